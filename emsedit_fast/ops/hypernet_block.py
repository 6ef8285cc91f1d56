"""Public hypernetwork-block op (reference: emsedit_fast.reference.hypernet_block).

The C++ and Triton forwards are custom ops whose autograd is their own manual backward op
(`hypernet_block_backward`, METHOD.md section 8.4), so training recomputes each block in chunks without keeping
PyTorch's intermediate graph. The reference forward is differentiated by PyTorch autograd.
"""

from __future__ import annotations

import torch

from emsedit_fast import _ext
from emsedit_fast import reference
from emsedit_fast.ops import _checks
from emsedit_fast.ops import _registry
from emsedit_fast.ops._dispatch import select


def _autograd(backward_op):
    def setup_context(ctx, inputs, output):
        z, a, b, c, s, t, idx, relu_first, mean, std = inputs
        ctx.save_for_backward(z, a, b, c, s, t, idx, mean, std)
        ctx.relu_first = relu_first

    def backward(ctx, grad_out):
        z, a, b, c, s, t, idx, mean, std = ctx.saved_tensors
        grads = backward_op(grad_out.contiguous(), z, a, b, c, s, t, idx, ctx.relu_first, mean, std)
        return (*grads, None, None, None, None)

    return backward, setup_context


def _triton_forward(*args):
    import emsedit_fast.kernels.hypernet_block  # noqa: F401  (registers the triton ops)

    _registry.register_autograd("emsedit_fast::triton_hypernet_block",
                                *_autograd(_registry.triton("hypernet_block", "hypernet_block_backward")))
    return torch.ops.emsedit_fast.triton_hypernet_block(*args)


if _ext.load_error() is None:
    _registry.register_autograd("emsedit_fast::hypernet_block", *_autograd(_registry.cpp("hypernet_block_backward")))

    # Fake (meta) kernels: shapes and dtypes only, so FakeTensor tracing and torch.compile can see through the C++ ops.
    @torch.library.register_fake("emsedit_fast::hypernet_block")
    def _hypernet_block_fake(z, a, b, c, s, t, idx, relu_first, mean, std):
        return z.new_empty(z.shape)  # (N, D) fp32

    @torch.library.register_fake("emsedit_fast::hypernet_block_backward")
    def _hypernet_block_backward_fake(grad_out, z, a, b, c, s, t, idx, relu_first, mean, std):
        return tuple(x.new_empty(x.shape) for x in (z, a, b, c, s, t))  # gradients shaped like their inputs

_FORWARD = {
    "reference": reference.hypernet_block,
    "cpp": _registry.cpp("hypernet_block"),
    "triton": _triton_forward,
}
_BACKWARD = {
    "reference": reference.hypernet_block_backward,
    "cpp": _registry.cpp("hypernet_block_backward"),
    "triton": _registry.triton("hypernet_block", "hypernet_block_backward"),
}


def _check(op, z, a, b, c, s, t, idx, mean, std):
    _checks.check(z.dim() == 2, op, f"z must be (rows, D), got {_checks.shape(z)}")
    n, d = z.shape
    _checks.check(a.dim() == 2 and a.shape[0] == d, op, f"a must be (D={d}, rank), got {_checks.shape(a)}")
    r = a.shape[1]
    _checks.check(b.shape == (r, d), op, f"b must be (rank={r}, D={d}), got {_checks.shape(b)}")
    _checks.check(c.shape == (d,), op, f"c must be ({d},), got {_checks.shape(c)}")
    _checks.check(s.dim() == 2 and s.shape[1] == d and t.shape == s.shape, op,
                  f"s and t must be (layers, D={d}), got {_checks.shape(s)} and {_checks.shape(t)}")
    _checks.index(op, idx, n, s.shape[0])
    _checks.check((mean is None) == (std is None), op, "give both mean and std, or neither")
    if mean is not None:
        _checks.check(mean.shape == (d,) and std.shape == (d,), op, f"mean and std must be ({d},)")
    for name, x in (("z", z), ("a", a), ("b", b), ("c", c), ("s", s), ("t", t)):
        _checks.check(x.dtype == torch.float32, op, f"{name} must be fp32, got {x.dtype}")
    _checks.same_device(op, z=z, a=a, b=b, c=c, s=s, t=t, idx=idx, mean=mean, std=std)


def hypernet_block(z: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, s: torch.Tensor,
                   t: torch.Tensor, idx: torch.Tensor, *, relu_first: bool = True, mean: torch.Tensor | None = None,
                   std: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """z' = z + h(z) with h = s[idx] * relu(z A B + c) + t[idx] (relu_first) or relu(s[idx] * (z A B + c) + t[idx]).

    z: (N, D) fp32, the rows of every same-shape layer stacked; idx: (N,) int64 layer of each row, in [0, L).
    a: (D, r), b: (r, D), c: (D,), s, t: (L, D) fp32. A and B are read once for all layers.
    mean, std: (D,) fp32 folds the normaliser into the block: z is then the raw row x and the block uses
    (x - mean) / (std + 2^-23). relu'(0) = 1. Returns (N, D) fp32; differentiable in z, a, b, c, s, t.
    Reference: emsedit_fast.reference.hypernet_block (one call per layer).
    """
    op = "hypernet_block"
    _check(op, z, a, b, c, s, t, idx, mean, std)
    _, fn = select(op, _FORWARD, (z, a, b), backend)
    return fn(z.contiguous(), a.contiguous(), b.contiguous(), c, s.contiguous(), t.contiguous(), idx, bool(relu_first),
              mean, std)


def hypernet_block_backward(grad_out: torch.Tensor, z: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                            c: torch.Tensor, s: torch.Tensor, t: torch.Tensor, idx: torch.Tensor, *,
                            relu_first: bool = True, mean: torch.Tensor | None = None,
                            std: torch.Tensor | None = None, backend: str | None = None) -> tuple[torch.Tensor, ...]:
    """Gradients (z, a, b, c, s, t) of `hypernet_block` given dL/dz' (N, D); recomputes the forward.

    Reference: emsedit_fast.reference.hypernet_block_backward (METHOD.md section 8.4).
    """
    op = "hypernet_block_backward"
    _check(op, z, a, b, c, s, t, idx, mean, std)
    _checks.check(grad_out.shape == z.shape, op, f"grad_out must match z {_checks.shape(z)}")
    _, fn = select(op, _BACKWARD, (z, a, b), backend)
    return fn(grad_out.contiguous(), z.contiguous(), a.contiguous(), b.contiguous(), c, s.contiguous(),
              t.contiguous(), idx, bool(relu_first), mean, std)
