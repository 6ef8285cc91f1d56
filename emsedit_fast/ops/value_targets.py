"""Public value-targets op (reference: emsedit_fast.reference.value_targets)."""

from __future__ import annotations

import torch

from emsedit_fast import _ext
from emsedit_fast import reference
from emsedit_fast.ops import _checks
from emsedit_fast.ops import _registry
from emsedit_fast.ops._dispatch import select


def _autograd(backward_op):
    def setup_context(ctx, inputs, output):
        keys, z, eta, idx = inputs
        ctx.save_for_backward(keys, z, eta, idx)

    def backward(ctx, grad_targets, grad_coeffs):
        keys, z, eta, idx = ctx.saved_tensors
        if grad_targets is None:
            grad_targets = torch.zeros(z.shape[0], z.shape[1] - keys.shape[1], dtype=z.dtype, device=z.device)
        grad_z, grad_eta = backward_op(grad_targets.contiguous(), grad_coeffs, keys, z, eta, idx)
        return None, grad_z, grad_eta, None

    return backward, setup_context


def _triton_forward(*args):
    import emsedit_fast.kernels.value_targets  # noqa: F401  (registers the triton ops)

    _registry.register_autograd("emsedit_fast::triton_value_targets",
                                *_autograd(_registry.triton("value_targets", "value_targets_backward")))
    return torch.ops.emsedit_fast.triton_value_targets(*args)


if _ext.load_error() is None:
    _registry.register_autograd("emsedit_fast::value_targets", *_autograd(_registry.cpp("value_targets_backward")))

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
    "cpp": _registry.cpp("value_targets"),
    "triton": _triton_forward,
}
_BACKWARD = {
    "reference": reference.value_targets_backward,
    "cpp": _registry.cpp("value_targets_backward"),
    "triton": _registry.triton("value_targets", "value_targets_backward"),
}


def _check(op, keys, z, eta, idx):
    _checks.check(keys.dim() == 2 and z.dim() == 2 and keys.shape[0] == z.shape[0], op,
                  f"keys (rows, d_in) and z (rows, D) must have the same rows, got {_checks.shape(keys)} and "
                  f"{_checks.shape(z)}")
    _checks.check(z.shape[1] > keys.shape[1], op, f"z has D={z.shape[1]} columns, not more than d_in={keys.shape[1]}")
    _checks.check(eta.dim() == 1, op, f"eta must be (layers,), got {_checks.shape(eta)}")
    _checks.index(op, idx, keys.shape[0], eta.shape[0])
    for name, x in (("keys", keys), ("z", z), ("eta", eta)):
        _checks.check(x.dtype == torch.float32, op, f"{name} must be fp32, got {x.dtype}")
    _checks.same_device(op, keys=keys, z=z, eta=eta, idx=idx)


def value_targets(keys: torch.Tensor, z: torch.Tensor, eta: torch.Tensor, idx: torch.Tensor, *,
                  backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, coeffs): coeff_j = -eta[idx_j] <u_j, u~_j>, target_j = coeff_j * delta~_j.

    keys: (N, d_in) fp32 raw keys u. z: (N, D) fp32 hypernetwork output [u~ | delta~]. eta: (L,) fp32.
    idx: (N,) int64. Returns targets (N, d_out) and coeffs (N,), fp32; differentiable in z and eta.
    Reference: emsedit_fast.reference.value_targets.
    """
    op = "value_targets"
    _check(op, keys, z, eta, idx)
    _, fn = select(op, _FORWARD, (keys, z), backend)
    return fn(keys.contiguous(), z.contiguous(), eta, idx)


def value_targets_backward(grad_targets: torch.Tensor, grad_coeffs: torch.Tensor | None, keys: torch.Tensor,
                           z: torch.Tensor, eta: torch.Tensor, idx: torch.Tensor, *,
                           backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_z (N, D), grad_eta (L,)) of `value_targets` (METHOD.md section 8.3).

    Reference: emsedit_fast.reference.value_targets_backward.
    """
    op = "value_targets_backward"
    _check(op, keys, z, eta, idx)
    _, fn = select(op, _BACKWARD, (keys, z), backend)
    return fn(grad_targets.contiguous(), grad_coeffs, keys.contiguous(), z.contiguous(), eta, idx)
