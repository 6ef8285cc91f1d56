"""Triton kernels of the grouped in-place weight updates (reference: emsedit_fast/reference/apply_deltas.py;
docs/method.md, "Applying and undoing an update" and "Fused operations").

    low rank:  W_l <- round(W_l + alpha_l * M_l^T K_l)      M_l (n_l, d_out), K_l (n_l, d_in) fp32
    dense:     W_l <- round(W_l + alpha_l * S_l^T)          S_l (d_in, d_out) fp32

`_apply_deltas_fwd_kernel` is a tiled GEMM over (d_out x d_in) tiles of W with its K loop over the n rows; the
epilogue loads the W tile in its own dtype (fp32, bf16, fp16), adds in fp32 and stores with one round-to-nearest-even.
No dense fp32 delta exists. Bytes per bf16 weight element: 2 B read + 2 B written, against about 16-20 B for the
reference (materialise the fp32 delta, cast, add, copy back). The factors (n (d_in + d_out) fp32 per layer) are read
once per tile row / column and stay in L2.

GPT-2 Conv1D stores W as (d_in, d_out): `transposed=True` only swaps W's strides, so no transposed copy is made.

Grouping: layers with the same (shape, dtype) go into one launch through a device-side table of data pointers and
row counts (grid axis 1 = member of the group); different shapes may be mixed in one call (one launch per group).
While tracing (torch.compile / fake tensors) there are no data pointers, so every layer gets its own launch with W
as a visible kernel argument.

Deterministic: the reduction over n runs in a fixed order inside one program (no split-n atomics), and the launch
config depends only on the shapes, never on autotuning, so a replayed edit gives the same bits.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import triton
import triton.language as tl
from torch.library import triton_op
from torch.library import wrap_triton

from . import _common
from ._common import round_fp32_to
from ._common import upcast_fp32

# Columns of the pointer tables: one row per layer of a group.
_LOW_RANK_COLUMNS = ("weight", "coeffs", "keys", "n_rows", "layer")
_DENSE_COLUMNS = ("weight", "shift", "layer")


@triton.jit
def _apply_deltas_fwd_kernel(
    w_ptr,  # W of one layer (FROM_TABLE: any weight of the group; it only carries the dtype)
    m_ptr,  # (n, d_out) fp32 coefficients M, unit column stride (unused with FROM_TABLE)
    k_ptr,  # (n, d_in) fp32 keys K, unit column stride (unused with FROM_TABLE)
    table_ptr,  # (G, 5) int64 [W address, M address, K address, n, layer] (read only with FROM_TABLE)
    alpha_ptr,  # (L,) fp32 per-layer scale (read only with HAS_ALPHA), indexed by the original layer number
    n_rows,  # n when not FROM_TABLE
    layer,  # layer number when not FROM_TABLE
    d_out,
    d_in,
    stride_wo,  # W strides in (d_out, d_in) orientation: (d_in, 1) for Linear, (1, d_out) for Conv1D
    stride_wi,
    stride_mn,  # M row stride (d_out when contiguous)
    stride_kn,  # K row stride (d_in when contiguous)
    HAS_ALPHA: tl.constexpr,
    FROM_TABLE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee", or "tf32" when torch allows TF32 matmuls (as for the reference)
    BLOCK_O: tl.constexpr,  # W tile rows (d_out)
    BLOCK_I: tl.constexpr,  # W tile columns (d_in)
    BLOCK_K: tl.constexpr,  # rows of M and K per step of the K loop
):
    tiles_i = tl.cdiv(d_in, BLOCK_I)
    pid = tl.program_id(0)
    # int64 offsets: W element offsets reach d_out * d_in
    oo = ((pid // tiles_i) * BLOCK_O + tl.arange(0, BLOCK_O)).to(tl.int64)
    ii = ((pid % tiles_i) * BLOCK_I + tl.arange(0, BLOCK_I)).to(tl.int64)
    if FROM_TABLE:
        row = table_ptr + tl.program_id(1) * 5
        w_ptr = tl.load(row).to(tl.pointer_type(w_ptr.dtype.element_ty))
        m_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float32))
        k_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        n_rows = tl.load(row + 3)
        layer = tl.load(row + 4)
    o_ok = oo < d_out
    i_ok = ii < d_in

    # acc (BLOCK_O, BLOCK_I) = sum_k M[k, oo]^T K[k, ii]: M is read transposed through its strides.
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for k0 in range(0, n_rows, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < n_rows
        mt = tl.load(m_ptr + kk[None, :] * stride_mn + oo[:, None], mask=o_ok[:, None] & k_ok[None, :], other=0.0)
        kt = tl.load(k_ptr + kk[:, None] * stride_kn + ii[None, :], mask=k_ok[:, None] & i_ok[None, :], other=0.0)
        acc = tl.dot(mt, kt, acc, input_precision=DOT_PRECISION)
    if HAS_ALPHA:
        acc = acc * tl.load(alpha_ptr + layer)

    # Epilogue: read W once in its dtype, add in fp32, round once on the store.
    w_tile = w_ptr + oo[:, None] * stride_wo + ii[None, :] * stride_wi
    mask = o_ok[:, None] & i_ok[None, :]
    w = upcast_fp32(tl.load(w_tile, mask=mask, other=0.0))
    tl.store(w_tile, round_fp32_to(w + acc, w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _apply_deltas_dense_fwd_kernel(
    w_ptr,  # W of one layer (FROM_TABLE: any weight of the group, dtype carrier)
    s_ptr,  # (d_in, d_out) fp32 shift S, row stride stride_si (unused with FROM_TABLE)
    table_ptr,  # (G, 3) int64 [W address, S address, layer] (FROM_TABLE)
    alpha_ptr,  # (L,) fp32 (HAS_ALPHA)
    layer,
    d_out,
    d_in,
    stride_wo,
    stride_wi,
    stride_si,
    HAS_ALPHA: tl.constexpr,
    FROM_TABLE: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    # W tile (o, i) += alpha * S[i, o]. Bytes: W read and written once in its dtype, S read once (4 B).
    tiles_i = tl.cdiv(d_in, BLOCK_I)
    pid = tl.program_id(0)
    oo = ((pid // tiles_i) * BLOCK_O + tl.arange(0, BLOCK_O)).to(tl.int64)
    ii = ((pid % tiles_i) * BLOCK_I + tl.arange(0, BLOCK_I)).to(tl.int64)
    if FROM_TABLE:
        row = table_ptr + tl.program_id(1) * 3
        w_ptr = tl.load(row).to(tl.pointer_type(w_ptr.dtype.element_ty))
        s_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float32))
        layer = tl.load(row + 2)
    mask = (oo < d_out)[:, None] & (ii < d_in)[None, :]
    delta = tl.load(s_ptr + ii[None, :] * stride_si + oo[:, None], mask=mask, other=0.0)  # S^T tile
    if HAS_ALPHA:
        delta = delta * tl.load(alpha_ptr + layer)
    w_tile = w_ptr + oo[:, None] * stride_wo + ii[None, :] * stride_wi
    w = upcast_fp32(tl.load(w_tile, mask=mask, other=0.0))
    tl.store(w_tile, round_fp32_to(w + delta, w_ptr.dtype.element_ty), mask=mask)


def _low_rank_config(d_out, d_in, n_max):
    """One fixed config per shape (no autotuning: in place, and replay must give the same bits)."""
    big = d_out * d_in >= (1 << 20)
    cuda = dict(BLOCK_O=128 if big else 64, BLOCK_I=128 if big else 64, BLOCK_K=32 if n_max > 16 else 16,
                num_warps=8 if big else 4, num_stages=3)
    b = _common.INTERPRET_BLOCK
    return _common.pick(dict(BLOCK_O=b, BLOCK_I=b, BLOCK_K=b), cuda, BLOCK_O=d_out, BLOCK_I=d_in,
                        BLOCK_K=n_max)


def _dense_config(d_out, d_in):
    b = _common.INTERPRET_BLOCK
    return _common.pick(dict(BLOCK_O=b, BLOCK_I=b), dict(BLOCK_O=64, BLOCK_I=64, num_warps=4), BLOCK_O=d_out,
                        BLOCK_I=d_in)


def _dims(w, transposed):
    """(d_out, d_in, stride_wo, stride_wi): W's strides in (d_out, d_in) orientation."""
    if transposed:
        return w.shape[1], w.shape[0], w.stride(1), w.stride(0)
    return w.shape[0], w.shape[1], w.stride(0), w.stride(1)


