"""Edit journal: every edit batch recorded as low-rank factors, so it can be undone, replayed or compacted exactly.

A journal is a folder; it persists the undo design of `emsedit_fast.history` (a base snapshot plus the recorded
updates after it):

    journal.jsonl                   append-only, one JSON line per event:
                                    {"type": "edit", "id", "time", facts (case ids, prompts, targets), editor
                                     checkpoint hash, base-model fingerprint, backends that ran, per-layer ||dW||_F,
                                     efficacy right after the edit, the factors file and its sha256, ...}
                                    {"type": "revert", "id": <edit id>, ...}: the edit is removed (its line stays)
                                    {"type": "compact", "id": <last folded edit id>, "base": <file>, ...}: every edit
                                     up to that id is folded into a new base snapshot
    base_snapshot.safetensors       the edited layers' unedited weights W0 (model dtype), written once
    bases/base-<id>.safetensors     the weights after the edits up to <id> (the latest one is the current base)
    factors/<id>.safetensors        one edit batch (an edit file, `emsedit_fast.editfiles`), plus the editor's
                                    normaliser statistics after the edit

Crash safety. Every file is written to a temporary name in the same folder, fsynced, then renamed into place. An edit
(or a compaction) is committed by appending its line to journal.jsonl (one write, then fsync) only after its file is
in place, so a crash leaves at worst a file that no line refers to (reported by `Journal.orphans()`, ignored, and
overwritten later) or a torn last line without its newline (ignored on read, truncated before the next append). A
line stores its file's sha256; a file that does not match is refused. A compaction deletes the folded edits' factors
files only after its line is committed.

Exactness guarantees (same backend, same device type: the backend and device type that applied each edit are recorded
and replay uses them, refusing to switch silently unless allow_backend_change=True):

* Replaying the active edits' factors in order onto the current base (`Journal.rebuild_`) reproduces, bit for bit,
  the weights the live editing session produced: apply is deterministic and the same grouped calls run on the same
  bytes.
* Reverting the LAST active edit is bit-exact: the rebuild without it equals the state before it was applied.
* Reverting an EARLIER edit rebuilds base + the remaining edits' stored factors, in order. This is bit-identical to
  applying those factors in that order, but the later edits' factors were computed on a model that contained the
  removed edit; they are not recomputed, so the result is not what editing without the removed edit would have given.
* Compaction keeps all of this for the edits after the compaction point; edits up to it can no longer be reverted one
  by one (the base snapshot W0 stays, so the unedited model is always recoverable).
* Subtraction is never used (round(round(W + d) - d) != W in bf16).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time

import torch

from emsedit_fast import ops
from emsedit_fast.checkpoint import sha256_file
from emsedit_fast.editfiles import META_KEY
from emsedit_fast.editfiles import atomic_save_safetensors
from emsedit_fast.editfiles import base_header
from emsedit_fast.editfiles import fsync_dir
from emsedit_fast.editfiles import load_edit_file
from emsedit_fast.editfiles import read_safetensors
from emsedit_fast.editfiles import save_edit_file
from emsedit_fast.editfiles import weights_by_name
from emsedit_fast.updates import AppliedEdit
from emsedit_fast.updates import JournalError
from emsedit_fast.updates import apply_edit_

log = logging.getLogger(__name__)

BASE_FORMAT = "emsedit_fast.journal.base"
MOMENTS = "edit_moment/"  # tensors of a compacted base that hold the key prior's edit term, not weights
FORMAT_VERSION = 1
EVENTS = ("edit", "revert", "compact")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ----------------------------------------------------------------------------------------------------------------------
# the journal


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Journal:
    """An edit journal folder (see the module docstring). Opening reads journal.jsonl; writes go through `record`,
    `mark_reverted` and `write_base`, each atomic and fsynced.

    Concurrent writers are serialised with an advisory lock on `<dir>/.lock`; a writer whose view is stale (another
    process appended since it was opened) is refused rather than committing an edit computed on other weights.
    """

    JSONL = "journal.jsonl"
    BASE = "base_snapshot.safetensors"
    BASES = "bases"
    FACTORS = "factors"

    def __init__(self, path: str, *, create: bool = True):
        self.path = os.path.abspath(path)
        if not os.path.isdir(self.path):
            if not create:
                raise JournalError(f"{path}: no journal folder")
            os.makedirs(self.path, exist_ok=True)
        self.lines: list[dict] = []
        self.torn_tail = False
        self._n_bytes = 0
        self.reload()

    # -- reading ---------------------------------------------------------------------------------------------------

    @property
    def jsonl(self) -> str:
        return os.path.join(self.path, self.JSONL)

    @property
    def base_path(self) -> str:
        return os.path.join(self.path, self.BASE)

    def factors_path(self, edit_id: int) -> str:
        return os.path.join(self.path, self.FACTORS, f"{int(edit_id)}.safetensors")

    def reload(self) -> None:
        """Re-read journal.jsonl. A last line without its newline (a torn append) is ignored with a warning."""
        self.lines, self.torn_tail = [], False
        try:
            with open(self.jsonl, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raw = b""
        complete = raw[:raw.rfind(b"\n") + 1]
        if len(complete) != len(raw):
            self.torn_tail = True
            log.warning("%s: ignoring a torn last line (%d bytes; an interrupted append)", self.jsonl,
                        len(raw) - len(complete))
        try:
            text = complete.decode("utf-8")
        except UnicodeDecodeError as err:
            lineno = complete.count(b"\n", 0, err.start) + 1
            raise JournalError(f"{self.jsonl}: line {lineno} is corrupt (not UTF-8 at byte {err.start})") from None
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError as err:
                raise JournalError(f"{self.jsonl}: line {lineno} is corrupt ({err})") from None
            if not (isinstance(event, dict) and event.get("type") in EVENTS and isinstance(event.get("id"), int)
                    and (event["type"] != "edit" or "factors" in event)
                    and (event["type"] != "compact" or "base" in event)):
                raise JournalError(f"{self.jsonl}: line {lineno} is corrupt (not an edit or revert event, nor a "
                                   f"compaction: {line[:80]!r})")
            self.lines.append(event)
        self._n_bytes = len(complete)

    @property
    def edits(self) -> list[dict]:
        """The edit lines, in order, each with "reverted": bool (and "reverted_time" when reverted) and "folded":
        bool (folded into a compacted base)."""
        reverted = {ln["id"]: ln for ln in self.lines if ln.get("type") == "revert"}
        upto = self.compacted_upto()
        out = []
        for ln in self.lines:
            if ln.get("type") == "edit":
                entry = dict(ln, reverted=ln["id"] in reverted, folded=ln["id"] <= upto)
                if entry["reverted"]:
                    entry["reverted_time"] = reverted[ln["id"]]["time"]
                out.append(entry)
        return out

    def compaction(self) -> dict | None:
        """The latest compaction line, or None."""
        return next((ln for ln in reversed(self.lines) if ln.get("type") == "compact"), None)

    def compacted_upto(self) -> int:
        """The id of the last edit folded into the current base (0: no compaction)."""
        last = self.compaction()
        return last["id"] if last else 0

    def active_ids(self) -> list[int]:
        """The edits replayed onto the current base: neither reverted nor folded, in order."""
        return [e["id"] for e in self.edits if not e["reverted"] and not e["folded"]]

    def entry(self, edit_id: int) -> dict:
        for e in self.edits:
            if e["id"] == int(edit_id):
                return e
        raise JournalError(f"{self.path}: no edit with id {edit_id}; recorded ids: {[e['id'] for e in self.edits]}")

    def next_id(self) -> int:
        return max((e["id"] for e in self.edits), default=self.compacted_upto()) + 1

    def orphans(self) -> list[str]:
        """Factors files no committed line refers to (left by an interrupted edit); they are never replayed."""
        folder = os.path.join(self.path, self.FACTORS)
        if not os.path.isdir(folder):
            return []
        known = {os.path.basename(e["factors"]) for e in self.edits}
        return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                      if n.endswith(".safetensors") and not n.startswith(".") and n not in known)

    def load_factors(self, edit_id: int) -> AppliedEdit:
        """The recorded factors of one edit, checked against the sha256 in its line."""
        entry = self.entry(edit_id)
        if entry["folded"]:
            raise JournalError(f"{self.path}: edit {edit_id} was folded into the base snapshot by a compaction; its "
                               "factors are no longer kept")
        path = os.path.join(self.path, entry["factors"])
        if not os.path.exists(path):
            raise JournalError(f"{path}: factors of edit {edit_id} missing (the journal and its folder disagree)")
        if sha256_file(path) != entry["factors_sha256"]:
            raise JournalError(f"{path}: contents do not match the sha256 recorded for edit {edit_id}")
        edits, _ = load_edit_file(path)
        edit = edits[0]
        edit.info = {k: v for k, v in entry.items() if k not in ("reverted", "reverted_time", "folded")}
        edit.edit_id = entry["id"]
        return edit

    def active_factors(self) -> list[AppliedEdit]:
        return [self.load_factors(i) for i in self.active_ids()]

    def has_base(self) -> bool:
        return os.path.exists(self.base_path)

    def _read_base(self, path: str, digest: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        if digest is not None and os.path.exists(path) and sha256_file(path) != digest:
            raise JournalError(f"{path}: contents do not match the sha256 recorded by its compaction")
        tensors, meta = read_safetensors(path)
        if meta.get("format") != BASE_FORMAT or meta.get("version") != FORMAT_VERSION:
            raise JournalError(f"{path}: not a version-{FORMAT_VERSION} base snapshot")
        return tensors, meta

    def original(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(W0 by module name, header) from base_snapshot.safetensors: the unedited weights."""
        return self._read_base(self.base_path)

    def base(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(weights by module name, header) the active edits replay onto: the latest compacted base, else W0."""
        last = self.compaction()
        if last is None:
            return self.original()
        tensors, _ = self._read_base(os.path.join(self.path, last["base"]), last.get("base_sha256"))
        return {k: v for k, v in tensors.items() if not k.startswith(MOMENTS)}, self.header()

    def edit_moments(self) -> dict[str, torch.Tensor]:
        """{layer: sum of U^T U} over every active edit's keys and the edits folded into the base (the edit term of
        the editor's key prior, when its edits record keys); {} when they record none."""
        moments: dict[str, torch.Tensor] = {}
        last = self.compaction()
        if last is not None:
            tensors, _ = self._read_base(os.path.join(self.path, last["base"]), last.get("base_sha256"))
            moments = {k[len(MOMENTS):]: v.double() for k, v in tensors.items() if k.startswith(MOMENTS)}
        for edit_id in self.active_ids():
            for name, u in self.load_factors(edit_id).keys.items():
                u = u.double()
                moments[name] = moments.get(name, 0) + u.t() @ u
        return moments

    def header(self) -> dict:
        """The base snapshot's header: model name, dtype, base fingerprint, edited modules."""
        return self.original()[1] if self.has_base() else {}

    def rows(self) -> list[dict]:
        """One summary per edit for listing: id, time, n facts, backend, efficacy, status."""
        return [{"id": e["id"], "time": e["time"], "n_facts": len(e.get("facts", [])),
                 "backend": e.get("backend", {}).get("apply", {}),
                 "efficacy": e.get("efficacy"),
                 "status": "reverted" if e["reverted"] else "folded" if e["folded"] else "active"}
                for e in self.edits]

    def format_table(self) -> str:
        lines = ["| id | time | facts | apply backend | efficacy % | status |", "|---|---|---|---|---|---|"]
        for r in self.rows():
            eff = "-" if r["efficacy"] is None else f"{r['efficacy']:.1f}"
            backend = ",".join(sorted(set(r["backend"].values()))) or "-"
            lines.append(f"| {r['id']} | {r['time']} | {r['n_facts']} | {backend} | {eff} | {r['status']} |")
        return "\n".join(lines)

    # -- writing ---------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self):
        import fcntl

        with open(os.path.join(self.path, ".lock"), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                size = os.path.getsize(self.jsonl) if os.path.exists(self.jsonl) else 0
                if size != self._n_bytes and not (self.torn_tail and size > self._n_bytes):
                    raise JournalError(f"{self.jsonl} changed since it was opened (another process wrote to it); "
                                       "reopen the journal and redo the operation on the current state")
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _append(self, line: dict) -> None:
        """Append one line and fsync. A torn tail left by a crash is cut off first."""
        data = (json.dumps(line, sort_keys=False) + "\n").encode("utf-8")
        fd = os.open(self.jsonl, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, self._n_bytes)  # drops a torn tail; a no-op otherwise
            os.lseek(fd, self._n_bytes, os.SEEK_SET)
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.path)
        self.lines.append(line)
        self._n_bytes += len(data)
        self.torn_tail = False

    def write_base(self, weights: dict[str, torch.Tensor], header: dict) -> None:
        """Write base_snapshot.safetensors once (W0 of the edited layers, model dtype). If it exists, check that it
        holds the same layers and bytes, and refuse a different base."""
        if self.has_base():
            saved, meta = self.original()
            if sorted(saved) != sorted(weights) or any(not torch.equal(saved[n], weights[n].detach().cpu())
                                                       for n in weights):
                raise JournalError(f"{self.base_path}: this journal was started on other base weights or other edited "
                                   f"layers ({sorted(saved)}); use a new journal folder")
            return
        meta = {"format": BASE_FORMAT, "version": FORMAT_VERSION, "created": _now(), **header}
        atomic_save_safetensors(weights, self.base_path, {META_KEY: json.dumps(meta)})

    def record(self, edit: AppliedEdit, line: dict, header: dict) -> dict:
        """Commit one edit batch: factors file (atomic), then its line (appended, fsynced). Returns the line.

        line: the descriptive fields (facts, efficacy, checkpoint hash, ...); id, time, factors file, sha256, backend
        and delta norms are filled in here. header: the edit-file header (modules, base fingerprint, model).
        """
        with self._locked():
            if not self.has_base():
                raise JournalError(f"{self.base_path}: write the base snapshot before the first edit")
            edit_id = self.next_id()
            rel = os.path.join(self.FACTORS, f"{edit_id}.safetensors")
            stamp = time.time()
            full = {"type": "edit", "id": edit_id, "time": _now(), "unix_time": stamp, **line,
                    "backend": {"apply": dict(edit.backend), **line.get("backend", {})},
                    "delta_norms": edit.delta_norms(), "step_delta_norms": edit.step_delta_norms(),
                    "factors": rel}
            edit.info = {k: v for k, v in full.items() if k != "factors"}
            digest = save_edit_file(os.path.join(self.path, rel), [edit], header, include_normaliser=True)
            full["factors_sha256"] = digest
            self._append(full)
            edit.edit_id = edit_id
        return full

    def mark_reverted(self, edit_id: int, **extra) -> dict:
        """Append a revert line for an active edit (the edit stays in the file). Returns the line."""
        with self._locked():
            entry = self.entry(edit_id)
            if entry["folded"]:
                raise JournalError(f"edit {edit_id} was folded into the base snapshot by a compaction (up to edit "
                                   f"{self.compacted_upto()}) and can no longer be reverted on its own; rebuild from "
                                   "base_snapshot.safetensors (the unedited weights) to undo it")
            if entry["reverted"]:
                raise JournalError(f"edit {edit_id} was already reverted at {entry['reverted_time']}")
            remaining = [i for i in self.active_ids() if i != entry["id"]]
            line = {"type": "revert", "id": entry["id"], "time": _now(), "unix_time": time.time(),
                    "remaining": remaining, "was_last": self.active_ids()[-1] == entry["id"], **extra}
            self._append(line)
        return line

    # -- materialising ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def rebuild_(self, weights: dict[str, torch.Tensor], *, allow_backend_change: bool = False) -> list[int]:
        """weights <- the current base, then every active edit's factors in order. Returns the ids applied.

        weights: module name -> storage-layout tensor (mutated). Bit-identical to the live session's weights after
        those edits, on the recorded backends (see the module docstring for what holds after an earlier revert).
        """
        base, _ = self.base()
        missing = sorted(set(base) - set(weights))
        if missing:
            raise JournalError(f"no weights given for the journal's layers {missing}")
        names = sorted(base)
        ops.restore_([weights[n] for n in names], [base[n] for n in names])
        ids = self.active_ids()
        for edit_id in ids:
            apply_edit_(weights, self.load_factors(edit_id), allow_backend_change=allow_backend_change)
        return ids

    def revert(self, edit_id: int, weights: dict[str, torch.Tensor] | None = None, *,
               allow_backend_change: bool = False) -> dict:
        """Remove one edit: append its revert line, then (when weights are given) rebuild them without it."""
        line = self.mark_reverted(edit_id)
        if weights is not None:
            self.rebuild_(weights, allow_backend_change=allow_backend_change)
        return line

    @torch.no_grad()
    def compact(self, upto: int, *, device: torch.device | str = "cpu", allow_backend_change: bool = False) -> dict:
        """Fold every active edit with id <= `upto` into a new base snapshot (the weights after them, computed by
        replay on `device`, which must be the device type the edits were made on for a bit-exact base). The folded
        edits stay applied but can no longer be reverted one by one; undo stays exact for the edits after `upto`.
        Returns the compaction line."""
        with self._locked():
            folded = [i for i in self.active_ids() if i <= upto]
            if upto <= self.compacted_upto() or upto not in [e["id"] for e in self.edits]:
                raise JournalError(f"cannot compact up to edit {upto}: recorded edits {[e['id'] for e in self.edits]}, "
                                   f"already compacted up to {self.compacted_upto()}")
            base, _ = self.base()
            weights = {n: t.to(device) for n, t in base.items()}
            moments = {}
            if self.compaction() is not None:
                tensors, _ = self._read_base(os.path.join(self.path, self.compaction()["base"]))
                moments = {k[len(MOMENTS):]: v.double() for k, v in tensors.items() if k.startswith(MOMENTS)}
            for edit_id in folded:
                edit = self.load_factors(edit_id)
                apply_edit_(weights, edit, allow_backend_change=allow_backend_change)
                for name, u in edit.keys.items():  # the key prior's edit term keeps the folded edits
                    moments[name] = moments.get(name, 0) + u.double().t() @ u.double()
            weights.update({MOMENTS + name: m.float() for name, m in moments.items()})
            rel = os.path.join(self.BASES, f"base-{upto}.safetensors")
            meta = {"format": BASE_FORMAT, "version": FORMAT_VERSION, "created": _now(), "folded_upto": upto}
            digest = atomic_save_safetensors(weights, os.path.join(self.path, rel), {META_KEY: json.dumps(meta)})
            previous = self.compaction()
            line = {"type": "compact", "id": upto, "time": _now(), "unix_time": time.time(), "base": rel,
                    "base_sha256": digest, "folded": folded}
            self._append(line)
        # only after the line is committed: the folded edits' factors and the superseded base
        gone = [os.path.join(self.path, e["factors"]) for e in self.edits if e["id"] <= upto]
        if previous is not None:
            gone.append(os.path.join(self.path, previous["base"]))
        for path in gone:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return line

    def disk_bytes(self) -> int:
        """Bytes the journal folder holds."""
        return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(self.path) for f in files)


