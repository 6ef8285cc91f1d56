"""Tokenisation, label masks and micro-batches (docs/method.md, Capture).

For a tuple (prompt, answer[, foil]):

    p = tok(prompt)                                   # the tokenizer's default special tokens (BOS where it adds one)
    a = tok(" " + answer, add_special_tokens=False)   # exactly one leading space, tokenised apart from the prompt
    input_ids = p + a[:-1]                            # length len(p) + len(a) - 1
    labels    = [-100] * (len(p) - 1) + a             # pre-shifted: logits[t] predict labels[t]

so the answer positions are P = {len(p) - 1, ..., len(p) + len(a) - 2}. A foil f (CounterFact) is tokenised like the
answer and laid on the same positions, `foil_labels = [-100] * (len(p) - 1) + f[:len(a)]`: only positions i <=
min(len(a), len(f)) can be compared, since the input is teacher-forced with the answer (docs/method.md, Evaluation).

`collate` stably sorts the tuples by token length, cuts them into micro-batches of `micro_batch` tuples (the unit of
loss normalisation), and right-pads: pad_token_id (0 if the tokenizer has none) in the inputs, -100 in the labels,
0 in the attention mask.

With `subjects`, each row also marks the last token of its subject inside the prompt (`subject_mask`): the position
where a transformer's middle layers hold what it recalls about the subject, which an edit can read its keys from
(`editor.key_positions`). It is found by tokenising the prompt up to the end of the subject's first occurrence:

    s = len(tok(prompt[:end_of_subject])) - 1          # same special tokens as the prompt itself

A subject that is absent from its prompt (or None) marks nothing in that row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from typing import Iterator
from typing import Literal
from typing import Sequence

import torch

from emsedit_fast.data.schemas import EditRecord

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
TUPLE_KINDS = ("edit", "equiv", "unrel", "portability")
# which token positions of a batch: the answer positions, each prompt's last subject token (the answer positions of
# a row whose prompt names no subject), both, or every non-pad token
Positions = Literal["answer", "subject", "answer_subject", "all"]


@dataclass
class TokenBatch:
    """Padded token tensors for a list of (prompt, answer[, foil]) tuples, sorted by length.

    input_ids: (B, T) int64, right-padded with the pad id. attention_mask: (B, T) int64, 1 on tokens, 0 on padding.
    labels: (B, T) int64, pre-shifted (logits[:, t] predict labels[:, t]); -100 off the answer positions and on padding.
    micro_batch: (B,) int64, loss-group id of each row (rows [k*m, (k+1)*m) form group k, m = micro_batch size).
    order: (B,) int64, index of each row in the input list (row r holds tuple order[r]).
    foil_labels: (B, T) int64 or None, the foil tokens on the answer positions (only the first min(L, L_f)); -100
    elsewhere, and on every position of rows without a foil. None when no tuple has a foil.
    subject_mask: (B, T) bool or None, True at the last subject token of each row's prompt (module docstring); None
    when collate was given no subjects.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    micro_batch: torch.Tensor
    order: torch.Tensor
    foil_labels: torch.Tensor | None = None
    subject_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TokenBatch:
        """A copy with every tensor on `device`."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return TokenBatch(move(self.input_ids), move(self.attention_mask), move(self.labels), move(self.micro_batch),
                          move(self.order), move(self.foil_labels), move(self.subject_mask))

    @property
    def answer_mask(self) -> torch.Tensor:
        """(B, T) bool: the answer positions (labels != -100)."""
        return self.labels != IGNORE_INDEX

    def positions(self, which: Positions) -> torch.Tensor:
        """(B, T) bool mask of the positions `which` names (see `Positions`). "subject" and "answer_subject" need
        subject_mask (collate with subjects); a row whose prompt names no subject falls back to its answer
        positions under "subject", so every row keeps at least one position."""
        if which == "answer":
            return self.answer_mask
        if which == "all":
            return self.attention_mask != 0
        if which not in ("subject", "answer_subject"):
            raise ValueError(f"positions must be one of answer, subject, answer_subject, all; got {which!r}")
        if self.subject_mask is None:
            raise ValueError(f"positions {which!r} need a batch tokenised with its subjects (collate(subjects=...))")
        answer = self.answer_mask
        if which == "answer_subject":
            return answer | self.subject_mask
        named = self.subject_mask.any(1, keepdim=True)
        return torch.where(named, self.subject_mask, answer)

    @property
    def n_micro_batches(self) -> int:
        return int(self.micro_batch.max().item()) + 1 if len(self) else 0

    def rows(self, start: int, stop: int) -> TokenBatch:
        """Rows [start, stop), with the trailing columns that are padding in every kept row removed."""
        width = max(int(self.attention_mask[start:stop].sum(1).max().item()), 1)
        foil = None if self.foil_labels is None else self.foil_labels[start:stop, :width]
        subject = None if self.subject_mask is None else self.subject_mask[start:stop, :width]
        return TokenBatch(self.input_ids[start:stop, :width], self.attention_mask[start:stop, :width],
                          self.labels[start:stop, :width], self.micro_batch[start:stop], self.order[start:stop], foil,
                          subject)

    def micro_batches(self) -> Iterator[TokenBatch]:
        """Each micro-batch as its own TokenBatch, trimmed to its longest row."""
        ids = self.micro_batch.tolist()
        start = 0
        for stop in range(1, len(ids) + 1):
            if stop == len(ids) or ids[stop] != ids[start]:
                yield self.rows(start, stop)
                start = stop

    def in_input_order(self, values: torch.Tensor) -> torch.Tensor:
        """Per-row `values` (B, ...) in row order -> the same values in the order of the input tuples."""
        out = torch.empty_like(values)
        out[self.order.to(values.device)] = values
        return out


def _tokens(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    # One batched call: the fast tokenizers encode a list in Rust, much quicker than one call per text.
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]


def _short(text: Any, limit: int = 60) -> str:
    """repr of `text`, elided in the middle past `limit` characters (error messages stay one readable line)."""
    shown = repr(text)
    return shown if len(shown) <= limit else f"{shown[:limit // 2]}...{shown[-(limit // 2):]} ({len(text)} chars)"


def _check_pair(prompt: str, answer: str, p: list[int], a: list[int], max_length: int) -> None:
    if not isinstance(prompt, str) or not prompt.strip() or not p:
        raise ValueError(f"collate: prompt {_short(prompt)} is empty or tokenises to nothing")
    if not isinstance(answer, str) or not answer.strip() or not a:
        raise ValueError(f"collate: answer {_short(answer)} (with its leading space) of prompt {_short(prompt)} "
                         "tokenises to nothing")
    if len(p) + len(a) - 1 > max_length:
        raise ValueError(f"collate: prompt {_short(prompt)} with answer {_short(answer)} is {len(p) + len(a) - 1} "
                         f"tokens (prompt {len(p)}, answer {len(a)}), more than max_length={max_length}; prompts are "
                         "never truncated silently")


def tokenize_pair(tokenizer: Any, prompt: str, answer: str, max_length: int = 128) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one tuple as plain lists (see the module docstring)."""
    p = _tokens(tokenizer, [prompt], True)[0]
    a = _tokens(tokenizer, [" " + answer], False)[0]
    _check_pair(prompt, answer, p, a, max_length)
    return p + a[:-1], [IGNORE_INDEX] * (len(p) - 1) + a


