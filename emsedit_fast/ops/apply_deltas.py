"""Public grouped in-place weight-update ops (reference: emsedit_fast.reference.apply_deltas; docs/method.md,
"Applying and undoing an update").

    low rank:  W_l <- round(W_l + alpha_l * M_l^T K_l)      dense:  W_l <- round(W_l + alpha_l * S_l^T)

accumulated in fp32 and rounded once into W's dtype.
"""

from __future__ import annotations

import torch

from emsedit_fast import _ext
from emsedit_fast import reference
from emsedit_fast.ops import _checks
from emsedit_fast.ops._dispatch import cpp_impl
from emsedit_fast.ops._dispatch import select
from emsedit_fast.ops._dispatch import triton_impl

WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_LOW_RANK = {
    "reference": reference.apply_deltas_,
    "cpp": cpp_impl("apply_deltas_"),
    "triton": triton_impl("apply_deltas", "apply_deltas_"),
}
_DENSE = {
    "reference": reference.apply_deltas_dense_,
    "cpp": cpp_impl("apply_deltas_dense_"),
    "triton": triton_impl("apply_deltas", "apply_deltas_dense_"),
}

if _ext.load_error() is None:

    # Fake (meta) kernels: the ops only mutate their weights (declared in the schema), so they return nothing. With
    # them FakeTensor tracing, torch.compile and opcheck can see through the C++ ops.
    @torch.library.register_fake("emsedit_fast::apply_deltas_")
    def _apply_deltas_fake(weights, coeffs, keys, alpha, transposed):
        return None

    @torch.library.register_fake("emsedit_fast::apply_deltas_dense_")
    def _apply_deltas_dense_fake(weights, shifts, alpha, transposed):
        return None


def _weight_dims(op, layer, w, transposed):
    _checks.check(w.dim() == 2, op, lambda: f"weights[{layer}] must be 2-D, got {_checks.shape(w)}")
    _checks.check(w.dtype in WEIGHT_DTYPES, op, lambda: f"weights[{layer}] dtype {w.dtype} unsupported "
                                                        f"(fp32, bf16, fp16)")
    _checks.check(w.is_contiguous(), op, lambda: f"weights[{layer}] must be contiguous")
    d_out, d_in = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])
    return d_in, d_out


def _check_alpha(op, alpha, n_layers):
    if alpha is not None:
        _checks.check(alpha.shape == (n_layers,) and alpha.dtype == torch.float32, op,
                      lambda: f"alpha must be ({n_layers},) fp32, got {_checks.shape(alpha)} {alpha.dtype}")


def check_apply_deltas_(weights, coeffs, keys, alpha, transposed) -> None:
    """The input check of `apply_deltas_` (every backend relies on it)."""
    op = "apply_deltas_"
    n = len(weights)
    _checks.check(n > 0 and len(coeffs) == n and len(keys) == n, op,
                  lambda: f"need one coeffs and one keys tensor per weight, got {n} weights, {len(coeffs)} coeffs, "
                  f"{len(keys)} keys")
    for layer, (w, m, k) in enumerate(zip(weights, coeffs, keys)):
        d_in, d_out = _weight_dims(op, layer, w, transposed)
        _checks.check(m.dim() == 2 and k.dim() == 2 and m.shape[0] == k.shape[0], op,
                      lambda: f"layer {layer}: coeffs (n, d_out) and keys (n, d_in) must share n, got "
                              f"{_checks.shape(m)} "
                      f"and {_checks.shape(k)}")
        _checks.check(m.shape[1] == d_out and k.shape[1] == d_in, op,
                      lambda: f"layer {layer}: weight implies d_in={d_in}, d_out={d_out} but coeffs is "
                              f"{_checks.shape(m)} "
                      f"and keys is {_checks.shape(k)}")
        _checks.check(m.dtype == torch.float32 and k.dtype == torch.float32, op,
                      lambda: f"layer {layer}: coeffs and keys must be fp32, got {m.dtype} and {k.dtype}")
    _check_alpha(op, alpha, n)
    _checks.same_device(op, alpha=alpha, weights=weights, coeffs=coeffs, keys=keys)


def check_apply_deltas_dense_(weights, shifts, alpha, transposed) -> None:
    """The input check of `apply_deltas_dense_`."""
    op = "apply_deltas_dense_"
    n = len(weights)
    _checks.check(n > 0 and len(shifts) == n, op, lambda: f"need one shift per weight, got {n} weights, "
                                                          f"{len(shifts)} shifts")
    for layer, (w, shift) in enumerate(zip(weights, shifts)):
        d_in, d_out = _weight_dims(op, layer, w, transposed)
        _checks.check(shift.shape == (d_in, d_out) and shift.dtype == torch.float32, op,
                      lambda: f"layer {layer}: shift must be ({d_in}, {d_out}) fp32, got "
                              f"{_checks.shape(shift)} {shift.dtype}")
    _check_alpha(op, alpha, n)
    _checks.same_device(op, alpha=alpha, weights=weights, shifts=shifts)


def apply_deltas_(weights: list[torch.Tensor], coeffs: list[torch.Tensor], keys: list[torch.Tensor],
                  alpha: torch.Tensor | None = None, transposed: bool = False, *,
                  backend: str | None = None) -> None:
    """W_l <- round(W_l + alpha_l * M_l^T K_l) for every layer, in place, in one call.

    weights: L tensors (d_out, d_in), or (d_in, d_out) with transposed=True (GPT-2 Conv1D); fp32, bf16 or fp16.
    Mutated. coeffs: L tensors M_l (n_l, d_out) fp32. keys: L tensors K_l (n_l, d_in) fp32. alpha: (L,) fp32 or
    None. Shapes may differ between layers. Accumulates in fp32 and rounds once; no dense delta is materialised by
    the fast backends. Deterministic. Reference: emsedit_fast.reference.apply_deltas_.
    """
    check_apply_deltas_(weights, coeffs, keys, alpha, transposed)
    _, fn = select("apply_deltas_", _LOW_RANK, (weights[0], coeffs[0]), backend)
    fn(list(weights), [m.contiguous() for m in coeffs], [k.contiguous() for k in keys],
       alpha.contiguous() if alpha is not None else None, bool(transposed))


def apply_deltas_dense_(weights: list[torch.Tensor], shifts: list[torch.Tensor], alpha: torch.Tensor | None = None,
                        transposed: bool = False, *, backend: str | None = None) -> None:
    """W_l <- round(W_l + alpha_l * S_l^T) for every layer, in place (the primal-form update).

    weights: as in `apply_deltas_`. Mutated. shifts: L tensors S_l (d_in, d_out) fp32. alpha: (L,) fp32 or None.
    Reference: emsedit_fast.reference.apply_deltas_dense_.
    """
    check_apply_deltas_dense_(weights, shifts, alpha, transposed)
    _, fn = select("apply_deltas_dense_", _DENSE, (weights[0], shifts[0]), backend)
    fn(list(weights), [s.contiguous() for s in shifts], alpha.contiguous() if alpha is not None else None,
       bool(transposed))
