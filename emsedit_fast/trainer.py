"""Meta-training of hypernetwork editors: sequential (Algorithm 1) and batch (Algorithm 2) modes.

Sequential, per training batch E_t (the model is never reset between batches):
    for k = 1..K:  capture on the current W; predict with phi_k; apply dW_k permanently
    L = loss(E_t; W) (+ c ||W - W0||^2, or c ||W - W_{t-1}||^2 with drift_reference pre_batch, or KL, or RLEdit's
        decayed loss over the last B batches)
        (+ retain_coef * mean_{s in R_t} CE(E_s; W): R_t = retain_batches earlier batches of the current sequence,
        drawn at random, so that the step learns to keep the edits before it; off by default)
    G = dL/dW (factored); push G through every step's aggregation into phi_1..phi_K (train.step_credit final; last:
        into phi_K only; per_step: L and G after each step k, into phi_k); clip; Adam step
        (every batch, or once at the end with seq_optimizer_step = once_at_end, the published schedule)
Batch, per training step (one batch):
    for k = 1..K:  capture; predict with the shared phi; apply; L; G; revert dW_k (reset, the published default) or
                   keep it (chain); push G into phi; clip; Adam step        ("step-wise updating")
    restore W0
(docs/method.md, "Meta-gradient", "Training losses", "MSBP and the two modes").
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace

import torch
from torch.optim.adam import adam  # the functional update torch.optim.Adam runs

from emsedit_fast import ops
from emsedit_fast.callbacks import Callback
from emsedit_fast.config import ConfigError
from emsedit_fast.config import TrainConfig
from emsedit_fast.editors import Editor
from emsedit_fast.editors import EditRefused
from emsedit_fast.editors import WeightGrad
from emsedit_fast.editors.weight_grad import drift_sq_norm
from emsedit_fast.editors.weight_grad import lowrank_drift_sq_norm
from emsedit_fast.losses import answer_ce
from emsedit_fast.losses import answer_kl
from emsedit_fast.models.hooks import FactoredGrads
from emsedit_fast.models.hooks import answer_positions
from emsedit_fast.models.hooks import factored_weight_grads
from emsedit_fast.models.hooks import logits_at

log = logging.getLogger(__name__)


@dataclass
class TrainReport:
    steps: int = 0
    skipped: int = 0  # steps refused for non-finite values (counted, never silently applied)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    edits: int = 0
    curve: list[dict] = field(default_factory=list)  # validation points during training (api.train, eval_every)
    kept_step: int | None = None  # train.keep best: the training step whose editor the run kept (0: untrained)
    # after every training batch, per MSBP step k: the step size and the size of what the networks learnt
    # (MetaTrainer.network_scales); where a run diverges, this says which part moved
    scales: list[dict] = field(default_factory=list)

    @property
    def seconds_per_edit(self) -> float:
        return self.seconds / max(self.edits, 1)

    @property
    def outcome(self) -> str:
        """Which editor the run ended with, as a results table says it: the last one, or the validation point that
        train.keep best kept (0: the untrained editor)."""
        kept = self.kept_step
        if kept is None:
            return "trained"
        return "untrained: best on validation" if kept == 0 else f"trained, kept after {kept} of {self.steps} batches"


class SlicedAdam(torch.optim.Adam):
    """torch's Adam, per tensor (foreach=False), run over slices of at most `slice_numel` elements of each parameter.

    The update is elementwise, so slicing changes no value (tested bit for bit against torch.optim.Adam). What it
    changes is the step's transient memory: the per-tensor update allocates two parameter-sized temporaries (the
    square root of the second moment and its bias-corrected quotient), 2 x 8.6 MB for a rank-1024 hypernetwork block,
    on top of the gradients and moments at the peak of a training step; sliced, 2 x 1 MB. The state (step, exp_avg,
    exp_avg_sq per parameter) and its state_dict are torch's. A group set to foreach, fused, capturable or
    differentiable is refused with an error (use torch.optim.Adam for those).
    """

    def __init__(self, params, *, slice_numel: int = 1 << 18, **kwargs):
        super().__init__(params, **kwargs)
        self.slice_numel = slice_numel

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["foreach"] or group["fused"] or group["capturable"] or group["differentiable"]:
                raise ValueError("SlicedAdam runs the per-tensor update only (foreach=False, fused, capturable and "
                                 "differentiable off); use torch.optim.Adam for the others")
            params, grads, avgs, sqs, maxs, steps = [], [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or torch.is_complex(p):
                    raise ValueError("SlicedAdam: sparse gradients and complex parameters are not supported")
                state = self.state[p]
                if not state:  # as torch's Adam initialises it (a float32 step on the CPU, zero moments)
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                tensors = [p, p.grad, state["exp_avg"], state["exp_avg_sq"]]
                if group["amsgrad"]:
                    tensors.append(state["max_exp_avg_sq"])
                flat = [t.view(-1) for t in tensors]  # parameters and their state are contiguous
                for lo in range(0, p.numel(), self.slice_numel):
                    part = [t[lo:lo + self.slice_numel] for t in flat]
                    params.append(part[0])
                    grads.append(part[1])
                    avgs.append(part[2])
                    sqs.append(part[3])
                    if group["amsgrad"]:
                        maxs.append(part[4])
                    # the first slice advances the state's step in place, the others a copy taken before the update
                    steps.append(state["step"] if lo == 0 else state["step"].clone())
            # decoupled_weight_decay came with AdamW's merge into Adam: groups of older torch versions lack the key
            extra = {"decoupled_weight_decay": group["decoupled_weight_decay"]} \
                if "decoupled_weight_decay" in group else {}
            adam(params, grads, avgs, sqs, maxs, steps, foreach=False, amsgrad=group["amsgrad"],
                 beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"], weight_decay=group["weight_decay"],
                 eps=group["eps"], maximize=group["maximize"], **extra)
        return loss


def build_optimizer(editor: Editor, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (0.9, 0.999, eps 1e-8, no weight decay) over every editor parameter; the per-layer step size (eta or
    log eta) and log-ridge at meta_lr * scalar_lr_scale.

    The per-tensor implementation (foreach=False), run over slices of each parameter (SlicedAdam): it computes what
    the multi-tensor one does, bit for bit (tested), but holds one slice's temporaries at a time instead of every
    parameter's, which on the CPU makes the step faster and its peak memory lower. The fused implementation is faster
    still but rounds differently, so trained results would not reproduce the published tables."""
    scalars = {id(p) for net_list in editor.nets for net in net_list for p in net.scalar_parameters()}
    main = [p for p in editor.parameters() if id(p) not in scalars]
    small = [p for p in editor.parameters() if id(p) in scalars]
    groups = [{"params": main, "lr": cfg.meta_lr}, {"params": small, "lr": cfg.meta_lr * cfg.scalar_lr_scale}]
    return SlicedAdam([g for g in groups if g["params"]], betas=(0.9, 0.999), eps=1e-8, foreach=False)


