"""Edit records, the record formats, and the loaders that validate them (sources: `emsedit_fast.data.sources`).

One record type, `EditRecord`, serves every dataset. Its `kind` fixes the metric family (docs/method.md,
"Evaluation"):

- "counterfact": the new-vs-old token margin. ES / GS: target_new must beat ground_truth (the foil); LS, roles
  swapped: each neighbourhood answer must beat target_new.
- "zsre" and "facts": token top-1 accuracy. ES / GS: accuracy on target_new; LS: accuracy against the gold
  locality answer (LS-gold) and agreement with the pre-edit model (LS-agree).

"facts" is the kind of users' own facts in the plain JSONL format; a plain record may declare `"kind": "counterfact"`
(with a `ground_truth`) to be scored by the margin instead.

Record formats (`load_records(source, format=...)`); the source may be a JSON list or JSON Lines file, a Parquet file,
a folder, a `datasets` object or a cached Hub dataset id (`emsedit_fast.data.sources`):

- "counterfact": flat MEND/EasyEdit CounterFact (case_id, prompt, target_new, subject, ground_truth, rephrase_prompt,
  locality_prompt, locality_ground_truth).
- "counterfact_rome": ROME/MEMIT CounterFact (requested_rewrite {prompt with "{}", subject, target_new.str,
  target_true.str}, paraphrase_prompts, neighborhood_prompts whose answers are target_true, generation_prompts).
- "zsre": zsRE in MEND format (src, alt, answers, rephrase, loc, loc_ans). `loc` keeps its "nq question: " prefix and
  gets "?" appended (reference behaviour); ground_truth = answers[0].
- "facts": plain records (prompt, target_new, optional case_id, kind, subject, ground_truth, rephrases,
  locality_prompts, locality_answers, portability_prompts, portability_answers, generation_prompts). This is also
  what `EditRecord.to_dict` writes, so `save_records` / `load_records` round-trip.

Cleaning: every answer string is stripped; a record whose stripped edit target is empty is dropped (2 such records
in the shipped zsRE file). Drops are never silent: they are logged and listed in `LoadResult.dropped`. Any other
malformed record raises `DataError` naming the source, the record (index, and line for JSON Lines; row for a
dataset), the case_id and the field, unless `skip_invalid=True`, in which case it is listed in `LoadResult.skipped`.
Prompts are kept verbatim (CounterFact paraphrases keep their leading context sentence).

`load_records` returns every record in a list; `iter_records` yields them one at a time, for sources too large to
hold (hundreds of thousands of edits).

(About 590 lines: the record type, the parsers of its four formats and the validating loop that names a bad record's
source, position, case_id and field are one concept; how the raw objects are read lives in `sources`.)
"""

from __future__ import annotations

import difflib
import itertools
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from typing import Callable
from typing import Iterator
from typing import Sequence

logger = logging.getLogger(__name__)

KINDS = ("counterfact", "zsre", "facts")
FORMATS = ("counterfact", "counterfact_rome", "zsre", "facts")

# Keys of the plain ("facts") format, in the order `EditRecord.to_dict` writes them.
PLAIN_KEYS = (
    "case_id",
    "kind",
    "prompt",
    "target_new",
    "ground_truth",
    "subject",
    "rephrases",
    "locality_prompts",
    "locality_answers",
    "portability_prompts",
    "portability_answers",
    "generation_prompts",
)
_PLAIN_KEY_SET = frozenset(PLAIN_KEYS)


class DataError(ValueError):
    """A data file or record that cannot be used. The message names the file, record, case_id and field."""


class RecordError(DataError):
    """A problem with one field of one record; loaders add the file and record position to the message."""

    def __init__(self, field_name: str, problem: str, case_id: str | None = None):
        self.field = field_name
        self.problem = problem
        self.case_id = case_id
        where = f"EditRecord(case_id={case_id!r}): " if case_id is not None else ""
        super().__init__(f"{where}field {field_name!r}: {problem}")


class _EmptyTarget(Exception):
    """Raised by a format parser when the stripped edit target is empty: a cleaning drop, not an error."""

    def __init__(self, field_name: str, case_id: str):
        self.field = field_name
        self.case_id = case_id


def _check_prompt(value: Any, name: str, case_id: str | None) -> None:
    if not isinstance(value, str):
        raise RecordError(name, f"expected a string, got {type(value).__name__}", case_id)
    if not value.strip():
        raise RecordError(name, "empty prompt", case_id)


