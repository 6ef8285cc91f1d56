"""Edit journal and edit files: what was applied, stored as low-rank factors, so it can be undone or re-applied exactly.

A journal is a folder (DESIGN.md 8.4 "Journal", METHOD.md 7.6):

    journal.jsonl                   append-only, one JSON line per event:
                                    {"type": "edit", "id", "time", facts (case ids, prompts, targets), editor
                                     checkpoint hash, base-model fingerprint, backends that ran, per-layer ||dW||_F,
                                     efficacy right after the edit, the factors file and its sha256, ...}
                                    {"type": "revert", "id": <edit id>, "time", ...}: the edit is removed (never
                                     deleted from the file)
    base_snapshot.safetensors       the edited layers' unedited weights W0 (model dtype), written once
    factors/<id>.safetensors        one edit batch: per MSBP step and layer, M_l (n, d_out) and K_l (n, d_in) fp32
                                    (dW_l = M_l^T K_l), or S_l (d_in, d_out) for primal steps (dW_l = S_l^T); plus the
                                    editor's normaliser statistics after the edit

An edit file (`save_edit_file`, the CLI's --save-edit) is the same safetensors layout holding one or several edits in
order, with a JSON header (safetensors metadata key "emsedit_fast"): format, version, base-model fingerprint, model
name and dtype, the edited modules (name, d_in, d_out, storage layout) and, per edit and step, the layers of each
shape group, the solution form and the apply backend that ran.

Crash safety. Every file is written to a temporary name in the same folder, fsynced, then renamed into place. An edit
is committed by appending its line to journal.jsonl (one write, then fsync) only after its factors file is in place, so
a crash leaves at worst a factors file that no line refers to (reported by `Journal.orphans()`, ignored, and
overwritten by the next edit) or a torn last line without its newline (ignored on read, truncated before the next
append). The line stores the factors file's sha256; a factors file that does not match is refused.

Exactness guarantees (same backend, same device type: the backend and device type that applied each edit are recorded
and replay uses them, refusing to switch silently unless allow_backend_change=True):

* Replaying the active edits' factors in order onto W0 (`Journal.rebuild_`) reproduces, bit for bit, the weights the
  live editing session produced: apply is deterministic and the same grouped calls run on the same bytes.
* Reverting the LAST active edit is bit-exact: the rebuild without it equals the state before it was applied.
* Reverting an EARLIER edit rebuilds W0 + the remaining edits' stored factors, in order. This is bit-identical to
  applying those factors in that order, but the later edits' factors were computed on a model that contained the
  removed edit; they are not recomputed, so the result is not what editing without the removed edit would have given.
* Subtraction is never used (round(round(W + d) - d) != W in bf16).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from dataclasses import field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from emsedit_fast import ops
from emsedit_fast.checkpoint import sha256_file

log = logging.getLogger(__name__)

EDIT_FORMAT = "emsedit_fast.edit"
BASE_FORMAT = "emsedit_fast.journal.base"
FORMAT_VERSION = 1
META_KEY = "emsedit_fast"
APPLY_OPS = {"low_rank": "apply_deltas_", "dense": "apply_deltas_dense_"}
_STATS_SUFFIXES = ("count", "mean", "var", "std")


class JournalError(RuntimeError):
    """A journal or edit file is missing, corrupt, inconsistent, or does not fit the model."""


# ----------------------------------------------------------------------------------------------------------------------
# edits as factors


@dataclass
class GroupFactors:
    """One MSBP step's update of one shape group (the layers `names`, same shape and layout). fp32, CPU.

    form "dual" / "outer": solution M (m, n, d_out) and factor_keys K (m, n, d_in): dW_l = M_l^T K_l (rank <= n).
    form "primal": solution S (m, d_in, d_out), factor_keys None: dW_l = S_l^T (rank <= n as well).
    dW is in linear orientation (d_out, d_in) whatever the storage layout; transposed=True means the weights are
    stored (d_in, d_out) (GPT-2 Conv1D).
    """

    names: tuple[str, ...]
    transposed: bool
    form: str
    solution: torch.Tensor
    factor_keys: torch.Tensor | None
    n_rows: int = 0  # rows n behind the step (bounds the rank of a primal S too)

    @property
    def low_rank(self) -> bool:
        return self.form != "primal"

    def layer_delta(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """Layer i's update: (M_l^T (d_out, n), K_l (n, d_in)) for low-rank forms, dense S_l^T (d_out, d_in) else."""
        if self.low_rank:
            return self.solution[i].t(), self.factor_keys[i]
        return self.solution[i].t()


