"""What an edit changed, as low-rank factors, and the one path that applies it to weights.

One MSBP step changes every edited layer l of a shape group (same d_in, d_out and storage layout) by

    dual / outer:  dW_l = M_l^T K_l      M_l (n, d_out), K_l (n, d_in): rank <= n, never formed densely
    primal:        dW_l = S_l^T          S_l (d_in, d_out)

in linear orientation (d_out, d_in) whatever the storage layout (GPT-2 Conv1D stores W as (d_in, d_out)).

    GroupUpdate     one step's update of one shape group
    AppliedEdit     one edit batch: its steps, the backends that applied them, what it was, the normaliser after it
    apply_updates_  W <- round(W + dW) for every group of every step: one grouped call per (step, group)

The editor (live editing, undo and replay), the journal (rebuild from its base snapshot), edit files and the LoRA
export all use these records and this apply path, so a replay runs the same calls on the same bytes as the live edit
and reproduces it bit for bit (same backend and device type; see docs/method.md, "Applying and undoing an update").
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field

import torch

from emsedit_fast import ops

log = logging.getLogger(__name__)

# the apply op of each kind of update (what the journal records the backend of)
APPLY_OPS = {"low_rank": "apply_deltas_", "dense": "apply_deltas_dense_"}


class JournalError(RuntimeError):
    """A journal, edit file or recorded edit is missing, corrupt, inconsistent, or does not fit the model."""


class BackendUnavailable(JournalError):
    """A recorded edit cannot be replayed bit-exactly here (another device type, or its apply backend is missing)."""


@dataclass
class GroupUpdate:
    """One MSBP step's update of one shape group: layers `names`, same shape and layout.

    form "dual" / "outer": solution M (m, n, d_out), factor_keys K (m, n, d_in): dW_l = M_l^T K_l.
    form "primal": solution S (m, d_in, d_out), factor_keys None: dW_l = S_l^T.
    transposed: the weights are stored (d_in, d_out) (GPT-2 Conv1D). n_rows: the rows n behind the step (it bounds
    the rank of a primal S too). Tensors are fp32.
    """

    names: tuple[str, ...]
    transposed: bool
    form: str
    solution: torch.Tensor
    factor_keys: torch.Tensor | None
    n_rows: int = 0

    @property
    def low_rank(self) -> bool:
        return self.form != "primal"

    def layer_delta(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """Layer i's update: (M_l^T (d_out, n), K_l (n, d_in)) for low-rank forms, dense S_l^T (d_out, d_in) else."""
        if self.low_rank:
            return self.solution[i].t(), self.factor_keys[i]
        return self.solution[i].t()

    def delta_norms(self) -> torch.Tensor:
        """||dW_l||_F per layer (m,) without forming dW: ||M^T K||_F^2 = <M M^T, K K^T> (n x n work)."""
        if not self.low_rank:
            return self.solution.flatten(1).norm(dim=1)
        mm = self.solution @ self.solution.transpose(1, 2)
        kk = self.factor_keys @ self.factor_keys.transpose(1, 2)
        return (mm * kk).sum((1, 2)).clamp_min(0).sqrt()

    def delta_maxabs_bound(self) -> torch.Tensor:
        """An upper bound on max |dW_l| per layer (m,), from the factors alone: by Cauchy-Schwarz over the rank index j,
        |dW[o, i]| = |sum_j M[j, o] K[j, i]| <= ||M[:, o]|| ||K[:, i]|| <= max_o ||M[:, o]|| * max_i ||K[:, i]||.
        Exact (max |S|) for the primal form."""
        if not self.low_rank:
            return self.solution.flatten(1).abs().amax(dim=1)
        return self.solution.norm(dim=1).amax(dim=1) * self.factor_keys.norm(dim=1).amax(dim=1)

    def cpu(self) -> GroupUpdate:
        """A detached fp32 copy on the CPU (what journals and edit files store)."""
        return GroupUpdate(self.names, self.transposed, self.form, self.solution.detach().float().cpu().contiguous(),
                           None if self.factor_keys is None else self.factor_keys.detach().float().cpu().contiguous(),
                           self.n_rows)


@dataclass
class AppliedEdit:
    """One applied edit batch: its MSBP steps as per-group updates, and how it was applied.

    steps[k][g]: the GroupUpdate of step k for shape group g. backend: {apply op: backend name} of the apply ops
    that ran (replay uses them). device_type: where it was applied (kernels are bit-reproducible only there).
    edit_id, request_ids: the editor's id and the edited facts' ids. info: a JSON-able description (the journal
    line). normaliser: the editor's running statistics after the edit ({} when not kept). seconds: wall time.
    ops_ran: {op: [backends]} of every op that ran during the edit (what `ops.record_backends` saw).
    keys: {layer name: the first step's raw keys (n, d_in)} when the editor's key prior keeps earlier edits in place
    (editor.edit_prior), else {}.
    """

    steps: list[list[GroupUpdate]]
    backend: dict[str, str] = field(default_factory=dict)
    device_type: str = ""
    edit_id: int = 0
    request_ids: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    normaliser: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    seconds: float = 0.0
    ops_ran: dict[str, list[str]] = field(default_factory=dict)
    keys: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def delta_norms(self) -> dict[str, float]:
        """||sum over steps of dW_l||_F per layer, in fp64 from the factors (the Gram trick for low-rank steps)."""
        return {name: float(delta.norm()) if isinstance(delta, torch.Tensor) else lowrank_norm(*delta)
                for name, delta in total_deltas([self]).items()}

    def step_delta_norms(self) -> list[dict[str, float]]:
        """||dW_l||_F of each step separately."""
        return [AppliedEdit([step]).delta_norms() for step in self.steps]

    def cpu(self) -> AppliedEdit:
        """A copy whose tensors are detached fp32 on the CPU."""
        return AppliedEdit([[g.cpu() for g in step] for step in self.steps], dict(self.backend), self.device_type,
                           self.edit_id, list(self.request_ids), dict(self.info),
                           {k: v.detach().cpu().clone() for k, v in self.normaliser.items()}, self.seconds,
                           {k: list(v) for k, v in self.ops_ran.items()},
                           {k: v.detach().float().cpu().contiguous() for k, v in self.keys.items()})


