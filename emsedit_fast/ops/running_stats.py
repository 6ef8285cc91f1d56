"""Public running-normaliser ops (reference: emsedit_fast.reference.running_stats).

NORM_EPS is the normaliser's denominator guard, z = (x - mean) / (std + NORM_EPS), shared by every backend and by
the normaliser folded into the first hypernetwork block (`hypernet_block(..., mean=, std=)`).
"""

from __future__ import annotations

import torch

from emsedit_fast import _ext
from emsedit_fast import reference
from emsedit_fast.ops import _checks
from emsedit_fast.ops._dispatch import cpp_impl
from emsedit_fast.ops._dispatch import select
from emsedit_fast.ops._dispatch import triton_impl
from emsedit_fast.reference.running_stats import EPS as NORM_EPS  # 2^-23, fp32 machine epsilon

_UPDATE = {
    "reference": reference.running_stats_update_,
    "cpp": cpp_impl("running_stats_update_"),
    "triton": triton_impl("running_stats", "running_stats_update_"),
}
_NORMALIZE = {
    "reference": reference.running_stats_normalize,
    "cpp": cpp_impl("running_stats_normalize"),
    "triton": triton_impl("running_stats", "running_stats_normalize"),
}

if _ext.load_error() is None:

    # Fake (meta) kernels: shapes and dtypes only, so FakeTensor tracing and torch.compile can see through the C++ ops.
    @torch.library.register_fake("emsedit_fast::running_stats_update_")
    def _running_stats_update_fake(count, mean, var, std, keys, value_grads):
        return None  # mutates count, mean, var, std in place; no outputs

    @torch.library.register_fake("emsedit_fast::running_stats_normalize")
    def _running_stats_normalize_fake(keys, value_grads, mean, std, eps):
        return keys.new_empty(keys.shape[0], keys.shape[1] + value_grads.shape[1], dtype=torch.float32)  # Z (m, D)


_ROW_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_rows(op, keys, value_grads, mean, std):
    _checks.check(keys.dim() == 2 and value_grads.dim() == 2, op,
                  lambda: f"keys and value_grads must be 2-D (rows x features), got {_checks.shape(keys)} and "
                  f"{_checks.shape(value_grads)}")
    _checks.check(keys.shape[0] == value_grads.shape[0], op,
                  lambda: f"keys and value_grads must have the same number of rows, got {keys.shape[0]} and "
                  f"{value_grads.shape[0]}")
    _checks.dtype(op, _ROW_DTYPES, keys=keys, value_grads=value_grads)
    d = keys.shape[1] + value_grads.shape[1]
    for name, t in (("mean", mean), ("std", std)):
        _checks.check(t.shape == (d,), op,
                      lambda: f"statistics must have shape ({d},) = d_in + d_out, got {name} ({_checks.shape(t)})")
    _checks.dtype(op, (torch.float32,), mean=mean, std=std)


def check_running_stats_update_(count, mean, var, std, keys, value_grads) -> None:
    """The input check of `running_stats_update_` (every backend relies on it)."""
    op = "running_stats_update_"
    _check_rows(op, keys, value_grads, mean, std)
    _checks.check(keys.shape[0] >= 1, op, "needs at least one row")
    _checks.check(count.dtype == torch.float64 and count.shape == (1,), op,
                  lambda: f"count must be a (1,) float64 tensor, got ({_checks.shape(count)}) {count.dtype}")
    _checks.check(var.shape == mean.shape and var.dtype == torch.float32, op,
                  lambda: f"var must be ({mean.shape[0]},) fp32, got ({_checks.shape(var)}) {var.dtype}")
    _checks.contiguous(op, count=count, mean=mean, var=var, std=std)
    _checks.same_device(op, count=count, mean=mean, var=var, std=std, keys=keys, value_grads=value_grads)


def check_running_stats_normalize(keys, value_grads, mean, std) -> None:
    """The input check of `running_stats_normalize`."""
    op = "running_stats_normalize"
    _check_rows(op, keys, value_grads, mean, std)
    _checks.same_device(op, keys=keys, value_grads=value_grads, mean=mean, std=std)


def running_stats_update_(count: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, std: torch.Tensor,
                          keys: torch.Tensor, value_grads: torch.Tensor, *, backend: str | None = None) -> None:
    """Merge the rows [keys | value_grads] into the running (count, mean, var, std), in place.

    count: (1,) float64; mean, var, std: (D,) fp32, D = d_in + d_out, contiguous. Mutated.
    keys: (m, d_in), value_grads: (m, d_out), fp32/bf16/fp16, m >= 1. The concatenation is never materialised by
    the fast paths. Parallel merge of Chan, Golub and LeVeque: the result does not depend on how rows are batched.
    Reference: emsedit_fast.reference.running_stats_update_.
    """
    check_running_stats_update_(count, mean, var, std, keys, value_grads)
    _, fn = select("running_stats_update_", _UPDATE, (keys, value_grads, mean), backend)
    fn(count, mean, var, std, keys.contiguous(), value_grads.contiguous())


def running_stats_normalize(keys: torch.Tensor, value_grads: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                            eps: float = NORM_EPS, *, backend: str | None = None) -> torch.Tensor:
    """Z = ([keys | value_grads] - mean) / (std + eps) as a new (m, D) fp32 tensor.

    keys: (m, d_in), value_grads: (m, d_out); mean, std: (D,) fp32. eps defaults to NORM_EPS = 2^-23.
    Reference: emsedit_fast.reference.running_stats_normalize.
    """
    check_running_stats_normalize(keys, value_grads, mean, std)
    _, fn = select("running_stats_normalize", _NORMALIZE, (keys, value_grads, mean), backend)
    return fn(keys.contiguous(), value_grads.contiguous(), mean.contiguous(), std.contiguous(), float(eps))
