"""Public value-targets ops (reference: emsedit_fast.reference.value_targets; docs/method.md, "Value targets").

    coeff_j = -eta[idx_j] <u_j, u~_j>,   target_j = coeff_j * delta~_j,   z = [u~ | delta~] (N, D)
"""

from __future__ import annotations

import torch

from emsedit_fast import _ext
from emsedit_fast import reference
from emsedit_fast.ops import _checks
from emsedit_fast.ops._dispatch import cpp_impl
from emsedit_fast.ops._dispatch import register_autograd_once
from emsedit_fast.ops._dispatch import select
from emsedit_fast.ops._dispatch import triton_impl


def _autograd(backward_op):
    def setup_context(ctx, inputs, output):
        keys, z, eta, idx = inputs
        ctx.save_for_backward(keys, z, eta, idx)

    def backward(ctx, grad_targets, grad_coeffs):
        keys, z, eta, idx = ctx.saved_tensors
        if grad_targets is None:
            grad_targets = torch.zeros(z.shape[0], z.shape[1] - keys.shape[1], dtype=z.dtype, device=z.device)
        if grad_coeffs is not None:
            grad_coeffs = grad_coeffs.contiguous()
        grad_z, grad_eta = backward_op(grad_targets.contiguous(), grad_coeffs, keys, z, eta, idx)
        return None, grad_z, grad_eta, None

    return backward, setup_context


if _ext.load_error() is None:
    register_autograd_once("emsedit_fast::value_targets", *_autograd(cpp_impl("value_targets_backward")))

    # Fake (meta) kernels: shapes and dtypes only, so FakeTensor tracing and torch.compile can see through the C++ ops.
    @torch.library.register_fake("emsedit_fast::value_targets")
    def _value_targets_fake(keys, z, eta, idx):
        n_rows, d = z.shape
        return z.new_empty(n_rows, d - keys.shape[1]), z.new_empty(n_rows)  # targets (N, d_out), coeffs (N,)

    @torch.library.register_fake("emsedit_fast::value_targets_backward")
    def _value_targets_backward_fake(grad_targets, grad_coeffs, keys, z, eta, idx):
        return z.new_empty(z.shape), eta.new_empty(eta.shape)  # grad_z (N, D), grad_eta (L,)


_FORWARD = {
    "reference": reference.value_targets,
    "cpp": cpp_impl("value_targets"),
    "triton": triton_impl("value_targets", "value_targets",
                          autograd=_autograd(triton_impl("value_targets", "value_targets_backward"))),
}
_BACKWARD = {
    "reference": reference.value_targets_backward,
    "cpp": cpp_impl("value_targets_backward"),
    "triton": triton_impl("value_targets", "value_targets_backward"),
}


def check_value_targets(keys, z, eta, idx, grad_targets=None, grad_coeffs=None, op: str = "value_targets") -> None:
    """The input check of `value_targets` (and, with the gradients, of `value_targets_backward`)."""
    _checks.check(keys.dim() == 2 and z.dim() == 2 and keys.shape[0] == z.shape[0], op,
                  lambda: f"keys (rows, d_in) and z (rows, D) must have the same rows, got {_checks.shape(keys)} and "
                  f"{_checks.shape(z)}")
    n, d_in = keys.shape
    _checks.check(z.shape[1] > d_in, op, lambda: f"z has D={z.shape[1]} columns, not more than d_in={d_in}")
    _checks.check(eta.dim() == 1, op, lambda: f"eta must be (layers,), got {_checks.shape(eta)}")
    _checks.index(op, idx, n)
    if op == "value_targets_backward":
        d_out = z.shape[1] - d_in
        _checks.check(grad_targets is not None, op, "grad_targets must be given")
        _checks.check(grad_targets.shape == (n, d_out), op,
                      lambda: f"grad_targets must be ({n}, {d_out}), got ({_checks.shape(grad_targets)})")
        if grad_coeffs is not None:
            _checks.check(grad_coeffs.shape == (n,), op,
                          lambda: f"grad_coeffs must be ({n},) or None, got ({_checks.shape(grad_coeffs)})")
    _checks.dtype(op, (torch.float32,), keys=keys, z=z, eta=eta, grad_targets=grad_targets, grad_coeffs=grad_coeffs)
    _checks.same_device(op, keys=keys, z=z, eta=eta, idx=idx, grad_targets=grad_targets, grad_coeffs=grad_coeffs)


def value_targets(keys: torch.Tensor, z: torch.Tensor, eta: torch.Tensor, idx: torch.Tensor, *,
                  backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, coeffs): coeff_j = -eta[idx_j] <u_j, u~_j>, target_j = coeff_j * delta~_j.

    keys: (N, d_in) fp32 raw keys u. z: (N, D) fp32 hypernetwork output [u~ | delta~]. eta: (L,) fp32.
    idx: (N,) int64. Returns targets (N, d_out) and coeffs (N,), fp32; differentiable in z and eta.
    Reference: emsedit_fast.reference.value_targets.
    """
    check_value_targets(keys, z, eta, idx)
    _, fn = select("value_targets", _FORWARD, (keys, z), backend)
    return fn(keys.contiguous(), z.contiguous(), eta.contiguous(), idx.contiguous())


def value_targets_backward(grad_targets: torch.Tensor, grad_coeffs: torch.Tensor | None, keys: torch.Tensor,
                           z: torch.Tensor, eta: torch.Tensor, idx: torch.Tensor, *,
                           backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_z (N, D), grad_eta (L,)) of `value_targets`, given P = dL/dtargets (N, d_out) and dL/dcoeffs (N,) or None.

    With g_j = <P_j, delta~_j> (+ dL/dcoeff_j): dL/ddelta~_j = coeff_j P_j;  dL/du~_j = -eta_i g_j u_j;
    dL/deta_i = -sum_{j: idx_j = i} g_j <u_j, u~_j>.  Reference: emsedit_fast.reference.value_targets_backward.
    """
    op = "value_targets_backward"
    check_value_targets(keys, z, eta, idx, grad_targets, grad_coeffs, op=op)
    _, fn = select(op, _BACKWARD, (keys, z), backend)
    return fn(grad_targets.contiguous(), grad_coeffs.contiguous() if grad_coeffs is not None else None,
              keys.contiguous(), z.contiguous(), eta.contiguous(), idx.contiguous())
