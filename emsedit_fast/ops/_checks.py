"""Argument checks shared by the public ops: clear errors that name the argument and what was expected."""

from __future__ import annotations

import torch


def check(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"emsedit_fast.{op}: {msg}")


def shape(t: torch.Tensor) -> str:
    return "x".join(str(d) for d in t.shape) or "scalar"


def same_device(op: str, **tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    check(len(set(devices.values())) <= 1, op, f"all tensors must be on one device, got {devices}")


def index(op: str, idx: torch.Tensor, n_rows: int, n_layers: int) -> None:
    check(idx.dtype == torch.int64, op, f"idx must be int64, got {idx.dtype}")
    check(idx.dim() == 1 and idx.shape[0] == n_rows, op, f"idx must have shape ({n_rows},), got ({shape(idx)})")
