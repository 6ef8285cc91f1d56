"""Triton kernels of the low-rank residual hypernetwork block (reference: emsedit_fast/reference/hypernet_block.py;
docs/method.md, "Hypernetwork", "Meta-gradient" and "Fused operations").

Rows z (N, D) of every same-shape layer are stacked with a layer index idx (N,), so A (D, r) and B (r, D) are read
once per row tile for all layers instead of once per layer:

    act = z0 A (N, r);  p = act B + c (N, D)
    relu_first:  h = s[idx] * relu(p) + t[idx]      otherwise:  h = relu(s[idx] * p + t[idx])
    z' = z0 + h,        z0 = z, or (x - mean) / (std + 2^-23) when the normaliser is folded in

The nonlinearity acts on p, the D side: p needs the full rank-r sum, so GEMM2 accumulates over rank chunks before
the epilogue, and the rank side (act) is linear. relu'(0) = 1: the backward masks with p >= 0 (or pre >= 0).

Forward, one kernel for every rank (`_hypernet_block_fwd_kernel`, one program per tile of BLOCK_N rows):
  1. act = z0 A, BLOCK_R rank columns at a time (K loop over D, normalising prologue), into a per-row-tile slice of
     an (N, r) scratch buffer that only this program writes and reads back: it stays in L1/L2.
  2. for each BLOCK_D column tile: p = sum over rank chunks act[:, chunk] B[chunk, cols] (GEMM2 accumulated in
     registers), then the whole block in the epilogue (+c, relu, s/t gathered by idx, residual z0) and one store.
  Bytes per row: z read once per rank chunk for GEMM1 (L2 hits for all but the first) and once for the residual, z'
  written once; act (r fp32 per row, r/D of z) written once; p never leaves registers, except under autograd
  (save_for_backward), where it is stored once as pre and act is kept, so the backward recomputes neither.
Backward, recomputing what the forward did not save; every reduction has a fixed order (no float atomics), so it is
deterministic:
  act = z0 A (unless saved)                           `_hypernet_block_rowgemm_kernel` (normalising prologue)
  p = act B + c (or pre), then pi, grad_s, grad_t     `_hypernet_block_pi_bwd_kernel`: one program per (layer,
                                                      column tile) walks that layer's rows (a stable sort of idx),
                                                      recomputes (or reads) its p tile, writes only
                                                      pi = s * gamma * mask
  grad_c = sum_l pisum_l                              torch sum over L rows
  alpha = pi B^T, grad_z = (gamma + alpha A^T) [/ (std + eps)]   `_hypernet_block_dz_bwd_kernel`: the forward's
                                                      two-phase structure (alpha kept for grad_a)
  grad_a = z0^T alpha, grad_b = act^T pi              `_hypernet_block_wgrad_bwd_kernel` (K loop over rows)

(About 510 lines: the forward, the backward and their launch configurations are one fused op and share its tiling
helpers.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op
from torch.library import wrap_triton

from emsedit_fast.reference.running_stats import EPS

from . import _common


@triton.jit
def _load_input(z_ptr, mean_ptr, std_ptr, rows, cols, row_ok, col_ok, stride_zm, NORMALIZE: tl.constexpr,
                EPS: tl.constexpr):
    """z0[rows, cols] as fp32: z itself, or (x - mean) / (std + EPS) with the reference's operation order.

    Out-of-range entries are 0 (after normalisation too: they feed GEMM reductions).
    """
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(z_ptr + rows[:, None] * stride_zm + cols[None, :], mask=mask, other=0.0)
    if NORMALIZE:
        mu = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
        sd = tl.load(std_ptr + cols, mask=col_ok, other=1.0)
        x = tl.where(mask, (x - mu[None, :]) / (sd + EPS)[None, :], 0.0)
    return x


@triton.jit
def _block_epilogue(p, s_ptr, t_ptr, layer, cols, row_ok, col_ok, stride_sl, RELU_FIRST: tl.constexpr):
    """h from the pre-activation tile p = act B + c (BLOCK_N, BLOCK_D): relu (x * [x >= 0], as the reference) and
    s/t gathered by layer."""
    mask = row_ok[:, None] & col_ok[None, :]
    s = tl.load(s_ptr + layer[:, None] * stride_sl + cols[None, :], mask=mask, other=0.0)
    t = tl.load(t_ptr + layer[:, None] * stride_sl + cols[None, :], mask=mask, other=0.0)
    if RELU_FIRST:
        h = s * (p * (p >= 0).to(tl.float32)) + t
    else:
        pre = s * p + t
        h = pre * (pre >= 0).to(tl.float32)
    return h


@triton.jit
def _project_rows(x_ptr, mean_ptr, std_ptr, y_ptr, out_ptr, rows, row_ok, k_dim, j_dim, stride_xm, stride_yk,
                  stride_yj, stride_om, NORM_X: tl.constexpr, EPS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """out[rows, :] = x0[rows, :] @ Y (k_dim, j_dim), BLOCK_R output columns at a time (K loop over k_dim).

    x0 is x, or x normalised on load (NORM_X). Y is addressed through its strides, so A, and B^T read from B, need no
    copies. Used for act = z0 A (forward) and alpha = pi B^T (backward); the caller reads `out` back after a barrier.
    """
    for j0 in range(0, j_dim, BLOCK_R):
        jj = j0 + tl.arange(0, BLOCK_R)
        j_ok = jj < j_dim
        acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, k_dim, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < k_dim
            x = _load_input(x_ptr, mean_ptr, std_ptr, rows, kk, row_ok, k_ok, stride_xm, NORM_X, EPS)
            y = tl.load(y_ptr + kk[:, None] * stride_yk + jj[None, :] * stride_yj,
                        mask=k_ok[:, None] & j_ok[None, :], other=0.0)
            acc = tl.dot(x, y, acc, input_precision=DOT_PRECISION)
        tl.store(out_ptr + rows[:, None] * stride_om + jj[None, :], acc, mask=row_ok[:, None] & j_ok[None, :])


@triton.jit
def _expand_tile(act_ptr, y_ptr, rows, row_ok, cols, col_ok, rank, stride_actm, stride_yk, stride_yj,
                 DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """act[rows, :] @ Y[:, cols] (BLOCK_N, BLOCK_D) fp32, accumulated over rank chunks of BLOCK_R (GEMM2)."""
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < rank
        act = tl.load(act_ptr + rows[:, None] * stride_actm + rr[None, :], mask=row_ok[:, None] & r_ok[None, :],
                      other=0.0)
        y = tl.load(y_ptr + rr[:, None] * stride_yk + cols[None, :] * stride_yj, mask=r_ok[:, None] & col_ok[None, :],
                    other=0.0)
        acc = tl.dot(act, y, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _hypernet_block_fwd_kernel(
    z_ptr,  # (N, D) fp32 rows: z, or raw x when NORMALIZE; row stride stride_zm
    a_ptr,  # (D, r) fp32 A, row stride stride_am
    b_ptr,  # (r, D) fp32 B, row stride stride_bm
    c_ptr,  # (D,) fp32 bias
    s_ptr,  # (L, D) fp32 per-layer scale, row stride stride_sl (t shares it)
    t_ptr,  # (L, D) fp32 per-layer shift
    idx_ptr,  # (N,) int64 layer of each row
    mean_ptr,  # (D,) fp32 normaliser mean (read only when NORMALIZE)
    std_ptr,  # (D,) fp32 normaliser std (read only when NORMALIZE)
    act_ptr,  # (N, r) fp32 scratch: act = z0 A, written and read back by the program owning the rows (kept by SAVE)
    out_ptr,  # (N, D) fp32 out z', row stride stride_om
    pre_ptr,  # (N, D) fp32 out with SAVE: the pre-activation p = act B + c, row stride stride_om (same layout as out)
    n_rows,
    rows_bucket,  # next power of two >= n_rows: the autotune key (one tuning per bucket, not per batch size)
    d_total,  # D
    rank,  # r
    stride_zm,
    stride_am,
    stride_bm,
    stride_sl,
    stride_actm,
    stride_om,
    RELU_FIRST: tl.constexpr,  # True: s * relu(p) + t; False: relu(s * p + t) (MEND)
    NORMALIZE: tl.constexpr,  # fold the normaliser into GEMM1's prologue and the residual
    SAVE: tl.constexpr,  # also store pre for the backward (training); act is then an output too
    EPS: tl.constexpr,  # 2^-23
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32" (see _common.dot_precision)
    BLOCK_N: tl.constexpr,  # rows per program
    BLOCK_K: tl.constexpr,  # D columns per step of GEMM1's K loop
    BLOCK_D: tl.constexpr,  # output columns per step of GEMM2
    BLOCK_R: tl.constexpr,  # rank columns per chunk (GEMM1 output chunk, GEMM2 K step)
):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # int64: offsets can pass 2^31
    row_ok = rows < n_rows

    # 1. act = z0 A for this program's rows, rank chunk by rank chunk, into its slice of the scratch buffer.
    _project_rows(z_ptr, mean_ptr, std_ptr, a_ptr, act_ptr, rows, row_ok, d_total, rank, stride_zm, stride_am, 1,
                  stride_actm, NORMALIZE, EPS, DOT_PRECISION, BLOCK_N, BLOCK_K, BLOCK_R)
    tl.debug_barrier()  # act was stored by other threads of this program: make it visible before reading it back

    # 2. GEMM2 per column tile, accumulated over the rank, then the whole block in the epilogue.
    layer = tl.load(idx_ptr + rows, mask=row_ok, other=0)
    for d0 in range(0, d_total, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < d_total
        mask = row_ok[:, None] & col_ok[None, :]
        p = _expand_tile(act_ptr, b_ptr, rows, row_ok, cols, col_ok, rank, stride_actm, stride_bm, 1,
                         DOT_PRECISION, BLOCK_N, BLOCK_D, BLOCK_R)
        p = p + tl.load(c_ptr + cols, mask=col_ok, other=0.0)[None, :]
        if SAVE:
            tl.store(pre_ptr + rows[:, None] * stride_om + cols[None, :], p, mask=mask)
        h = _block_epilogue(p, s_ptr, t_ptr, layer, cols, row_ok, col_ok, stride_sl, RELU_FIRST)
        z0 = _load_input(z_ptr, mean_ptr, std_ptr, rows, cols, row_ok, col_ok, stride_zm, NORMALIZE, EPS)
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], z0 + h, mask=mask)


@triton.jit
def _hypernet_block_rowgemm_kernel(
    x_ptr,  # (N, K) fp32 left operand (z, normalised on load with NORM_X), row stride stride_xm
    y_ptr,  # (K, J) fp32 right operand A, row stride stride_yk
    mean_ptr,  # (K,) fp32 (NORM_X)
    std_ptr,  # (K,) fp32 (NORM_X)
    out_ptr,  # (N, J) fp32 out, row stride stride_om
    n_rows,
    rows_bucket,  # next power of two >= n_rows: the autotune key
    k_dim,
    j_dim,
    stride_xm,
    stride_yk,
    stride_om,
    NORM_X: tl.constexpr,
    EPS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # act = z0 A for the backward, as a 2-D grid of (row tile, rank tile): act is an output there (grad_b needs it).
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # int64: offsets can pass 2^31
    jj = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    row_ok = rows < n_rows
    j_ok = jj < j_dim
    acc = tl.zeros((BLOCK_N, BLOCK_J), dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < k_dim
        x = _load_input(x_ptr, mean_ptr, std_ptr, rows, kk, row_ok, k_ok, stride_xm, NORM_X, EPS)
        y = tl.load(y_ptr + kk[:, None] * stride_yk + jj[None, :], mask=k_ok[:, None] & j_ok[None, :], other=0.0)
        acc = tl.dot(x, y, acc, input_precision=DOT_PRECISION)
    tl.store(out_ptr + rows[:, None] * stride_om + jj[None, :], acc, mask=row_ok[:, None] & j_ok[None, :])


@triton.jit
def _hypernet_block_pi_bwd_kernel(
    grad_out_ptr,  # (N, D) fp32 gamma = dL/dz', row stride stride_gm
    act_ptr,  # (N, r) fp32 act = z0 A, row stride stride_actm (unused with HAS_PRE)
    b_ptr,  # (r, D) fp32 B, row stride stride_bm (unused with HAS_PRE)
    c_ptr,  # (D,) fp32
    pre_ptr,  # (N, D) fp32 p saved by the forward, row stride stride_gm (read only with HAS_PRE)
    s_ptr,  # (L, D) fp32, row stride stride_sl
    t_ptr,  # (L, D) fp32
    perm_ptr,  # (N,) int64 rows sorted by layer (stable)
    offsets_ptr,  # (L + 1,) int64 start of each layer's rows in perm
    pi_ptr,  # (N, D) fp32 out: pi, row stride stride_pim
    grad_s_ptr,  # (L, D) fp32 out
    grad_t_ptr,  # (L, D) fp32 out
    pisum_ptr,  # (L, D) fp32 out: sum of pi over the layer's rows (grad_c = sum over layers)
    d_total,
    rank,
    stride_gm,
    stride_actm,
    stride_bm,
    stride_sl,
    stride_pim,
    RELU_FIRST: tl.constexpr,
    HAS_PRE: tl.constexpr,  # p comes from the forward (training) instead of act B + c
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # One program per (layer, column tile) walks that layer's rows in order: per-layer sums without atomics. p is
    # read from the forward's pre, or recomputed tile by tile (GEMM2 over rank chunks) and never stored. Bytes: reads
    # gamma once and pre once (or act once per column tile: r per row), writes pi once; (L, D) outputs.
    layer = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d_total
    start = tl.load(offsets_ptr + layer)
    end = tl.load(offsets_ptr + layer + 1)
    c = tl.load(c_ptr + cols, mask=col_ok, other=0.0)[None, :]
    s = tl.load(s_ptr + layer * stride_sl + cols, mask=col_ok, other=0.0)[None, :]
    t = tl.load(t_ptr + layer * stride_sl + cols, mask=col_ok, other=0.0)[None, :]
    acc_s = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    acc_pi = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for i0 in range(start, end, BLOCK_N):
        ii = i0 + tl.arange(0, BLOCK_N)
        i_ok = ii < end
        rows = tl.load(perm_ptr + ii, mask=i_ok, other=0)
        mask = i_ok[:, None] & col_ok[None, :]
        if HAS_PRE:
            p = tl.load(pre_ptr + rows[:, None] * stride_gm + cols[None, :], mask=mask, other=0.0)
        else:
            p = _expand_tile(act_ptr, b_ptr, rows, i_ok, cols, col_ok, rank, stride_actm, stride_bm, 1,
                             DOT_PRECISION, BLOCK_N, BLOCK_D, BLOCK_R) + c
        gamma = tl.load(grad_out_ptr + rows[:, None] * stride_gm + cols[None, :], mask=mask, other=0.0)
        if RELU_FIRST:
            # dt = gamma; ds = gamma * relu(p); pi = s * gamma * [p >= 0]
            acc_t += gamma
            acc_s += gamma * (p * (p >= 0).to(tl.float32))
            pi = s * gamma * (p >= 0).to(tl.float32)
        else:
            # g = gamma * [s p + t >= 0]; dt = g; ds = g * p; pi = s * g
            g = gamma * ((s * p + t) >= 0).to(tl.float32)
            acc_t += g
            acc_s += g * p
            pi = s * g
        pi = tl.where(mask, pi, 0.0)
        acc_pi += pi
        tl.store(pi_ptr + rows[:, None] * stride_pim + cols[None, :], pi, mask=mask)
    out = layer * d_total + cols
    tl.store(grad_s_ptr + out, tl.sum(acc_s, axis=0), mask=col_ok)
    tl.store(grad_t_ptr + out, tl.sum(acc_t, axis=0), mask=col_ok)
    tl.store(pisum_ptr + out, tl.sum(acc_pi, axis=0), mask=col_ok)


@triton.jit
def _hypernet_block_dz_bwd_kernel(
    pi_ptr,  # (N, D) fp32 pi, row stride stride_pim
    b_ptr,  # (r, D) fp32 B, row stride stride_bm (read as B^T)
    a_ptr,  # (D, r) fp32 A, row stride stride_am (read as A^T)
    grad_out_ptr,  # (N, D) fp32 gamma, row stride stride_gm
    std_ptr,  # (D,) fp32 (SCALE_OUT)
    alpha_ptr,  # (N, r) fp32 out: alpha = pi B^T, row stride stride_alm
    grad_z_ptr,  # (N, D) fp32 out, row stride stride_dzm
    n_rows,
    rows_bucket,  # next power of two >= n_rows: the autotune key
    d_total,
    rank,
    stride_pim,
    stride_bm,
    stride_am,
    stride_gm,
    stride_alm,
    stride_dzm,
    SCALE_OUT: tl.constexpr,  # the normaliser was folded in: dL/dx = dL/dz0 / (std + EPS)
    EPS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # The forward's structure on the backward chain: alpha = pi B^T (rank chunks, kept: grad_a = z0^T alpha needs
    # it), then grad_z = gamma + alpha A^T per column tile with the residual and the scaling in the epilogue.
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # int64: offsets can pass 2^31
    row_ok = rows < n_rows
    _project_rows(pi_ptr, std_ptr, std_ptr, b_ptr, alpha_ptr, rows, row_ok, d_total, rank, stride_pim, 1, stride_bm,
                  stride_alm, False, EPS, DOT_PRECISION, BLOCK_N, BLOCK_K, BLOCK_R)
    tl.debug_barrier()  # alpha was stored by other threads of this program
    for d0 in range(0, d_total, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < d_total
        mask = row_ok[:, None] & col_ok[None, :]
        acc = _expand_tile(alpha_ptr, a_ptr, rows, row_ok, cols, col_ok, rank, stride_alm, 1, stride_am,
                           DOT_PRECISION, BLOCK_N, BLOCK_D, BLOCK_R)
        acc = tl.load(grad_out_ptr + rows[:, None] * stride_gm + cols[None, :], mask=mask, other=0.0) + acc
        if SCALE_OUT:
            sd = tl.load(std_ptr + cols, mask=col_ok, other=1.0)
            acc = acc / (sd + EPS)[None, :]
        tl.store(grad_z_ptr + rows[:, None] * stride_dzm + cols[None, :], acc, mask=mask)


@triton.jit
def _hypernet_block_wgrad_bwd_kernel(
    x_ptr,  # (N, I) fp32, row stride stride_xm: z (normalised on load with NORM_X) or act
    y_ptr,  # (N, J) fp32, row stride stride_ym: alpha or pi
    mean_ptr,  # (I,) fp32 (NORM_X)
    std_ptr,  # (I,) fp32 (NORM_X)
    out_ptr,  # (I, J) fp32 out = x'^T y, row stride stride_om
    n_rows,
    rows_bucket,  # next power of two >= n_rows: the autotune key
    i_dim,
    j_dim,
    stride_xm,
    stride_ym,
    stride_om,
    NORM_X: tl.constexpr,
    EPS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,  # rows per step of the K loop over N
):
    # Weight gradients grad_a = z0^T alpha (D, r) and grad_b = act^T pi (r, D): the K loop runs over every row in
    # order inside one program (deterministic; no split-K atomics). x is read transposed through its strides.
    ii = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    jj = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    i_ok = ii < i_dim
    j_ok = jj < j_dim
    if NORM_X:
        mu = tl.load(mean_ptr + ii, mask=i_ok, other=0.0)[:, None]
        sd = tl.load(std_ptr + ii, mask=i_ok, other=1.0)[:, None]
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for k0 in range(0, n_rows, BLOCK_K):
        kk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)  # int64: offsets can pass 2^31
        k_ok = kk < n_rows
        xmask = i_ok[:, None] & k_ok[None, :]
        xt = tl.load(x_ptr + kk[None, :] * stride_xm + ii[:, None], mask=xmask, other=0.0)  # (BLOCK_I, BLOCK_K)
        if NORM_X:
            xt = tl.where(xmask, (xt - mu) / (sd + EPS), 0.0)
        y = tl.load(y_ptr + kk[:, None] * stride_ym + jj[None, :], mask=k_ok[:, None] & j_ok[None, :], other=0.0)
        acc = tl.dot(xt, y, acc, input_precision=DOT_PRECISION)
    tl.store(out_ptr + ii[:, None] * stride_om + jj[None, :], acc, mask=i_ok[:, None] & j_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------------
# Launch configurations: autotuned on CUDA (fresh outputs; keys bucket the row count), fixed small blocks under the
# interpreter (_common.INTERPRET_BLOCK). The per-layer pi kernel takes a fixed config: it runs once per backward.

_B = _common.INTERPRET_BLOCK
_CHAIN_CONFIGS = [_common.config(BLOCK_N=32, BLOCK_K=32, BLOCK_D=64, BLOCK_R=32, num_warps=4),
                  _common.config(BLOCK_N=64, BLOCK_K=32, BLOCK_D=64, BLOCK_R=64, num_warps=4),
                  _common.config(BLOCK_N=64, BLOCK_K=64, BLOCK_D=128, BLOCK_R=64, num_warps=8),
                  _common.config(BLOCK_N=128, BLOCK_K=32, BLOCK_D=64, BLOCK_R=32, num_warps=8)]
_CHAIN_INTERPRET = dict(BLOCK_N=_B, BLOCK_K=_B, BLOCK_D=_B, BLOCK_R=_B)
_FWD = _common.autotuned(_hypernet_block_fwd_kernel, configs=_CHAIN_CONFIGS,
                         key=["rows_bucket", "d_total", "rank"], interpret=_CHAIN_INTERPRET)
_DZ = _common.autotuned(_hypernet_block_dz_bwd_kernel, configs=_CHAIN_CONFIGS,
                        key=["rows_bucket", "d_total", "rank"], interpret=_CHAIN_INTERPRET)
_ROWGEMM = _common.autotuned(
    _hypernet_block_rowgemm_kernel,
    configs=[_common.config(BLOCK_N=64, BLOCK_J=64, BLOCK_K=32, num_warps=4, num_stages=3),
             _common.config(BLOCK_N=128, BLOCK_J=128, BLOCK_K=32, num_warps=8, num_stages=3),
             _common.config(BLOCK_N=64, BLOCK_J=128, BLOCK_K=64, num_warps=4, num_stages=4),
             _common.config(BLOCK_N=128, BLOCK_J=64, BLOCK_K=32, num_warps=4, num_stages=4)],
    key=["rows_bucket", "k_dim", "j_dim"], interpret=dict(BLOCK_N=_B, BLOCK_J=_B, BLOCK_K=_B))
_WGRAD = _common.autotuned(
    _hypernet_block_wgrad_bwd_kernel,
    configs=[_common.config(BLOCK_I=64, BLOCK_J=64, BLOCK_K=32, num_warps=4, num_stages=3),
             _common.config(BLOCK_I=128, BLOCK_J=128, BLOCK_K=32, num_warps=8, num_stages=3),
             _common.config(BLOCK_I=64, BLOCK_J=128, BLOCK_K=64, num_warps=4, num_stages=4)],
    key=["rows_bucket", "i_dim", "j_dim"], interpret=dict(BLOCK_I=_B, BLOCK_J=_B, BLOCK_K=_B))
_PI_CONFIG = dict(interpret=dict(BLOCK_N=_B, BLOCK_D=_B, BLOCK_R=_B),
                  cuda=dict(BLOCK_N=32, BLOCK_D=64, BLOCK_R=32, num_warps=4))


def _chain_meta(tuned, n_rows, d_total, rank):
    return tuned.launch_meta(BLOCK_N=n_rows, BLOCK_K=d_total, BLOCK_D=d_total, BLOCK_R=rank)


def _act(z, a, mean, std):
    """act = z0 A (N, r) fp32."""
    n_rows, d_total = z.shape
    rank = a.shape[1]
    out = torch.empty((n_rows, rank), dtype=torch.float32, device=z.device)
    norm_x = mean is not None
    wrap_triton(_ROWGEMM.kernel)[lambda m: (triton.cdiv(n_rows, m["BLOCK_N"]), triton.cdiv(rank, m["BLOCK_J"]))](
        z, a, mean if norm_x else z, std if norm_x else z, out, n_rows, _common.bucket(n_rows), d_total, rank,
        z.stride(0), a.stride(0), out.stride(0), NORM_X=norm_x, EPS=EPS, DOT_PRECISION=_common.dot_precision(),
        **_ROWGEMM.launch_meta(BLOCK_N=n_rows, BLOCK_J=rank, BLOCK_K=d_total))
    return out


def _wgrad(x, y, i_dim, j_dim, *, mean=None, std=None):
    """out (i_dim, j_dim) = [x normalised]^T y, reduced over all rows in order."""
    n_rows = x.shape[0]
    out = torch.empty((i_dim, j_dim), dtype=torch.float32, device=x.device)
    norm_x = mean is not None
    wrap_triton(_WGRAD.kernel)[lambda m: (triton.cdiv(i_dim, m["BLOCK_I"]), triton.cdiv(j_dim, m["BLOCK_J"]))](
        x, y, mean if norm_x else x, std if norm_x else x, out, n_rows, _common.bucket(n_rows), i_dim, j_dim,
        x.stride(0), y.stride(0), out.stride(0), NORM_X=norm_x, EPS=EPS, DOT_PRECISION=_common.dot_precision(),
        **_WGRAD.launch_meta(BLOCK_I=i_dim, BLOCK_J=j_dim, BLOCK_K=n_rows))
    return out


@triton_op("emsedit_fast::triton_hypernet_block", mutates_args={})
def hypernet_block(z: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, s: torch.Tensor,
                   t: torch.Tensor, idx: torch.Tensor, relu_first: bool, mean: torch.Tensor | None,
                   std: torch.Tensor | None, save_for_backward: bool = False) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor]:
    """(z', act, pre) for all layers of a shape group in one launch, any rank: z' (N, D) fp32; with
    save_for_backward act = z0 A (N, r) and pre = p (N, D) for the backward, else both empty.

    Reference: emsedit_fast.reference.hypernet_block.
    """
    n_rows, d_total = z.shape  # inputs checked by the ops layer (emsedit_fast/ops/hypernet_block.py)
    rank = a.shape[1]
    out = torch.empty_like(z)
    act = torch.empty((n_rows, rank), dtype=torch.float32, device=z.device)  # scratch, or kept for the backward
    pre = torch.empty_like(z) if save_for_backward else z.new_empty(0)
    if n_rows:
        normalize = mean is not None
        wrap_triton(_FWD.kernel)[lambda m: (triton.cdiv(n_rows, m["BLOCK_N"]),)](
            z, a, b, c, s, t, idx, mean if normalize else z, std if normalize else z, act, out,
            pre if save_for_backward else out, n_rows, _common.bucket(n_rows), d_total, rank, z.stride(0),
            a.stride(0), b.stride(0), s.stride(0), act.stride(0), out.stride(0), RELU_FIRST=relu_first,
            NORMALIZE=normalize, SAVE=save_for_backward, EPS=EPS, DOT_PRECISION=_common.dot_precision(),
            **_chain_meta(_FWD, n_rows, d_total, rank))
    return out, (act if save_for_backward else z.new_empty(0)), pre


@triton_op("emsedit_fast::triton_hypernet_block_backward", mutates_args={})
def hypernet_block_backward(grad_out: torch.Tensor, z: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                            c: torch.Tensor, s: torch.Tensor, t: torch.Tensor, idx: torch.Tensor, relu_first: bool,
                            mean: torch.Tensor | None, std: torch.Tensor | None, act: torch.Tensor | None = None,
                            pre: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_z, grad_a, grad_b, grad_c, grad_s, grad_t) of `hypernet_block`; act and pre from the forward when given
    (both), else recomputed.

    With mean/std, grad_z is the gradient with respect to the raw rows x. Deterministic.
    Reference: emsedit_fast.reference.hypernet_block_backward.
    """
    n_rows, d_total = z.shape  # inputs checked by the ops layer (emsedit_fast/ops/hypernet_block.py)
    rank = a.shape[1]
    n_layers = s.shape[0]
    normalize = mean is not None
    if n_rows == 0:
        return tuple(torch.zeros_like(x) for x in (z, a, b, c, s, t))

    has_pre = pre is not None
    if act is None:
        act = _act(z, a, mean, std)  # (N, r)

    # Rows grouped by layer (stable: each layer's rows in their original order), without a host sync and with static
    # shapes (no bincount): offsets[l] = first position of layer l in the sorted index.
    sorted_idx, perm = torch.sort(idx, stable=True)
    offsets = torch.searchsorted(sorted_idx, torch.arange(n_layers + 1, dtype=idx.dtype, device=idx.device))
    pi = torch.empty_like(z)
    grad_s = torch.empty_like(s)
    grad_t = torch.empty_like(t)
    pisum = torch.empty_like(s)
    cfg = _common.pick(**_PI_CONFIG, BLOCK_N=n_rows, BLOCK_D=d_total, BLOCK_R=rank)
    # pre is read with grad_out's row stride: both are contiguous (N, D)
    wrap_triton(_hypernet_block_pi_bwd_kernel)[(n_layers, triton.cdiv(d_total, cfg["BLOCK_D"]))](
        grad_out, act, b, c, pre if has_pre else grad_out, s, t, perm, offsets, pi, grad_s, grad_t, pisum, d_total,
        rank, grad_out.stride(0), act.stride(0), b.stride(0), s.stride(0), pi.stride(0), RELU_FIRST=relu_first,
        HAS_PRE=has_pre, DOT_PRECISION=_common.dot_precision(), **cfg)
    grad_c = pisum.sum(0)

    alpha = torch.empty((n_rows, rank), dtype=torch.float32, device=z.device)
    grad_z = torch.empty_like(z)
    wrap_triton(_DZ.kernel)[lambda m: (triton.cdiv(n_rows, m["BLOCK_N"]),)](
        pi, b, a, grad_out, std if normalize else pi, alpha, grad_z, n_rows, _common.bucket(n_rows), d_total, rank,
        pi.stride(0), b.stride(0), a.stride(0), grad_out.stride(0), alpha.stride(0), grad_z.stride(0),
        SCALE_OUT=normalize, EPS=EPS, DOT_PRECISION=_common.dot_precision(), **_chain_meta(_DZ, n_rows, d_total, rank))
    grad_a = _wgrad(z, alpha, d_total, rank, mean=mean, std=std)  # z0^T alpha (D, r)
    grad_b = _wgrad(act, pi, rank, d_total)  # act^T pi (r, D)
    return grad_z, grad_a, grad_b, grad_c, grad_s, grad_t
