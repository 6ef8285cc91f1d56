"""Exact restore and snapshots of edited weights (reference: emsedit_fast.reference.restore)."""

from __future__ import annotations

import torch

from emsedit_fast import reference
from emsedit_fast.ops import _checks
from emsedit_fast.ops import _registry
from emsedit_fast.ops._dispatch import select

_RESTORE = {
    "reference": reference.restore_,
    "cpp": _registry.cpp("restore_"),
    "triton": _registry.triton("restore", "restore_"),
}


def snapshot(weights: list[torch.Tensor], device: str | torch.device | None = None) -> list[torch.Tensor]:
    """Independent copies of `weights` (on `device`, default: where they are), for `restore_`."""
    return [w.detach().to(device=device if device is not None else w.device, copy=True) for w in weights]


def restore_(weights: list[torch.Tensor], snapshots: list[torch.Tensor], *, backend: str | None = None) -> None:
    """weights[l] <- snapshots[l], bit for bit, for every layer in one call.

    weights: L tensors (any dtype). Mutated. snapshots: L tensors with the same shapes and dtypes; they may live on
    another device (the copy then goes through the reference path). Reference: emsedit_fast.reference.restore_.
    """
    op = "restore_"
    _checks.check(len(weights) == len(snapshots), op,
                  f"got {len(weights)} weights but {len(snapshots)} snapshots")
    for layer, (w, snap) in enumerate(zip(weights, snapshots)):
        _checks.check(w.shape == snap.shape and w.dtype == snap.dtype, op,
                      f"layer {layer}: snapshot {_checks.shape(snap)} {snap.dtype} does not match weight "
                      f"{_checks.shape(w)} {w.dtype}")
        _checks.check(w.is_contiguous(), op, f"weights[{layer}] must be contiguous")
    if not weights:
        return
    if any(s.device != weights[0].device for s in snapshots):
        backend = "reference"  # a cross-device copy is a plain transfer; kernels work within one device
    _, fn = select(op, _RESTORE, (weights[0],), backend)
    fn(list(weights), [s.contiguous() for s in snapshots])
