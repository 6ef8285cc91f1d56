"""Building blocks of the ops' input checks: clear errors that name the op, the argument and what was expected.

Each public op runs exactly one check function (in its own module under emsedit_fast/ops/) before dispatch; the
Triton launchers rely on it and do not check again. The C++ kernels keep their own TORCH_CHECKs, because they can be
called through torch.ops directly. Checks look at shapes, dtypes, devices and strides only, never at values, so that
they cost no device synchronisation and torch.compile can trace them.
"""

from __future__ import annotations

from typing import Callable

import torch


def check(cond: bool, op: str, msg: str | Callable[[], str]) -> None:
    """Raise ValueError('emsedit_fast.<op>: <msg>') unless cond. msg may be a callable: messages that format shapes
    are built only on failure, so a passing check costs next to nothing (ops are called in tight loops)."""
    if not cond:
        raise ValueError(f"emsedit_fast.{op}: {msg() if callable(msg) else msg}")


def shape(t: torch.Tensor) -> str:
    return "x".join(str(d) for d in t.shape) or "scalar"


def same_device(op: str, **tensors: torch.Tensor | list[torch.Tensor] | None) -> None:
    """Every tensor (or every tensor of a list) on one device."""
    flat = [(name, t) for name, value in tensors.items() if value is not None
            for t in (value if isinstance(value, (list, tuple)) else [value])]
    if len({t.device for _, t in flat}) > 1:
        devices = {}
        for name, value in tensors.items():
            if isinstance(value, (list, tuple)):
                devices.update({f"{name}[{i}]": str(t.device) for i, t in enumerate(value)})
            elif value is not None:
                devices[name] = str(value.device)
        check(False, op, f"all tensors must be on one device, got {devices}")


def dtype(op: str, allowed: tuple[torch.dtype, ...], **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.dtype not in allowed:
            names = "/".join(str(d).replace("torch.", "") for d in allowed)
            check(False, op, f"{name} must be {names}, got {str(t.dtype).replace('torch.', '')}")


def contiguous(op: str, **tensors: torch.Tensor | None) -> None:
    """For tensors the op writes in place (they cannot be replaced by a contiguous copy)."""
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            check(False, op, f"{name} must be contiguous (it is updated in place)")


def index(op: str, idx: torch.Tensor, n_rows: int) -> None:
    check(idx.dtype == torch.int64, op, lambda: f"idx must be int64, got {idx.dtype}")
    check(idx.dim() == 1 and idx.shape[0] == n_rows, op, lambda: f"idx must have shape ({n_rows},), got ({shape(idx)})")
