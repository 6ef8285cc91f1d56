"""Exact restore and snapshots of edited weights (reference: emsedit_fast.reference.restore; docs/method.md,
"Applying and undoing an update"): weights[l] <- snapshots[l] bit for bit, because subtracting a delta again is not
exact in low precision (round(round(W + d) - d) != W in bf16).

A snapshot may be held in a narrower floating dtype than its weight when it converts back exactly (`snapshot(...,
compact=True)`): the fp32 master copies that a bf16 model's edited layers get hold bf16 values until the first edit,
so their W0 needs half the memory. Restoring from it widens, which is exact."""

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


# narrower dtypes a snapshot may take, tried in this order (bf16 first: what a bf16 model's promoted weights hold)
_NARROWER = {torch.float64: (torch.bfloat16, torch.float16, torch.float32),
             torch.float32: (torch.bfloat16, torch.float16)}


def snapshot(weights: list[torch.Tensor], device: str | torch.device | None = None, *, compact: bool = False
             ) -> list[torch.Tensor]:
    """Independent copies of `weights` (on `device`, default: where they are), for `restore_`.

    compact: store each copy in the narrowest floating dtype that converts back to its weight bit for bit (checked
    per layer, in blocks of 2^22 elements so the check's temporaries stay small), else in the weight's own dtype."""
    copies = []
    for w in weights:
        w = w.detach()
        dtype = w.dtype
        if compact:
            dtype = next((narrow for narrow in _NARROWER.get(w.dtype, ()) if _holds_exactly(w, narrow)), w.dtype)
        copies.append(w.to(device=device if device is not None else w.device, dtype=dtype, copy=True))
    return copies


def _holds_exactly(w: torch.Tensor, dtype: torch.dtype, block: int = 1 << 22) -> bool:
    """Every element of `w` survives the round trip through `dtype` (a NaN never compares equal: not exact)."""
    flat = w.reshape(-1)
    return all(torch.equal(flat[lo:lo + block].to(dtype).to(w.dtype), flat[lo:lo + block])
               for lo in range(0, flat.numel(), block))


def widens_exactly(src: torch.dtype, dst: torch.dtype) -> bool:
    """Every value of floating dtype `src` converts to floating dtype `dst` exactly (bf16/fp16 -> fp32 -> fp64)."""
    return src == dst or (src.is_floating_point and dst.is_floating_point and torch.promote_types(src, dst) == dst
                          and torch.finfo(src).bits < torch.finfo(dst).bits)


def restore_(weights: list[torch.Tensor], snapshots: list[torch.Tensor], *, backend: str | None = None) -> None:
    """weights[l] <- snapshots[l], bit for bit, for every layer in one call.

    weights: L tensors (any dtype). Mutated. snapshots: L tensors with the same shapes and the same dtypes, or a
    floating dtype that widens to the weight's exactly (a compact snapshot); they may live on another device. A
    cross-device or widening copy goes through the reference path (a plain `copy_`; the kernels copy bytes within one
    device and dtype). Reference: emsedit_fast.reference.restore_.
    """
    plain = check_restore_(weights, snapshots)
    if not weights:
        return
    if not plain:
        backend = "reference"
    _, fn = select("restore_", _RESTORE, (weights[0],), backend)
    fn(list(weights), [s.contiguous() for s in snapshots] if plain else list(snapshots))


def check_restore_(weights, snapshots) -> bool:
    """The input check of `restore_`. The weights must share one device; snapshots may live elsewhere. Returns
    whether every snapshot has its weight's dtype and device (what the kernels copy; else the reference path widens
    or moves it).

    One pass over the layers with plain comparisons and no helper call per condition: restore_ runs after every edit
    and undo, and at SmolLM2 shapes (11 layers, under a millisecond of copying) the check's Python cost shows."""
    op = "restore_"
    if len(weights) != len(snapshots):
        _checks.check(False, op, f"got {len(weights)} weights but {len(snapshots)} snapshots")
    plain = True
    device = weights[0].device if weights else None
    for layer, (w, snap) in enumerate(zip(weights, snapshots)):
        same_dtype = snap.dtype == w.dtype
        if w.shape != snap.shape or not (same_dtype or widens_exactly(snap.dtype, w.dtype)):
            _checks.check(False, op, f"layer {layer}: snapshot {_checks.shape(snap)} {snap.dtype} does not match "
                          f"weight {_checks.shape(w)} {w.dtype} (a snapshot needs the weight's shape, and its dtype or "
                          f"a narrower floating one)")
        if not w.is_contiguous():
            _checks.check(False, op, f"weights[{layer}] must be contiguous (it is updated in place)")
        if w.device != device:
            _checks.same_device(op, weights=weights)
        plain = plain and same_dtype and snap.device == device
    return plain
