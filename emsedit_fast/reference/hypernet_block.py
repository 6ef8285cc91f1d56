"""One residual low-rank hypernetwork block (docs/method.md, "Hypernetwork" and "Meta-gradient").

For rows z (N x D) whose layer index is idx (N,):

    p = (z A) B + c                      A: (D, r), B: (r, D), c: (D,)
    relu_first:  h = s[idx] * relu(p) + t[idx]        (MALMEN, RLEdit, EMSEdit)
    otherwise:   h = relu(s[idx] * p + t[idx])        (MEND's affine_relu order)
    z' = z + h

relu'(0) is defined as 1 (mask p >= 0): at initialisation B = 0 makes every p exactly 0, and the strict convention
would never let a gradient reach A, B or c. With `mean` and `std` given, the input is the raw row x and the block
first normalises it, z = (x - mean) / (std + eps); that is how the fast paths fold the normaliser into the first block.

The reference runs the published way: one call per edited layer (the rows with idx == l, with that layer's s and t),
and lets PyTorch autograd differentiate it. `hypernet_block_backward` is the manual backward that fused kernels
implement; tests check it against autograd.
"""

import torch

from emsedit_fast.reference.running_stats import EPS


def _relu_ge(x: torch.Tensor) -> torch.Tensor:
    # relu with derivative 1 at 0: d/dx [x * (x >= 0)] = (x >= 0) under autograd.
    return x * (x >= 0).to(x.dtype)


def _normalised_input(z, mean, std):
    if mean is None:
        return z
    return (z - mean) / (std + EPS)


def hypernet_block(
    z: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    s: torch.Tensor,
    t: torch.Tensor,
    idx: torch.Tensor,
    relu_first: bool = True,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> torch.Tensor:
    """z + h(z) for every row, with layer-specific scale s[idx] and shift t[idx].

    z: (N, D) fp32 (raw rows x when mean/std are given). a: (D, r), b: (r, D), c: (D,), s, t: (L, D) fp32.
    idx: (N,) int64 in [0, L). mean, std: (D,) fp32 or None. Returns (N, D) fp32, a new tensor.
    Differentiable in z, a, b, c, s, t through PyTorch autograd.
    """
    z0 = _normalised_input(z, mean, std)
    out = torch.empty_like(z0)
    for layer in range(s.shape[0]):  # one call per layer, as published
        rows = (idx == layer).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        zl = z0.index_select(0, rows)  # (n_l, D)
        p = (zl @ a) @ b + c  # (n_l, r) then (n_l, D); never A @ B (D x D)
        if relu_first:
            h = s[layer] * _relu_ge(p) + t[layer]
        else:
            h = _relu_ge(s[layer] * p + t[layer])
        out = out.index_copy(0, rows, zl + h)
    return out


def hypernet_block_backward(
    grad_out: torch.Tensor,
    z: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    s: torch.Tensor,
    t: torch.Tensor,
    idx: torch.Tensor,
    relu_first: bool = True,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Manual backward of `hypernet_block`, recomputing the forward (the formulas below).

    grad_out: (N, D) = dL/dz'. Returns (grad_z (N, D), grad_a (D, r), grad_b (r, D), grad_c (D,), grad_s (L, D),
    grad_t (L, D)). With mean/std given, grad_z is the gradient with respect to the raw rows x.

        a_ = z A, p = a_ B + c, gamma = dL/dz'
        relu_first: dt_l = sum_{rows of l} gamma; ds_l = sum gamma * relu(p); pi = s[idx] * gamma * [p >= 0]
        otherwise:  q = s[idx] * p + t[idx]; g = gamma * [q >= 0]; dt_l = sum g; ds_l = sum g * p; pi = s[idx] * g
        dc = sum_rows pi; dB = a_^T pi; alpha = pi B^T; dA = z^T alpha; dz = gamma + alpha A^T
    """
    z0 = _normalised_input(z, mean, std)
    n_layers = s.shape[0]
    act = z0 @ a  # (N, r)
    p = act @ b + c  # (N, D)
    s_rows = s.index_select(0, idx)  # (N, D)
    if relu_first:
        q = _relu_ge(p)
        grad_t = torch.zeros_like(t).index_add_(0, idx, grad_out)
        grad_s = torch.zeros_like(s).index_add_(0, idx, grad_out * q)
        pi = s_rows * grad_out * (p >= 0).to(p.dtype)
    else:
        pre = s_rows * p + t.index_select(0, idx)
        g = grad_out * (pre >= 0).to(p.dtype)
        grad_t = torch.zeros_like(t).index_add_(0, idx, g)
        grad_s = torch.zeros_like(s).index_add_(0, idx, g * p)
        pi = s_rows * g
    grad_c = pi.sum(0)
    grad_b = act.t() @ pi  # (r, D)
    alpha = pi @ b.t()  # (N, r)
    grad_a = z0.t() @ alpha  # (D, r)
    grad_z = grad_out + alpha @ a.t()  # (N, D)
    if mean is not None:
        grad_z = grad_z / (std + EPS)
    assert grad_s.shape[0] == n_layers
    return grad_z, grad_a, grad_b, grad_c, grad_s, grad_t