def open_journal(path: str, model, modules, *, model_name: str | None = None, model_dtype: str | None = None,
                 checkpoint_id: str | None = None, editor=None, allow_backend_change: bool = False
                 ) -> tuple[Journal, dict]:
    """Open (or start) the journal at `path` for the UNEDITED `model` and bring the model to the journal's state.

    Checks that the journal edits these modules of this base model (refusing anything else), writes the base snapshot
    when the journal is new, replays the active edits, and, when `editor` is given and the latest active edit came
    from the same checkpoint (`checkpoint_id`), restores the editor's normaliser statistics saved with it.
    Returns (journal, header).
    """
    journal = Journal(path)
    header = base_header(model, modules, model_name, model_dtype)
    if journal.has_base():
        saved = journal.header()
        names = [m["name"] for m in saved["modules"]]
        if names != [m.name for m in modules]:
            raise JournalError(f"{path}: the journal edits {names}, but this run edits {[m.name for m in modules]}")
        if saved.get("base_fingerprint") != header["base_fingerprint"]:
            raise JournalError(f"{path}: the model is not the journal's base model (fingerprint differs: other "
                               "weights, dtype or architecture, or an already edited model)")
        header["model"] = saved.get("model") or header["model"]
        header["model_dtype"] = saved.get("model_dtype", header["model_dtype"])
    weights = weights_by_name(model, [m.name for m in modules])
    journal.write_base({n: w.detach().cpu() for n, w in weights.items()}, header)
    if journal.orphans():
        log.warning("%s: ignoring factors file(s) of interrupted edits: %s", path, journal.orphans())
    ids = journal.rebuild_(weights, allow_backend_change=allow_backend_change)
    if ids:
        log.info("journal %s: replayed %d active edit(s) %s", path, len(ids), ids)
    if editor is not None and editor.cfg.edit_prior > 0:
        editor.sync_edit_prior(journal.edit_moments())
    if editor is not None and ids:
        last = journal.entry(ids[-1])
        if checkpoint_id is not None and last.get("editor_checkpoint", {}).get("hash") == checkpoint_id:
            state = journal.load_factors(ids[-1]).normaliser
            if state:
                editor.load_normaliser_state(state)
                log.info("restored the editor's normaliser statistics saved with edit %d", ids[-1])
        else:
            log.warning("the latest journal edit came from another editor checkpoint; keeping this checkpoint's "
                        "normaliser statistics")
    return journal, header


def materialize(journal: Journal, model, *, allow_backend_change: bool = False) -> list[int]:
    """Bring `model`'s edited layers to the journal's current state (base + active edits); returns the ids."""
    names = [m["name"] for m in journal.header()["modules"]]
    return journal.rebuild_(weights_by_name(model, names), allow_backend_change=allow_backend_change)