def _check_answer(value: Any, name: str, case_id: str | None) -> None:
    if not isinstance(value, str):
        raise RecordError(name, f"expected a string, got {type(value).__name__}", case_id)
    if not value.strip():
        raise RecordError(name, "empty answer", case_id)
    if value != value.strip():
        # Tokenisation adds exactly one leading space to an answer; stray whitespace would change the tokens.
        raise RecordError(name, f"answer {value!r} has leading or trailing whitespace (strip it)", case_id)


@dataclass(frozen=True, kw_only=True)
class EditRecord:
    """One edit request with its evaluation probes. Immutable; list arguments are stored as tuples.

    case_id: unique id (str). prompt: edit prompt x. target_new: the answer to edit in (stripped, non-empty).
    kind: "counterfact" (margin metrics, needs ground_truth != target_new), "zsre" or "facts" (token accuracy).
    ground_truth: the old (true) answer; the foil of the CounterFact margin, else informational. subject: informational.
    rephrase_prompts: paraphrases x' (generalisation), answered by target_new.
    locality_prompts / locality_answers: unrelated or neighbourhood prompts and their answers (same length).
    portability_prompts / portability_answers: multi-hop probes answered consistently with the edit (same length).
    generation_prompts: prompts for free generation (fluency).

    Training uses the first rephrase and the first locality prompt; evaluation uses all of them.
    """

    case_id: str
    prompt: str
    target_new: str
    kind: str
    ground_truth: str | None = None
    subject: str | None = None
    rephrase_prompts: tuple[str, ...] = ()
    locality_prompts: tuple[str, ...] = ()
    locality_answers: tuple[str, ...] = ()
    portability_prompts: tuple[str, ...] = ()
    portability_answers: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        cid = self.case_id if isinstance(self.case_id, str) else None
        if not isinstance(self.case_id, str) or not self.case_id:
            raise RecordError("case_id", f"expected a non-empty string, got {self.case_id!r}")
        for name in ("rephrase_prompts", "locality_prompts", "locality_answers", "portability_prompts",
                     "portability_answers", "generation_prompts"):
            value = getattr(self, name)
            if type(value) is tuple:  # what the parsers pass: skip the (slow) abstract Iterable check
                continue
            if isinstance(value, str) or not isinstance(value, Iterable):
                raise RecordError(name, f"expected a sequence of strings, got {type(value).__name__}", cid)
            # frozen dataclass: object.__setattr__ is the documented way to normalise fields in __post_init__
            object.__setattr__(self, name, tuple(value))
        if self.kind not in KINDS:
            raise RecordError("kind", f"must be one of {KINDS}, got {self.kind!r}", cid)
        _check_prompt(self.prompt, "prompt", cid)
        _check_answer(self.target_new, "target_new", cid)
        if self.ground_truth is not None:
            _check_answer(self.ground_truth, "ground_truth", cid)
        if self.subject is not None and not isinstance(self.subject, str):
            raise RecordError("subject", f"expected a string or null, got {type(self.subject).__name__}", cid)
        if self.kind == "counterfact":
            if self.ground_truth is None:
                raise RecordError("ground_truth", "required for kind 'counterfact' (it is the margin foil)", cid)
            if self.ground_truth == self.target_new:
                raise RecordError("target_new", f"equals ground_truth {self.ground_truth!r}: nothing to edit", cid)
        for i, p in enumerate(self.rephrase_prompts):
            _check_prompt(p, f"rephrase_prompts[{i}]", cid)
        for i, p in enumerate(self.generation_prompts):
            _check_prompt(p, f"generation_prompts[{i}]", cid)
        for prompts, answers in (("locality_prompts", "locality_answers"),
                                 ("portability_prompts", "portability_answers")):
            ps, ans = getattr(self, prompts), getattr(self, answers)
            if len(ps) != len(ans):
                raise RecordError(answers, f"has {len(ans)} entries but {prompts} has {len(ps)}", cid)
            for i, (p, a) in enumerate(zip(ps, ans)):
                _check_prompt(p, f"{prompts}[{i}]", cid)
                _check_answer(a, f"{answers}[{i}]", cid)

    @property
    def metric_family(self) -> str:
        """The metric family: "margin" for kind "counterfact", "accuracy" otherwise (docs/method.md, "Evaluation")."""
        return "margin" if self.kind == "counterfact" else "accuracy"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict in the plain ("facts") format; `record_from_dict` and `load_records` read it back."""
        return {
            "case_id": self.case_id,
            "kind": self.kind,
            "prompt": self.prompt,
            "target_new": self.target_new,
            "ground_truth": self.ground_truth,
            "subject": self.subject,
            "rephrases": list(self.rephrase_prompts),
            "locality_prompts": list(self.locality_prompts),
            "locality_answers": list(self.locality_answers),
            "portability_prompts": list(self.portability_prompts),
            "portability_answers": list(self.portability_answers),
            "generation_prompts": list(self.generation_prompts),
        }


# ---------------------------------------------------------------------------------------------------------------------
# Field access helpers for the format parsers. Each raises RecordError naming the field (dotted for nested fields).


def _get(obj: dict, key: str, case_id: str, *, required: bool = True, path: str | None = None) -> Any:
    name = path or key
    if key not in obj or obj[key] is None:
        if required:
            raise RecordError(name, "missing", case_id)
        return None
    return obj[key]


def _prompt(obj: dict, key: str, case_id: str, *, path: str | None = None) -> str:
    value = _get(obj, key, case_id, path=path)
    _check_prompt(value, path or key, case_id)
    return value


def _answer(obj: dict, key: str, case_id: str, *, required: bool = True, path: str | None = None) -> str | None:
    """Stripped answer string. Empty after stripping is an error here; edit targets use _target."""
    value = _get(obj, key, case_id, required=required, path=path)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecordError(path or key, f"expected a string, got {type(value).__name__}", case_id)
    value = value.strip()
    if not value:
        raise RecordError(path or key, "empty answer", case_id)
    return value


def _target(obj: dict, key: str, case_id: str, *, path: str | None = None) -> str:
    """Stripped edit target; an empty one is the cleaning drop (reported by the loader)."""
    value = _get(obj, key, case_id, path=path)
    if not isinstance(value, str):
        raise RecordError(path or key, f"expected a string, got {type(value).__name__}", case_id)
    value = value.strip()
    if not value:
        raise _EmptyTarget(path or key, case_id)
    return value


def _str_list(obj: dict, key: str, case_id: str, *, required: bool = False, answers: bool = False) -> tuple[str, ...]:
    """A list of strings; a bare string counts as a one-element list. Answers are stripped and must be non-empty."""
    value = _get(obj, key, case_id, required=required)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise RecordError(key, f"expected a list of strings, got {type(value).__name__}", case_id)
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise RecordError(f"{key}[{i}]", f"expected a string, got {type(item).__name__}", case_id)
        if answers:
            item = item.strip()
            if not item:
                raise RecordError(f"{key}[{i}]", "empty answer", case_id)
        elif not item.strip():
            raise RecordError(f"{key}[{i}]", "empty prompt", case_id)
        out.append(item)
    return tuple(out)


def _case_id(obj: dict, index: int, default_prefix: str) -> str:
    value = obj.get("case_id")
    if value is None:
        return f"{default_prefix}{index}"
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value):
        raise RecordError("case_id", f"expected an integer or a non-empty string, got {value!r}")
    return str(value)


# ---------------------------------------------------------------------------------------------------------------------
# Format parsers: (json object, index in file) -> EditRecord. They raise RecordError or _EmptyTarget.


def _parse_counterfact(obj: dict, index: int) -> EditRecord:
    cid = _case_id(obj, index, "cf-")
    return EditRecord(
        case_id=cid,
        kind="counterfact",
        prompt=_prompt(obj, "prompt", cid),
        target_new=_target(obj, "target_new", cid),
        ground_truth=_answer(obj, "ground_truth", cid),
        subject=_get(obj, "subject", cid, required=False),
        # Kept verbatim, including any leading context sentence.
        rephrase_prompts=_str_list(obj, "rephrase_prompt", cid, required=True),
        locality_prompts=_str_list(obj, "locality_prompt", cid, required=True),
        locality_answers=_str_list(obj, "locality_ground_truth", cid, required=True, answers=True),
    )


def _parse_counterfact_rome(obj: dict, index: int) -> EditRecord:
    cid = _case_id(obj, index, "cf-")
    rw = _get(obj, "requested_rewrite", cid)
    if isinstance(rw, list) and len(rw) == 1:  # some dumps wrap the single rewrite in a list
        rw = rw[0]
    if not isinstance(rw, dict):
        raise RecordError("requested_rewrite", f"expected an object, got {type(rw).__name__}", cid)
    template = _prompt(rw, "prompt", cid, path="requested_rewrite.prompt")
    subject = _prompt(rw, "subject", cid, path="requested_rewrite.subject")
    if template.count("{}") != 1:
        raise RecordError("requested_rewrite.prompt", f"needs exactly one '{{}}' placeholder: {template!r}", cid)
    new = _get(rw, "target_new", cid, path="requested_rewrite.target_new")
    true = _get(rw, "target_true", cid, path="requested_rewrite.target_true")
    for name, value in (("target_new", new), ("target_true", true)):
        if not isinstance(value, dict):
            raise RecordError(f"requested_rewrite.{name}", f"expected an object with 'str', got {value!r}", cid)
    target_new = _target(new, "str", cid, path="requested_rewrite.target_new.str")
    target_true = _answer(true, "str", cid, path="requested_rewrite.target_true.str")
    neighbours = _str_list(obj, "neighborhood_prompts", cid)
    return EditRecord(
        case_id=cid,
        kind="counterfact",
        # str.replace, not str.format: templates may contain other braces.
        prompt=template.replace("{}", subject),
        target_new=target_new,
        ground_truth=target_true,
        subject=subject,
        rephrase_prompts=_str_list(obj, "paraphrase_prompts", cid),
        locality_prompts=neighbours,
        # Neighbourhood subjects share the true object, so their answer is target_true.
        locality_answers=(target_true,) * len(neighbours),
        generation_prompts=_str_list(obj, "generation_prompts", cid),
    )


def _parse_zsre(obj: dict, index: int) -> EditRecord:
    cid = _case_id(obj, index, "zsre-")
    answers = _str_list(obj, "answers", cid, answers=True)
    loc = _prompt(obj, "loc", cid)
    return EditRecord(
        case_id=cid,
        kind="zsre",
        prompt=_prompt(obj, "src", cid),
        target_new=_target(obj, "alt", cid),
        ground_truth=answers[0] if answers else None,
        subject=_get(obj, "subject", cid, required=False),
        rephrase_prompts=(_prompt(obj, "rephrase", cid),),
        # Reference behaviour: keep the "nq question: " prefix and append "?".
        locality_prompts=(loc + "?",),
        locality_answers=(_answer(obj, "loc_ans", cid),),
    )


def _parse_facts(obj: dict, index: int) -> EditRecord:
    cid = _case_id(obj, index, "fact-")
    unknown = sorted(set(obj) - _PLAIN_KEY_SET)
    if unknown:
        # Strict: a typo in a user's own file would otherwise silently drop probes.
        hints = {k: difflib.get_close_matches(k, PLAIN_KEYS, n=1) for k in unknown}
        text = ", ".join(f"{k!r}" + (f" (did you mean {m[0]!r}?)" if m else "") for k, m in hints.items())
        raise RecordError(unknown[0], f"unknown key(s) {text}; valid keys: {', '.join(PLAIN_KEYS)}", cid)
    kind = obj.get("kind", "facts")
    return EditRecord(
        case_id=cid,
        kind=kind,
        prompt=_prompt(obj, "prompt", cid),
        target_new=_target(obj, "target_new", cid),
        ground_truth=_answer(obj, "ground_truth", cid, required=False),
        subject=_get(obj, "subject", cid, required=False),
        rephrase_prompts=_str_list(obj, "rephrases", cid),
        locality_prompts=_str_list(obj, "locality_prompts", cid),
        locality_answers=_str_list(obj, "locality_answers", cid, answers=True),
        portability_prompts=_str_list(obj, "portability_prompts", cid),
        portability_answers=_str_list(obj, "portability_answers", cid, answers=True),
        generation_prompts=_str_list(obj, "generation_prompts", cid),
    )


_PARSERS: dict[str, Callable[[dict, int], EditRecord]] = {
    "counterfact": _parse_counterfact,
    "counterfact_rome": _parse_counterfact_rome,
    "zsre": _parse_zsre,
    "facts": _parse_facts,
}


def record_from_dict(obj: dict[str, Any], format: str = "facts", index: int = 0) -> EditRecord:
    """Parse one JSON object of the given format (see the module docstring). Raises RecordError / DataError."""
    if format not in _PARSERS:
        raise DataError(f"unknown format {format!r}; expected one of {FORMATS}")
    try:
        return _PARSERS[format](obj, index)
    except _EmptyTarget as err:
        raise RecordError(err.field, "empty edit target after stripping", err.case_id) from None


def detect_format(obj: dict[str, Any]) -> str | None:
    """Guess the format from one record's keys; None if no format fits."""
    keys = set(obj)
    if "requested_rewrite" in keys:
        return "counterfact_rome"
    if {"src", "alt"} <= keys:
        return "zsre"
    if keys & {"rephrase_prompt", "locality_prompt", "locality_ground_truth"}:
        return "counterfact"
    if {"prompt", "target_new"} <= keys:
        return "facts"
    if keys & {"prompt", "target_new"} and keys <= _PLAIN_KEY_SET:
        return "facts"  # a plain record missing one of them: the facts parser then names the missing field
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Loading: any source (emsedit_fast.data.sources) -> validated records, lazily (iter_records) or at once (load_records)


