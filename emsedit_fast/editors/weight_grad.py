"""dL/dW of the meta-loss for every edited weight, kept factored, as the meta-gradient consumes it.

G_l = Delta'^T X' + 2 c (W_l - W_l^0) Q  (linear orientation, d_out x d_in) is never formed densely: the meta-gradient
only needs K G^T for row blocks K of keys (the dual form) or, for the primal form, G^T itself. Q is the drift
penalty's metric: the identity (c ||D||_F^2, D = W - W0) or the key second moment Sigma = E[x x^T] of the layer's
ordinary inputs (c tr(D Sigma D^T) = c E_x ||D x||^2: the expected squared change of the layer's output on ordinary
inputs, the quantity that unrelated predictions feel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class WeightGrad:
    """dL/dW_l in linear orientation (d_out, d_in), kept factored: G = Delta'^T X' + 2 c D Q, D = W - W_ref.

    inputs X' (T, d_in) and output_grads Delta' (T, d_out): the meta-loss pass's rows (None: no such term).
    The drift term 2 c D Q (the penalty c tr(D Q D^T), Q = drift_metric (d_in, d_in) symmetric, or the identity
    when None; W_ref = W0, or the weights before the batch) is held as either
      drift_factors: [(M_i (n_i, d_out), K_i (n_i, d_in))] with D = sum_i M_i^T K_i (the updates applied since
                     W_ref, when they are few: batch mode, sequential pre_batch), or
      drift_weights: (W, W_ref, transposed) in storage layout, streamed in row blocks (the sequential mode, where
                     the drift from W0 has accumulated over many edits); no dense fp32 (d_out, d_in) buffer is ever
                     formed.
    """

    inputs: torch.Tensor | None = None
    output_grads: torch.Tensor | None = None
    drift_coef: float = 0.0
    drift_factors: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    drift_weights: tuple[torch.Tensor, torch.Tensor, bool] | None = None
    drift_metric: torch.Tensor | None = None
    d_out: int = 0

    def times_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """K G^T (n, d_out) for rows K (n, d_in): row j is G k_j."""
        out = torch.zeros(keys.shape[0], self.d_out, device=keys.device)
        if self.inputs is not None:
            out += (keys @ self.inputs.t()) @ self.output_grads  # (n x T)(T x d_out)
        if self.drift_coef and self.drift_metric is not None:
            keys = keys @ self.drift_metric.to(keys.device)  # K (D Q)^T = (K Q) D^T, Q symmetric
        if self.drift_coef and self.drift_factors:
            for m, k in self.drift_factors:
                out += (2 * self.drift_coef) * ((keys @ k.t()) @ m)
        elif self.drift_coef and self.drift_weights is not None:
            w, w0, transposed = self.drift_weights
            out += (2 * self.drift_coef) * _drift_times_keys(w, w0, transposed, keys)
        return out

    def hat(self) -> torch.Tensor:
        """G^T (d_in, d_out) dense: the primal form needs it."""
        out = None
        if self.inputs is not None:
            out = self.inputs.t() @ self.output_grads
        if self.drift_coef and (self.drift_factors or self.drift_weights is not None):
            if self.drift_factors:
                drift = sum(k.t() @ m for m, k in self.drift_factors)
            else:
                w, w0, transposed = self.drift_weights
                d = (w.float() - w0.float())
                drift = d if transposed else d.t()
            if self.drift_metric is not None:  # (D Q)^T = Q D^T
                drift = self.drift_metric.to(drift.device) @ drift
            drift = (2 * self.drift_coef) * drift.to(out.device if out is not None else drift.device)
            out = drift if out is None else out + drift
        return out


def _drift_times_keys(w: torch.Tensor, w0: torch.Tensor, transposed: bool, keys: torch.Tensor,
                      block: int = 1024) -> torch.Tensor:
    """keys (W - W0)^T (n, d_out) in linear orientation, streaming row blocks of the stored weights in fp32."""
    keys = keys.to(w.device)
    if transposed:  # stored (d_in, d_out): keys (W_lin)^T = keys W_stored, blocks over d_in
        out = torch.zeros(keys.shape[0], w.shape[1], device=w.device)
        for lo in range(0, w.shape[0], block):
            out += keys[:, lo:lo + block] @ (w[lo:lo + block].float() - w0[lo:lo + block].float())
        return out
    parts = [keys @ (w[lo:lo + block].float() - w0[lo:lo + block].float()).t() for lo in range(0, w.shape[0], block)]
    return torch.cat(parts, 1)


def drift_sq_norm(w: torch.Tensor, w0: torch.Tensor, block: int = 1024, *, metric: torch.Tensor | None = None,
                  transposed: bool = False) -> float:
    """tr(D Q D^T) for D = W - W0 in linear orientation (||D||_F^2 when metric Q is None) in fp64, streaming blocks
    (no dense copy of the whole difference). transposed: W is stored (d_in, d_out) (GPT-2 Conv1D)."""
    total = 0.0
    q = None if metric is None else metric.double().to(w.device)
    if q is not None and transposed:  # columns j of the stored (d_in, d_out) difference: d_j^T Q d_j
        for lo in range(0, w.shape[1], block):
            d = w[:, lo:lo + block].double() - w0[:, lo:lo + block].double()
            total += float(((q @ d) * d).sum())
        return total
    for lo in range(0, w.shape[0], block):  # rows of D (or of D^T for the plain norm, which is the same)
        d = w[lo:lo + block].double() - w0[lo:lo + block].double()
        total += float(((d @ q) * d).sum() if q is not None else (d * d).sum())
    return total


def lowrank_drift_sq_norm(factors: list[tuple[torch.Tensor, torch.Tensor]], metric: torch.Tensor | None = None
                          ) -> float:
    """tr(D Q D^T) for D = sum_i B_i A_i, B_i (d_out, n_i), A_i (n_i, d_in), via the stacked factors' Gram matrices:
    with B = [B_1 .. B_k], A = [A_1; ..; A_k], tr(B A Q A^T B^T) = <B^T B, A Q A^T> (sum n_i squared work; the cross
    terms between steps included)."""
    if not factors:
        return 0.0
    b = torch.cat([f[0] for f in factors], 1).double()
    a = torch.cat([f[1] for f in factors], 0).double()
    aqa = a @ a.t() if metric is None else a @ metric.double().to(a.device) @ a.t()
    return float(((b.t() @ b) * aqa).sum().clamp_min(0))
