"""Public hypernetwork-block ops (reference: emsedit_fast.reference.hypernet_block).

One residual low-rank block for the rows of every same-shape layer at once (docs/method.md, "Hypernetwork"):

    z0 = z,  or  z0 = (x - mean) / (std + NORM_EPS)  when mean and std are given (the normaliser folded in)
    p  = (z0 A) B + c                               A (D, r), B (r, D), c (D,)
    h  = s[idx] * relu(p) + t[idx]   (relu_first)   or   relu(s[idx] * p + t[idx])   (MEND's order)
    z' = z0 + h,   relu(x) = x * [x >= 0], relu'(0) = 1

The C++ and Triton forwards are custom ops whose autograd is their own manual backward op, `hypernet_block_backward`
(one fused pass per block, recomputing p; docs/method.md, "Meta-gradient"), so training never keeps PyTorch's
intermediate graph of a block. The reference forward is differentiated by PyTorch autograd.
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
    """(backward, setup_context) of a forward op whose gradients come from `backward_op` (same arguments, plus
    grad_out first). mean and std are constants (running-statistics buffers): they get no gradient."""

    def setup_context(ctx, inputs, output):
        z, a, b, c, s, t, idx, relu_first, mean, std = inputs
        ctx.save_for_backward(z, a, b, c, s, t, idx, mean, std)
        ctx.relu_first = relu_first

    def backward(ctx, grad_out):
        z, a, b, c, s, t, idx, mean, std = ctx.saved_tensors
        grads = backward_op(grad_out.contiguous(), z, a, b, c, s, t, idx, ctx.relu_first, mean, std)
        return (*grads, None, None, None, None)

    return backward, setup_context


_FORWARD = {
    "reference": reference.hypernet_block,
    "cpp": cpp_impl("hypernet_block"),
    "triton": triton_impl("hypernet_block", "hypernet_block",
                          autograd=_autograd(triton_impl("hypernet_block", "hypernet_block_backward"))),
}
_BACKWARD = {
    "reference": reference.hypernet_block_backward,
    "cpp": cpp_impl("hypernet_block_backward"),
    "triton": triton_impl("hypernet_block", "hypernet_block_backward"),
}

if _ext.load_error() is None:
    register_autograd_once("emsedit_fast::hypernet_block", *_autograd(cpp_impl("hypernet_block_backward")))

    # Fake (meta) kernels: shapes and dtypes only, so FakeTensor tracing and torch.compile can see through the C++ ops.
    @torch.library.register_fake("emsedit_fast::hypernet_block")
    def _hypernet_block_fake(z, a, b, c, s, t, idx, relu_first, mean, std):
        return z.new_empty(z.shape)  # (N, D) fp32

    @torch.library.register_fake("emsedit_fast::hypernet_block_backward")
    def _hypernet_block_backward_fake(grad_out, z, a, b, c, s, t, idx, relu_first, mean, std):
        return tuple(x.new_empty(x.shape) for x in (z, a, b, c, s, t))  # gradients shaped like their inputs


def check_hypernet_block(z, a, b, c, s, t, idx, mean, std, grad_out=None, op: str = "hypernet_block") -> None:
    """The input check of `hypernet_block` (and, with grad_out, of `hypernet_block_backward`)."""
    _checks.check(z.dim() == 2, op, f"z must be (rows, D), got {_checks.shape(z)}")
    n, d = z.shape
    _checks.check(a.dim() == 2 and a.shape[0] == d and a.shape[1] >= 1, op,
                  f"a must be (D={d}, rank >= 1), got {_checks.shape(a)}")
    r = a.shape[1]
    _checks.check(b.shape == (r, d), op, f"b must be (rank={r}, D={d}), got {_checks.shape(b)}")
    _checks.check(c.shape == (d,), op, f"c must be ({d},), got {_checks.shape(c)}")
    _checks.check(s.dim() == 2 and s.shape[1] == d and t.shape == s.shape, op,
                  f"s and t must be (layers, D={d}), got {_checks.shape(s)} and {_checks.shape(t)}")
    _checks.index(op, idx, n)
    _checks.check((mean is None) == (std is None), op, "give both mean and std, or neither")
    if mean is not None:
        _checks.check(mean.shape == (d,) and std.shape == (d,), op,
                      f"mean and std must be ({d},), got {_checks.shape(mean)} and {_checks.shape(std)}")
    if grad_out is not None:
        _checks.check(grad_out.shape == z.shape, op,
                      f"grad_out must match z ({_checks.shape(z)}), got {_checks.shape(grad_out)}")
    _checks.dtype(op, (torch.float32,), z=z, a=a, b=b, c=c, s=s, t=t, mean=mean, std=std, grad_out=grad_out)
    _checks.same_device(op, z=z, a=a, b=b, c=c, s=s, t=t, idx=idx, mean=mean, std=std, grad_out=grad_out)


def _contiguous(*tensors):
    return tuple(x.contiguous() if x is not None else None for x in tensors)


def hypernet_block(z: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, s: torch.Tensor,
                   t: torch.Tensor, idx: torch.Tensor, *, relu_first: bool = True, mean: torch.Tensor | None = None,
                   std: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """z' = z0 + h(z0) for the rows of every layer of a shape group, in one call (math in the module docstring).

    z: (N, D) fp32, the rows of every same-shape layer stacked; idx: (N,) int64, the layer of each row, in [0, L),
    in any order. a: (D, r), b: (r, D), c: (D,), s, t: (L, D) fp32. A and B are read once for all layers.

    Folded normaliser: with mean and std ((D,) fp32, the running statistics) z is the raw row x = [keys |
    value_grads] and the block works on z0 = (x - mean) / (std + NORM_EPS), exactly what
    `running_stats_normalize(keys, value_grads, mean, std)` followed by `hypernet_block(z0, ...)` computes, without
    writing z0. The first block of a hypernetwork is then

        hypernet_block(x, a, b, c, s, t, idx, relu_first=..., mean=mean, std=std)

    Returns (N, D) fp32. Differentiable in z (then x), a, b, c, s, t; mean and std are constants (no gradient).
    Reference: emsedit_fast.reference.hypernet_block (one call per layer).
    """
    check_hypernet_block(z, a, b, c, s, t, idx, mean, std)
    _, fn = select("hypernet_block", _FORWARD, (z, a, b), backend)
    return fn(*_contiguous(z, a, b, c, s, t, idx), bool(relu_first), *_contiguous(mean, std))


def hypernet_block_backward(grad_out: torch.Tensor, z: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                            c: torch.Tensor, s: torch.Tensor, t: torch.Tensor, idx: torch.Tensor, *,
                            relu_first: bool = True, mean: torch.Tensor | None = None,
                            std: torch.Tensor | None = None, backend: str | None = None) -> tuple[torch.Tensor, ...]:
    """Gradients (z, a, b, c, s, t) of `hypernet_block` given gamma = dL/dz' (N, D); recomputes the forward.

    With q = relu(p) and the mask m = [p >= 0] (relu_first), or g = gamma * [s[idx] p + t[idx] >= 0] (MEND's order):

        pi = s[idx] * gamma * m          (pi = s[idx] * g)
        dt_l = sum_{rows of l} gamma     (g);     ds_l = sum_{rows of l} gamma * q     (g * p)
        dc = sum_rows pi;  dB = (z0 A)^T pi;  alpha = pi B^T;  dA = z0^T alpha;  dz = gamma + alpha A^T

    and with mean/std, dz is divided by (std + NORM_EPS) (the gradient with respect to the raw rows x).
    Reference: emsedit_fast.reference.hypernet_block_backward.
    """
    op = "hypernet_block_backward"
    check_hypernet_block(z, a, b, c, s, t, idx, mean, std, grad_out=grad_out, op=op)
    _, fn = select(op, _BACKWARD, (z, a, b), backend)
    return fn(*_contiguous(grad_out, z, a, b, c, s, t, idx), bool(relu_first), *_contiguous(mean, std))
