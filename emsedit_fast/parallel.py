"""Data-parallel meta-training over edit batches with torch.distributed (gloo on CPU, NCCL on GPUs).

The library behind `torchrun --nproc-per-node N -m emsedit_fast.distributed` (see that command for the flags).

Every rank loads the same model and builds the same deterministic list of training batches (api.train); rank r trains
on batches r, r + W, r + 2W, ... (W = world size; the list is cut to a multiple of W so every rank takes the same
number of optimiser steps). The global batch of one optimiser step is W local edit batches, W x n_edits edits.

* Identical start: parameters and normaliser buffers are broadcast from rank 0 (and a resumed run loads the same
  checkpoint on every rank).
* Gradients: `GradientSync` is the MetaTrainer.reduce_grads hook, called after each backward and before clipping. It
  all-reduces (sums) every hypernetwork gradient in one flat buffer and divides by the number of contributing ranks,
  so every rank clips and steps on the mean gradient: the gradient of the mean meta-loss over the global batch.
* Normaliser statistics are per-process state (each rank's editor updates them with its own rows inside
  predict_deltas). They are merged at the same points: each rank contributes the rows it added since the last
  synchronisation as moments about the last synchronised mean (count m_r, first moment P_r, second moment Q_r, fp64),
  the sums are all-reduced, and every rank sets count, mean, var, std to those of (old rows + all ranks' new rows),
  exactly as if one normaliser had seen every row (Chan et al.'s parallel merge;
  `emsedit_fast.nn.merge_running_stats`). Between two synchronisations a rank's forward sees the synchronised
  statistics plus its own batch's rows, not the other ranks' rows of the same step. The single-process equivalent is
  therefore gradient accumulation over the W batches of a step with the statistics reset to the synchronised ones
  before each batch and merged after; tests/test_distributed checks that a 2-process run matches it (to ~1e-6: the
  statistics agree exactly, parameters up to the last bits that BLAS kernels may round differently in different
  processes).
* Regimes: batch mode (Algorithm 2) resets the model after every step and is exactly data parallel. In the sequential
  mode (Algorithm 1) each rank edits its own model through its own batches (W independent lifelong streams whose
  gradients are averaged): a valid data-parallel scheme, but not the same as one stream over all batches.
* Refused batches (non-finite values): the refusing rank still takes part in the remaining collectives of that batch
  with zero weight, so no rank blocks and all ranks keep identical parameters; if every rank refused, the step is
  skipped as in a single process.
* Only rank 0 writes the checkpoint and results.json (which records every rank's losses and a hash of every rank's
  final editor state, equal on all ranks).
* Devices: the model and the editor may sit on different devices (--editor-device); with NCCL each rank uses
  cuda:<LOCAL_RANK> for the model, and the collectives run on the editor's device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time

import torch
import torch.distributed as dist

from emsedit_fast.editors import EditRefused
from emsedit_fast.nn import STATS_FIELDS
from emsedit_fast.nn import RunningStats
from emsedit_fast.nn import finish_merge
from emsedit_fast.nn import new_rows_moments
from emsedit_fast.trainer import MetaTrainer

log = logging.getLogger("emsedit_fast.distributed")



# ----------------------------------------------------------------------------------------------------------------------
# normaliser statistics


def stats_modules(editor) -> list[RunningStats]:
    """The running normalisers of every hypernetwork of `editor`, in a fixed order."""
    return [m for m in editor.modules() if isinstance(m, RunningStats)]


def stats_state(editor) -> list[dict[str, torch.Tensor]]:
    return [{f: getattr(s, f).detach().clone() for f in STATS_FIELDS} for s in stats_modules(editor)]


def load_stats_(editor, states: list[dict[str, torch.Tensor]]) -> None:
    for s, state in zip(stats_modules(editor), states):
        for f in STATS_FIELDS:
            getattr(s, f).copy_(state[f])


# ----------------------------------------------------------------------------------------------------------------------
# the reduce_grads hook


def shard(batches: list, rank: int, world_size: int) -> list:
    """Rank `rank`'s batches: rank, rank + W, ... of the list cut to a multiple of W (equal step counts)."""
    usable = len(batches) - len(batches) % world_size
    if usable < len(batches):
        log.warning("dropping the last %d of %d training batches so every rank takes %d", len(batches) - usable,
                    len(batches), usable // world_size)
    return batches[:usable][rank::world_size]


def state_digest(editor) -> str:
    """sha256 over the editor's parameters and buffers (equal on every rank after synchronised training)."""
    h = hashlib.sha256()
    for k, v in sorted(editor.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class GradientSync:
    """MetaTrainer.reduce_grads hook: mean of the hypernetwork gradients over ranks + merge of normaliser statistics.

    Call `broadcast_()` once after building (and possibly resuming) the editor. `calls` counts synchronisations since
    `begin_batch()`; the data-parallel trainer uses it to keep refusing ranks in step.
    """

    def __init__(self, editor, group=None):
        self.editor = editor
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.synced = stats_state(editor)
        self.calls = 0

    def broadcast_(self) -> None:
        """Parameters and buffers of rank 0 to every rank (identical initial hypernetworks and statistics)."""
        with torch.no_grad():
            for t in self.editor.state_dict().values():
                dist.broadcast(t, src=0, group=self.group)
        self.synced = stats_state(self.editor)

    def begin_batch(self) -> None:
        self.calls = 0

    @torch.no_grad()
    def __call__(self, editor, weight: float = 1.0) -> float:
        """Average gradients over the ranks with weight 1 (0: this rank contributes nothing); merge statistics.
        Returns the number of contributing ranks (0: nobody had a gradient; gradients are then left untouched)."""
        self.calls += 1
        params = list(editor.parameters())
        device = params[0].device
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() * weight
                          for p in params])
        present = torch.tensor([float(p.grad is not None) * weight for p in params] + [weight], dtype=torch.float64,
                               device=device)
        stats = stats_state(editor)
        moments = [new_rows_moments(b, s).to(device) for b, s in zip(self.synced, stats)]
        meta = torch.cat([present] + moments)
        dist.all_reduce(flat, group=self.group)
        dist.all_reduce(meta, group=self.group)
        count = float(meta[len(params)])
        offset = len(params) + 1
        merged = []
        for base in self.synced:
            width = 1 + 2 * base["mean"].shape[0]
            total = meta[offset:offset + width].cpu()
            offset += width
            merged.append({f: base[f].clone() for f in STATS_FIELDS} if float(total[0]) == 0
                          else finish_merge(base, total))
        load_stats_(editor, merged)
        self.synced = stats_state(editor)
        if count == 0:
            return 0.0
        start = 0
        for p, n_present in zip(params, meta[:len(params)].tolist()):
            n = p.numel()
            if n_present == 0:
                p.grad = None
            else:
                p.grad = (flat[start:start + n] / count).view_as(p).to(p.dtype)
            start += n
        return count