def subject_positions(tokenizer: Any, prompts: Sequence[str], subjects: Sequence[str | None],
                      prompt_ids: Sequence[list[int]]) -> list[int | None]:
    """For each prompt, the index of the last token of its subject (module docstring), or None where the subject is
    None or does not occur in the prompt. prompt_ids: the prompts' token ids (an index never passes the last one)."""
    if len(subjects) != len(prompts):
        raise ValueError(f"collate: {len(subjects)} subjects for {len(prompts)} tuples")
    ends: list[int | None] = []
    for i, (prompt, subject) in enumerate(zip(prompts, subjects)):
        if subject is not None and not isinstance(subject, str):
            raise ValueError(f"collate: subject {i} must be a string or None, got {subject!r}")
        name = (subject or "").strip()
        at = prompt.find(name) if name else -1
        ends.append(at + len(name) if at >= 0 else None)
    found = [i for i, end in enumerate(ends) if end is not None]
    prefixes = _tokens(tokenizer, [prompts[i][:ends[i]] for i in found], True)
    out: list[int | None] = [None] * len(prompts)
    for i, prefix in zip(found, prefixes):
        out[i] = min(max(len(prefix) - 1, 0), len(prompt_ids[i]) - 1)
    return out


def collate(tokenizer: Any, pairs: Sequence[tuple], micro_batch: int = 4, max_length: int = 128,
            subjects: Sequence[str | None] | None = None) -> TokenBatch:
    """Tokenise (prompt, answer) or (prompt, answer, foil) tuples into one padded TokenBatch (module docstring).

    Rows are stably sorted by input length, then grouped in micro-batches of `micro_batch` rows. A foil of None means
    no foil. subjects: one per tuple (or None), marks `subject_mask`. Raises ValueError, naming the prompt, when a
    prompt or answer tokenises to nothing or a sequence is longer than max_length.
    """
    if not pairs:
        raise ValueError("collate: no tuples given")
    if micro_batch < 1:
        raise ValueError(f"collate: micro_batch must be >= 1, got {micro_batch}")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) not in (2, 3):
            raise ValueError(f"collate: tuple {i} must be (prompt, answer) or (prompt, answer, foil), got {pair!r}")
    prompts = [pair[0] for pair in pairs]
    answers = [pair[1] for pair in pairs]
    foils = [pair[2] if len(pair) == 3 else None for pair in pairs]
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        if not isinstance(prompt, str) or not isinstance(answer, str):
            raise ValueError(f"collate: tuple {i} must hold strings, got {pairs[i]!r}")
    p_ids = _tokens(tokenizer, prompts, True)
    a_ids = _tokens(tokenizer, [" " + a for a in answers], False)
    has_foil = [f is not None for f in foils]
    f_ids = iter(_tokens(tokenizer, [" " + f for f in foils if f is not None], False))

    inputs, labels, foil_rows = [], [], []
    for prompt, answer, foil, p, a in zip(prompts, answers, foils, p_ids, a_ids):
        _check_pair(prompt, answer, p, a, max_length)
        inputs.append(p + a[:-1])
        labels.append([IGNORE_INDEX] * (len(p) - 1) + a)
        if foil is None:
            foil_rows.append([])
            continue
        f = next(f_ids)
        if not foil.strip() or not f:
            raise ValueError(f"collate: foil {foil!r} of prompt {prompt!r} tokenises to nothing")
        # Only the first min(L, L_f) foil tokens sit on answer positions; the rest cannot be compared.
        foil_rows.append([IGNORE_INDEX] * (len(p) - 1) + f[:len(a)])

    subject_at = subject_positions(tokenizer, prompts, subjects, p_ids) if subjects is not None else None
    order = sorted(range(len(pairs)), key=lambda i: len(inputs[i]))  # list.sort is stable
    width = max(len(x) for x in inputs)
    pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    n = len(pairs)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    label_t = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    foil_t = torch.full((n, width), IGNORE_INDEX, dtype=torch.long) if any(has_foil) else None
    subject_t = torch.zeros((n, width), dtype=torch.bool) if subject_at is not None else None
    for row, i in enumerate(order):  # one Python step per row, not per token
        length = len(inputs[i])
        input_ids[row, :length] = torch.tensor(inputs[i], dtype=torch.long)
        attention[row, :length] = 1
        label_t[row, :length] = torch.tensor(labels[i], dtype=torch.long)
        if foil_t is not None and foil_rows[i]:
            foil_t[row, :len(foil_rows[i])] = torch.tensor(foil_rows[i], dtype=torch.long)
        if subject_t is not None and subject_at[i] is not None:
            subject_t[row, subject_at[i]] = True
    return TokenBatch(
        input_ids=input_ids,
        attention_mask=attention,
        labels=label_t,
        micro_batch=torch.arange(n, dtype=torch.long) // micro_batch,
        order=torch.tensor(order, dtype=torch.long),
        foil_labels=foil_t,
        subject_mask=subject_t,
    )


