"""Public running-normaliser ops (reference: emsedit_fast.reference.running_stats)."""

from __future__ import annotations

import torch

from emsedit_fast import _ext
from emsedit_fast import reference
from emsedit_fast.ops import _checks
from emsedit_fast.ops import _registry
from emsedit_fast.ops._dispatch import select
from emsedit_fast.reference.running_stats import EPS

_UPDATE = {
    "reference": reference.running_stats_update_,
    "cpp": _registry.cpp("running_stats_update_"),
    "triton": _registry.triton("running_stats", "running_stats_update_"),
}
_NORMALIZE = {
    "reference": reference.running_stats_normalize,
    "cpp": _registry.cpp("running_stats_normalize"),
    "triton": _registry.triton("running_stats", "running_stats_normalize"),
}

if _ext.load_error() is None:

    # Fake (meta) kernel: shapes and dtypes only, so FakeTensor tracing and torch.compile can see through the C++ op.
    # (running_stats_update_ only mutates its state and returns nothing.)
    @torch.library.register_fake("emsedit_fast::running_stats_normalize")
    def _running_stats_normalize_fake(keys, value_grads, mean, std, eps):
        return keys.new_empty(keys.shape[0], keys.shape[1] + value_grads.shape[1], dtype=torch.float32)  # Z (m, D)


def _check_rows(op, keys, value_grads, mean):
    _checks.check(keys.dim() == 2 and value_grads.dim() == 2, op,
                  f"keys and value_grads must be 2-D (rows x features), got {_checks.shape(keys)} and "
                  f"{_checks.shape(value_grads)}")
    _checks.check(keys.shape[0] == value_grads.shape[0], op,
                  f"keys and value_grads must have the same number of rows, got {keys.shape[0]} and "
                  f"{value_grads.shape[0]}")
    d = keys.shape[1] + value_grads.shape[1]
    _checks.check(mean.shape == (d,), op,
                  f"statistics must have shape ({d},) = d_in + d_out, got ({_checks.shape(mean)})")
    _checks.same_device(op, keys=keys, value_grads=value_grads, mean=mean)


def running_stats_update_(count: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, std: torch.Tensor,
                          keys: torch.Tensor, value_grads: torch.Tensor, *, backend: str | None = None) -> None:
    """Merge the rows [keys | value_grads] into the running (count, mean, var, std), in place.

    count: (1,) float64; mean, var, std: (D,) fp32, D = d_in + d_out. Mutated.
    keys: (m, d_in), value_grads: (m, d_out), fp32/bf16/fp16, m >= 1. The concatenation is never materialised by
    the fast paths. Parallel merge of Chan, Golub and LeVeque: the result does not depend on how rows are batched.
    Reference: emsedit_fast.reference.running_stats_update_.
    """
    op = "running_stats_update_"
    _check_rows(op, keys, value_grads, mean)
    _checks.check(keys.shape[0] >= 1, op, "needs at least one row")
    _checks.check(count.dtype == torch.float64 and count.shape == (1,), op, "count must be a (1,) float64 tensor")
    for name, t in (("mean", mean), ("var", var), ("std", std)):
        _checks.check(t.dtype == torch.float32 and t.shape == mean.shape, op, f"{name} must be ({mean.shape[0]},) fp32")
    _, fn = select(op, _UPDATE, (keys, value_grads, mean), backend)
    fn(count, mean, var, std, keys.contiguous(), value_grads.contiguous())


def running_stats_normalize(keys: torch.Tensor, value_grads: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                            eps: float = EPS, *, backend: str | None = None) -> torch.Tensor:
    """Z = ([keys | value_grads] - mean) / (std + eps) as a new (m, D) fp32 tensor.

    keys: (m, d_in), value_grads: (m, d_out); mean, std: (D,) fp32. eps defaults to 2^-23.
    Reference: emsedit_fast.reference.running_stats_normalize.
    """
    op = "running_stats_normalize"
    _check_rows(op, keys, value_grads, mean)
    _, fn = select(op, _NORMALIZE, (keys, value_grads, mean), backend)
    return fn(keys.contiguous(), value_grads.contiguous(), mean, std, float(eps))
