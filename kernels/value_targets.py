"""Triton kernels of the value targets (reference: emsedit_fast/reference/value_targets.py; docs/method.md, "Value
targets" and "Meta-gradient").

    coeff_j = -eta[idx_j] * <u_j, u~_j>,   target_j = coeff_j * delta~_j,   z = [u~ | delta~] (N, D)

Forward, one kernel: each program owns BLOCK_N rows, reduces the row dots over d_in, then scales its rows of delta~.
Bytes: reads keys and z once (8 B per element of each), writes targets (4 B) and coeffs; no intermediate (N, d_in)
product and no separate scaling pass.

Backward, two kernels (deterministic, no float atomics):
  1. `_value_targets_bwd_kernel`: per row, dots = <u, u~> and g = <P, delta~> (+ dL/dcoeff), then
     grad_z = [(-eta g) u | coeff P] and the per-row contribution e_j = -g_j dots_j to dL/deta.
  2. `_value_targets_eta_bwd_kernel`: grid (L,): dL/deta_l = sum of e_j over rows j with idx_j = l, in row order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op
from torch.library import wrap_triton

from . import _common


@triton.jit
def _row_dots(a_ptr, b_ptr, rows, row_ok, n_cols, stride_am, stride_bm, BLOCK_K: tl.constexpr):
    """sum_k a[rows, k] * b[rows, k] over k < n_cols (unit column strides): (BLOCK_N,) fp32."""
    acc = tl.zeros((rows.shape[0], BLOCK_K), dtype=tl.float32)
    for k0 in range(0, n_cols, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        a = tl.load(a_ptr + rows[:, None] * stride_am + cols[None, :], mask=mask, other=0.0)
        b = tl.load(b_ptr + rows[:, None] * stride_bm + cols[None, :], mask=mask, other=0.0)
        acc += a * b
    return tl.sum(acc, axis=1)


@triton.jit
def _value_targets_fwd_kernel(
    keys_ptr,  # (N, d_in) fp32 raw keys u, row stride stride_km
    z_ptr,  # (N, D) fp32 hypernetwork output [u~ | delta~], row stride stride_zm
    eta_ptr,  # (L,) fp32 step sizes
    idx_ptr,  # (N,) int64 layer of each row
    targets_ptr,  # (N, d_out) fp32 out, row stride stride_tm
    coeffs_ptr,  # (N,) fp32 out
    n_rows,
    rows_bucket,  # next power of two >= n_rows: the autotune key (one tuning per bucket, not per batch size)
    d_in,
    d_out,
    stride_km,
    stride_zm,
    stride_tm,
    BLOCK_N: tl.constexpr,  # rows per program
    BLOCK_K: tl.constexpr,  # columns per step of the column loops
):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # int64: offsets can pass 2^31
    row_ok = rows < n_rows
    dots = _row_dots(keys_ptr, z_ptr, rows, row_ok, d_in, stride_km, stride_zm, BLOCK_K)  # <u, u~> (BLOCK_N,)
    layer = tl.load(idx_ptr + rows, mask=row_ok, other=0)
    eta = tl.load(eta_ptr + layer, mask=row_ok, other=0.0)
    coeff = -eta * dots
    tl.store(coeffs_ptr + rows, coeff, mask=row_ok)
    for k0 in range(0, d_out, BLOCK_K):  # targets = coeff * delta~, delta~ = z[:, d_in:]
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (cols < d_out)[None, :]
        pg = tl.load(z_ptr + rows[:, None] * stride_zm + (d_in + cols)[None, :], mask=mask, other=0.0)
        tl.store(targets_ptr + rows[:, None] * stride_tm + cols[None, :], coeff[:, None] * pg, mask=mask)


@triton.jit
def _value_targets_bwd_kernel(
    grad_t_ptr,  # (N, d_out) fp32 P = dL/dtargets, row stride stride_gm
    grad_c_ptr,  # (N,) fp32 dL/dcoeffs (read only when HAS_GRAD_COEFFS)
    keys_ptr,  # (N, d_in) fp32 raw keys u
    z_ptr,  # (N, D) fp32 [u~ | delta~]
    eta_ptr,  # (L,) fp32
    idx_ptr,  # (N,) int64
    grad_z_ptr,  # (N, D) fp32 out, row stride stride_dzm
    contrib_ptr,  # (N,) fp32 out: -g_j <u_j, u~_j>, summed per layer by the eta kernel
    n_rows,
    rows_bucket,  # next power of two >= n_rows: the autotune key
    d_in,
    d_out,
    stride_gm,
    stride_km,
    stride_zm,
    stride_dzm,
    HAS_GRAD_COEFFS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # int64: offsets can pass 2^31
    row_ok = rows < n_rows
    dots = _row_dots(keys_ptr, z_ptr, rows, row_ok, d_in, stride_km, stride_zm, BLOCK_K)  # <u, u~>
    g = _row_dots(grad_t_ptr, z_ptr + d_in, rows, row_ok, d_out, stride_gm, stride_zm, BLOCK_K)  # <P, delta~>
    if HAS_GRAD_COEFFS:
        g += tl.load(grad_c_ptr + rows, mask=row_ok, other=0.0)
    layer = tl.load(idx_ptr + rows, mask=row_ok, other=0)
    eta = tl.load(eta_ptr + layer, mask=row_ok, other=0.0)
    coeff = -eta * dots
    scale_u = -eta * g  # dL/du~_j = -eta_i g_j u_j
    tl.store(contrib_ptr + rows, -g * dots, mask=row_ok)
    for k0 in range(0, d_in, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (cols < d_in)[None, :]
        u = tl.load(keys_ptr + rows[:, None] * stride_km + cols[None, :], mask=mask, other=0.0)
        tl.store(grad_z_ptr + rows[:, None] * stride_dzm + cols[None, :], scale_u[:, None] * u, mask=mask)
    for k0 in range(0, d_out, BLOCK_K):  # dL/ddelta~_j = coeff_j P_j
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (cols < d_out)[None, :]
        p = tl.load(grad_t_ptr + rows[:, None] * stride_gm + cols[None, :], mask=mask, other=0.0)
        tl.store(grad_z_ptr + rows[:, None] * stride_dzm + (d_in + cols)[None, :], coeff[:, None] * p, mask=mask)


@triton.jit
def _value_targets_eta_bwd_kernel(
    contrib_ptr,  # (N,) fp32 per-row contributions from the kernel above
    idx_ptr,  # (N,) int64
    grad_eta_ptr,  # (L,) fp32 out
    n_rows,
    BLOCK_N: tl.constexpr,
):
    # One program per layer scans every row in a fixed order: deterministic, and cheap (N values, L programs).
    layer = tl.program_id(0)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        mine = (tl.load(idx_ptr + rows, mask=row_ok, other=-1) == layer) & row_ok
        acc += tl.where(mine, tl.load(contrib_ptr + rows, mask=mine, other=0.0), 0.0)
    tl.store(grad_eta_ptr + layer, tl.sum(acc, axis=0))


_ROW_CONFIGS = [_common.config(BLOCK_N=16, BLOCK_K=128, num_warps=4),
                _common.config(BLOCK_N=32, BLOCK_K=128, num_warps=4),
                _common.config(BLOCK_N=8, BLOCK_K=256, num_warps=4)]
_B = _common.INTERPRET_BLOCK
_FWD = _common.autotuned(_value_targets_fwd_kernel, configs=_ROW_CONFIGS, key=["rows_bucket", "d_in", "d_out"],
                         interpret=dict(BLOCK_N=_B, BLOCK_K=_B))
_BWD = _common.autotuned(_value_targets_bwd_kernel, configs=_ROW_CONFIGS, key=["rows_bucket", "d_in", "d_out"],
                         interpret=dict(BLOCK_N=_B, BLOCK_K=_B))
_ETA_CONFIG = dict(interpret=dict(BLOCK_N=_B), cuda=dict(BLOCK_N=1024, num_warps=4))


def _row_grid(n_rows):
    return lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]),)


@triton_op("emsedit_fast::triton_value_targets", mutates_args={})
def value_targets(keys: torch.Tensor, z: torch.Tensor, eta: torch.Tensor,
                  idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets (N, d_out), coeffs (N,)) fp32. Reference: emsedit_fast.reference.value_targets."""
    n_rows, d_in = keys.shape  # inputs checked by the ops layer (emsedit_fast/ops/value_targets.py)
    d_out = z.shape[1] - d_in
    targets = torch.empty((n_rows, d_out), dtype=torch.float32, device=z.device)
    coeffs = torch.empty((n_rows,), dtype=torch.float32, device=z.device)
    if n_rows:
        wrap_triton(_FWD.kernel)[_row_grid(n_rows)](
            keys, z, eta, idx, targets, coeffs, n_rows, _common.bucket(n_rows), d_in, d_out, keys.stride(0),
            z.stride(0), targets.stride(0), **_FWD.launch_meta(BLOCK_N=n_rows, BLOCK_K=max(d_in, d_out)))
    return targets, coeffs


