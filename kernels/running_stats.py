"""Triton kernels of the running normaliser (reference: emsedit_fast/reference/running_stats.py; docs/method.md,
"Running normaliser").

Rows are x = [u | delta]: keys (m, d_in) fill columns [0, d_in), value-grads (m, d_out) columns [d_in, D). The
kernels read both tensors in place through two masked loads per column block; the concatenation is never
materialised (one read of each input, no (m, D) copy).

update_, two kernels:
  1. `_running_stats_update_fwd_kernel`, grid (column blocks, row splits): two-pass mean and M2 = sum (x - xbar)^2
     of one slice of rows per program, in fp32, into (splits, D) workspaces. Two passes rather than sum / sum of
     squares, because key columns of LLMs can have means far larger than their spread.
  2. `_running_stats_update_merge_kernel`, grid (column blocks,): in fp64, merges the slices (Chan, Golub and LeVeque),
     then the batch into the running (count, mean, var, std), exactly the reference's formula. The launcher adds m to
     the count afterwards, in stream order, because every program reads the old count.
normalize: `_running_stats_normalize_fwd_kernel`, Z = (x - mean) / (std + eps) into a new (m, D) fp32 tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op
from torch.library import wrap_triton

from . import _common
from ._common import upcast_fp32


@triton.jit
def _load_rows(keys_ptr, vgrads_ptr, rows, cols, row_ok, d_in, d_total, stride_km, stride_vm):
    """x[rows, cols] of the virtual [keys | value_grads] as fp32; 0 where out of range."""
    is_key = cols < d_in  # (BLOCK_D,)
    is_val = (cols >= d_in) & (cols < d_total)
    k = tl.load(keys_ptr + rows[:, None] * stride_km + cols[None, :],
                mask=row_ok[:, None] & is_key[None, :], other=0.0)
    v = tl.load(vgrads_ptr + rows[:, None] * stride_vm + (cols - d_in)[None, :],
                mask=row_ok[:, None] & is_val[None, :], other=0.0)
    return tl.where(is_key[None, :], upcast_fp32(k), upcast_fp32(v))  # (BLOCK_M, BLOCK_D)


@triton.jit
def _running_stats_update_fwd_kernel(
    keys_ptr,  # (m, d_in) any float dtype, row stride stride_km, unit column stride
    vgrads_ptr,  # (m, d_out) any float dtype, row stride stride_vm
    part_mean_ptr,  # (splits, D) fp32 out: mean of each slice of rows
    part_m2_ptr,  # (splits, D) fp32 out: sum of squared deviations from that mean
    n_rows,  # m
    d_in,  # columns taken from keys
    d_total,  # D = d_in + d_out
    rows_per_split,  # rows of one slice (the last slice may be shorter)
    stride_km,
    stride_vm,
    BLOCK_M: tl.constexpr,  # rows per step of the row loop
    BLOCK_D: tl.constexpr,  # columns per program
):
    pid_d = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, n_rows)
    count = tl.cast(row_end - row_start, tl.float32)

    # Pass 1: column sums. A (BLOCK_M, BLOCK_D) accumulator keeps BLOCK_M partial sums per column (less rounding).
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = (r0 + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: offsets can pass 2^31
        acc += _load_rows(keys_ptr, vgrads_ptr, rows, cols, rows < row_end, d_in, d_total, stride_km, stride_vm)
    mean = tl.sum(acc, axis=0) / count  # (BLOCK_D,)

    # Pass 2: squared deviations from the slice mean (the rows are read again; they are usually still in L2).
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = (r0 + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: offsets can pass 2^31
        row_ok = rows < row_end
        x = _load_rows(keys_ptr, vgrads_ptr, rows, cols, row_ok, d_in, d_total, stride_km, stride_vm)
        dev = tl.where(row_ok[:, None], x - mean[None, :], 0.0)
        acc += dev * dev
    m2 = tl.sum(acc, axis=0)

    col_ok = cols < d_total
    tl.store(part_mean_ptr + split * d_total + cols, mean, mask=col_ok)
    tl.store(part_m2_ptr + split * d_total + cols, m2, mask=col_ok)


@triton.jit
def _running_stats_update_merge_kernel(
    count_ptr,  # (1,) fp64: rows seen before this update (read only here; the launcher adds m afterwards)
    mean_ptr,  # (D,) fp32 running mean, updated in place
    var_ptr,  # (D,) fp32 running population variance, updated in place
    std_ptr,  # (D,) fp32 running sample std, updated in place
    part_mean_ptr,  # (splits, D) fp32 slice means from the update kernel
    part_m2_ptr,  # (splits, D) fp32 slice M2
    n_rows,  # m, rows of this update
    d_total,  # D
    n_splits,
    rows_per_split,
    BLOCK_D: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d_total

    # Merge the slices into the batch statistics (xbar, M2_b), in fp64, in a fixed order (deterministic).
    n_b = tl.zeros((BLOCK_D,), dtype=tl.float64)
    xbar = tl.zeros((BLOCK_D,), dtype=tl.float64)
    m2_b = tl.zeros((BLOCK_D,), dtype=tl.float64)
    for sp in range(0, n_splits):
        n_s = tl.cast(tl.minimum(rows_per_split, n_rows - sp * rows_per_split), tl.float64)
        mean_s = tl.load(part_mean_ptr + sp * d_total + cols, mask=col_ok, other=0.0).to(tl.float64)
        m2_s = tl.load(part_m2_ptr + sp * d_total + cols, mask=col_ok, other=0.0).to(tl.float64)
        n_ab = n_b + n_s
        delta = mean_s - xbar
        xbar = xbar + delta * (n_s / n_ab)
        m2_b = m2_b + m2_s + delta * delta * (n_b * n_s / n_ab)
        n_b = n_ab

    # Merge the batch into the running state: the reference formula, term by term, in fp64.
    n_old = tl.load(count_ptr)
    m = tl.cast(n_rows, tl.float64)  # tl.cast: an int argument equal to 1 arrives as a constexpr
    n_new = n_old + m
    mu = tl.load(mean_ptr + cols, mask=col_ok, other=0.0).to(tl.float64)
    var = tl.load(var_ptr + cols, mask=col_ok, other=0.0).to(tl.float64)
    d = xbar - mu
    m2 = var * n_old + m2_b + d * d * (n_old * m / n_new)  # v_b * m == M2_b
    tl.store(mean_ptr + cols, (mu + d * (m / n_new)).to(tl.float32), mask=col_ok)
    tl.store(var_ptr + cols, (m2 / tl.maximum(n_new, 1.0)).to(tl.float32), mask=col_ok)
    tl.store(std_ptr + cols, tl.sqrt(m2 / (n_new - 1.0 + 1e-8)).to(tl.float32), mask=col_ok)


@triton.jit
def _running_stats_normalize_fwd_kernel(
    keys_ptr,  # (m, d_in) any float dtype
    vgrads_ptr,  # (m, d_out) any float dtype
    mean_ptr,  # (D,) fp32
    std_ptr,  # (D,) fp32
    out_ptr,  # (m, D) fp32 out, row stride stride_om
    eps,  # fp32 denominator guard (2^-23 by default)
    n_rows,
    rows_bucket,  # next power of two >= n_rows: the autotune key (one tuning per bucket, not per batch size)
    d_in,
    d_total,
    stride_km,
    stride_vm,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Bytes: reads each input element once (2-4 B) and writes 4 B of Z; no concatenated copy of x.
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: offsets can pass 2^31
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < d_total
    x = _load_rows(keys_ptr, vgrads_ptr, rows, cols, row_ok, d_in, d_total, stride_km, stride_vm)
    mu = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
    sd = tl.load(std_ptr + cols, mask=col_ok, other=1.0)
    z = (x - mu[None, :]) / (sd + eps)[None, :]  # the reference's order: (x - mean) / (std + eps)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], z, mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------------
# Launch configurations. The update is in place (through the merge), so it is not autotuned.

_B = _common.INTERPRET_BLOCK
_UPDATE_CONFIG = dict(interpret=dict(BLOCK_M=_B, BLOCK_D=_B), cuda=dict(BLOCK_M=32, BLOCK_D=128, num_warps=4))
_MERGE_CONFIG = dict(interpret=dict(BLOCK_D=_B), cuda=dict(BLOCK_D=256, num_warps=4))
_NORMALIZE = _common.autotuned(
    _running_stats_normalize_fwd_kernel,
    configs=[_common.config(BLOCK_M=32, BLOCK_D=128, num_warps=4),
             _common.config(BLOCK_M=64, BLOCK_D=128, num_warps=8),
             _common.config(BLOCK_M=16, BLOCK_D=256, num_warps=4)],
    key=["rows_bucket", "d_total"],
    interpret=dict(BLOCK_M=_B, BLOCK_D=_B),
)


def row_splits(n_rows: int, block_m: int, col_blocks: int, device: torch.device) -> tuple[int, int]:
    """(n_splits, rows_per_split) of the update's first kernel: slices of rows whose statistics the merge combines.

    On CUDA the rows are split only when there are too few column blocks to fill the GPU (about 4 programs per SM).
    Under the interpreter every slice holds two row tiles, so the tests run the split and the Chan-Golub-LeVeque merge
    of several slices whenever they have more than 2 * BLOCK_M rows. The split changes only the merge order of exact
    partial statistics, not the result's meaning.
    """
    if _common.INTERPRET:
        rows_per_split = 2 * block_m
    else:
        target = 4 * _common.sm_count(device)
        n_splits = max(1, min(_common.cdiv(n_rows, 4 * block_m), target // col_blocks))
        rows_per_split = _common.cdiv(n_rows, n_splits)
    return _common.cdiv(n_rows, rows_per_split), rows_per_split


@triton_op("emsedit_fast::triton_running_stats_update_", mutates_args={"count", "mean", "var", "std"})
def running_stats_update_(count: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, std: torch.Tensor,
                          keys: torch.Tensor, value_grads: torch.Tensor) -> None:
    """Merge rows [keys | value_grads] into (count (1,) fp64, mean, var, std (D,) fp32), in place.

    Reference: emsedit_fast.reference.running_stats_update_.
    """
    n_rows, d_total = keys.shape[0], keys.shape[1] + value_grads.shape[1]  # inputs checked by the ops layer

    cfg = _common.pick(**_UPDATE_CONFIG, BLOCK_M=n_rows, BLOCK_D=d_total)
    col_blocks = _common.cdiv(d_total, cfg["BLOCK_D"])
    n_splits, rows_per_split = row_splits(n_rows, cfg["BLOCK_M"], col_blocks, keys.device)
    part_mean = torch.empty((n_splits, d_total), dtype=torch.float32, device=keys.device)
    part_m2 = torch.empty_like(part_mean)
    wrap_triton(_running_stats_update_fwd_kernel)[(col_blocks, n_splits)](
        keys, value_grads, part_mean, part_m2, n_rows, keys.shape[1], d_total, rows_per_split,
        keys.stride(0), value_grads.stride(0), **cfg)
    mcfg = _common.pick(**_MERGE_CONFIG, BLOCK_D=d_total)
    wrap_triton(_running_stats_update_merge_kernel)[(_common.cdiv(d_total, mcfg["BLOCK_D"]),)](
        count, mean, var, std, part_mean, part_m2, n_rows, d_total, n_splits, rows_per_split, **mcfg)
    count.add_(float(n_rows))  # after the merge in stream order: every program above read the old count


@triton_op("emsedit_fast::triton_running_stats_normalize", mutates_args={})
def running_stats_normalize(keys: torch.Tensor, value_grads: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                            eps: float) -> torch.Tensor:
    """Z = ([keys | value_grads] - mean) / (std + eps): a new (m, D) fp32 tensor.

    Reference: emsedit_fast.reference.running_stats_normalize.
    """
    n_rows, d_total = keys.shape[0], keys.shape[1] + value_grads.shape[1]  # inputs checked by the ops layer
    out = torch.empty((n_rows, d_total), dtype=torch.float32, device=keys.device)
    if n_rows == 0 or d_total == 0:
        return out

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_M"]), triton.cdiv(d_total, meta["BLOCK_D"]))

    wrap_triton(_NORMALIZE.kernel)[grid](
        keys, value_grads, mean, std, out, eps, n_rows, _common.bucket(n_rows), keys.shape[1], d_total,
        keys.stride(0), value_grads.stride(0), out.stride(0), **_NORMALIZE.launch_meta(BLOCK_M=n_rows, BLOCK_D=d_total))
    return out