def lr_factor(schedule: str, step: int, total: int, warmup: float = 0.0) -> float:
    """The factor train.lr_schedule puts on Adam's rate at training batch `step` (0-based) of `total`: 1 (constant),
    (1 + cos(pi step / total)) / 2 (cosine) or 1 - step / total (linear); without warmup the first batch trains at
    the full rate, the last at a fraction 1 / total of it or less.

    warmup (train.warmup, a fraction of the run): over its first w = ceil(warmup * total) batches the factor also
    rises linearly, (step + 1) / w, so that the first batches, whose meta-gradients come from networks that have
    not learnt anything yet, move them by a fraction of the full rate (1 / w at the first batch)."""
    ramp = 1.0
    if warmup > 0 and total > 0:
        ramp = min(1.0, (step + 1) / max(1, math.ceil(warmup * total)))
    if schedule == "constant" or total <= 0:
        return ramp
    x = min(max(step / total, 0.0), 1.0)
    if schedule == "cosine":
        return ramp * 0.5 * (1.0 + math.cos(math.pi * x))
    if schedule == "linear":
        return ramp * (1.0 - x)
    raise ValueError(f"train.lr_schedule: expected constant, cosine or linear, got {schedule!r}")


class MetaTrainer:
    """Trains `editor` on batches of tokenised edit requests (`EditBatch` from emsedit_fast.data.collate).

    The trainer owns the optimiser; `state_dict()` / `load_state_dict()` carry it with the step count, so a run can
    resume from a checkpoint and end where an uninterrupted run would.
    """

    def __init__(self, editor: Editor, cfg: TrainConfig, callbacks: list[Callback] = ()):
        self.editor = editor
        self.cfg = cfg
        self.callbacks = list(callbacks)
        if cfg.drift_metric == "keys" and cfg.reg_coef and (editor.prior is None or editor.cfg.key_prior <= 0):
            raise ConfigError("train.drift_metric: 'keys' weighs the drift by the key prior's Sigma; set "
                              "editor.key_prior > 0 (or use drift_metric 'identity')")
        self.optimizer = build_optimizer(editor, cfg)
        self.step = 0  # training batches completed
        self.report = TrainReport()
        # (tuples, reference logits) of the latest batches: RLEdit's decayed loss revisits them
        self.recent = collections.deque(maxlen=cfg.back_depth if cfg.loss == "rledit_decay" else 1)
        # Called with the editor after each backward, before clipping: data-parallel training all-reduces here.
        self.reduce_grads = None
        self._refused: set[int] = set()  # training batches skipped in this process (never retained: not applied)
        # train.keep best: {"step", "score", "state"} of the best validation point so far (api.train fills it)
        self.best: dict | None = None
        # train.ema: the moving average of the editor's parameters, in editor.parameters() order (None: off)
        self.average = [p.detach().clone() for p in editor.parameters()] if cfg.ema else None

    # ---------------------------------------------------------------------------------------------------------------
    # losses and weight gradients

    def _reference_logits(self, batch) -> torch.Tensor:
        """p_ref logits on the unrelated prompts, before the current edit (pre_batch) or on W0 (original): at the
        positions the KL reads only (`_kl_positions`), (B, T', V)."""
        model = self.editor.model
        with torch.no_grad():
            if self.cfg.kl_reference == "original":
                current = ops.snapshot(self.editor.weights())
                ops.restore_(self.editor.weights(), self.editor.base, backend=self.editor.backend)
            try:
                with logits_at(model, self._kl_positions(batch)) as cut:
                    return cut(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits).detach()
            finally:
                if self.cfg.kl_reference == "original":
                    ops.restore_(self.editor.weights(), current, backend=self.editor.backend)

    def _kl_positions(self, unrel) -> torch.Tensor:
        """Where the KL term reads logits: the answer positions, or every position (kl_positions = all)."""
        if self.cfg.kl_positions == "all":
            return torch.arange(unrel.input_ids.shape[1], device=unrel.input_ids.device)
        return answer_positions(unrel.labels)

    def weight_grads(self, terms: list[tuple[float, object, torch.Tensor | None]], drift_steps: list | None = None,
                     drift_base: list[torch.Tensor] | None = None) -> tuple[float, dict[str, WeightGrad]]:
        """dL/dW for every edited module, factored, for L = sum_terms w (edit_coef [CE(equiv) + edit_prompt_coef
        CE(edit)] + loc_coef KL(unrel))
        + reg_coef sum_l ||W_l - W_l^0||^2 (loss 'l2'). terms: (weight, tuples, reference logits or None).

        drift_steps: the StepRecords applied since the drift's reference when the drift is exactly their sum (batch
        mode; sequential mode with drift_reference pre_batch); the drift term then stays factored. None: the drift has
        accumulated over many edits (sequential mode, reference W0) and is streamed from W and W0 in row blocks.
        drift_base: the weights the drift is measured from when it is not W0 (pre_batch: the weights before this
        batch); a dense (primal) step's drift is then streamed from W and these."""
        cfg, editor = self.cfg, self.editor
        modules = editor.modules_
        parts: list[FactoredGrads] = []
        for weight, tuples, ref in terms:
            # the paraphrases (generalisation), and with edit_prompt_coef the edit prompts themselves (efficacy)
            scored = [(cfg.edit_coef, tuples.equiv)]
            if cfg.edit_prompt_coef:
                scored.append((cfg.edit_coef * cfg.edit_prompt_coef, tuples.edit))
            for coef, toks in scored:
                keep = answer_positions(toks.labels)  # logits only where the loss reads them

                def ce(logits, labels=toks.labels.index_select(1, keep), toks=toks, w=weight * coef):
                    return w * answer_ce(logits, labels, toks.micro_batch, cfg.loss_reduction)

                parts.append(factored_weight_grads(editor.model, modules, toks.input_ids, toks.attention_mask, ce,
                                                   logit_positions=keep))
            if ref is not None:
                unrel = tuples.unrel
                keep = self._kl_positions(unrel)

                def kl(logits, unrel=unrel, ref=ref, w=weight, keep=keep):
                    return w * cfg.loc_coef * answer_kl(ref, logits, unrel.labels.index_select(1, keep),
                                                        unrel.micro_batch, cfg.kl_positions,
                                                        unrel.attention_mask.index_select(1, keep),
                                                        cfg.loss_reduction)

                parts.append(factored_weight_grads(editor.model, modules, unrel.input_ids, unrel.attention_mask, kl,
                                                   logit_positions=keep))
        merged = FactoredGrads.merge(parts)
        loss = merged.loss
        coef = cfg.reg_coef if cfg.loss == "l2" else 0.0
        factors: dict[str, list] = {}
        # the batch mode restores W0 before the meta-gradient reads the drift: a dense drift must be a copy then
        copy_weights = drift_steps is not None and drift_base is None
        if coef and drift_steps is not None and all(gs.update.low_rank for rec in drift_steps for gs in rec.groups):
            copy_weights = False
            for rec in drift_steps:
                for gs in rec.groups:
                    for i, name in enumerate(gs.update.names):
                        factors.setdefault(name, []).append(gs.update.layer_delta(i))
        else:
            drift_steps = None  # primal (dense) steps: stream the drift from W and W0
        # the penalty's metric Q per layer: Sigma of the key prior (drift_metric keys), else the identity
        metrics = editor.prior.key_moments() if coef and cfg.drift_metric == "keys" else {}
        grads = {}
        to = editor.device  # the model may sit on another device than the hypernetworks
        for m, w0 in zip(modules, drift_base if drift_base is not None else editor.base):
            wg = WeightGrad(merged.inputs[m.name].float().to(to), merged.output_grads[m.name].float().to(to),
                            d_out=m.d_out)
            if coef:
                wg.drift_coef = coef
                wg.drift_metric = metrics.get(m.name)
                if drift_steps is not None:  # W - W0 = sum_i M_i^T K_i exactly (up to the weights' rounding)
                    wg.drift_factors = [(b.t(), a) for b, a in factors.get(m.name, [])]
                    loss += coef * lowrank_drift_sq_norm(factors.get(m.name, []), wg.drift_metric)
                else:
                    weight = m.weight.detach().clone() if copy_weights else m.weight.detach()
                    wg.drift_weights = (weight, w0, m.transposed)
                    loss += coef * drift_sq_norm(weight, w0, metric=wg.drift_metric, transposed=m.transposed)
            grads[m.name] = wg
        return loss, grads

    # ---------------------------------------------------------------------------------------------------------------
    # the two modes

    def _apply_steps(self, tuples, steps: range, prefix=None) -> list:
        """MSBP steps `steps` on tuples.edit, applied to the model; prefix: the batch's `PrefixReuse` when the steps
        are applied in several calls (default: a fresh one for these steps)."""
        records = []
        prefix = prefix or self.editor.prefix_reuse()
        for k in steps:
            rec = self.editor.predict_deltas(self.editor.capture(tuples.edit, self.cfg.loss_reduction, prefix), k)
            self.editor.check_record(rec)
            self.editor.apply_step(rec)
            records.append(rec)
        return records

    def _clip(self) -> None:
        if self.reduce_grads is not None:
            self.reduce_grads(self.editor)
        torch.nn.utils.clip_grad_norm_(self.editor.parameters(), self.cfg.max_grad_norm)

    def _optimizer_step(self) -> None:
        self._clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._update_average()

    @torch.no_grad()
    def _update_average(self) -> None:
        """a <- ema a + (1 - ema) theta for every editor parameter (train.ema), after each optimiser step."""
        if self.average is not None:
            for a, p in zip(self.average, self.editor.parameters()):
                a.lerp_(p.detach(), 1.0 - self.cfg.ema)

    @contextlib.contextmanager
    def averaged(self):
        """Within the block the editor's parameters hold the moving average (train.ema; unchanged without one); the
        training iterate is put back afterwards, also when the block raises."""
        if self.average is None:
            yield
            return
        params = list(self.editor.parameters())
        iterate = [p.detach().clone() for p in params]
        self.use_average()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, x in zip(params, iterate):
                    p.copy_(x)

    @torch.no_grad()
    def use_average(self) -> None:
        """End of training with train.ema: the editor keeps the moving average of its parameters."""
        if self.average is not None:
            for p, a in zip(self.editor.parameters(), self.average):
                p.copy_(a)

    def network_scales(self) -> dict:
        """Per MSBP step k (lists of length K): "eta", the geometric mean of |eta| over its layers and shape groups,
        and "b_norm", the Frobenius norm of all its blocks' B matrices, which start at 0 (the untrained networks are
        the identity), so it measures how far training has moved the networks' output map."""
        etas, b_norms = [], []
        with torch.no_grad():
            for nets in self.editor.nets:
                log_eta = torch.cat([net.step_size().detach().abs().clamp_min(1e-38).log() for net in nets])
                etas.append(float(log_eta.mean().exp()))
                # one pass over each B without a temporary (a rank-1024 block's B is 8.6 MB)
                b_norms.append(math.sqrt(sum(float(torch.linalg.vector_norm(b.detach())) ** 2
                                             for net in nets for b in net.b)))
        return {"eta": etas, "b_norm": b_norms}

    def _finite_grads(self) -> bool:
        return all(p.grad is None or torch.isfinite(p.grad).all() for p in self.editor.parameters())

    def train(self, batches: list, progress: bool | None = None) -> TrainReport:
        """Run meta-training over `batches` (each an `EditBatch` with .edit, .equiv, .unrel tuples and .records),
        starting after the `self.step` batches a resumed run has already done. Restores W0 at the end."""
        from tqdm.auto import tqdm

        editor, cfg = self.editor, self.cfg
        if not editor.cfg.trainable:  # a training-free editor (UltraEdit): nothing to learn
            return self.report
        needs_ref = cfg.loss in ("kl", "rledit_decay")
        recent = self.recent
        start = time.perf_counter()
        total = len(batches)  # the schedule's length: a resumed run continues where it left off
        todo = batches[self.step:]
        bar = tqdm(todo, desc=f"meta-train {editor.cfg.name} ({editor.mode}, K={editor.cfg.n_steps})",
                   disable=(not progress) if progress is not None else None, unit="batch")
        for tuples in bar:
            n_edits = len(tuples.records)
            for group in self.optimizer.param_groups:  # every optimiser step of this batch trains at its rate
                # base_lr: the unscheduled rate, kept in the group (and its saved state) the first time it is scaled
                factor = lr_factor(cfg.lr_schedule, self.step, total, cfg.warmup)
                group["lr"] = group.setdefault("base_lr", group["lr"]) * factor
            ref = self._reference_logits(tuples.unrel) if needs_ref else None
            # once_at_end accumulates over batches: a refused batch must not wipe (or poison) what came before
            kept = ({p: p.grad.clone() for p in editor.parameters() if p.grad is not None}
                    if editor.mode == "sequential" and cfg.seq_optimizer_step == "once_at_end" else {})
            try:
                if editor.mode == "sequential":
                    loss = self._sequential_batch(tuples, ref, recent, self._retained(batches))
                else:
                    loss = self._batch_step(tuples, ref)
            except EditRefused as err:
                self.report.skipped += 1
                self._refused.add(self.step)
                log.warning("training batch %d skipped: %s", self.step + 1, err)
                self.optimizer.zero_grad(set_to_none=True)
                for p, g in kept.items():
                    p.grad = g
                if editor.mode == "batch":
                    editor.reset()
                loss = float("nan")
            self.step += 1
            self.report.steps += 1
            self.report.edits += n_edits
            self.report.losses.append(loss)
            self.report.scales.append(self.network_scales())
            if editor.mode == "sequential" and cfg.sequence_length and self.step % cfg.sequence_length == 0:
                # the end of one lifelong sequence: the next starts from W0, as every evaluation sequence does
                editor.reset()
                recent.clear()
            bar.set_postfix(loss=f"{loss:.4f}", skipped=self.report.skipped)
            for cb in self.callbacks:
                cb.on_train_step(self, {"step": self.step, "loss": loss, "skipped": self.report.skipped})
        if editor.mode == "sequential" and cfg.seq_optimizer_step == "once_at_end" and todo:
            self.optimizer.step()  # the published schedule: gradients of all batches, one Adam step
            self.optimizer.zero_grad(set_to_none=True)
            self._update_average()
        editor.reset()
        self.report.seconds += time.perf_counter() - start
        return self.report

    def _retained(self, batches: list) -> list:
        """The earlier batches of the current training sequence that this step's loss also scores (R_t): up to
        train.retain_batches of them, uniformly without replacement, from a generator seeded by the step (a resumed
        run draws the same ones)."""
        cfg = self.cfg
        if not cfg.retain_batches or not cfg.retain_coef:
            return []
        start = self.step - self.step % cfg.sequence_length if cfg.sequence_length else 0
        earlier = [i for i in range(start, self.step) if i not in self._refused]
        if len(earlier) > cfg.retain_batches:
            gen = torch.Generator().manual_seed(1_000_003 * (self.step + 1))
            pick = torch.randperm(len(earlier), generator=gen)[:cfg.retain_batches].sort().values
            earlier = [earlier[i] for i in pick.tolist()]
        return [batches[i] for i in earlier]

    def _sequential_batch(self, tuples, ref, recent, retained=()) -> float:
        # A refused batch is skipped as a whole: the weights, normaliser statistics and recent batches go back to
        # where they were before it (its earlier steps stay out of the model, a non-finite batch out of the decayed
        # loss of the batches after it). Every refusal happens before the optimiser step, so the rollback copy (one
        # copy of the edited weights) and the steps' records are gone before it: on a run's first batch, where Adam
        # allocates its moments, they no longer stack on the copy.
        cfg, editor = self.cfg, self.editor
        weights = ops.snapshot(editor.weights())
        stats = editor.normaliser_state()
        kept = list(recent)
        try:
            loss, keys = self._sequential_batch_grads(tuples, ref, recent, retained, weights)
        except EditRefused:
            ops.restore_(editor.weights(), weights, backend=editor.backend)
            editor.load_normaliser_state(stats)
            recent.clear()
            recent.extend(kept)
            raise
        del weights, stats, kept
        if cfg.seq_optimizer_step == "every_batch":
            self._optimizer_step()
        else:  # once_at_end: each batch's gradient is clipped as it accumulates, one Adam step at the end
            self._clip()
        if keys is not None:  # the batch's edit stays applied: the key prior keeps it in place from now on
            editor.prior.add_edit_keys(keys)
        return loss

    def _sequential_batch_grads(self, tuples, ref, recent, retained=(), before=None) -> tuple[float, object]:
        """Apply the batch's K steps, score them and accumulate the meta-gradient: (meta-loss after the K steps, the
        first step's keys per layer for the key prior, or None without one). Raises EditRefused on a non-finite loss
        or gradient. train.step_credit decides which loss reaches which step's networks (config.TrainConfig)."""
        cfg, editor = self.cfg, self.editor
        recent.appendleft((tuples, ref))
        if cfg.loss == "rledit_decay":  # L_t = sum_a decay^a [CE + loc KL](E_{t-a}; W_t)
            terms = [(cfg.time_decay ** a, tup, r) for a, (tup, r) in enumerate(recent)]
        else:
            # the retained batches' edits are already in W: their CE at the current W is what this step may spoil
            terms = [(1.0, tuples, ref)] + [(cfg.retain_coef / len(retained), tup, None) for tup in retained]
        shift_reg = cfg.shift_reg if cfg.loss == "rledit_decay" else 0.0
        n_steps = editor.cfg.n_steps
        records: list = []
        prefix = editor.prefix_reuse()  # every step runs over the same edit tokens
        for k in range(n_steps):
            records += self._apply_steps(tuples, range(k, k + 1), prefix)
            if cfg.step_credit != "per_step" and k < n_steps - 1:
                continue
            loss, grads = self._batch_weight_grads(terms, records, before)
            if not math.isfinite(loss):
                raise EditRefused(f"non-finite meta-loss {loss}" + (f" after step {k + 1}" if k < n_steps - 1 else ""))
            # final: G of the loss after step K drives every step (first-order truncation: step k < K's effect on
            # the inputs of the steps after it is dropped); last: step K alone, whose gradient is exact; per_step:
            # G of the loss after step k drives step k, exact for that loss
            credited = records if cfg.step_credit == "final" else records[-1:]
            editor.meta_backward(credited, grads, shift_reg=shift_reg)
        if not self._finite_grads():
            raise EditRefused("non-finite hypernetwork gradient")
        return loss, (records[0].layer_keys() if editor.prior is not None else None)

    def _batch_weight_grads(self, terms, records, before):
        """weight_grads after this batch's steps `records`, the drift measured as train.drift_reference says."""
        if self.cfg.drift_reference == "pre_batch":  # c ||W - W_before||^2: this batch's own steps so far, factored
            return self.weight_grads(terms, records, before)
        return self.weight_grads(terms)  # c ||W - W0||^2: every edit of the sequence so far

    def credit_check(self, tuples, h: float = 0.05) -> list[dict]:
        """How each step_credit's gradient compares with the edit it trains, on one batch from the current weights
        (sequential mode; the weights, normaliser statistics and .grad are left as they were).

        Per MSBP step k: the derivative of the meta-loss along scaling step k's step size by e^s (all layers and
        shape groups at once; d/ds = sum dL/dlog eta, or sum eta dL/deta with eta_param linear) as each credit's
        backward gives it (None where a credit does not train step k), and central differences (+-h) of the loss
        after all K steps ("fd_final") and of the loss after step k ("fd_own"). "final" equals fd_final for step K only;
        "last" and "per_step" equal what they score (fd_final, fd_own)."""
        editor, cfg = self.editor, self.cfg
        if editor.mode != "sequential":
            raise ValueError("credit_check: the sequential mode's steps only (the batch mode scores each step)")
        n_steps = editor.cfg.n_steps
        weights, stats = ops.snapshot(editor.weights()), editor.normaliser_state()
        ref = self._reference_logits(tuples.unrel) if cfg.loss in ("kl", "rledit_decay") else None
        sizes = [[net.scalar_parameters()[0] for net in editor.nets[k]] for k in range(n_steps)]
        kept = {p: p.grad for p in editor.parameters()}

        def restore():
            ops.restore_(editor.weights(), weights, backend=editor.backend)
            editor.load_normaliser_state(stats)
            editor.zero_grad(set_to_none=True)

        initial = [[p.detach().clone() for p in step] for step in sizes]

        def scale(k, s):  # step k's step size times e^s (s = 0: exactly as it was)
            with torch.no_grad():
                for p, p0 in zip(sizes[k], initial[k]):
                    p.copy_(p0 + s if editor.cfg.eta_param == "log" else p0 * math.exp(s))

        def losses_after_each_step(k, s):
            restore()
            scale(k, s)
            out, records, prefix = [], [], editor.prefix_reuse()
            try:
                for j in range(n_steps):
                    records += self._apply_steps(tuples, range(j, j + 1), prefix)
                    out.append(self._batch_weight_grads([(1.0, tuples, ref)], records, weights)[0])
            finally:
                scale(k, 0.0)
            return out

        rows = [{"step": k + 1} for k in range(n_steps)]
        try:
            for credit in ("final", "last", "per_step"):
                restore()
                self.cfg = replace(cfg, step_credit=credit)
                self._sequential_batch_grads(tuples, ref, collections.deque(maxlen=1), before=weights)
                for k in range(n_steps):
                    grads = [(p.grad if editor.cfg.eta_param == "log" else p.grad * p.detach())
                             for p in sizes[k] if p.grad is not None]
                    rows[k][credit] = float(sum(g.sum() for g in grads)) if grads else None
            self.cfg = cfg
            for k in range(n_steps):
                up, down = losses_after_each_step(k, h), losses_after_each_step(k, -h)
                rows[k]["fd_final"] = (up[-1] - down[-1]) / (2 * h)
                rows[k]["fd_own"] = (up[k] - down[k]) / (2 * h)
        finally:
            self.cfg = cfg
            restore()
            for p, g in kept.items():
                p.grad = g
        return rows

    def _batch_step(self, tuples, ref) -> float:
        cfg, editor = self.cfg, self.editor
        total = 0.0
        applied = []
        prefix = editor.prefix_reuse()  # every step runs over the same edit tokens
        for k in range(editor.cfg.n_steps):
            records = self._apply_steps(tuples, range(k, k + 1), prefix)
            # W - W0 is this step's update (reset) or the steps of this batch so far (chain): factored either way
            applied.extend(records)
            loss, grads = self.weight_grads([(1.0, tuples, ref)],
                                            records if cfg.batch_step_chaining == "reset" else applied)
            if cfg.batch_step_chaining == "reset":
                # every step starts from W0 in this chaining, so the exact revert is a copy of W0 (the published code
                # subtracts the update again: not exact in low precision)
                ops.restore_(editor.weights(), editor.base, backend=editor.backend)
            if not math.isfinite(loss):
                raise EditRefused(f"non-finite meta-loss {loss} at step {k + 1}")
            editor.meta_backward(records, grads)
            if not self._finite_grads():
                raise EditRefused(f"non-finite hypernetwork gradient at step {k + 1}")
            self._optimizer_step()
            total += loss
        editor.reset()
        return total / editor.cfg.n_steps

    # ---------------------------------------------------------------------------------------------------------------
    # resume

    def state_dict(self) -> dict:
        """Everything a resumed run needs to end exactly where an uninterrupted one would: optimiser, step, report,
        and in the sequential mode the current (edited) weights and the recent batches with their reference
        logits (kept only at the answer positions the KL loss reads, when kl_positions = answer)."""
        recent = [(tuples, None if ref is None else ("kept", ref.cpu(), tuple(ref.shape)))
                  for tuples, ref in self.recent]
        sequential = self.editor.mode == "sequential"
        return {"optimizer": self.optimizer.state_dict(), "step": self.step,
                "report": {"steps": self.report.steps, "skipped": self.report.skipped,
                           "losses": list(self.report.losses), "seconds": self.report.seconds,
                           "edits": self.report.edits, "curve": list(self.report.curve),
                           "kept_step": self.report.kept_step, "scales": list(self.report.scales)},
                "best": None if self.best is None else {**self.best, "state": {k: v.cpu() for k, v in
                                                                              self.best["state"].items()}},
                "weights": [w.cpu().clone() for w in self.editor.weights()] if sequential and self.step else None,
                "average": None if self.average is None else [a.cpu().clone() for a in self.average],
                "recent": recent}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.report = TrainReport(**state["report"])
        self.best = state.get("best")
        if self.average is not None and state.get("average") is not None:
            with torch.no_grad():
                for a, saved in zip(self.average, state["average"]):
                    a.copy_(saved)
        if state.get("weights") is not None:
            ops.restore_(self.editor.weights(), [w.to(x.device) for w, x in zip(state["weights"],
                                                                                 self.editor.weights())])
        self.recent.clear()
        for tuples, ref in state.get("recent", []):
            if ref is not None:
                how, values, shape = ref
                if how == "answer":  # older states: full-length logits stored at the answer positions only
                    full = torch.zeros(shape, dtype=values.dtype)
                    full[tuples.unrel.labels.cpu() != -100] = values
                    values = full
                if how in ("answer", "all"):  # older states hold every position: keep the KL's
                    values = values.index_select(1, self._kl_positions(tuples.unrel).cpu())
                ref = values.to(tuples.unrel.labels.device)
            self.recent.append((tuples, ref))