def lowrank_norm(b: torch.Tensor, a: torch.Tensor) -> float:
    """||B A||_F in fp64 without forming B A: ||B A||^2 = <B^T B, A A^T>."""
    b, a = b.double(), a.double()
    return float(((b.t() @ b) * (a @ a.t())).sum().clamp_min(0).sqrt())


def total_deltas(edits: list[AppliedEdit]) -> dict[str, tuple[torch.Tensor, torch.Tensor] | torch.Tensor]:
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


def _apply_group_(weights: list[torch.Tensor], g: GroupUpdate, backend: str | None) -> None:
    dev = weights[0].device
    if g.low_rank:
        ops.apply_deltas_(weights, list(g.solution.to(dev).unbind(0)), list(g.factor_keys.to(dev).unbind(0)), None,
                          g.transposed, backend=backend)
    else:
        ops.apply_deltas_dense_(weights, list(g.solution.to(dev).unbind(0)), None, g.transposed, backend=backend)


@torch.no_grad()
def apply_updates_(weights: Mapping[str, torch.Tensor], steps: list[list[GroupUpdate]],
                   backend: str | Mapping[str, str] | None = None, *, allow_backend_change: bool = False) -> None:
    """W_l <- round(W_l + dW_l) for every layer of every group of every step, in order, in place.

    weights: module name -> weight tensor in storage layout (mutated). One grouped call per (step, group), layers in
    group order; fp32 accumulation and one rounding to the weights' dtype per call.
    backend: a request for every call ("auto", "cpp", ...; None = the ambient choice), or {apply op: backend name}
    as recorded with an edit (replay). A recorded backend that cannot run here raises BackendUnavailable unless
    allow_backend_change, which then falls back to "auto" with a warning (no longer guaranteed bit-exact).
    """
    for step in steps:
        for g in step:
            ws = [weights[n] for n in g.names]
            if not isinstance(backend, Mapping):
                _apply_group_(ws, g, backend)
                continue
            op = APPLY_OPS["low_rank" if g.low_rank else "dense"]
            recorded = backend.get(op)
            try:
                _apply_group_(ws, g, recorded)
            except NotImplementedError as err:
                if not allow_backend_change:
                    raise BackendUnavailable(
                        f"the edit was applied with the {recorded!r} backend of {op}, which cannot run here ({err}); "
                        "replaying on another backend is not bit-exact. Build/enable that backend, or pass "
                        "allow_backend_change=True (CLI: --allow-backend-change)") from None
                log.warning("%s: recorded backend %r unavailable; replaying with 'auto' (not guaranteed bit-exact)",
                            op, recorded)
                _apply_group_(ws, g, "auto")


def recorded_backends(seen: Mapping[str, set[str]]) -> dict[str, str]:
    """{apply op: backend} from what `ops.record_backends` saw during one edit; refuses a mix (not replayable)."""
    out = {}
    for op in APPLY_OPS.values():
        ran = sorted(seen.get(op, ()))
        if len(ran) > 1:
            raise RuntimeError(f"{op} ran on several backends {ran} within one edit; cannot record a replay backend")
        if ran:
            out[op] = ran[0]
    return out


@torch.no_grad()
def apply_edit_(weights: Mapping[str, torch.Tensor], edit: AppliedEdit, *, allow_backend_change: bool = False
                ) -> None:
    """Replay one recorded edit onto `weights` (name -> storage-layout tensor, mutated): its steps in order on the
    backends recorded with it, bit-identical to the live edit on the same device type. Applying on another device
    type than recorded raises BackendUnavailable unless allow_backend_change."""
    here = next(iter(weights.values())).device.type if weights else "cpu"
    if edit.device_type and edit.device_type != here:
        if not allow_backend_change:
            raise BackendUnavailable(f"the edit was applied on {edit.device_type}, these weights are on {here}: replay "
                                     "is bit-exact only on the same device type and backend; move the model, or pass "
                                     "allow_backend_change=True (CLI: --allow-backend-change)")
        log.warning("replaying an edit made on %s on %s: not guaranteed bit-exact", edit.device_type, here)
    apply_updates_(weights, edit.steps, edit.backend, allow_backend_change=allow_backend_change)
