"""Exact restore and snapshots of edited weights (reference: emsedit_fast.reference.restore; docs/method.md,
"Applying and undoing an update"): weights[l] <- snapshots[l] bit for bit, because subtracting a delta again is not
exact in low precision (round(round(W + d) - d) != W in bf16)."""

from __future__ import annotations

import torch

from emsedit_fast import _ext
from emsedit_fast import reference
from emsedit_fast.ops import _checks
from emsedit_fast.ops._dispatch import cpp_impl
from emsedit_fast.ops._dispatch import select
from emsedit_fast.ops._dispatch import triton_impl

_RESTORE = {
    "reference": reference.restore_,
    "cpp": cpp_impl("restore_"),
    "triton": triton_impl("restore", "restore_"),
}

if _ext.load_error() is None:

    # Fake (meta) kernel: restore_ only mutates its weights (declared in the schema) and returns nothing.
    @torch.library.register_fake("emsedit_fast::restore_")
    def _restore_fake(weights, snapshots):
        return None


def snapshot(weights: list[torch.Tensor], device: str | torch.device | None = None) -> list[torch.Tensor]:
    """Independent copies of `weights` (on `device`, default: where they are), for `restore_`."""
    return [w.detach().to(device=device if device is not None else w.device, copy=True) for w in weights]


def restore_(weights: list[torch.Tensor], snapshots: list[torch.Tensor], *, backend: str | None = None) -> None:
    """weights[l] <- snapshots[l], bit for bit, for every layer in one call.

    weights: L tensors (any dtype). Mutated. snapshots: L tensors with the same shapes and dtypes; they may live on
    another device (the copy then goes through the reference path). Reference: emsedit_fast.reference.restore_.
    """
    check_restore_(weights, snapshots)
    if not weights:
        return
    if any(s.device != weights[0].device for s in snapshots):
        backend = "reference"  # a cross-device copy is a plain transfer; kernels work within one device
    _, fn = select("restore_", _RESTORE, (weights[0],), backend)
    fn(list(weights), [s.contiguous() for s in snapshots])


def check_restore_(weights, snapshots) -> None:
    """The input check of `restore_`. The weights must share one device; snapshots may live elsewhere."""
    op = "restore_"
    _checks.check(len(weights) == len(snapshots), op,
                  lambda: f"got {len(weights)} weights but {len(snapshots)} snapshots")
    for layer, (w, snap) in enumerate(zip(weights, snapshots)):
        _checks.check(w.shape == snap.shape and w.dtype == snap.dtype, op,
                      lambda: f"layer {layer}: snapshot {_checks.shape(snap)} {snap.dtype} does not match weight "
                      f"{_checks.shape(w)} {w.dtype}")
        _checks.check(w.is_contiguous(), op, lambda: f"weights[{layer}] must be contiguous (it is updated in place)")
    _checks.same_device(op, weights=weights)