@dataclass
class LoadResult:
    """What `load_records` read.

    path: the source's label (a file path, "Dataset split 'train'", "owner/name split 'train'"). records: the valid
    records, in source order. skipped: (index, reason) for invalid records skipped under skip_invalid=True. dropped:
    (index, reason) for records removed by the cleaning rule "empty edit target". n_read: number of objects read.
    Index = 0-based position of the object in the source.
    """

    path: str
    format: str
    records: list[EditRecord]
    skipped: list[tuple[int, str]] = field(default_factory=list)
    dropped: list[tuple[int, str]] = field(default_factory=list)
    n_read: int = 0

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[EditRecord]:
        return iter(self.records)

    def summary(self) -> dict[str, Any]:
        """JSON-ready account of the load, to be stored with a run's outputs."""
        return {
            "path": self.path,
            "format": self.format,
            "n_read": self.n_read,
            "n_records": len(self.records),
            "dropped": [list(x) for x in self.dropped],
            "skipped": [list(x) for x in self.skipped],
        }

    def to_dataset(self):
        """The records as a `datasets.Dataset` (plain-format columns); see `records_to_dataset`."""
        return records_to_dataset(self.records)


DROP_NOTE = "; dropped by the cleaning rule (empty edit target)"


class RecordStream:
    """The records of one source, parsed and validated one at a time as they are iterated (once).

    source: the source's label. format: the record format (detected when "auto"). While and after iterating:
    n_read (objects read), skipped and dropped (as in `LoadResult`). Memory: one record at a time plus the index of
    case_ids seen (duplicates are malformed records), about 100 bytes per record.
    """

    def __init__(self, source: str, format: str, items: Iterator[tuple[Any, str]], skip_invalid: bool):
        self.source, self.format = source, format
        self.skipped: list[tuple[int, str]] = []
        self.dropped: list[tuple[int, str]] = []
        self.n_read = 0
        self._items, self._skip_invalid, self._started = items, skip_invalid, False

    def __iter__(self) -> Iterator[EditRecord]:
        if self._started:
            raise RuntimeError(f"{self.source}: a RecordStream is read once; call iter_records again to re-read")
        self._started = True
        return self._records()

    def _records(self) -> Iterator[EditRecord]:
        parser, label = _PARSERS[self.format], self.source
        seen: dict[str, int] = {}
        for index, (obj, where) in enumerate(self._items):
            self.n_read = index + 1
            case_id = obj.get("case_id") if isinstance(obj, dict) else None
            try:
                if not isinstance(obj, dict):
                    raise RecordError("<record>", f"expected a JSON object, got {type(obj).__name__}")
                record = parser(obj, index)
                if record.case_id in seen:
                    raise RecordError("case_id", f"duplicate of record {seen[record.case_id]}", record.case_id)
            except _EmptyTarget as drop:
                self.dropped.append((index, f"{label}: {where} (case_id={drop.case_id}): field {drop.field!r}: "
                                            f"empty edit target after stripping{DROP_NOTE}"))
                continue
            except RecordError as err:
                cid = err.case_id if err.case_id is not None else case_id
                reason = f"{label}: {where} (case_id={cid}): field {err.field!r}: {err.problem}"
                if not self._skip_invalid:
                    raise DataError(reason) from None
                self.skipped.append((index, reason))
                continue
            seen[record.case_id] = index
            yield record
        if self.dropped:
            logger.warning("%s: dropped %d record(s) with an empty edit target: indices %s", label,
                           len(self.dropped), [i for i, _ in self.dropped])
        if self.skipped:
            logger.warning("%s: skipped %d invalid record(s); first: %s", label, len(self.skipped),
                           self.skipped[0][1])
        logger.info("%s: read %d %s record(s) of %d", label, self.n_read - len(self.dropped) - len(self.skipped),
                    self.format, self.n_read)


