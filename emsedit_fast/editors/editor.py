"""The editing engine shared by every method: capture -> predict_deltas -> apply, repeated K times (MSBP).

One MSBP step on an edit batch (docs/method.md, "MSBP and the two modes"):

    rows    <- capture(batch, current W)                   keys U_l (n, d_in), value-grads Delta_l (n, d_out)
    for each shape group g (all same-shape layers at once, rows stacked with a layer index):
        normaliser(phi_k,g).update(rows)                    (unless frozen)
        z = [u~ | delta~] = phi_k,g(normalise(rows))
        ridge:  c_j = -eta_l <u_j, u~_j>, V_j = c_j delta~_j;  M_l = (U'_l U'_l^T + e^lambda_l I)^-1 V_l  (dual)
                with U' = U P_l (P_l = I without a key prior) and factor keys K_l = U'_l P_l; or the primal
                S_l = (U^T U + e^lambda_l I)^-1 U^T V_l
        outer:  M_l = -eta_l Delta~_l, K_l = U~_l   (MEND)
    W_l <- round(W_l + M_l^T K_l)  (or + S_l^T) for every layer in one grouped call per group

Step k+1 captures on the model edited by step k: that is MSBP. Which hypernetwork serves step k depends on the
mode: sequential editors own one network per step (rank r / k), batch editors share one network across steps.

Key prior (editor.key_prior = gamma > 0): the ridge problem becomes
    min_S sum_j ||S^T u_j - v_j||^2 + beta ||S||^2 + beta gamma E_x ||S^T x||^2,   x ~ keys of generic text,
which keeps the update small on the directions ordinary inputs occupy (docs/method.md, "Ridge least squares"). With
Sigma = E[x x^T] and P = (I + gamma Sigma)^(-1/2) it is the plain ridge problem on keys U P, solved in the same dual
form; dW = M^T (U P) P stays rank n.

The meta-gradient is decoupled from the language model: `meta_backward` takes the loss gradient G_l with respect to
each edited weight (`WeightGrad`), pushes it through the aggregation analytically, then recomputes the hypernetwork
in row chunks under autograd and back-propagates the surrogate <dL/dV, V(phi)> (docs/method.md, "Meta-gradient").
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from emsedit_fast import ops
from emsedit_fast.config import EditorConfig
from emsedit_fast.editors.prior import KeyPrior
from emsedit_fast.editors.weight_grad import WeightGrad
from emsedit_fast.history import History
from emsedit_fast.losses import Reduction
from emsedit_fast.models.adapter import EditedModule
from emsedit_fast.models.adapter import ShapeGroup
from emsedit_fast.models.adapter import group_by_shape
from emsedit_fast.models.hooks import Capture
from emsedit_fast.models.hooks import PrefixReuse
from emsedit_fast.models.hooks import capture
from emsedit_fast.models.hooks import key_second_moments
from emsedit_fast.nn import HyperNet
from emsedit_fast.updates import AppliedEdit
from emsedit_fast.updates import GroupUpdate
from emsedit_fast.updates import apply_updates_
from emsedit_fast.updates import recorded_backends

log = logging.getLogger(__name__)


class EditRefused(RuntimeError):
    """An edit produced non-finite values or exceeded the delta-norm bound; the model was left unchanged."""


@dataclass
class GroupStep:
    """One MSBP step of one shape group: the update it applied, and what the meta-gradient needs to redo it.

    keys (m, n, d_in) raw U, value_grads (m, n, d_out), idx (m n,) layer of each stacked row: the captured rows.
    mean, std (D,): the normaliser statistics the hypernetwork used (the meta-gradient must reuse them).
    solve_keys (m, n, d_in): the keys the ridge system was built from (U P with a key prior, else U; None for MEND).
    """

    update: GroupUpdate
    group: int
    net: HyperNet
    keys: torch.Tensor
    value_grads: torch.Tensor
    idx: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    solve_keys: torch.Tensor | None

    @property
    def form(self) -> str:
        return self.update.form

    @property
    def solution(self) -> torch.Tensor:
        return self.update.solution

    @property
    def factor_keys(self) -> torch.Tensor | None:
        return self.update.factor_keys

    def delta_norms(self) -> torch.Tensor:
        return self.update.delta_norms()


@dataclass
class StepRecord:
    """One MSBP step over all shape groups, plus the caching loss that drove it."""

    step: int
    groups: list[GroupStep]
    cache_loss: float
    n_rows: int

    @property
    def updates(self) -> list[GroupUpdate]:
        return [gs.update for gs in self.groups]

    def layer_keys(self) -> dict[str, torch.Tensor]:
        """{layer name: the step's raw keys (n, d_in)}: what the edit term of the key prior accumulates."""
        return {name: gs.keys[i] for gs in self.groups for i, name in enumerate(gs.update.names)}


class Editor(nn.Module):
    """A hypernetwork editor for a list of edited modules of one model.

    mode "sequential": n_steps networks, step k of rank floor(rank / k) when rank_schedule = divide (Algorithm 1).
    mode "batch": one network of rank `rank` serves every step (Algorithm 2).
    The model is held by reference (not registered as a submodule) so `state_dict()` holds only the editor:
    hypernetwork parameters, normaliser statistics and (with a key prior) the key statistics.
    """

    def __init__(self, model: nn.Module, modules: list[EditedModule], cfg: EditorConfig, mode: str = "sequential",
                 *, seed: int = 0, device: torch.device | str | None = None):
        super().__init__()
        if not modules:
            raise ValueError("Editor needs at least one edited module")
        if mode not in ("sequential", "batch"):
            raise ValueError(f"mode must be 'sequential' or 'batch', got {mode!r}")
        self.cfg = cfg
        self.mode = mode
        self.__dict__["model"] = model  # not a submodule
        self.modules_ = list(modules)
        self.groups: list[ShapeGroup] = group_by_shape(modules)
        device = torch.device(device) if device is not None else modules[0].weight.device
        gen = torch.Generator().manual_seed(seed)
        n_nets = cfg.n_steps if mode == "sequential" else 1
        nets = []
        for k in range(n_nets):
            rank = cfg.rank if mode == "batch" or cfg.rank_schedule == "constant" else max(1, cfg.rank // (k + 1))
            if k > 0 and cfg.step_rank:
                rank = cfg.step_rank
            nets.append(nn.ModuleList([
                HyperNet(g.d_in, g.d_out, len(g), rank, cfg.n_blocks, cfg.block_order == "relu_affine",
                         cfg.eta_init, cfg.lambda_init, cfg.std_floor, eta_param=cfg.eta_param, generator=gen,
                         a_init=cfg.a_init)
                for g in self.groups]))
        self.nets = nn.ModuleList(nets).to(device)
        self.device = device  # the hypernetworks' device; the model may live elsewhere (factors move per step)
        # the key prior of the ridge solve (editors/prior.py); a submodule only when configured
        self.prior = KeyPrior(self.groups, cfg.key_prior, cfg.edit_prior, device) \
            if cfg.key_prior > 0 or cfg.edit_prior > 0 else None
        # W0: the unedited edited weights, for reset and the drift penalty; compact: a bf16 model's layers promoted to
        # fp32 master weights still hold bf16 values here, so W0 is kept in bf16 (exact, half the memory)
        self.base = ops.snapshot(self.weights(), compact=True)
        self.history = History([m.name for m in self.modules_], self.base, cfg.undo, cfg.max_undo,
                               dtypes=[w.dtype for w in self.weights()])
        self._next_id = 1
        self._maxabs = [float(w.abs().max()) if w.numel() else 0.0 for w in self.base]  # overflow bound, see check

    # ---------------------------------------------------------------------------------------------------------------
    # plumbing

    @property
    def backend(self) -> str:
        return self.cfg.backend

    def weights(self, group: int | None = None) -> list[torch.Tensor]:
        """The edited weight tensors (storage layout), all modules or one shape group."""
        mods = self.modules_ if group is None else self.groups[group].modules
        return [m.weight.data for m in mods]

    def named_weights(self) -> dict[str, torch.Tensor]:
        return {m.name: m.weight.data for m in self.modules_}

    def net(self, step: int, group: int) -> HyperNet:
        return self.nets[step if self.mode == "sequential" else 0][group]

    def solve_form(self, n_rows: int, d_in: int) -> str:
        """The reference backend runs the published primal solve; the fast paths pick dual/primal by cost. A key
        prior is solved in the dual form (its transformed keys keep the update rank n)."""
        if self.prior is not None:
            return "dual"
        if self.cfg.solve_form == "auto" and self.backend == "reference":
            return "primal"
        return ops.choose_form(n_rows, d_in, self.cfg.solve_form)

    def capture(self, batch, reduction: Reduction = "sum_of_microbatch_means",
                prefix: PrefixReuse | None = None) -> Capture:
        """Caching pass on the current weights: keys and value-grads of every edited module at the positions
        editor.key_positions names (`TokenBatch.positions`; the subject choices need batches tokenised with their
        records' subjects, as `tokenize_batch` does). prefix: shared by the K passes over one batch (`prefix_reuse`)."""
        where = self.cfg.key_positions
        return capture(self.model, self.modules_, batch.input_ids, batch.attention_mask, batch.labels,
                       batch.micro_batch, "answer", reduction, device=self.device,
                       positions=None if where == "answer" else batch.positions(where), prefix=prefix)

    def prefix_reuse(self) -> PrefixReuse | None:
        """A fresh `PrefixReuse` for the K caching passes over one edit batch (None with editor.reuse_prefix off):
        the layers below the lowest edited module run in the first pass only."""
        return PrefixReuse(self.model, self.modules_) if self.cfg.reuse_prefix else None

    def normaliser_state(self) -> dict[str, torch.Tensor]:
        """A copy of every hypernetwork's running-normaliser buffers (count, mean, var, std), by state_dict key."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if ".stats." in k}

    def load_normaliser_state(self, state: dict[str, torch.Tensor]) -> None:
        own = self.state_dict()
        self.load_state_dict({k: v.to(own[k].device) for k, v in state.items()}, strict=False)

    def editor_state(self) -> dict[str, torch.Tensor]:
        """A deep copy of parameters and buffers (evaluation snapshots it and restores it afterwards)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def session_state(self) -> dict:
        """Everything an evaluation changes and must put back: the edited weights, parameters and buffers, the undo
        history and the overflow bound."""
        return {"weights": ops.snapshot(self.weights()), "editor": self.editor_state(),
                "history": self.history.state(), "maxabs": list(self._maxabs), "next_id": self._next_id}

    @torch.no_grad()
    def load_session_state(self, state: dict) -> None:
        ops.restore_(self.weights(), state["weights"], backend=self.backend)
        self.load_state_dict(state["editor"])
        self.history.load_state(state["history"])
        self._maxabs, self._next_id = list(state["maxabs"]), state["next_id"]

    # ---------------------------------------------------------------------------------------------------------------
    # key prior

    @torch.no_grad()
    def fit_key_prior(self, batches, *, max_tokens: int | None = None, positions: str = "all") -> int:
        """Estimate Sigma_l = E[x x^T] over the keys of every edited module at the `positions` of `batches`
        (TokenBatches; "all" non-pad tokens, or a `TokenBatch.positions` choice), replacing earlier statistics.
        Returns the tokens used."""
        if self.prior is None or self.cfg.key_prior <= 0:
            raise ValueError("fit_key_prior: editor.key_prior is 0 (no key prior configured)")
        moments, tokens = key_second_moments(self.model, self.modules_, batches, max_tokens=max_tokens,
                                             positions=positions)
        self.prior.fit(moments, tokens)
        log.info("key prior: second moments of %d tokens per edited module", tokens)
        return tokens

    def sync_edit_prior(self, base: dict[str, torch.Tensor] | None = None) -> None:
        """Rebuild the edit term of the key prior from the recorded edits (history, plus the folded ones'
        statistics; `base` replaces those, e.g. from a journal's compacted base)."""
        if self.prior is not None:
            if base is not None:
                self.history.folded_moments = {k: v.double() for k, v in base.items()}
            self.prior.set_edit_keys([e.keys for e in self.history], self.history.folded_moments)

    def _coeff_keys(self, keys: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, d_in: int) -> torch.Tensor:
        """The keys k_j of the target coefficient c_j = -eta <k_j, u~_j>: raw (u_j) or normalised
        (u^_j = (u_j - mu) / (sigma + eps), UltraEdit) with the statistics the step used."""
        if self.cfg.coeff_keys == "raw":
            return keys
        return (keys - mean[:d_in]) / (std[:d_in] + ops.NORM_EPS)

    # ---------------------------------------------------------------------------------------------------------------
    # one MSBP step

    @torch.no_grad()
    def predict_deltas(self, cap: Capture, step: int, *, update_stats: bool = True) -> StepRecord:
        """Keys and value-grads of one caching pass -> the factors of every layer's update (nothing is applied)."""
        if self.prior is not None and not self.prior.ready():
            raise ValueError("editor.key_prior > 0 but the key statistics were never estimated: call "
                             "editor.fit_key_prior(batches) (training and api.open_session do it from the training "
                             "data)")
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
            keys3 = keys.view(m, n, -1)
            solve_keys = None
            if self.cfg.aggregation == "outer":
                coeffs = -net.step_size().index_select(0, idx).unsqueeze(1) * z[:, group.d_in:]  # M = -eta Delta~
                update = GroupUpdate(group.names, group.transposed, "outer", coeffs.view(m, n, -1),
                                     z[:, :group.d_in].reshape(m, n, -1), n)
            else:
                targets, _ = ops.value_targets(self._coeff_keys(keys, mean, std, group.d_in), z, net.step_size(), idx,
                                               backend=self.backend)
                if not torch.isfinite(targets).all():
                    raise EditRefused(f"step {step + 1}: non-finite value targets (hypernetwork output or eta) for "
                                      f"{', '.join(group.names)}; the model was left unchanged")
                form = self.solve_form(n, group.d_in)
                solve_keys, factor_keys = keys3, keys3
                if self.prior is not None:
                    solve_keys, factor_keys = self.prior.transform(g, keys3)  # U L^-T (Gram), U C^-1 (dW = M^T U C^-1)
                solution = ops.ridge_solve(solve_keys, targets.view(m, n, -1), net.log_ridge, form,
                                           backend=self.backend)
                update = GroupUpdate(group.names, group.transposed, form, solution,
                                     factor_keys if form == "dual" else None, n)
            groups.append(GroupStep(update, g, net, keys3, grads.view(m, n, -1), idx, mean, std, solve_keys))
        return StepRecord(step, groups, cap.loss, cap.n_rows)

    def check_record(self, record: StepRecord) -> None:
        """Refuse (EditRefused) a step with non-finite factors, a layer delta above max_delta_norm, or an update that
        could overflow the weights' dtype (decided from the factors: max|W| + max|dW| bounds, see `_maxabs`)."""
        for gs in record.groups:
            names = self.groups[gs.group].names
            for what, t in (("solution", gs.solution), ("factor keys", gs.factor_keys)):
                if t is not None and not torch.isfinite(t).all():
                    raise EditRefused(f"step {record.step + 1}: non-finite {what} for {', '.join(names)}; "
                                      "the model was left unchanged")
            if self.cfg.max_delta_norm > 0:
                norms = gs.delta_norms()
                worst = int(norms.argmax())
                if norms[worst] > self.cfg.max_delta_norm:
                    raise EditRefused(f"step {record.step + 1}: ||dW|| = {norms[worst]:.4g} for {names[worst]} exceeds "
                                      f"max_delta_norm {self.cfg.max_delta_norm:g}; the model was left unchanged")

    @torch.no_grad()
    def apply_step(self, record: StepRecord) -> None:
        """W_l += M_l^T K_l (or S_l^T) for every layer of every group, one grouped call per group; refuses an update
        that overflowed the weights' dtype (only checked where the factor bound says it could)."""
        index = {m.name: i for i, m in enumerate(self.modules_)}
        risky = []
        for gs in record.groups:
            bounds = gs.update.delta_maxabs_bound().tolist()
            for name, bound in zip(gs.update.names, bounds):
                i = index[name]
                self._maxabs[i] += bound
                if self._maxabs[i] > torch.finfo(self.modules_[i].weight.dtype).max / 2:
                    risky.append(i)
        apply_updates_(self.named_weights(), [record.updates], self.backend)
        weights = self.weights()
        for i in risky:
            if not torch.isfinite(weights[i]).all() and torch.isfinite(self.base[i]).all():
                raise EditRefused(f"step {record.step + 1}: the update overflowed {self.modules_[i].name} "
                                  f"({weights[i].dtype}) to non-finite values; the model was left unchanged")

    # ---------------------------------------------------------------------------------------------------------------
    # editing API

    def edit(self, batch, n_steps: int | None = None, request_ids: list[str] | None = None,
             update_stats: bool | None = None) -> AppliedEdit:
        """Apply K MSBP steps to `batch` (a TokenBatch of edit tuples) and record them; returns the AppliedEdit.

        K defaults to the configured n_steps; a sequential editor cannot run more steps than it has networks.
        Every step is checked before it is applied: on EditRefused (or any error) the weights and the normaliser
        statistics go back bit for bit, from a pre-edit snapshot (undo policy "snapshot") or by replaying the
        recorded edits onto the history's base (policy "replay", which copies nothing per edit).
        """
        if n_steps is not None and n_steps < 1:
            raise ValueError(f"n_steps must be >= 1 (or None for the configured {self.cfg.n_steps}), got {n_steps}")
        k_steps = n_steps or self.cfg.n_steps
        if self.mode == "sequential" and k_steps > len(self.nets):
            raise ValueError(f"this sequential editor has {len(self.nets)} step networks; cannot run {k_steps} steps")
        if update_stats is None:
            update_stats = not self.cfg.freeze_normaliser_at_eval
        before = ops.snapshot(self.weights()) if self.history.wants_snapshot() else None
        stats_before = self.normaliser_state()
        start = time.perf_counter()
        records = []
        prefix = self.prefix_reuse()
        with ops.record_backends() as seen:
            try:
                for k in range(k_steps):
                    rec = self.predict_deltas(self.capture(batch, prefix=prefix), k, update_stats=update_stats)
                    self.check_record(rec)
                    records.append(rec)  # before applying: a failure inside the apply must be rolled back too
                    self.apply_step(rec)
            except BaseException:
                if records:
                    if before is not None:
                        ops.restore_(self.weights(), before, backend=self.backend)
                    else:
                        self.history.rebuild_(self.weights(), backend=self.backend)
                self.load_normaliser_state(stats_before)
                raise
        entry = AppliedEdit([rec.updates for rec in records], recorded_backends(seen),
                            self.weights()[0].device.type, self._next_id, list(request_ids or []),
                            seconds=time.perf_counter() - start,
                            ops_ran={op: sorted(names) for op, names in seen.items()},
                            keys=records[0].layer_keys() if self.cfg.edit_prior > 0 else {})
        self.history.record(entry, before)
        self.sync_edit_prior()
        self._next_id += 1
        return entry

    @torch.no_grad()
    def revert(self, edit_id: int) -> AppliedEdit:
        """Remove one recorded edit (exact; see emsedit_fast.history for what undoing an earlier edit means)."""
        removed = self.history.undo_(edit_id, self.weights(), backend=self.backend)
        self.sync_edit_prior()
        return removed

    @torch.no_grad()
    def replay(self) -> None:
        """Weights <- the history's base, then every recorded edit again, in order (bit-identical)."""
        self.history.rebuild_(self.weights(), backend=self.backend)

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the unedited weights W0 (bit-exact), an empty history and no edit term in the key prior."""
        ops.restore_(self.weights(), self.base, backend=self.backend)
        self.history.clear()
        if self.prior is not None:
            self.prior.clear_edits()
        self._maxabs = [float(w.abs().max()) if w.numel() else 0.0 for w in self.base]

    # ---------------------------------------------------------------------------------------------------------------
    # meta-gradient

    def meta_backward(self, records: list[StepRecord], grads: dict[str, WeightGrad], *, shift_reg: float = 0.0,
                      scale: float = 1.0) -> None:
        """Accumulate dL/dphi into the hypernetworks' .grad for the given steps (docs/method.md, "Meta-gradient").

        grads: module name -> dL/dW (linear orientation, factored). The same G drives every step (first-order
        truncation across steps). shift_reg: RLEdit's r_S; adds 2 r_S S_k to dL/dS_k of step k. scale multiplies
        the whole gradient.
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
            # dW_l = M_l^T K_l: dL/dM_l = K_l G_l^T (n, d_out); the shift penalty adds K_l (2 r_S S_l), S_l = K_l^T M_l
            grad_sol = torch.stack([wg[i].times_keys(gs.factor_keys[i]) for i in range(m)])
            if shift_reg:
                shift = gs.factor_keys.transpose(1, 2) @ gs.solution  # (m, d_in, d_out)
                grad_sol = grad_sol + 2 * shift_reg * (gs.factor_keys @ shift)
        else:
            grad_sol = torch.stack([wg[i].hat() for i in range(m)])  # (m, d_in, d_out)
            if shift_reg:
                grad_sol = grad_sol + 2 * shift_reg * gs.solution
        grad_sol = grad_sol * scale
        grad_targets, grad_log_ridge = ops.ridge_solve_backward(grad_sol, gs.solve_keys, gs.solution,
                                                                net.log_ridge.detach(), gs.form, backend=self.backend)
        _accumulate(net.log_ridge, grad_log_ridge)
        keys = gs.keys.reshape(-1, gs.keys.shape[2])
        grads = gs.value_grads.reshape(-1, gs.value_grads.shape[2])
        p = grad_targets.reshape(-1, grad_targets.shape[2])  # (m n, d_out) dL/dV
        for lo in range(0, keys.shape[0], self.cfg.hypernet_chunk):
            hi = lo + self.cfg.hypernet_chunk
            with torch.enable_grad():
                z = net(keys[lo:hi], grads[lo:hi], gs.idx[lo:hi], mean=gs.mean, std=gs.std, backend=self.backend)
                coeff_keys = self._coeff_keys(keys[lo:hi], gs.mean, gs.std, keys.shape[1])
                targets, _ = ops.value_targets(coeff_keys, z, net.step_size(), gs.idx[lo:hi], backend=self.backend)
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
                    coeffs = -net.step_size().index_select(0, idx[lo:hi]).unsqueeze(1) * z[:, d_in:]
                    g_k = wg[layer].times_keys(z[:, :d_in])  # G_l u~_j, differentiable in u~
                    (scale * (coeffs * g_k).sum()).backward()


def _accumulate(param: nn.Parameter, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = grad.detach().clone()
    else:
        param.grad += grad.detach()
