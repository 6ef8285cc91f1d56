"""Triton grouped copy for exact restores (reference: emsedit_fast/reference/restore.py; docs/method.md, "Applying
and undoing an update").

weights[l] <- snapshots[l] bit for bit. The copy moves raw words (int8/16/32/64, the widest that the byte count and
both addresses allow), never floats, so NaN payloads and signed zeros survive and no dtype is special. All layers
whose words have the same width go through one launch over a device-side table [dst, src, words] (grid axis 1 =
member); programs beyond a shorter member's end exit at once. Bytes: each byte read once and written once.
While tracing (torch.compile / fake tensors) every layer gets its own launch with its tensors as kernel arguments.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import triton
import triton.language as tl
from torch.library import triton_op
from torch.library import wrap_triton

from . import _common

_WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


@triton.jit
def _restore_fwd_kernel(
    dst_ptr,  # words of one weight (FROM_TABLE: any weight of the group, carrying the word type)
    src_ptr,  # words of its snapshot (unused with FROM_TABLE)
    table_ptr,  # (G, 3) int64 [dst address, src address, words] (FROM_TABLE)
    n_words,  # words to copy when not FROM_TABLE
    FROM_TABLE: tl.constexpr,
    BLOCK: tl.constexpr,  # words per program
):
    if FROM_TABLE:
        row = table_ptr + tl.program_id(1) * 3
        dst_ptr = tl.load(row).to(tl.pointer_type(dst_ptr.dtype.element_ty))
        src_ptr = tl.load(row + 1).to(tl.pointer_type(dst_ptr.dtype.element_ty))
        n_words = tl.load(row + 2)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_words
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)


def _word_bytes(dst, src):
    """Widest word (8, 4, 2 or 1 bytes) that divides the byte count and both addresses."""
    nbytes = dst.numel() * dst.element_size()
    for size in (8, 4, 2):
        if nbytes % size == 0 and dst.data_ptr() % size == 0 and src.data_ptr() % size == 0:
            return size
    return 1


def _words(t, size):
    return t.reshape(-1).view(torch.uint8).view(_WORDS[size])


@triton_op("emsedit_fast::triton_restore_", mutates_args={"weights"})
def restore_(weights: list[torch.Tensor], snapshots: list[torch.Tensor]) -> None:
    """weights[l] <- snapshots[l] bit for bit, in place. Reference: emsedit_fast.reference.restore_."""
    # Inputs checked by the ops layer (emsedit_fast/ops/restore.py): matching shapes and dtypes, contiguous, one
    # device.
    if not weights:
        return
    cfg = _common.pick(dict(BLOCK=256), dict(BLOCK=4096, num_warps=8),
                       BLOCK=max(w.numel() * w.element_size() for w in weights))
    block = cfg["BLOCK"]
    if _common.is_tracing(*weights):
        for w, snap in zip(weights, snapshots):
            n_words = w.numel() * w.element_size()
            if n_words:
                dst, src = _words(w, 1), _words(snap, 1)
                wrap_triton(_restore_fwd_kernel)[(triton.cdiv(n_words, block), 1)](
                    dst, src, dst, n_words, FROM_TABLE=False, **cfg)
        return
    groups = defaultdict(list)  # word size -> [(dst words, src words)]
    for w, snap in zip(weights, snapshots):
        if w.numel():
            size = _word_bytes(w, snap)
            groups[size].append((_words(w, size), _words(snap, size)))
    for members in groups.values():
        max_words = max(dst.numel() for dst, _ in members)
        if len(members) == 1 or len({dst.data_ptr() for dst, _ in members}) < len(members):
            # one member, or a weight listed twice (sequential copies: the last snapshot wins, as in the reference)
            for dst, src in members:
                wrap_triton(_restore_fwd_kernel)[(triton.cdiv(dst.numel(), block), 1)](
                    dst, src, dst, dst.numel(), FROM_TABLE=False, **cfg)
            continue
        table = _common.pointer_table([[dst.data_ptr(), src.data_ptr(), dst.numel()] for dst, src in members],
                                      members[0][0].device)  # (G, 3)
        wrap_triton(_restore_fwd_kernel)[(triton.cdiv(max_words, block), len(members))](
            members[0][0], members[0][1], table, 0, FROM_TABLE=True, **cfg)
