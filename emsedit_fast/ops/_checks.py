"""Building blocks of the ops' input checks: clear errors that name the op, the argument and what was expected.

Each public op runs exactly one check function (in its own module under emsedit_fast/ops/) before dispatch; the
Triton launchers rely on it and do not check again. The C++ kernels keep their own TORCH_CHECKs, because they can be
called through torch.ops directly. Checks look at shapes, dtypes, devices and strides only, never at values, so that
they cost no device synchronisation and torch.compile can trace them.
"""

from __future__ import annotations

import torch


def check(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"emsedit_fast.{op}: {msg}")


def shape(t: torch.Tensor) -> str:
    return "x".join(str(d) for d in t.shape) or "scalar"


def same_device(op: str, **tensors: torch.Tensor | None) -> None:
    devices = {name: str(t.device) for name, t in tensors.items() if t is not None}
    check(len(set(devices.values())) <= 1, op, f"all tensors must be on one device, got {devices}")


def dtype(op: str, allowed: tuple[torch.dtype, ...], **tensors: torch.Tensor | None) -> None:
    names = "/".join(str(d).replace("torch.", "") for d in allowed)
    for name, t in tensors.items():
        if t is not None:
            check(t.dtype in allowed, op, f"{name} must be {names}, got {str(t.dtype).replace('torch.', '')}")


def contiguous(op: str, **tensors: torch.Tensor | None) -> None:
    """For tensors the op writes in place (they cannot be replaced by a contiguous copy)."""
    for name, t in tensors.items():
        if t is not None:
            check(t.is_contiguous(), op, f"{name} must be contiguous (it is updated in place)")


def index(op: str, idx: torch.Tensor, n_rows: int) -> None:
    check(idx.dtype == torch.int64, op, f"idx must be int64, got {idx.dtype}")
    check(idx.dim() == 1 and idx.shape[0] == n_rows, op, f"idx must have shape ({n_rows},), got ({shape(idx)})")