@dataclass
class EditFactors:
    """One recorded edit batch: its MSBP steps as per-group factors, and the apply backends that ran.

    steps[k][g]: GroupFactors of step k, shape group g. backend: {"apply_deltas_": name, "apply_deltas_dense_": name}
    for the apply ops that ran. info: the JSON-able description (id, facts, ...). normaliser: the editor's running
    statistics after the edit (state_dict keys -> tensors), or {}. device_type: where it was applied.
    """

    steps: list[list[GroupFactors]]
    backend: dict[str, str]
    info: dict = field(default_factory=dict)
    normaliser: dict[str, torch.Tensor] = field(default_factory=dict)
    device_type: str = ""  # where the edit was applied ("cpu", "cuda"); kernels are only bit-reproducible there

    def delta_norms(self) -> dict[str, float]:
        """||sum over steps of dW_l||_F per layer, in fp64 from the factors (the Gram trick for low-rank steps)."""
        return {name: float(delta.norm()) if isinstance(delta, torch.Tensor) else lowrank_norm(*delta)
                for name, delta in total_deltas([self]).items()}

    def step_delta_norms(self) -> list[dict[str, float]]:
        """||dW_l||_F of each step separately."""
        return [EditFactors([step], self.backend).delta_norms() for step in self.steps]


def lowrank_norm(b: torch.Tensor, a: torch.Tensor) -> float:
    # ||B A||_F^2 = <B^T B, A A^T> without forming B A
    b, a = b.double(), a.double()
    return float(((b.t() @ b) * (a @ a.t())).sum().clamp_min(0).sqrt())


def total_deltas(edits: list[EditFactors]) -> dict[str, tuple[torch.Tensor, torch.Tensor] | torch.Tensor]:
    """Sum of every step's dW_l over `edits`, per layer, in fp64 linear orientation.

    Low-rank only: (B (d_out, N), A (N, d_in)) with the factors concatenated (N = total rows, dW = B A exactly).
    Any primal step: the dense dW (d_out, d_in).
    """
    parts: dict[str, list] = {}
    for edit in edits:
        for step in edit.steps:
            for g in step:
                for i, name in enumerate(g.names):
                    parts.setdefault(name, []).append(g.layer_delta(i))
    out = {}
    for name, deltas in parts.items():
        if all(isinstance(d, tuple) for d in deltas):
            out[name] = (torch.cat([b.double() for b, _ in deltas], 1), torch.cat([a.double() for _, a in deltas], 0))
        else:
            out[name] = sum((d.double() if isinstance(d, torch.Tensor) else d[0].double() @ d[1].double())
                            for d in deltas)
    return out


def factors_from_applied(editor, applied) -> EditFactors:
    """The EditFactors of an `AppliedEdit` returned by `Editor.edit` (tensors copied to CPU, fp32).

    The apply backend is taken from what the dispatcher recorded during the edit."""
    device_type = editor.weights()[0].device.type
    steps = []
    for rec in applied.steps:
        groups = []
        for gs in rec.groups:
            group = editor.groups[gs.group]
            groups.append(GroupFactors(tuple(group.names), bool(group.transposed), gs.form,
                                       gs.solution.detach().float().cpu().contiguous(),
                                       None if gs.factor_keys is None else
                                       gs.factor_keys.detach().float().cpu().contiguous(), int(gs.keys.shape[1])))
        steps.append(groups)
    backend = {}
    for op in APPLY_OPS.values():
        ran = sorted(applied.backend.get(op, ()))
        if len(ran) > 1:
            raise JournalError(f"{op} ran on several backends {ran} within one edit; cannot record a replay backend")
        if ran:
            backend[op] = ran[0]
    return EditFactors(steps, backend, device_type=device_type)


def normaliser_state(editor) -> dict[str, torch.Tensor]:
    """The editor's running-normaliser buffers (count, mean, var, std of every hypernetwork), copied to CPU."""
    return {k: v.detach().cpu().clone() for k, v in editor.state_dict().items()
            if k.split(".")[-1] in _STATS_SUFFIXES and ".stats." in k}


# ----------------------------------------------------------------------------------------------------------------------
# applying factors


