"""In-place weight updates of the edited layers (docs/method.md, "Applying and undoing an update").

Low-rank form (dual solve, MEND):  W_l <- round(W_l + alpha_l * M_l^T K_l)
Dense form (primal solve):         W_l <- round(W_l + alpha_l * S_l^T)

The sum is formed in fp32 and rounded once into the weight's dtype. GPT-2 Conv1D stores W transposed, (d_in, d_out):
`transposed=True` adds the transposed delta so callers never transpose weights.

The reference materialises a dense fp32 delta per layer, as the published code does. Traffic per bf16 weight element:
write the fp32 delta (4 B), read it (4 B), read W (2 B), write an fp32 sum (4 B), read it and write bf16 (6 B): about
16-20 B, against 4 B (read W once, write once) for the fused low-rank kernels.
"""

import torch


def _add_(weight, delta, alpha, layer, transposed):
    if alpha is not None:
        delta = delta * alpha[layer]
    if not transposed:
        delta = delta.t()  # (d_out, d_in)
    weight.copy_((weight.float() + delta).to(weight.dtype))


def apply_deltas_(
    weights: list[torch.Tensor],
    coeffs: list[torch.Tensor],
    keys: list[torch.Tensor],
    alpha: torch.Tensor | None = None,
    transposed: bool = False,
) -> None:
    """W_l += alpha_l * M_l^T K_l for every layer l, in place.

    weights: L tensors (d_out, d_in) [(d_in, d_out) if transposed], fp32, bf16 or fp16. Mutated.
    coeffs: L tensors M_l (n_l, d_out) fp32. keys: L tensors K_l (n_l, d_in) fp32. alpha: (L,) fp32 or None (= 1).
    Shapes may differ between layers.
    """
    for layer, (w, m, k) in enumerate(zip(weights, coeffs, keys)):
        _add_(w, k.t() @ m, alpha, layer, transposed)  # dense fp32 (d_in, d_out)


def apply_deltas_dense_(
    weights: list[torch.Tensor],
    shifts: list[torch.Tensor],
    alpha: torch.Tensor | None = None,
    transposed: bool = False,
) -> None:
    """W_l += alpha_l * S_l^T for every layer l, in place.

    weights: as in `apply_deltas_`. Mutated. shifts: L tensors S_l (d_in, d_out) fp32. alpha: (L,) fp32 or None.
    """
    for layer, (w, shift) in enumerate(zip(weights, shifts)):
        _add_(w, shift.float(), alpha, layer, transposed)