def _groups(weights, tracing):
    """Layer numbers grouped by (shape, dtype), in order of first appearance; one group per layer while tracing
    (symbolic shapes cannot be hashed, and traced launches go one layer at a time anyway)."""
    if tracing:
        return [[layer] for layer in range(len(weights))]
    groups = defaultdict(list)
    for layer, w in enumerate(weights):
        groups[(tuple(w.shape), w.dtype)].append(layer)
    return list(groups.values())


def _aliased(weights, group):
    """True when a weight appears twice in a group: one launch would race on it, so it gets sequential launches (the
    reference's semantics: the updates add up in list order)."""
    return len({weights[ly].data_ptr() for ly in group}) < len(group)


@triton_op("emsedit_fast::triton_apply_deltas_", mutates_args={"weights"})
def apply_deltas_(weights: list[torch.Tensor], coeffs: list[torch.Tensor], keys: list[torch.Tensor],
                  alpha: torch.Tensor | None, transposed: bool) -> None:
    """W_l <- round(W_l + alpha_l M_l^T K_l) for every layer, in place.

    Reference: emsedit_fast.reference.apply_deltas_.
    """
    # Inputs checked by the ops layer (emsedit_fast/ops/apply_deltas.py); factors arrive contiguous.
    has_alpha = alpha is not None
    tracing = _common.is_tracing(*weights)
    precision = _common.dot_precision()
    for group in _groups(weights, tracing):
        w0, m0, k0 = weights[group[0]], coeffs[group[0]], keys[group[0]]
        d_out, d_in, stride_wo, stride_wi = _dims(w0, transposed)
        n_max = max(coeffs[layer].shape[0] for layer in group)
        if w0.numel() == 0 or n_max == 0:
            continue  # nothing to add: W is left untouched
        cfg = _low_rank_config(d_out, d_in, n_max)
        tiles = triton.cdiv(d_out, cfg["BLOCK_O"]) * triton.cdiv(d_in, cfg["BLOCK_I"])
        # Factors of one group share d_out and d_in but may be strided differently: pass per-group row strides only
        # when they agree (always true for the contiguous tensors the ops layer passes).
        same_strides = all(coeffs[ly].stride(0) == m0.stride(0) and keys[ly].stride(0) == k0.stride(0)
                           for ly in group)
        if tracing or len(group) == 1 or not same_strides or _aliased(weights, group):
            for layer in group:
                m, k = coeffs[layer], keys[layer]
                if m.shape[0] == 0:
                    continue
                wrap_triton(_apply_deltas_fwd_kernel)[(tiles, 1)](
                    weights[layer], m, k, m, alpha if has_alpha else m, m.shape[0], layer, d_out, d_in,
                    stride_wo, stride_wi, m.stride(0), k.stride(0), HAS_ALPHA=has_alpha, FROM_TABLE=False,
                    DOT_PRECISION=precision, **cfg)
            continue
        table = _common.pointer_table(
            [[weights[ly].data_ptr(), coeffs[ly].data_ptr(), keys[ly].data_ptr(), coeffs[ly].shape[0], ly]
             for ly in group], w0.device)  # (G, 5), columns _LOW_RANK_COLUMNS
        wrap_triton(_apply_deltas_fwd_kernel)[(tiles, len(group))](
            w0, m0, k0, table, alpha if has_alpha else table, 0, 0, d_out, d_in, stride_wo, stride_wi,
            m0.stride(0), k0.stride(0), HAS_ALPHA=has_alpha, FROM_TABLE=True, DOT_PRECISION=precision, **cfg)


