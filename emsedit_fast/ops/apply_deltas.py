"""Public grouped in-place weight-update ops (reference: emsedit_fast.reference.apply_deltas)."""

from __future__ import annotations

import torch

from emsedit_fast import reference
from emsedit_fast.ops import _checks
from emsedit_fast.ops import _registry
from emsedit_fast.ops._dispatch import select

WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_LOW_RANK = {
    "reference": reference.apply_deltas_,
    "cpp": _registry.cpp("apply_deltas_"),
    "triton": _registry.triton("apply_deltas", "apply_deltas_"),
}
_DENSE = {
    "reference": reference.apply_deltas_dense_,
    "cpp": _registry.cpp("apply_deltas_dense_"),
    "triton": _registry.triton("apply_deltas", "apply_deltas_dense_"),
}


def _weight_dims(op, layer, w, transposed):
    _checks.check(w.dim() == 2, op, f"weights[{layer}] must be 2-D, got {_checks.shape(w)}")
    _checks.check(w.dtype in WEIGHT_DTYPES, op, f"weights[{layer}] dtype {w.dtype} unsupported (fp32, bf16, fp16)")
    _checks.check(w.is_contiguous(), op, f"weights[{layer}] must be contiguous")
    d_out, d_in = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])
    return d_in, d_out


def _check_alpha(op, alpha, n_layers):
    if alpha is not None:
        _checks.check(alpha.shape == (n_layers,) and alpha.dtype == torch.float32, op,
                      f"alpha must be ({n_layers},) fp32, got {_checks.shape(alpha)} {alpha.dtype}")


def apply_deltas_(weights: list[torch.Tensor], coeffs: list[torch.Tensor], keys: list[torch.Tensor],
                  alpha: torch.Tensor | None = None, transposed: bool = False, *,
                  backend: str | None = None) -> None:
    """W_l <- round(W_l + alpha_l * M_l^T K_l) for every layer, in place, in one call.

    weights: L tensors (d_out, d_in), or (d_in, d_out) with transposed=True (GPT-2 Conv1D); fp32, bf16 or fp16.
    Mutated. coeffs: L tensors M_l (n_l, d_out) fp32. keys: L tensors K_l (n_l, d_in) fp32. alpha: (L,) fp32 or
    None. Shapes may differ between layers. Accumulates in fp32 and rounds once; no dense delta is materialised by
    the fast backends. Deterministic. Reference: emsedit_fast.reference.apply_deltas_.
    """
    op = "apply_deltas_"
    n = len(weights)
    _checks.check(n > 0 and len(coeffs) == n and len(keys) == n, op,
                  f"need one coeffs and one keys tensor per weight, got {n} weights, {len(coeffs)} coeffs, "
                  f"{len(keys)} keys")
    for layer, (w, m, k) in enumerate(zip(weights, coeffs, keys)):
        d_in, d_out = _weight_dims(op, layer, w, transposed)
        _checks.check(m.dim() == 2 and k.dim() == 2 and m.shape[0] == k.shape[0], op,
                      f"layer {layer}: coeffs (n, d_out) and keys (n, d_in) must share n, got {_checks.shape(m)} "
                      f"and {_checks.shape(k)}")
        _checks.check(m.shape[1] == d_out and k.shape[1] == d_in, op,
                      f"layer {layer}: weight implies d_in={d_in}, d_out={d_out} but coeffs is {_checks.shape(m)} "
                      f"and keys is {_checks.shape(k)}")
        _checks.check(m.dtype == torch.float32 and k.dtype == torch.float32, op,
                      f"layer {layer}: coeffs and keys must be fp32")
    _check_alpha(op, alpha, n)
    _, fn = select(op, _LOW_RANK, (weights[0], coeffs[0]), backend)
    fn(list(weights), [m.contiguous() for m in coeffs], [k.contiguous() for k in keys], alpha, bool(transposed))


def apply_deltas_dense_(weights: list[torch.Tensor], shifts: list[torch.Tensor], alpha: torch.Tensor | None = None,
                        transposed: bool = False, *, backend: str | None = None) -> None:
    """W_l <- round(W_l + alpha_l * S_l^T) for every layer, in place (the primal-form update).

    weights: as in `apply_deltas_`. Mutated. shifts: L tensors S_l (d_in, d_out) fp32. alpha: (L,) fp32 or None.
    Reference: emsedit_fast.reference.apply_deltas_dense_.
    """
    op = "apply_deltas_dense_"
    n = len(weights)
    _checks.check(n > 0 and len(shifts) == n, op, f"need one shift per weight, got {n} weights, {len(shifts)} shifts")
    for layer, (w, shift) in enumerate(zip(weights, shifts)):
        d_in, d_out = _weight_dims(op, layer, w, transposed)
        _checks.check(shift.shape == (d_in, d_out) and shift.dtype == torch.float32, op,
                      f"layer {layer}: shift must be ({d_in}, {d_out}) fp32, got {_checks.shape(shift)} {shift.dtype}")
    _check_alpha(op, alpha, n)
    _, fn = select(op, _DENSE, (weights[0], shifts[0]), backend)
    fn(list(weights), [s.contiguous() for s in shifts], alpha, bool(transposed))
