"""Public hypernetwork-block ops (reference: emsedit_fast.reference.hypernet_block).

One residual low-rank block for the rows of every same-shape layer at once (docs/method.md, "Hypernetwork"):

    z0 = z,  or  z0 = (x - mean) / (std + NORM_EPS)  when mean and std are given (the normaliser folded in)
    p  = (z0 A) B + c                               A (D, r), B (r, D), c (D,)
    h  = s[idx] * relu(p) + t[idx]   (relu_first)   or   relu(s[idx] * p + t[idx])   (MEND's order)
    z' = z0 + h,   relu(x) = x * [x >= 0], relu'(0) = 1

The C++ and Triton forwards are custom ops whose autograd is their own manual backward op, `hypernet_block_backward`
(one fused pass per block; docs/method.md, "Meta-gradient"), so training never keeps PyTorch's intermediate graph of
a block. Under autograd the forward also hands the backward act = z0 A (N, r) and pre = p (N, D), so no GEMM of the
forward runs twice; called on its own, the backward recomputes them. The reference forward is differentiated by
PyTorch autograd.
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
    grad_out first and the forward's saved act and pre last). mean and std are constants (running-statistics
    buffers): they get no gradient."""

    def setup_context(ctx, inputs, output):
        z, a, b, c, s, t, idx, relu_first, mean, std, save_for_backward = inputs
        _, act, pre = output
        ctx.mark_non_differentiable(act, pre)
        saved = (act, pre) if save_for_backward else (None, None)
        ctx.save_for_backward(z, a, b, c, s, t, idx, mean, std, *saved)
        ctx.relu_first = relu_first

    def backward(ctx, grad_out, _grad_act, _grad_pre):
        z, a, b, c, s, t, idx, mean, std, act, pre = ctx.saved_tensors
        grads = backward_op(grad_out.contiguous(), z, a, b, c, s, t, idx, ctx.relu_first, mean, std, act, pre)
        return (*grads, None, None, None, None, None)

    return backward, setup_context


def _reference_backward(grad_out, z, a, b, c, s, t, idx, relu_first, mean, std, act=None, pre=None):
    return reference.hypernet_block_backward(grad_out, z, a, b, c, s, t, idx, relu_first, mean, std)


_FORWARD = {
    "reference": reference.hypernet_block,
    "cpp": cpp_impl("hypernet_block"),
    "triton": triton_impl("hypernet_block", "hypernet_block",
                          autograd=_autograd(triton_impl("hypernet_block", "hypernet_block_backward"))),
}
_BACKWARD = {
    "reference": _reference_backward,  # recomputes from z whatever was saved
    "cpp": cpp_impl("hypernet_block_backward"),
    "triton": triton_impl("hypernet_block", "hypernet_block_backward"),
}

if _ext.load_error() is None:
    register_autograd_once("emsedit_fast::hypernet_block", *_autograd(cpp_impl("hypernet_block_backward")))

    # Fake (meta) kernels: shapes and dtypes only, so FakeTensor tracing and torch.compile can see through the C++ ops.
    @torch.library.register_fake("emsedit_fast::hypernet_block")
    def _hypernet_block_fake(z, a, b, c, s, t, idx, relu_first, mean, std, save_for_backward=False):
        if not save_for_backward:
            return z.new_empty(z.shape), z.new_empty(0), z.new_empty(0)  # z' (N, D); nothing saved
        return z.new_empty(z.shape), z.new_empty(z.shape[0], a.shape[1]), z.new_empty(z.shape)  # z', act, pre

    @torch.library.register_fake("emsedit_fast::hypernet_block_backward")
    def _hypernet_block_backward_fake(grad_out, z, a, b, c, s, t, idx, relu_first, mean, std, act=None, pre=None):
        return tuple(x.new_empty(x.shape) for x in (z, a, b, c, s, t))  # gradients shaped like their inputs


