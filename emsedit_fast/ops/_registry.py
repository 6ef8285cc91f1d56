"""How the ops layer reaches the compiled backends.

C++ ops live under torch.ops.emsedit_fast.<op> once `emsedit_fast._C` is loaded. Triton ops are registered with
`triton_op` as torch.ops.emsedit_fast.triton_<op> when their module in `emsedit_fast.kernels` is imported; that import
is lazy, because importing Triton is slow and the interpreter flag must be set before it.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch


def cpp(op: str) -> Callable:
    """The C++ implementation of `op` (resolved at call time)."""

    def call(*args):
        return getattr(torch.ops.emsedit_fast, op)(*args)

    call.__name__ = f"cpp_{op}"
    return call


def triton(stem: str, op: str) -> Callable:
    """The Triton implementation of `op`, imported from emsedit_fast.kernels.<stem> on first use."""

    def call(*args):
        importlib.import_module(f"emsedit_fast.kernels.{stem}")
        return getattr(torch.ops.emsedit_fast, f"triton_{op}")(*args)

    call.__name__ = f"triton_{op}"
    return call


def register_autograd(qualname: str, backward: Callable, setup_context: Callable) -> None:
    """Attach autograd to a registered custom op, once."""
    key = (qualname, backward)
    if key in _DONE:
        return
    torch.library.register_autograd(qualname, backward, setup_context=setup_context)
    _DONE.add(key)


_DONE: set = set()

