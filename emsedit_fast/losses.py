"""Answer-position losses (docs/method.md, Capture and Training losses).

Labels are pre-shifted: the logits at position t predict `labels[t]`, and no further shift happens here. The answer
positions are 𝒫 = {(i, t) : labels[i, t] ≠ IGN} with IGN = −100; row i of the batch belongs to micro-batch
mb[i], and 𝒫_b are the answer positions of the rows of micro-batch b.

Reductions of a per-position loss ℓ_t:

    sum_of_microbatch_means (reference):  L = Σ_b (1/|𝒫_b|) Σ_{t∈𝒫_b} ℓ_t
    mean:                                 L = (1/|𝒫|) Σ_{t∈𝒫} ℓ_t

Both are written as L = Σ_t w_t ℓ_t with w_t = 1/|𝒫_{mb(t)}| or 1/|𝒫|. Because distinct sequences never interact
in a causal LM, the per-position gradients of Σ_b mean_b over one pass equal those of separate micro-batch passes
All log-softmaxes run in fp32 whatever the logits dtype, and only on the selected positions, so a
(B, T, V) fp32 copy of the logits is never made.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

Reduction = Literal["sum_of_microbatch_means", "mean"]
REDUCTIONS = ("sum_of_microbatch_means", "mean")


def _check_batch(name: str, t: torch.Tensor | None, batch: int, seq: int | None = None) -> None:
    if t is None:
        return
    want = (batch,) if seq is None else (batch, seq)
    if tuple(t.shape) != want:
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def position_weights(rows: torch.Tensor, micro_batch: torch.Tensor | None,
                     reduction: Reduction = "sum_of_microbatch_means") -> torch.Tensor:
    """Per-position weights w_t of the reduction, fp32 (n,), for selected positions whose batch rows are `rows`.

    rows: (n,) int64 batch-row index of each selected position. micro_batch: (B,) integer micro-batch id per row
    (any ids; equal ids form one micro-batch), or None for a single micro-batch. Returns w_t = 1/|𝒫_{mb(t)}| for
    `sum_of_microbatch_means` and 1/n for `mean`; Σ_t w_t equals the number of micro-batches, or 1.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    n = rows.numel()
    if n == 0:
        raise ValueError("no selected positions (every label is -100?): the loss would be empty")
    if reduction == "mean" or micro_batch is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float32, device=rows.device)
    if micro_batch.dtype.is_floating_point or micro_batch.dtype == torch.bool:
        raise TypeError(f"micro_batch must hold integer ids, got {micro_batch.dtype}")
    mb = micro_batch.to(rows.device)[rows]  # (n,) micro-batch of each position
    _, inverse, counts = torch.unique(mb, return_inverse=True, return_counts=True)
    return 1.0 / counts.to(torch.float32)[inverse]


def answer_ce(logits: torch.Tensor, labels: torch.Tensor, micro_batch: torch.Tensor | None = None,
              reduction: Reduction = "sum_of_microbatch_means") -> torch.Tensor:
    """Cross-entropy of the answer tokens, reduced per micro-batch.

        ℓ_t = −log softmax(logits_t)[labels_t]   (fp32),   L = Σ_t w_t ℓ_t   (see `position_weights`)

    logits: (B, T, V) any float dtype. labels: (B, T) int64, pre-shifted, IGN = −100 off the answer positions.
    micro_batch: (B,) integer micro-batch id of each row, or None (one micro-batch). Returns a 0-dim fp32 tensor,
    differentiable in `logits`. Raises ValueError when no label is an answer label.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got {tuple(logits.shape)}")
    batch, seq, _ = logits.shape
    _check_batch("labels", labels, batch, seq)
    _check_batch("micro_batch", micro_batch, batch)
    rows, pos = (labels != IGNORE_INDEX).nonzero(as_tuple=True)  # row-major: (row, position) order
    weights = position_weights(rows, micro_batch, reduction)
    logp = F.log_softmax(logits[rows, pos].float(), dim=-1)  # (n, V) fp32
    nll = -logp.gather(1, labels[rows, pos].unsqueeze(1)).squeeze(1)  # (n,)
    return (weights * nll).sum()


def answer_kl(ref_logits: torch.Tensor, logits: torch.Tensor, mask_labels: torch.Tensor | None,
              micro_batch: torch.Tensor | None = None, positions: Literal["answer", "all"] = "answer",
              attention_mask: torch.Tensor | None = None,
              reduction: Reduction = "sum_of_microbatch_means") -> torch.Tensor:
    """Locality KL(p_ref ‖ p) over the full vocabulary, reduced per micro-batch.

        ℓ_t = Σ_v p_ref(v|t) (log p_ref(v|t) − log p(v|t)),  p = softmax(logits_t), p_ref = softmax(ref_logits_t),
        L = Σ_t w_t ℓ_t   over t ∈ 𝒫 (positions="answer": mask_labels ≠ IGN)
                          or every non-pad position (positions="all": attention_mask ≠ 0; all positions if None).

    ref_logits, logits: (B, T, V), any float dtype; ref_logits is a constant (detached). mask_labels: (B, T) labels
    whose non-IGN entries mark the answer positions (may be None for positions="all"). micro_batch: (B,) integer ids
    or None. attention_mask: (B, T) or None. The micro-batch normaliser |𝒫_b| counts the selected positions.
    Returns a 0-dim fp32 tensor, differentiable in `logits`.
    """
    if logits.dim() != 3 or ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits and logits must both be (B, T, V), got {tuple(ref_logits.shape)} and "
                         f"{tuple(logits.shape)}")
    batch, seq, _ = logits.shape
    _check_batch("mask_labels", mask_labels, batch, seq)
    _check_batch("attention_mask", attention_mask, batch, seq)
    _check_batch("micro_batch", micro_batch, batch)
    if positions == "answer":
        if mask_labels is None:
            raise ValueError("positions='answer' needs mask_labels")
        select = mask_labels != IGNORE_INDEX
    elif positions == "all":
        if attention_mask is None:
            select = torch.ones(batch, seq, dtype=torch.bool, device=logits.device)
        else:
            select = attention_mask != 0
    else:
        raise ValueError(f"positions must be 'answer' or 'all', got {positions!r}")
    rows, pos = select.nonzero(as_tuple=True)
    weights = position_weights(rows, micro_batch, reduction)
    logp_ref = F.log_softmax(ref_logits.detach()[rows, pos].float(), dim=-1)  # (n, V) fp32
    logp = F.log_softmax(logits[rows, pos].float(), dim=-1)  # (n, V) fp32
    kl = (logp_ref.exp() * (logp_ref - logp)).sum(dim=-1)  # (n,)
    return (weights * kl).sum()
