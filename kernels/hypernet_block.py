"""Triton kernels of the low-rank residual hypernetwork block (reference: emsedit_fast/reference/hypernet_block.py;
METHOD.md sections 6.1, 8.4 and 18.3 F1/F2).

Rows z (N, D) of every same-shape layer are stacked with a layer index idx (N,), so A (D, r) and B (r, D) are read
once per row tile for all layers instead of once per layer:

    act = z0 A (N, r);  p = act B + c (N, D)
    relu_first:  h = s[idx] * relu(p) + t[idx]      otherwise:  h = relu(s[idx] * p + t[idx])
    z' = z0 + h,        z0 = z, or (x - mean) / (std + 2^-23) when the normaliser is folded in (F1)

relu'(0) = 1: the backward masks with p >= 0 (or pre >= 0), as the reference.

Forward:
  - rank <= FUSED_MAX_RANK: `_hypernet_block_fwd_kernel`, one program per row tile. GEMM1 keeps act (BLOCK_N x r)
    in registers; GEMM2 loops over D column tiles with the whole block in its epilogue (+c, relu, s/t gather by idx,
    residual). Bytes per row: reads x once for GEMM1 and once for the residual, writes z' once; act never leaves the
    SM; A and B are read once per row tile.
  - larger ranks (act does not fit in registers): `_hypernet_block_rowgemm_kernel` writes act (N x r fp32, small
    next to z) and `_hypernet_block_expand_kernel` does GEMM2 with the same epilogue.
Backward (METHOD.md 8.4), recomputing the forward; every reduction has a fixed order (no float atomics):
  act = z0 A                                    rowgemm (normalising prologue)
  p = act B + c                                 expand kernel, storing p
  pi, grad_s, grad_t per layer                  `_hypernet_block_bwd_kernel`: rows grouped by layer through a stable
                                                sort of idx; pi overwrites p in place
  grad_c = sum_l pisum_l                        torch sum over L rows
  alpha = pi B^T, grad_z = (gamma + alpha A^T) / (std + eps)      rowgemm (residual and scaling epilogue)
  grad_a = z0^T alpha, grad_b = act^T pi        `_hypernet_block_wgrad_bwd_kernel` (K loop over rows)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op
from torch.library import wrap_triton

from emsedit_fast.reference.running_stats import EPS

from . import _common

# Largest (padded) rank whose GEMM1 result stays in registers in the fused forward: 64 x BLOCK_N fp32 accumulators.
FUSED_MAX_RANK = 64


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
def _block_epilogue(p, c_ptr, s_ptr, t_ptr, layer, cols, row_ok, col_ok, stride_sl, RELU_FIRST: tl.constexpr):
    """h from the GEMM2 tile p (BLOCK_N, BLOCK_D): + c, relu (x * [x >= 0], as the reference), s/t gathered by layer."""
    mask = row_ok[:, None] & col_ok[None, :]
    p = p + tl.load(c_ptr + cols, mask=col_ok, other=0.0)[None, :]
    s = tl.load(s_ptr + layer[:, None] * stride_sl + cols[None, :], mask=mask, other=0.0)
    t = tl.load(t_ptr + layer[:, None] * stride_sl + cols[None, :], mask=mask, other=0.0)
    if RELU_FIRST:
        h = s * (p * (p >= 0).to(tl.float32)) + t
    else:
        pre = s * p + t
        h = pre * (pre >= 0).to(tl.float32)
    return h


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
    out_ptr,  # (N, D) fp32 out z', row stride stride_om
    n_rows,
    d_total,  # D
    rank,  # r <= R_PAD
    stride_zm,
    stride_am,
    stride_bm,
    stride_sl,
    stride_om,
    RELU_FIRST: tl.constexpr,  # True: s * relu(p) + t; False: relu(s * p + t) (MEND)
    NORMALIZE: tl.constexpr,  # fold the normaliser into GEMM1's prologue and the residual
    EPS: tl.constexpr,  # 2^-23
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32" (see _common.dot_precision)
    BLOCK_N: tl.constexpr,  # rows per program
    BLOCK_K: tl.constexpr,  # D columns per step of GEMM1's K loop
    BLOCK_D: tl.constexpr,  # output columns per step of GEMM2
    R_PAD: tl.constexpr,  # rank padded to a power of two >= 16 (masked)
):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # int64: offsets can pass 2^31
    row_ok = rows < n_rows
    rr = tl.arange(0, R_PAD)
    r_ok = rr < rank

    # GEMM1: act = z0 A, (BLOCK_N, R_PAD) kept in registers.
    act = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    for k0 in range(0, d_total, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < d_total
        x = _load_input(z_ptr, mean_ptr, std_ptr, rows, kk, row_ok, k_ok, stride_zm, NORMALIZE, EPS)
        a = tl.load(a_ptr + kk[:, None] * stride_am + rr[None, :], mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        act = tl.dot(x, a, act, input_precision=DOT_PRECISION)

    # GEMM2 per column tile, then the whole block in the epilogue.
    layer = tl.load(idx_ptr + rows, mask=row_ok, other=0)
    for d0 in range(0, d_total, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < d_total
        b = tl.load(b_ptr + rr[:, None] * stride_bm + cols[None, :], mask=r_ok[:, None] & col_ok[None, :], other=0.0)
        p = tl.dot(act, b, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_D)
        h = _block_epilogue(p, c_ptr, s_ptr, t_ptr, layer, cols, row_ok, col_ok, stride_sl, RELU_FIRST)
        z0 = _load_input(z_ptr, mean_ptr, std_ptr, rows, cols, row_ok, col_ok, stride_zm, NORMALIZE, EPS)
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], z0 + h,
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _hypernet_block_rowgemm_kernel(
    x_ptr,  # (N, K) fp32 left operand, row stride stride_xm, unit column stride
    y_ptr,  # (K, J) fp32 right operand through strides: A (D, r); B^T and A^T are B and A read transposed
    res_ptr,  # (N, J) fp32 residual added in the epilogue (read only when HAS_RES), row stride stride_resm
    mean_ptr,  # (K,) fp32: normalise x's columns (NORM_X)
    std_ptr,  # (K,) with NORM_X, or (J,) with SCALE_OUT: divide the output columns by std + EPS
    out_ptr,  # (N, J) fp32 out, row stride stride_om
    n_rows,
    k_dim,
    j_dim,
    stride_xm,
    stride_yk,
    stride_yj,
    stride_resm,
    stride_om,
    NORM_X: tl.constexpr,
    HAS_RES: tl.constexpr,
    SCALE_OUT: tl.constexpr,
    EPS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # out = epilogue(prologue(x) @ y): act = z0 A;  alpha = pi B^T;  grad_z = (gamma + alpha A^T) / (std + eps).
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # int64: offsets can pass 2^31
    jj = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    row_ok = rows < n_rows
    j_ok = jj < j_dim
    acc = tl.zeros((BLOCK_N, BLOCK_J), dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < k_dim
        x = _load_input(x_ptr, mean_ptr, std_ptr, rows, kk, row_ok, k_ok, stride_xm, NORM_X, EPS)
        y = tl.load(y_ptr + kk[:, None] * stride_yk + jj[None, :] * stride_yj, mask=k_ok[:, None] & j_ok[None, :],
                    other=0.0)
        acc = tl.dot(x, y, acc, input_precision=DOT_PRECISION)
    mask = row_ok[:, None] & j_ok[None, :]
    if HAS_RES:
        acc = tl.load(res_ptr + rows[:, None] * stride_resm + jj[None, :], mask=mask, other=0.0) + acc
    if SCALE_OUT:
        sd = tl.load(std_ptr + jj, mask=j_ok, other=1.0)
        acc = acc / (sd + EPS)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + jj[None, :], acc, mask=mask)


@triton.jit
def _hypernet_block_expand_kernel(
    act_ptr,  # (N, r) fp32 act = z0 A, row stride stride_actm
    b_ptr,  # (r, D) fp32 B, row stride stride_bm
    c_ptr,  # (D,) fp32
    s_ptr,  # (L, D) fp32, row stride stride_sl
    t_ptr,  # (L, D) fp32
    idx_ptr,  # (N,) int64
    z_ptr,  # (N, D) fp32 rows for the residual (raw x when NORMALIZE); unused when STORE_P
    mean_ptr,  # (D,) fp32 (NORMALIZE)
    std_ptr,  # (D,) fp32 (NORMALIZE)
    out_ptr,  # (N, D) fp32 out: z' or, with STORE_P, the pre-activation p = act B + c
    n_rows,
    d_total,
    rank,
    stride_actm,
    stride_bm,
    stride_sl,
    stride_zm,
    stride_om,
    RELU_FIRST: tl.constexpr,
    NORMALIZE: tl.constexpr,
    STORE_P: tl.constexpr,
    EPS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # int64: offsets can pass 2^31
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < d_total
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, rank, BLOCK_K):  # GEMM2, K loop over the rank
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < rank
        act = tl.load(act_ptr + rows[:, None] * stride_actm + kk[None, :], mask=row_ok[:, None] & k_ok[None, :],
                      other=0.0)
        b = tl.load(b_ptr + kk[:, None] * stride_bm + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(act, b, acc, input_precision=DOT_PRECISION)
    mask = row_ok[:, None] & col_ok[None, :]
    if STORE_P:
        acc = acc + tl.load(c_ptr + cols, mask=col_ok, other=0.0)[None, :]
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc, mask=mask)
    else:
        layer = tl.load(idx_ptr + rows, mask=row_ok, other=0)
        h = _block_epilogue(acc, c_ptr, s_ptr, t_ptr, layer, cols, row_ok, col_ok, stride_sl, RELU_FIRST)
        z0 = _load_input(z_ptr, mean_ptr, std_ptr, rows, cols, row_ok, col_ok, stride_zm, NORMALIZE, EPS)
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], z0 + h, mask=mask)


@triton.jit
def _hypernet_block_bwd_kernel(
    grad_out_ptr,  # (N, D) fp32 gamma = dL/dz', row stride stride_gm
    p_ptr,  # (N, D) fp32 in: pre-activation p; out: pi (same element, same program), row stride stride_pm
    s_ptr,  # (L, D) fp32, row stride stride_sl
    t_ptr,  # (L, D) fp32
    perm_ptr,  # (N,) int64 rows sorted by layer (stable)
    offsets_ptr,  # (L + 1,) int64 start of each layer's rows in perm
    grad_s_ptr,  # (L, D) fp32 out
    grad_t_ptr,  # (L, D) fp32 out
    pisum_ptr,  # (L, D) fp32 out: sum of pi over the layer's rows (grad_c = sum over layers)
    d_total,
    stride_gm,
    stride_pm,
    stride_sl,
    RELU_FIRST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per (layer, column tile) walks that layer's rows in order: per-layer sums without atomics.
    # Bytes: reads gamma and p once, writes pi once; (L, D) outputs.
    layer = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d_total
    start = tl.load(offsets_ptr + layer)
    end = tl.load(offsets_ptr + layer + 1)
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
        gamma = tl.load(grad_out_ptr + rows[:, None] * stride_gm + cols[None, :], mask=mask, other=0.0)
        p = tl.load(p_ptr + rows[:, None] * stride_pm + cols[None, :], mask=mask, other=0.0)
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
        acc_pi += pi
        tl.store(p_ptr + rows[:, None] * stride_pm + cols[None, :], pi, mask=mask)
    out = layer * d_total + cols
    tl.store(grad_s_ptr + out, tl.sum(acc_s, axis=0), mask=col_ok)
    tl.store(grad_t_ptr + out, tl.sum(acc_t, axis=0), mask=col_ok)
    tl.store(pisum_ptr + out, tl.sum(acc_pi, axis=0), mask=col_ok)


@triton.jit
def _hypernet_block_wgrad_bwd_kernel(
    x_ptr,  # (N, I) fp32, row stride stride_xm: z (normalised on load with NORM_X) or act
    y_ptr,  # (N, J) fp32, row stride stride_ym: alpha or pi
    mean_ptr,  # (I,) fp32 (NORM_X)
    std_ptr,  # (I,) fp32 (NORM_X)
    out_ptr,  # (I, J) fp32 out = x'^T y, row stride stride_om
    n_rows,
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
# Launch configurations: autotuned on CUDA (fresh outputs), fixed under the interpreter. The per-layer backward
# kernel rewrites p in place, so it takes a fixed config (autotuning would re-run it on its own output).

_FWD = _common.autotuned(
    _hypernet_block_fwd_kernel,
    configs=[_common.config(BLOCK_N=64, BLOCK_K=32, BLOCK_D=64, num_warps=4),
             _common.config(BLOCK_N=64, BLOCK_K=64, BLOCK_D=128, num_warps=8),
             _common.config(BLOCK_N=128, BLOCK_K=32, BLOCK_D=64, num_warps=8),
             _common.config(BLOCK_N=32, BLOCK_K=64, BLOCK_D=128, num_warps=4)],
    key=["n_rows", "d_total", "R_PAD"],
    interpret=dict(BLOCK_N=128, BLOCK_K=256, BLOCK_D=256),
)
_GEMM_CONFIGS = [_common.config(BLOCK_N=64, BLOCK_J=64, BLOCK_K=32, num_warps=4, num_stages=3),
                 _common.config(BLOCK_N=128, BLOCK_J=128, BLOCK_K=32, num_warps=8, num_stages=3),
                 _common.config(BLOCK_N=64, BLOCK_J=128, BLOCK_K=64, num_warps=4, num_stages=4),
                 _common.config(BLOCK_N=128, BLOCK_J=64, BLOCK_K=32, num_warps=4, num_stages=4)]
_ROWGEMM = _common.autotuned(_hypernet_block_rowgemm_kernel, configs=_GEMM_CONFIGS,
                             key=["n_rows", "k_dim", "j_dim"], interpret=dict(BLOCK_N=128, BLOCK_J=256, BLOCK_K=256))
_EXPAND = _common.autotuned(
    _hypernet_block_expand_kernel,
    configs=[_common.config(BLOCK_N=c.kwargs["BLOCK_N"], BLOCK_D=c.kwargs["BLOCK_J"], BLOCK_K=c.kwargs["BLOCK_K"],
                            num_warps=c.num_warps, num_stages=c.num_stages) for c in _GEMM_CONFIGS],
    key=["n_rows", "d_total", "rank"],
    interpret=dict(BLOCK_N=128, BLOCK_D=256, BLOCK_K=256),
)
_WGRAD = _common.autotuned(
    _hypernet_block_wgrad_bwd_kernel,
    configs=[_common.config(BLOCK_I=64, BLOCK_J=64, BLOCK_K=32, num_warps=4, num_stages=3),
             _common.config(BLOCK_I=128, BLOCK_J=128, BLOCK_K=32, num_warps=8, num_stages=3),
             _common.config(BLOCK_I=64, BLOCK_J=128, BLOCK_K=64, num_warps=4, num_stages=4)],
    key=["n_rows", "i_dim", "j_dim"],
    interpret=dict(BLOCK_I=256, BLOCK_J=256, BLOCK_K=256),
)
_PER_LAYER_CONFIG = dict(interpret=dict(BLOCK_N=256, BLOCK_D=256), cuda=dict(BLOCK_N=32, BLOCK_D=128, num_warps=4))


def _rowgemm(x, y, strides_y, k_dim, j_dim, *, res=None, mean=None, std=None, norm_x=False, scale_out=False):
    """out (N, j_dim) = [x normalised] @ y (+ res) [/ (std + eps)], y addressed through strides_y = (k, j)."""
    n_rows = x.shape[0]
    out = torch.empty((n_rows, j_dim), dtype=torch.float32, device=x.device)
    dummy = x
    wrap_triton(_ROWGEMM.kernel)[lambda m: (triton.cdiv(n_rows, m["BLOCK_N"]), triton.cdiv(j_dim, m["BLOCK_J"]))](
        x, y, res if res is not None else dummy, mean if mean is not None else dummy,
        std if std is not None else dummy, out, n_rows, k_dim, j_dim, x.stride(0), strides_y[0], strides_y[1],
        res.stride(0) if res is not None else 0, out.stride(0),
        NORM_X=norm_x, HAS_RES=res is not None, SCALE_OUT=scale_out, EPS=EPS,
        DOT_PRECISION=_common.dot_precision(), **_ROWGEMM.launch_meta(BLOCK_N=n_rows, BLOCK_J=j_dim, BLOCK_K=k_dim))
    return out


def _expand(act, b, c, s, t, idx, z, mean, std, relu_first, store_p):
    n_rows, d_total = z.shape
    rank = b.shape[0]
    out = torch.empty((n_rows, d_total), dtype=torch.float32, device=z.device)
    normalize = mean is not None
    wrap_triton(_EXPAND.kernel)[lambda m: (triton.cdiv(n_rows, m["BLOCK_N"]), triton.cdiv(d_total, m["BLOCK_D"]))](
        act, b, c, s, t, idx, z, mean if normalize else z, std if normalize else z, out, n_rows, d_total, rank,
        act.stride(0), b.stride(0), s.stride(0), z.stride(0), out.stride(0),
        RELU_FIRST=relu_first, NORMALIZE=normalize, STORE_P=store_p, EPS=EPS,
        DOT_PRECISION=_common.dot_precision(), **_EXPAND.launch_meta(BLOCK_N=n_rows, BLOCK_D=d_total, BLOCK_K=rank))
    return out


def _wgrad(x, y, i_dim, j_dim, *, mean=None, std=None):
    """out (i_dim, j_dim) = [x normalised]^T y, reduced over all rows in order."""
    n_rows = x.shape[0]
    out = torch.empty((i_dim, j_dim), dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return out.zero_()
    norm_x = mean is not None
    wrap_triton(_WGRAD.kernel)[lambda m: (triton.cdiv(i_dim, m["BLOCK_I"]), triton.cdiv(j_dim, m["BLOCK_J"]))](
        x, y, mean if norm_x else x, std if norm_x else x, out, n_rows, i_dim, j_dim, x.stride(0), y.stride(0),
        out.stride(0), NORM_X=norm_x, EPS=EPS, DOT_PRECISION=_common.dot_precision(),
        **_WGRAD.launch_meta(BLOCK_I=i_dim, BLOCK_J=j_dim, BLOCK_K=n_rows))
    return out


@triton_op("emsedit_fast::triton_hypernet_block", mutates_args={})
def hypernet_block(z: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, s: torch.Tensor,
                   t: torch.Tensor, idx: torch.Tensor, relu_first: bool, mean: torch.Tensor | None,
                   std: torch.Tensor | None) -> torch.Tensor:
    """z' = z0 + h(z0) for all layers of a shape group in one call; (N, D) fp32.

    Reference: emsedit_fast.reference.hypernet_block.
    """
    n_rows, d_total = z.shape  # inputs checked by the ops layer (emsedit_fast/ops/hypernet_block.py)
    rank = a.shape[1]
    normalize = mean is not None
    if n_rows == 0:
        return torch.empty_like(z)
    r_pad = _common.next_pow2(rank)
    if r_pad <= FUSED_MAX_RANK:
        out = torch.empty_like(z)
        wrap_triton(_FWD.kernel)[lambda m: (triton.cdiv(n_rows, m["BLOCK_N"]),)](
            z, a, b, c, s, t, idx, mean if normalize else z, std if normalize else z, out, n_rows, d_total, rank,
            z.stride(0), a.stride(0), b.stride(0), s.stride(0), out.stride(0),
            RELU_FIRST=relu_first, NORMALIZE=normalize, EPS=EPS, DOT_PRECISION=_common.dot_precision(),
            R_PAD=r_pad, **_FWD.launch_meta(BLOCK_N=n_rows, BLOCK_K=d_total, BLOCK_D=d_total))
        return out
    act = _rowgemm(z, a, (a.stride(0), 1), d_total, rank, mean=mean, std=std, norm_x=normalize)  # (N, r)
    return _expand(act, b, c, s, t, idx, z, mean, std, relu_first, store_p=False)


@triton_op("emsedit_fast::triton_hypernet_block_backward", mutates_args={})
def hypernet_block_backward(grad_out: torch.Tensor, z: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                            c: torch.Tensor, s: torch.Tensor, t: torch.Tensor, idx: torch.Tensor, relu_first: bool,
                            mean: torch.Tensor | None, std: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                         torch.Tensor, torch.Tensor,
                                                                                         torch.Tensor, torch.Tensor]:
    """(grad_z, grad_a, grad_b, grad_c, grad_s, grad_t) of `hypernet_block`, recomputing the forward.

    With mean/std, grad_z is the gradient with respect to the raw rows x. Deterministic.
    Reference: emsedit_fast.reference.hypernet_block_backward (METHOD.md section 8.4).
    """
    n_rows, d_total = z.shape  # inputs checked by the ops layer (emsedit_fast/ops/hypernet_block.py)
    rank = a.shape[1]
    n_layers = s.shape[0]
    normalize = mean is not None
    if n_rows == 0:
        zeros = [torch.zeros_like(x) for x in (z, a, b, c, s, t)]
        return tuple(zeros)

    act = _rowgemm(z, a, (a.stride(0), 1), d_total, rank, mean=mean, std=std, norm_x=normalize)  # (N, r)
    p = _expand(act, b, c, s, t, idx, z, mean, std, relu_first, store_p=True)  # (N, D) pre-activation

    # Rows grouped by layer (stable: each layer's rows in their original order), without a host sync and with static
    # shapes (no bincount): offsets[l] = first position of layer l in the sorted index.
    sorted_idx, perm = torch.sort(idx, stable=True)
    offsets = torch.searchsorted(sorted_idx, torch.arange(n_layers + 1, dtype=idx.dtype, device=idx.device))
    grad_s = torch.empty_like(s)
    grad_t = torch.empty_like(t)
    pisum = torch.empty_like(s)
    cfg = _common.pick(**_PER_LAYER_CONFIG, BLOCK_N=n_rows, BLOCK_D=d_total)
    if n_layers:
        wrap_triton(_hypernet_block_bwd_kernel)[(n_layers, triton.cdiv(d_total, cfg["BLOCK_D"]))](
            grad_out, p, s, t, perm, offsets, grad_s, grad_t, pisum, d_total,
            grad_out.stride(0), p.stride(0), s.stride(0), RELU_FIRST=relu_first, **cfg)
    pi = p  # overwritten in place by the kernel above
    grad_c = pisum.sum(0)

    alpha = _rowgemm(pi, b, (1, b.stride(0)), d_total, rank)  # pi B^T (N, r)
    grad_z = _rowgemm(alpha, a, (1, a.stride(0)), rank, d_total, res=grad_out, std=std,
                      scale_out=normalize)  # (gamma + alpha A^T) [/ (std + eps)]
    grad_a = _wgrad(z, alpha, d_total, rank, mean=mean, std=std)  # z0^T alpha (D, r)
    grad_b = _wgrad(act, pi, rank, d_total)  # act^T pi (r, D)
    return grad_z, grad_a, grad_b, grad_c, grad_s, grad_t