def iter_records(source: Any, format: str = "auto", *, split: str | None = None,
                 skip_invalid: bool = False) -> RecordStream:
    """The records of `source`, read lazily: constant memory however many records the source holds.

    source: a JSON / JSON Lines / Parquet file, a folder (data files, or a `save_to_disk` dataset), a
    `datasets.Dataset` / `IterableDataset` / `DatasetDict`, or a Hub dataset id in the local cache (see
    `emsedit_fast.data.sources`). split: which split of a source with several. format and skip_invalid as in
    `load_records`. The source is opened and its first record read (format detection) before this returns, so an
    unreadable, empty or unrecognised source raises here; a malformed record raises DataError when it is reached.
    """
    from emsedit_fast.data.sources import describe
    from emsedit_fast.data.sources import open_source

    if format != "auto" and format not in _PARSERS:
        raise DataError(f"{describe(source)}: unknown format {format!r}; expected 'auto' or one of {FORMATS}")
    raw = open_source(source, split)
    items, head = iter(raw.items), []
    for item in items:  # up to the first object (format detection looks at its keys)
        head.append(item)
        if isinstance(item[0], dict) or format != "auto":
            break
    if not head:
        raise DataError(f"{raw.label}: contains no records")
    if format == "auto":
        first = head[-1][0] if isinstance(head[-1][0], dict) else None
        format = detect_format(first) if first is not None else None
        if format is None:
            keys = sorted(first) if first is not None else []
            raise DataError(f"{raw.label}: cannot detect the format from the keys {keys} of the first record; "
                            f"pass format= one of {FORMATS}")
    return RecordStream(raw.label, format, itertools.chain(head, items), skip_invalid)


