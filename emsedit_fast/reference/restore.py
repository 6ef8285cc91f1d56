"""Exact restore of edited weights from snapshots (docs/method.md, "Applying and undoing an update").

Reverting by subtracting the delta again is not exact in low precision (round(round(W + d) - d) != W in bf16), so
every revert copies bytes back from a snapshot taken before the edit.
"""

import torch


def restore_(weights: list[torch.Tensor], snapshots: list[torch.Tensor]) -> None:
    """weights[l] <- snapshots[l] bit for bit, for every l, in place.

    weights: L tensors, any dtype. Mutated. snapshots: L tensors of the same shapes and dtypes, or a narrower floating
    dtype (copy_ widens exactly), on any device.
    """
    for w, snap in zip(weights, snapshots):
        w.copy_(snap)
