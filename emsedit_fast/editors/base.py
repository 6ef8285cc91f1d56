"""The editing engine shared by every method: capture -> predict_deltas -> apply, repeated K times (MSBP).

One MSBP step on an edit batch (METHOD.md section 10):

    rows    <- capture(batch, current W)                   keys U_l (n, d_in), value-grads Delta_l (n, d_out)
    for each shape group g (all same-shape layers at once, rows stacked with a layer index):
        normaliser(phi_k,g).update(rows)                    (unless frozen)
        z = [u~ | delta~] = phi_k,g(normalise(rows))
        ridge:  coeff_j = -eta_l <u_j, u~_j>, V_j = coeff_j delta~_j; M_l = (U_l U_l^T + e^lambda_l I)^-1 V_l (dual)
                or S_l = (U_l^T U_l + e^lambda_l I)^-1 U_l^T V_l (primal)
        outer:  M_l = -eta_l Delta~_l, K_l = U~_l   (MEND)
    W_l <- round(W_l + M_l^T K_l)  (or + S_l^T) for every layer in one grouped call

Step k+1 captures on the model edited by step k: that is MSBP. Which hypernetwork serves step k depends on the regime:
sequential editors own one network per step (rank r / k), batch editors share one network across steps.

The meta-gradient (METHOD.md 8) is decoupled from the language model: `meta_backward` takes the loss gradient G_l with
respect to each edited weight (in factored form), pushes it through the aggregation analytically, then recomputes the
hypernetwork in row chunks under autograd and back-propagates the surrogate <dL/dV, V(phi)>.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from dataclasses import field

import torch
from torch import nn

from emsedit_fast import ops
from emsedit_fast.config import EditorConfig
from emsedit_fast.losses import Reduction
from emsedit_fast.models.adapter import EditedModule
from emsedit_fast.models.adapter import ShapeGroup
from emsedit_fast.models.adapter import group_by_shape
from emsedit_fast.models.hooks import Capture
from emsedit_fast.models.hooks import capture
from emsedit_fast.nn import HyperNet

log = logging.getLogger(__name__)


class EditRefused(RuntimeError):
    """An edit produced non-finite values or exceeded the delta-norm bound; the model was left unchanged."""


@dataclass
class GroupStep:
    """What one MSBP step computed for one shape group. All tensors fp32, detached.

    keys (m, n, d_in), value_grads (m, n, d_out): the captured rows. idx (m * n,): layer of each stacked row.
    mean, std (D,): the normaliser statistics the hypernetwork used (the meta-gradient must reuse them).
    form: "dual", "primal" or "outer". solution: M (m, n, d_out) for dual/outer, S (m, d_in, d_out) for primal.
    factor_keys: the K_l of dW_l = M_l^T K_l: the raw keys (dual) or MEND's pseudo keys (outer); None for primal.
    """

    group: int
    net: HyperNet
    keys: torch.Tensor
    value_grads: torch.Tensor
    idx: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    form: str
    solution: torch.Tensor
    factor_keys: torch.Tensor | None

    def delta_norms(self) -> torch.Tensor:
        """||dW_l||_F per layer (m,), without forming dW: ||M^T K||^2 = <M M^T, K K^T> (dual/outer)."""
        if self.form == "primal":
            return self.solution.flatten(1).norm(dim=1)
        mm = self.solution @ self.solution.transpose(1, 2)  # (m, n, n)
        kk = self.factor_keys @ self.factor_keys.transpose(1, 2)
        return (mm * kk).sum((1, 2)).clamp_min(0).sqrt()


@dataclass
class StepRecord:
    """One MSBP step over all shape groups, plus the caching loss that drove it."""

    step: int
    groups: list[GroupStep]
    cache_loss: float
    n_rows: int


@dataclass
class WeightGrad:
    """dL/dW_l in linear orientation, G = Delta'^T X' + E, kept factored.

    inputs X' (T, d_in) and output_grads Delta' (T, d_out) come from the meta-loss pass; extra E (d_out, d_in) is a
    dense addend (the l2 drift penalty 2c(W - W0)), or None.
    """

    inputs: torch.Tensor | None = None
    output_grads: torch.Tensor | None = None
    extra: torch.Tensor | None = None

    def times_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """K G^T (n, d_out) for rows K (n, d_in): row j is G k_j. Factored: (K X'^T) Delta' (n x T)(T x d_out)."""
        out = torch.zeros(keys.shape[0], self.d_out, device=keys.device)
        if self.inputs is not None:
            out += (keys @ self.inputs.t()) @ self.output_grads
        if self.extra is not None:
            out += keys @ self.extra.t()
        return out

    def hat(self) -> torch.Tensor:
        """G^T (d_in, d_out) dense: the primal form needs it."""
        out = self.extra.t().clone() if self.extra is not None else None
        if self.inputs is not None:
            g = self.inputs.t() @ self.output_grads
            out = g if out is None else out + g
        return out

    @property
    def d_out(self) -> int:
        return self.output_grads.shape[1] if self.output_grads is not None else self.extra.shape[0]


@dataclass
class AppliedEdit:
    """A journal entry kept by the editor: what was applied, so it can be reverted or replayed exactly."""

    edit_id: int
    request_ids: list[str]
    steps: list[StepRecord]
    backend: dict[str, set[str]]
    seconds: float
    before: list[torch.Tensor] | None = field(default=None, repr=False)  # pre-edit bytes (last edit only)


class Editor(nn.Module):
    """A hypernetwork editor for a list of edited modules of one model.

    regime "sequential": n_steps networks, step k of rank floor(rank / k) when rank_schedule = divide (Algorithm 1).
    regime "batch": one network of rank `rank` serves every step (Algorithm 2).
    The model is held by reference (not registered as a submodule) so `state_dict()` holds only the editor.
    """

    def __init__(self, model: nn.Module, modules: list[EditedModule], cfg: EditorConfig, regime: str = "sequential",
                 *, seed: int = 0, device: torch.device | str | None = None):
        super().__init__()
        if not modules:
            raise ValueError("Editor needs at least one edited module")
        self.cfg = cfg
        self.regime = regime
        self.__dict__["model"] = model  # not a submodule
        self.modules_ = list(modules)
        self.groups: list[ShapeGroup] = group_by_shape(modules)
        device = torch.device(device) if device is not None else modules[0].weight.device
        gen = torch.Generator().manual_seed(seed)
        n_nets = cfg.n_steps if regime == "sequential" else 1
        nets = []
        for k in range(n_nets):
            rank = max(1, cfg.rank // (k + 1)) if (regime == "sequential" and cfg.rank_schedule == "divide") \
                else cfg.rank
            nets.append(nn.ModuleList([
                HyperNet(g.d_in, g.d_out, len(g), rank, cfg.n_blocks, cfg.block_order == "relu_affine",
                         cfg.eta_init, cfg.lambda_init, cfg.std_floor, generator=gen) for g in self.groups]))
        self.nets = nn.ModuleList(nets).to(device)
        self.device = device  # the hypernetworks' device; the model may live elsewhere (factors move per step)
        self.base = ops.snapshot(self.weights())  # W0: the unedited edited weights, for reset and replay
        self.history: list[AppliedEdit] = []
        self._next_id = 1

    # ---------------------------------------------------------------------------------------------------------------
    # plumbing

    @property
    def backend(self) -> str:
        return self.cfg.backend

    def weights(self, group: int | None = None) -> list[torch.Tensor]:
        """The edited weight tensors (storage layout), all modules or one shape group."""
        mods = self.modules_ if group is None else self.groups[group].modules
        return [m.weight.data for m in mods]

    def net(self, step: int, group: int) -> HyperNet:
        return self.nets[step if self.regime == "sequential" else 0][group]

    def solve_form(self, n_rows: int, d_in: int) -> str:
        """The reference backend runs the published primal solve; the fast paths pick dual/primal by cost."""
        if self.cfg.solve_form == "auto" and self.backend == "reference":
            return "primal"
        return ops.choose_form(n_rows, d_in, self.cfg.solve_form)

    def capture(self, batch, reduction: Reduction = "sum_of_microbatch_means") -> Capture:
        """Caching pass on the current weights: answer-position keys and value-grads of every edited module."""
        return capture(self.model, self.modules_, batch.input_ids, batch.attention_mask, batch.labels,
                       batch.micro_batch, "answer", reduction, device=self.device)

    # ---------------------------------------------------------------------------------------------------------------
    # one MSBP step

    @torch.no_grad()
    def predict_deltas(self, cap: Capture, step: int, *, update_stats: bool = True) -> StepRecord:
        """Keys and value-grads of one caching pass -> the factors of every layer's update (nothing is applied)."""
        groups = []
        for g, group in enumerate(self.groups):
            net = self.net(step, g)
            keys, grads, idx = cap.stack(group)  # (m n, d_in), (m n, d_out), (m n,)
            keys, grads = keys.float(), grads.float()
            # Refuse before anything consumes them: non-finite rows would poison the running statistics, and the
            # fast solvers' fallbacks raise (instead of returning NaN) on a non-finite system.
            if not (torch.isfinite(keys).all() and torch.isfinite(grads).all()):
                raise EditRefused(f"step {step + 1}: non-finite keys or value-grads for {', '.join(group.names)}; "
                                  "the model was left unchanged")
            if update_stats:
                net.stats.update_(keys, grads, backend=self.backend)
            mean, std = net.stats.mean.clone(), net.stats.scale().clone()
            z = net(keys, grads, idx, mean=mean, std=std, backend=self.backend)  # (m n, D)
            m, n = len(group), cap.n_rows
            if self.cfg.aggregation == "outer":
                coeffs = -net.eta.index_select(0, idx).unsqueeze(1) * z[:, group.d_in:]  # M = -eta Delta~
                solution, factor_keys, form = coeffs.view(m, n, -1), z[:, :group.d_in].reshape(m, n, -1), "outer"
            else:
                targets, _ = ops.value_targets(keys, z, net.eta, idx, backend=self.backend)
                if not torch.isfinite(targets).all():
                    raise EditRefused(f"step {step + 1}: non-finite value targets (hypernetwork output or eta) for "
                                      f"{', '.join(group.names)}; the model was left unchanged")
                form = self.solve_form(n, group.d_in)
                solution = ops.ridge_solve(keys.view(m, n, -1), targets.view(m, n, -1), net.log_ridge, form,
                                           backend=self.backend)
                factor_keys = keys.view(m, n, -1) if form == "dual" else None
            groups.append(GroupStep(g, net, keys.view(m, n, -1), grads.view(m, n, -1), idx, mean, std, form,
                                    solution.detach(), None if factor_keys is None else factor_keys.detach()))
        return StepRecord(step, groups, cap.loss, cap.n_rows)

    def check_record(self, record: StepRecord) -> None:
        """Refuse (EditRefused) a step with non-finite factors or a layer delta above max_delta_norm."""
        for gs in record.groups:
            names = self.groups[gs.group].names
            for what, t in (("keys", gs.keys), ("value-grads", gs.value_grads), ("solution", gs.solution)):
                if not torch.isfinite(t).all():
                    raise EditRefused(f"step {record.step + 1}: non-finite {what} for {', '.join(names)}; "
                                      "the model was left unchanged")
            if self.cfg.max_delta_norm > 0:
                norms = gs.delta_norms()
                worst = int(norms.argmax())
                if norms[worst] > self.cfg.max_delta_norm:
                    raise EditRefused(f"step {record.step + 1}: ||dW|| = {norms[worst]:.4g} for {names[worst]} exceeds "
                                      f"max_delta_norm {self.cfg.max_delta_norm:g}; the model was left unchanged")

    def _check_applied(self, record: StepRecord, before: list[torch.Tensor]) -> None:
        """Refuse (EditRefused) a step that turned a finite weight non-finite: finite factors can still overflow
        the weights' dtype (fp16 above 65504, or any dtype near its range)."""
        for m, w, w0 in zip(self.modules_, self.weights(), before):
            if not torch.isfinite(w).all() and torch.isfinite(w0).all():
                raise EditRefused(f"step {record.step + 1}: the update overflowed {m.name} ({w.dtype}) to non-finite "
                                  "values; the model was left unchanged")

    @torch.no_grad()
    def apply_step(self, record: StepRecord) -> None:
        """W_l += M_l^T K_l (or S_l^T) for every layer of every group, one grouped call per group."""
        for gs in record.groups:
            group = self.groups[gs.group]
            weights = self.weights(gs.group)
            to_model = weights[0].device
            solution = list(gs.solution.to(to_model).unbind(0))
            if gs.form == "primal":
                ops.apply_deltas_dense_(weights, solution, None, group.transposed, backend=self.backend)
            else:
                ops.apply_deltas_(weights, solution, list(gs.factor_keys.to(to_model).unbind(0)), None,
                                  group.transposed, backend=self.backend)

    # ---------------------------------------------------------------------------------------------------------------
    # editing API

    def edit(self, batch, n_steps: int | None = None, request_ids: list[str] | None = None,
             update_stats: bool | None = None) -> AppliedEdit:
        """Apply K MSBP steps to `batch` (a TokenBatch of edit tuples) and record them; returns the journal entry.

        K defaults to the configured n_steps; a sequential editor cannot run more steps than it has networks.
        Every step is checked before it is applied: on EditRefused the model is restored bit for bit.
        """
        if n_steps is not None and n_steps < 1:
            raise ValueError(f"n_steps must be >= 1 (or None for the configured {self.cfg.n_steps}), got {n_steps}")
        k_steps = n_steps or self.cfg.n_steps
        if self.regime == "sequential" and k_steps > len(self.nets):
            raise ValueError(f"this sequential editor has {len(self.nets)} step networks; cannot run {k_steps} steps")
        if update_stats is None:
            update_stats = not self.cfg.freeze_normaliser_at_eval
        before = ops.snapshot(self.weights())
        stats_before = {k: v.clone() for k, v in self.state_dict().items() if k.endswith(("count", "mean", "var",
                                                                                        "std"))}
        start = time.perf_counter()
        records = []
        with ops.record_backends() as seen:
            try:
                for k in range(k_steps):
                    cap = self.capture(batch)
                    rec = self.predict_deltas(cap, k, update_stats=update_stats)
                    self.check_record(rec)
                    self.apply_step(rec)
                    self._check_applied(rec, before)
                    records.append(rec)
            except BaseException:
                ops.restore_(self.weights(), before, backend=self.backend)
                self.load_state_dict(stats_before, strict=False)
                raise
        entry = AppliedEdit(self._next_id, list(request_ids or []), records, dict(seen), time.perf_counter() - start,
                            before)
        for old in self.history:
            old.before = None  # only the latest edit keeps its pre-edit bytes (bit-exact undo of the last edit)
        self.history.append(entry)
        self._next_id += 1
        return entry

    @torch.no_grad()
    def revert(self, edit_id: int) -> None:
        """Remove one recorded edit. The last edit reverts bit-exactly from its pre-edit snapshot; an earlier one
        reverts by restoring W0 and replaying the factors of the remaining edits in order (bit-identical to the
        state those edits produced when no later edit depended on the removed one)."""
        pos = next((i for i, e in enumerate(self.history) if e.edit_id == edit_id), None)
        if pos is None:
            raise KeyError(f"no edit with id {edit_id}; recorded: {[e.edit_id for e in self.history]}")
        entry = self.history.pop(pos)
        if pos == len(self.history) and entry.before is not None:
            ops.restore_(self.weights(), entry.before, backend=self.backend)
            return
        for later in self.history:  # their pre-edit snapshots still contain the removed edit: stale from now on
            later.before = None
        self.replay()

    @torch.no_grad()
    def replay(self) -> None:
        """W <- W0, then every recorded step again, in order."""
        ops.restore_(self.weights(), self.base, backend=self.backend)
        for entry in self.history:
            for rec in entry.steps:
                self.apply_step(rec)

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the unedited weights W0 (bit-exact) and an empty history."""
        ops.restore_(self.weights(), self.base, backend=self.backend)
        self.history.clear()

    def editor_state(self) -> dict[str, torch.Tensor]:
        """A deep copy of parameters and normaliser buffers (evaluation snapshots it and restores it afterwards)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    # ---------------------------------------------------------------------------------------------------------------
    # meta-gradient

    def meta_backward(self, records: list[StepRecord], grads: dict[str, WeightGrad], *, shift_reg: float = 0.0,
                      scale: float = 1.0) -> None:
        """Accumulate dL/dphi into the hypernetworks' .grad for the given steps (METHOD.md 8.1-8.5).

        grads: module name -> dL/dW (linear orientation, factored). The same G drives every step (8.5).
        shift_reg: RLEdit's r_S; adds 2 r_S S_k to dL/dS_k of step k. scale multiplies the whole gradient.
        """
        for rec in records:
            for gs in rec.groups:
                group = self.groups[gs.group]
                wg = [grads[m.name] for m in group.modules]
                if gs.form == "outer":
                    self._backward_outer(gs, group, wg, scale)
                else:
                    self._backward_ridge(gs, wg, shift_reg, scale)

    def _backward_ridge(self, gs: GroupStep, wg: list[WeightGrad], shift_reg: float, scale: float) -> None:
        net, m = gs.net, gs.keys.shape[0]
        if gs.form == "dual":
            # dL/dM_l = U_l G_l^T (n, d_out); the shift penalty adds U_l (2 r_S S_l) with S_l = U_l^T M_l
            grad_sol = torch.stack([wg[i].times_keys(gs.keys[i]) for i in range(m)])
            if shift_reg:
                shift = gs.keys.transpose(1, 2) @ gs.solution  # (m, d_in, d_out)
                grad_sol = grad_sol + 2 * shift_reg * (gs.keys @ shift)
        else:
            grad_sol = torch.stack([wg[i].hat() for i in range(m)])  # (m, d_in, d_out)
            if shift_reg:
                grad_sol = grad_sol + 2 * shift_reg * gs.solution
        grad_sol = grad_sol * scale
        grad_targets, grad_log_ridge = ops.ridge_solve_backward(grad_sol, gs.keys, gs.solution,
                                                                net.log_ridge.detach(), gs.form, backend=self.backend)
        _accumulate(net.log_ridge, grad_log_ridge)
        keys = gs.keys.reshape(-1, gs.keys.shape[2])
        grads = gs.value_grads.reshape(-1, gs.value_grads.shape[2])
        p = grad_targets.reshape(-1, grad_targets.shape[2])  # (m n, d_out) dL/dV
        for lo in range(0, keys.shape[0], self.cfg.hypernet_chunk):
            hi = lo + self.cfg.hypernet_chunk
            with torch.enable_grad():
                z = net(keys[lo:hi], grads[lo:hi], gs.idx[lo:hi], mean=gs.mean, std=gs.std, backend=self.backend)
                targets, _ = ops.value_targets(keys[lo:hi], z, net.eta, gs.idx[lo:hi], backend=self.backend)
                (targets * p[lo:hi]).sum().backward()  # surrogate <dL/dV, V(phi)>; each chunk frees its graph

    def _backward_outer(self, gs: GroupStep, group: ShapeGroup, wg: list[WeightGrad], scale: float) -> None:
        # dW_l = sum_j m_j k_j^T with m_j = -eta_l delta~_j, k_j = u~_j:  <G_l, dW_l> = sum_j m_j^T (G_l k_j)
        net, (m, n, _) = gs.net, gs.keys.shape
        d_in = group.d_in
        for layer in range(m):
            keys, grads = gs.keys[layer], gs.value_grads[layer]
            idx = gs.idx[layer * n:(layer + 1) * n]
            for lo in range(0, n, self.cfg.hypernet_chunk):
                hi = lo + self.cfg.hypernet_chunk
                with torch.enable_grad():
                    z = net(keys[lo:hi], grads[lo:hi], idx[lo:hi], mean=gs.mean, std=gs.std, backend=self.backend)
                    coeffs = -net.eta.index_select(0, idx[lo:hi]).unsqueeze(1) * z[:, d_in:]
                    g_k = wg[layer].times_keys(z[:, :d_in])  # G_l u~_j, differentiable in u~
                    (scale * (coeffs * g_k).sum()).backward()


def _accumulate(param: nn.Parameter, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = grad.detach().clone()
    else:
        param.grad += grad.detach()