def load_records(source: Any, format: str = "auto", *, split: str | None = None,
                 skip_invalid: bool = False) -> LoadResult:
    """Load and validate every edit record of `source` (any source `iter_records` takes) into a list.

    format: "auto" (detected from the first record's keys) or one of FORMATS. split: which split of a `datasets`
    source with several. skip_invalid: skip malformed records (listed in `LoadResult.skipped`) instead of raising.
    Records whose stripped edit target is empty are always dropped and listed in `LoadResult.dropped`. Duplicate
    case_ids are malformed records.

    Raises DataError naming the source, the record (index, JSON Lines line, or Dataset row), the case_id and the field
    for corrupt or truncated files, an undetectable format, and, unless skip_invalid, any malformed record.
    """
    stream = iter_records(source, format, split=split, skip_invalid=skip_invalid)
    records = list(stream)
    return LoadResult(path=stream.source, format=stream.format, records=records, skipped=stream.skipped,
                      dropped=stream.dropped, n_read=stream.n_read)


def save_records(records: Sequence[EditRecord], path: str | os.PathLike) -> None:
    """Write records as JSON Lines in the plain format (readable by `load_records(path)`)."""
    with open(path, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")


def _features():
    import datasets

    strings = datasets.List(datasets.Value("string"))
    return datasets.Features({
        key: strings if key in ("rephrases", "locality_prompts", "locality_answers", "portability_prompts",
                                "portability_answers", "generation_prompts") else datasets.Value("string")
        for key in PLAIN_KEYS
    })


def records_to_dataset(records: Sequence[EditRecord]):
    """A `datasets.Dataset` with one row per record and the plain-format columns (lists for the probe sets).

    Explicit features keep the column types stable when every list of a column is empty.
    """
    import datasets  # imported lazily: it costs about a second and most callers only need the records

    return datasets.Dataset.from_list([r.to_dict() for r in records], features=_features())


def records_from_dataset(dataset) -> list[EditRecord]:
    """Inverse of `records_to_dataset`: rows in the plain format back to records (DataError naming a bad row)."""
    return load_records(dataset, "facts").records