def weights_by_name(model: torch.nn.Module, names) -> dict[str, torch.Tensor]:
    """{module name: its weight tensor (storage layout)} for the named modules of `model`."""
    mods = dict(model.named_modules())
    missing = [n for n in names if n not in mods or not hasattr(mods[n], "weight")]
    if missing:
        raise JournalError(f"the model has no weight module(s) {missing}")
    return {n: mods[n].weight.data for n in names}


def _run_apply(op_key: str, edit: EditFactors, call, allow_backend_change: bool) -> None:
    op = APPLY_OPS[op_key]
    backend = edit.backend.get(op)
    try:
        call(backend)
    except NotImplementedError as err:
        if not allow_backend_change:
            raise JournalError(f"the edit was applied with the {backend!r} backend of {op}, which cannot run here "
                               f"({err}); replaying on another backend is not bit-exact. Build/enable that backend, "
                               "or pass allow_backend_change=True (CLI: --allow-backend-change)") from None
        log.warning("%s: recorded backend %r unavailable; replaying with 'auto' (not guaranteed bit-exact)", op,
                    backend)
        call("auto")


@torch.no_grad()
def apply_edit_(weights: dict[str, torch.Tensor], edit: EditFactors, *, allow_backend_change: bool = False) -> None:
    """Apply one edit's steps in order to `weights` (name -> storage-layout tensor, mutated), in place.

    The same grouped calls as `Editor.apply_step` (one per step and shape group, layers in group order, solution
    tensors stacked (m, ...) and unbound), on the backend recorded with the edit: bit-identical to the live edit.
    """
    here = next(iter(weights.values())).device.type if weights else "cpu"
    if edit.device_type and edit.device_type != here:
        if not allow_backend_change:
            raise JournalError(f"the edit was applied on {edit.device_type}, these weights are on {here}: replay is "
                               "bit-exact only on the same device type and backend; move the model, or pass "
                               "allow_backend_change=True (CLI: --allow-backend-change)")
        log.warning("replaying an edit made on %s on %s: not guaranteed bit-exact", edit.device_type, here)
    for step in edit.steps:
        for g in step:
            ws = [weights[n] for n in g.names]
            dev = ws[0].device
            if g.low_rank:
                m = list(g.solution.to(dev).unbind(0))
                k = list(g.factor_keys.to(dev).unbind(0))
                _run_apply("low_rank", edit, lambda b, ws=ws, m=m, k=k, t=g.transposed:
                           ops.apply_deltas_(ws, m, k, None, t, backend=b), allow_backend_change)
            else:
                s = list(g.solution.to(dev).unbind(0))
                _run_apply("dense", edit, lambda b, ws=ws, s=s, t=g.transposed:
                           ops.apply_deltas_dense_(ws, s, None, t, backend=b), allow_backend_change)