def check_hypernet_block(z, a, b, c, s, t, idx, mean, std, grad_out=None, act=None, pre=None,
                         op: str = "hypernet_block") -> None:
    """The input check of `hypernet_block` (and, with grad_out, of `hypernet_block_backward`)."""
    _checks.check(z.dim() == 2, op, lambda: f"z must be (rows, D), got {_checks.shape(z)}")
    n, d = z.shape
    _checks.check(a.dim() == 2 and a.shape[0] == d and a.shape[1] >= 1, op,
                  lambda: f"a must be (D={d}, rank >= 1), got {_checks.shape(a)}")
    r = a.shape[1]
    _checks.check(b.shape == (r, d), op, lambda: f"b must be (rank={r}, D={d}), got {_checks.shape(b)}")
    _checks.check(c.shape == (d,), op, lambda: f"c must be ({d},), got {_checks.shape(c)}")
    _checks.check(s.dim() == 2 and s.shape[1] == d and t.shape == s.shape, op,
                  lambda: f"s and t must be (layers, D={d}), got {_checks.shape(s)} and {_checks.shape(t)}")
    _checks.index(op, idx, n)
    _checks.check((mean is None) == (std is None), op, "give both mean and std, or neither")
    if mean is not None:
        _checks.check(mean.shape == (d,) and std.shape == (d,), op,
                      lambda: f"mean and std must be ({d},), got {_checks.shape(mean)} and {_checks.shape(std)}")
    if grad_out is not None:
        _checks.check(grad_out.shape == z.shape, op,
                      lambda: f"grad_out must match z ({_checks.shape(z)}), got {_checks.shape(grad_out)}")
    _checks.check((act is None) == (pre is None), op, "give both act and pre (saved by the forward), or neither")
    if act is not None:
        _checks.check(act.shape == (n, r) and pre.shape == (n, d), op,
                      lambda: f"act must be ({n}, {r}) and pre ({n}, {d}), got {_checks.shape(act)} and "
                              f"{_checks.shape(pre)}")
    _checks.dtype(op, (torch.float32,), z=z, a=a, b=b, c=c, s=s, t=t, mean=mean, std=std, grad_out=grad_out,
                  act=act, pre=pre)
    _checks.same_device(op, z=z, a=a, b=b, c=c, s=s, t=t, idx=idx, mean=mean, std=std, grad_out=grad_out, act=act,
                        pre=pre)


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
    name, fn = select("hypernet_block", _FORWARD, (z, a, b), backend)
    args = (*_contiguous(z, a, b, c, s, t, idx), bool(relu_first), *_contiguous(mean, std))
    if name == "reference":
        return fn(*args)
    # Under autograd the fused forward also returns act = z0 A and pre = p (N x D fp32, held until the backward), so
    # the backward runs no GEMM of the forward again: 6 GEMMs per step instead of 8, like PyTorch's own autograd.
    save = torch.is_grad_enabled() and any(x.requires_grad for x in (z, a, b, c, s, t))
    return fn(*args, save)[0]


def hypernet_block_backward(grad_out: torch.Tensor, z: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                            c: torch.Tensor, s: torch.Tensor, t: torch.Tensor, idx: torch.Tensor, *,
                            relu_first: bool = True, mean: torch.Tensor | None = None,
                            std: torch.Tensor | None = None, act: torch.Tensor | None = None,
                            pre: torch.Tensor | None = None, backend: str | None = None) -> tuple[torch.Tensor, ...]:
    """Gradients (z, a, b, c, s, t) of `hypernet_block` given gamma = dL/dz' (N, D); recomputes the forward.

    With q = relu(p) and the mask m = [p >= 0] (relu_first), or g = gamma * [s[idx] p + t[idx] >= 0] (MEND's order):

        pi = s[idx] * gamma * m          (pi = s[idx] * g)
        dt_l = sum_{rows of l} gamma     (g);     ds_l = sum_{rows of l} gamma * q     (g * p)
        dc = sum_rows pi;  dB = (z0 A)^T pi;  alpha = pi B^T;  dA = z0^T alpha;  dz = gamma + alpha A^T

    and with mean/std, dz is divided by (std + NORM_EPS) (the gradient with respect to the raw rows x).
    act (N, r) = z0 A and pre (N, D) = p, when given (both), are taken instead of recomputed: the fused backends'
    forwards return them under autograd. Reference: emsedit_fast.reference.hypernet_block_backward.
    """
    op = "hypernet_block_backward"
    check_hypernet_block(z, a, b, c, s, t, idx, mean, std, grad_out=grad_out, act=act, pre=pre, op=op)
    _, fn = select(op, _BACKWARD, (z, a, b), backend)
    return fn(*_contiguous(grad_out, z, a, b, c, s, t, idx), bool(relu_first), *_contiguous(mean, std, act, pre))