def record_tuples(records: Sequence[EditRecord], which: str, *, first_only: bool = False
                  ) -> tuple[list[tuple[str, ...]], list[int]]:
    """Tuples of one kind for `records`, and for each tuple the index of its record.

    which: "edit" (prompt, target_new), "equiv" (each rephrase, target_new), "unrel" (each locality prompt, its answer)
    or "portability" (each two-hop prompt, its answer). Margin records (kind "counterfact") add the foil:
    ground_truth for edit and equiv, target_new for unrel (roles swapped); portability tuples never have one.
    first_only: only the first rephrase / locality prompt of each record, as training uses, and then a record without
    one is an error (ValueError naming its case_id). Otherwise every prompt is used, as evaluation does.
    """
    if which not in TUPLE_KINDS:
        raise ValueError(f"record_tuples: which must be one of {TUPLE_KINDS}, got {which!r}")
    tuples: list[tuple[str, ...]] = []
    owners: list[int] = []
    for index, r in enumerate(records):
        margin = r.metric_family == "margin"
        if which == "edit":
            items = [(r.prompt, r.target_new, r.ground_truth) if margin else (r.prompt, r.target_new)]
        elif which == "equiv":
            items = [(p, r.target_new, r.ground_truth) if margin else (p, r.target_new) for p in r.rephrase_prompts]
        elif which == "unrel":
            items = [(p, a, r.target_new) if margin else (p, a)
                     for p, a in zip(r.locality_prompts, r.locality_answers)]
        else:
            items = list(zip(r.portability_prompts, r.portability_answers))
        if first_only and which != "edit":
            if not items:
                raise ValueError(f"record_tuples: record {r.case_id!r} has no {which} prompt, which training needs")
            items = items[:1]
        tuples.extend(items)
        owners.extend([index] * len(items))
    return tuples, owners


def edit_tuples(records: Sequence[EditRecord]) -> list[tuple[str, ...]]:
    """One edit tuple per record: (prompt, target_new[, ground_truth as foil for counterfact])."""
    return record_tuples(records, "edit")[0]


def equiv_tuples(records: Sequence[EditRecord], first_only: bool = True) -> list[tuple[str, ...]]:
    """Paraphrase tuples: by default one per record (the first rephrase), as meta-training uses."""
    return record_tuples(records, "equiv", first_only=first_only)[0]


def unrel_tuples(records: Sequence[EditRecord], first_only: bool = True) -> list[tuple[str, ...]]:
    """Locality tuples: by default one per record (the first locality prompt), as the KL loss uses."""
    return record_tuples(records, "unrel", first_only=first_only)[0]


def portability_tuples(records: Sequence[EditRecord]) -> list[tuple[str, ...]]:
    """Every two-hop (prompt, answer) tuple of every record."""
    return record_tuples(records, "portability")[0]
