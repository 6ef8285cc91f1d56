"""Value targets from pseudo pairs (docs/method.md, "Value targets" and "Meta-gradient").

With the hypernetwork output z = [u~ | delta~] (normalised space) and the raw keys u:

    coeff_j  = -eta[idx_j] * <u_j, u~_j>        (raw key against pseudo key: part of the method)
    target_j = coeff_j * delta~_j

The targets are the per-token value changes that the ridge solve realises with one shift per layer.
"""

import torch


def value_targets(
    keys: torch.Tensor,
    z: torch.Tensor,
    eta: torch.Tensor,
    idx: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (targets (N, d_out), coeffs (N,)), both fp32.

    keys: (N, d_in) fp32 raw keys. z: (N, D) fp32 hypernetwork output, D = d_in + d_out. eta: (L,) fp32 step sizes.
    idx: (N,) int64 layer index per row. Differentiable in z and eta through PyTorch autograd.
    """
    d_in = keys.shape[1]
    pseudo_keys = z[:, :d_in]
    pseudo_grads = z[:, d_in:]
    coeffs = -eta.index_select(0, idx) * (keys * pseudo_keys).sum(1)  # (N,)
    return coeffs.unsqueeze(1) * pseudo_grads, coeffs


def value_targets_backward(
    grad_targets: torch.Tensor,
    grad_coeffs: torch.Tensor | None,
    keys: torch.Tensor,
    z: torch.Tensor,
    eta: torch.Tensor,
    idx: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Manual backward of `value_targets`: returns (grad_z (N, D), grad_eta (L,)).

    With P_j = dL/dtarget_j and g_j = <P_j, delta~_j> (+ dL/dcoeff_j when given):
        dL/ddelta~_j = coeff_j P_j;  dL/du~_j = -eta_i g_j u_j;  dL/deta_i = -sum_{j: idx_j = i} g_j <u_j, u~_j>
    """
    d_in = keys.shape[1]
    pseudo_keys = z[:, :d_in]
    pseudo_grads = z[:, d_in:]
    dots = (keys * pseudo_keys).sum(1)  # (N,)
    eta_rows = eta.index_select(0, idx)
    coeffs = -eta_rows * dots
    g = (grad_targets * pseudo_grads).sum(1)
    if grad_coeffs is not None:
        g = g + grad_coeffs
    grad_z = torch.cat([(-eta_rows * g).unsqueeze(1) * keys, coeffs.unsqueeze(1) * grad_targets], dim=1)
    grad_eta = torch.zeros_like(eta).index_add_(0, idx, -g * dots)
    return grad_z, grad_eta