@triton_op("emsedit_fast::triton_apply_deltas_dense_", mutates_args={"weights"})
def apply_deltas_dense_(weights: list[torch.Tensor], shifts: list[torch.Tensor], alpha: torch.Tensor | None,
                        transposed: bool) -> None:
    """W_l <- round(W_l + alpha_l S_l^T) for every layer, in place.

    Reference: emsedit_fast.reference.apply_deltas_dense_.
    """
    # Inputs checked by the ops layer (emsedit_fast/ops/apply_deltas.py); shifts arrive contiguous.
    has_alpha = alpha is not None
    tracing = _common.is_tracing(*weights)
    for group in _groups(weights, tracing):
        w0, s0 = weights[group[0]], shifts[group[0]]
        if w0.numel() == 0:
            continue
        d_out, d_in, stride_wo, stride_wi = _dims(w0, transposed)
        cfg = _dense_config(d_out, d_in)
        tiles = triton.cdiv(d_out, cfg["BLOCK_O"]) * triton.cdiv(d_in, cfg["BLOCK_I"])
        same_strides = all(shifts[ly].stride(0) == s0.stride(0) for ly in group)
        if tracing or len(group) == 1 or not same_strides or _aliased(weights, group):
            for layer in group:
                s = shifts[layer]
                wrap_triton(_apply_deltas_dense_fwd_kernel)[(tiles, 1)](
                    weights[layer], s, s, alpha if has_alpha else s, layer, d_out, d_in, stride_wo, stride_wi,
                    s.stride(0), HAS_ALPHA=has_alpha, FROM_TABLE=False, **cfg)
            continue
        table = _common.pointer_table([[weights[ly].data_ptr(), shifts[ly].data_ptr(), ly] for ly in group],
                                      w0.device)  # (G, 3), columns _DENSE_COLUMNS
        wrap_triton(_apply_deltas_dense_fwd_kernel)[(tiles, len(group))](
            w0, s0, table, alpha if has_alpha else table, 0, d_out, d_in, stride_wo, stride_wi, s0.stride(0),
            HAS_ALPHA=has_alpha, FROM_TABLE=True, **cfg)