@triton_op("emsedit_fast::triton_value_targets_backward", mutates_args={})
def value_targets_backward(grad_targets: torch.Tensor, grad_coeffs: torch.Tensor | None, keys: torch.Tensor,
                           z: torch.Tensor, eta: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_z (N, D), grad_eta (L,)). Reference: emsedit_fast.reference.value_targets_backward."""
    n_rows, d_in = keys.shape  # inputs checked by the ops layer (emsedit_fast/ops/value_targets.py)
    d_out = z.shape[1] - d_in
    grad_z = torch.empty_like(z)
    grad_eta = torch.empty_like(eta)
    contrib = torch.empty((n_rows,), dtype=torch.float32, device=z.device)
    if n_rows:
        wrap_triton(_BWD.kernel)[_row_grid(n_rows)](
            grad_targets, grad_coeffs if grad_coeffs is not None else contrib, keys, z, eta, idx, grad_z, contrib,
            n_rows, _common.bucket(n_rows), d_in, d_out, grad_targets.stride(0), keys.stride(0), z.stride(0),
            grad_z.stride(0), HAS_GRAD_COEFFS=grad_coeffs is not None,
            **_BWD.launch_meta(BLOCK_N=n_rows, BLOCK_K=max(d_in, d_out)))
    if eta.shape[0]:
        wrap_triton(_value_targets_eta_bwd_kernel)[(eta.shape[0],)](
            contrib, idx, grad_eta, n_rows, **_common.pick(**_ETA_CONFIG, BLOCK_N=n_rows))
    return grad_z, grad_eta