class DataParallelTrainer(MetaTrainer):
    """MetaTrainer whose `train(batches)` takes this rank's shard and synchronises every optimiser step."""

    def __init__(self, editor, cfg, callbacks=(), *, group=None):
        super().__init__(editor, cfg, callbacks)
        self.sync = GradientSync(editor, group)
        self.reduce_grads = self.sync

    def train(self, batches: list, progress: bool | None = None):
        return super().train(shard(batches, self.sync.rank, self.sync.world_size), progress)

    def _idle_step(self) -> None:
        """Take part in one synchronised optimiser step without contributing a gradient (batch mode)."""
        for p in self.editor.parameters():
            p.grad = torch.zeros_like(p)
        if self.sync(self.editor, weight=0.0) == 0:
            self.optimizer.zero_grad(set_to_none=True)  # every rank refused: no step, as in one process
            return
        torch.nn.utils.clip_grad_norm_(self.editor.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _batch_step(self, tuples, ref) -> float:
        self.sync.begin_batch()
        try:
            return super()._batch_step(tuples, ref)
        except EditRefused:
            for _ in range(self.editor.cfg.n_steps - self.sync.calls):  # the steps the other ranks still take
                self._idle_step()
            raise

    def _sequential_batch(self, tuples, ref, recent) -> float:
        self.sync.begin_batch()
        params = list(self.editor.parameters())
        kept = {p: p.grad.clone() for p in params if p.grad is not None}  # once_at_end: the synchronised sum so far
        try:
            return super()._sequential_batch(tuples, ref, recent)
        except EditRefused as err:
            if self.sync.calls:  # refusals come before the synchronisation; anything else is a bug
                raise
            self.report.skipped += 1
            log.warning("rank %d: training batch %d skipped: %s", self.sync.rank, self.step + 1, err)
            for p in params:
                p.grad = kept[p].clone() if p in kept else torch.zeros_like(p)
            if self.sync(self.editor, weight=0.0) == 0:  # every rank refused this batch
                for p in params:
                    p.grad = kept.get(p)
                return float("nan")
            torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
            if self.cfg.seq_optimizer_step == "every_batch":
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            return float("nan")


# ----------------------------------------------------------------------------------------------------------------------
# running it


def init_process_group(backend: str | None = None) -> tuple[int, int, int, str]:
    """init_process_group from the torchrun environment; returns (rank, world_size, local_rank, backend)."""
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), local_rank, backend


def train_data_parallel(cfg, *, editor_device=None, resume: str | None = None, progress: bool | None = None,
                        backend: str | None = None):
    """Meta-train on this rank's shard (call in every process of a torchrun launch); rank 0 writes
    <cfg.output>/checkpoint and results.json. Returns (session, trainer, results dict)."""
    from emsedit_fast import api
    from emsedit_fast.checkpoint import load_editor_state
    from emsedit_fast.checkpoint import save_checkpoint
    from emsedit_fast.report import write_json

    rank, world, local_rank, backend = init_process_group(backend)
    if backend == "nccl":
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device=f"cuda:{local_rank}"))
        editor_device = editor_device if editor_device is not None else f"cuda:{local_rank}"
    session = api.open_session(cfg, editor_device=editor_device)
    trainer = DataParallelTrainer(session.editor, cfg.train)
    if resume:
        load_editor_state(resume, session.editor, trainer)
    trainer.sync.broadcast_()
    start = time.perf_counter()
    api.train(session, trainer=trainer, progress=progress if rank == 0 else False)
    seconds = time.perf_counter() - start
    losses = [None] * world
    digests = [None] * world
    dist.all_gather_object(losses, list(trainer.report.losses))
    dist.all_gather_object(digests, state_digest(session.editor))
    results = {"world_size": world, "backend": backend, "global_batch_edits": world * cfg.data.n_edits,
               "optimizer_batches_per_rank": trainer.report.steps, "seconds": seconds, "losses": losses,
               "state_sha256": digests, "skipped": trainer.report.skipped,
               "devices": {"model": str(session.device), "editor": str(session.editor.device)}}
    if rank == 0:
        os.makedirs(cfg.output, exist_ok=True)
        extra = {"distributed": {k: results[k] for k in ("world_size", "backend", "global_batch_edits")}}
        results["checkpoint"] = save_checkpoint(os.path.join(cfg.output, "checkpoint"), session.editor, cfg, trainer,
                                                extra_meta=extra)
        write_json(os.path.join(cfg.output, "results.json"), results)
    dist.barrier()
    return session, trainer, results