# ----------------------------------------------------------------------------------------------------------------------
# files


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened for fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> str:
    """save_file to a temporary file in the same folder, fsync, rename onto `path`; returns the file's sha256."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return digest


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise JournalError(f"{path}: missing") from None
    except Exception as err:
        raise JournalError(f"{path}: cannot read ({type(err).__name__}: {err})") from None
    if META_KEY not in meta:
        raise JournalError(f"{path}: not an emsedit_fast file (no {META_KEY!r} metadata)")
    try:
        return tensors, json.loads(meta[META_KEY])
    except json.JSONDecodeError as err:
        raise JournalError(f"{path}: corrupt metadata ({err})") from None


def _edit_tensors(edit: EditFactors, prefix: str) -> tuple[dict[str, torch.Tensor], list]:
    """Tensors `<prefix>step<k>/<layer>/M|K|S` and the per-step group layout for the header."""
    tensors, layout = {}, []
    for k, step in enumerate(edit.steps):
        groups = []
        for g in step:
            for i, name in enumerate(g.names):
                if g.low_rank:
                    tensors[f"{prefix}step{k}/{name}/M"] = g.solution[i]
                    tensors[f"{prefix}step{k}/{name}/K"] = g.factor_keys[i]
                else:
                    tensors[f"{prefix}step{k}/{name}/S"] = g.solution[i]
            groups.append({"names": list(g.names), "transposed": g.transposed, "form": g.form, "n_rows": g.n_rows})
        layout.append(groups)
    return tensors, layout


def _edit_from_tensors(tensors: dict[str, torch.Tensor], prefix: str, layout: list, backend: dict,
                       info: dict, device_type: str = "") -> EditFactors:
    steps = []
    for k, groups in enumerate(layout):
        step = []
        for g in groups:
            names = tuple(g["names"])
            try:
                if g["form"] == "primal":
                    sol = torch.stack([tensors[f"{prefix}step{k}/{n}/S"] for n in names])
                    keys = None
                else:
                    sol = torch.stack([tensors[f"{prefix}step{k}/{n}/M"] for n in names])
                    keys = torch.stack([tensors[f"{prefix}step{k}/{n}/K"] for n in names])
            except KeyError as err:
                raise JournalError(f"edit file lacks tensor {err}") from None
            step.append(GroupFactors(names, bool(g["transposed"]), g["form"], sol, keys, int(g.get("n_rows", 0))))
        steps.append(step)
    normaliser = {k[len(prefix) + len("normaliser/"):]: v for k, v in tensors.items()
                  if k.startswith(prefix + "normaliser/")}
    return EditFactors(steps, dict(backend), dict(info), normaliser, device_type)


def save_edit_file(path: str, edits: list[EditFactors], header: dict | None = None,
                   include_normaliser: bool = False) -> str:
    """Write `edits` (applied in this order) to one safetensors file with a JSON header; atomic; returns sha256.

    header: extra JSON fields (model name, base fingerprint, modules, ...). Tensors: fp32, one M/K (or S) per layer
    and step, keys `edit<e>/step<k>/<layer name>/M|K|S`.
    """
    tensors, entries = {}, []
    for e, edit in enumerate(edits):
        t, layout = _edit_tensors(edit, f"edit{e}/")
        if include_normaliser:
            t.update({f"edit{e}/normaliser/{k}": v for k, v in edit.normaliser.items()})
        tensors.update(t)
        entries.append({"info": edit.info, "backend": edit.backend, "device_type": edit.device_type, "steps": layout})
    meta = {"format": EDIT_FORMAT, "version": FORMAT_VERSION, **(header or {}), "edits": entries}
    return atomic_save_safetensors(tensors, path, {META_KEY: json.dumps(meta)})


def load_edit_file(path: str) -> tuple[list[EditFactors], dict]:
    """(edits in order, header) of a file written by `save_edit_file`."""
    tensors, meta = _read_safetensors(path)
    if meta.get("format") != EDIT_FORMAT:
        raise JournalError(f"{path}: format {meta.get('format')!r} is not {EDIT_FORMAT!r}")
    if meta.get("version") != FORMAT_VERSION:
        raise JournalError(f"{path}: edit-file version {meta.get('version')!r} is not supported "
                           f"(supports {FORMAT_VERSION})")
    edits = [_edit_from_tensors(tensors, f"edit{e}/", entry["steps"], entry.get("backend", {}), entry.get("info", {}),
                                entry.get("device_type", "")) for e, entry in enumerate(meta["edits"])]
    header = {k: v for k, v in meta.items() if k != "edits"}
    return edits, header


def check_base(header: dict, model: torch.nn.Module, modules=None) -> None:
    """Refuse (JournalError) a model whose edited layers are not the base the edits were made on.

    Compares the current weights' fingerprint with the recorded base fingerprint (call on the UNEDITED model)."""
    from emsedit_fast.models.adapter import fingerprint
    from emsedit_fast.models.adapter import resolve_modules

    want = header.get("base_fingerprint")
    if want is None:
        return
    if modules is None:
        modules = resolve_modules(model, [re.escape(m["name"]) for m in header["modules"]])
    got = fingerprint(model, modules)
    if got != want:
        raise JournalError(f"the model is not the base these edits were made on (fingerprint {got[:12]} != recorded "
                           f"{want[:12]}: other weights, dtype or architecture, or the model is already edited)")


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
            if not (isinstance(event, dict) and event.get("type") in ("edit", "revert")
                    and isinstance(event.get("id"), int) and (event["type"] == "revert" or "factors" in event)):
                raise JournalError(f"{self.jsonl}: line {lineno} is corrupt (not an edit or revert event: "
                                   f"{line[:80]!r})")
            self.lines.append(event)
        self._n_bytes = len(complete)

    @property
    def edits(self) -> list[dict]:
        """The edit lines, in order, each with "reverted": bool (and "reverted_time" when reverted)."""
        reverted = {ln["id"]: ln for ln in self.lines if ln.get("type") == "revert"}
        out = []
        for ln in self.lines:
            if ln.get("type") == "edit":
                entry = dict(ln, reverted=ln["id"] in reverted)
                if entry["reverted"]:
                    entry["reverted_time"] = reverted[ln["id"]]["time"]
                out.append(entry)
        return out

    def active_ids(self) -> list[int]:
        return [e["id"] for e in self.edits if not e["reverted"]]

    def entry(self, edit_id: int) -> dict:
        for e in self.edits:
            if e["id"] == int(edit_id):
                return e
        raise JournalError(f"{self.path}: no edit with id {edit_id}; recorded ids: {[e['id'] for e in self.edits]}")

    def next_id(self) -> int:
        return max((e["id"] for e in self.edits), default=0) + 1

    def orphans(self) -> list[str]:
        """Factors files no committed line refers to (left by an interrupted edit); they are never replayed."""
        folder = os.path.join(self.path, self.FACTORS)
        if not os.path.isdir(folder):
            return []
        known = {os.path.basename(e["factors"]) for e in self.edits}
        return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                      if n.endswith(".safetensors") and not n.startswith(".") and n not in known)

    def load_factors(self, edit_id: int) -> EditFactors:
        """The recorded factors of one edit, checked against the sha256 in its line."""
        entry = self.entry(edit_id)
        path = os.path.join(self.path, entry["factors"])
        if not os.path.exists(path):
            raise JournalError(f"{path}: factors of edit {edit_id} missing (the journal and its folder disagree)")
        if sha256_file(path) != entry["factors_sha256"]:
            raise JournalError(f"{path}: contents do not match the sha256 recorded for edit {edit_id}")
        edits, _ = load_edit_file(path)
        edit = edits[0]
        edit.info = {k: v for k, v in entry.items() if k not in ("reverted", "reverted_time")}
        return edit

    def active_factors(self) -> list[EditFactors]:
        return [self.load_factors(i) for i in self.active_ids()]

    def has_base(self) -> bool:
        return os.path.exists(self.base_path)

    def base(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(W0 by module name, header) from base_snapshot.safetensors."""
        tensors, meta = _read_safetensors(self.base_path)
        if meta.get("format") != BASE_FORMAT or meta.get("version") != FORMAT_VERSION:
            raise JournalError(f"{self.base_path}: not a version-{FORMAT_VERSION} base snapshot")
        return tensors, meta

    def header(self) -> dict:
        """The base snapshot's header: model name, dtype, base fingerprint, edited modules."""
        return self.base()[1] if self.has_base() else {}

    def rows(self) -> list[dict]:
        """One summary per edit for listing: id, time, n facts, backend, efficacy, status."""
        return [{"id": e["id"], "time": e["time"], "n_facts": len(e.get("facts", [])),
                 "backend": e.get("backend", {}).get("apply", {}),
                 "efficacy": e.get("efficacy"), "status": "reverted" if e["reverted"] else "active"}
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
        _fsync_dir(self.path)
        self.lines.append(line)
        self._n_bytes += len(data)
        self.torn_tail = False

    def write_base(self, weights: dict[str, torch.Tensor], header: dict) -> None:
        """Write base_snapshot.safetensors once (W0 of the edited layers, model dtype). If it exists, check that it
        holds the same layers and bytes, and refuse a different base."""
        if self.has_base():
            saved, meta = self.base()
            if sorted(saved) != sorted(weights) or any(not torch.equal(saved[n], weights[n].detach().cpu())
                                                       for n in weights):
                raise JournalError(f"{self.base_path}: this journal was started on other base weights or other edited "
                                   f"layers ({sorted(saved)}); use a new journal folder")
            return
        meta = {"format": BASE_FORMAT, "version": FORMAT_VERSION, "created": _now(), **header}
        atomic_save_safetensors(weights, self.base_path, {META_KEY: json.dumps(meta)})

    def record(self, edit: EditFactors, line: dict, header: dict) -> dict:
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
        return full

    def mark_reverted(self, edit_id: int, **extra) -> dict:
        """Append a revert line for an active edit (the edit stays in the file). Returns the line."""
        with self._locked():
            entry = self.entry(edit_id)
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
        """weights <- W0 from the base snapshot, then every active edit's factors in order. Returns the ids applied.

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
