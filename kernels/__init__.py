"""Triton kernels of emsedit_fast, installed as `emsedit_fast.kernels` (docs/architecture.md, "Ops layer").

Importing this package does not import triton. Each op stem (emsedit_fast.ops.STEMS) lives in its own module;
importing one of them imports triton and registers its ops as torch.ops.emsedit_fast.triton_<op>
(`torch.library.triton_op`). The ops layer (emsedit_fast.ops._dispatch.triton_impl) does that lazily, on first use.
The launchers take inputs already validated by the op's check in emsedit_fast/ops/<stem>.py and do not check again.

On a machine without a GPU the kernels run only through Triton's interpreter, and TRITON_INTERPRET=1 must be in the
environment before triton is imported (the flag is read when `@triton.jit` decorates).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _yield_top_level_name() -> None:
    """Hand the name `kernels` to the distribution that owns it.

    This folder is installed as `emsedit_fast.kernels`. It is importable as a top-level `kernels` only when the
    checkout's root is on sys.path (`python -m ...` or pytest started there), and then it shadows any installed
    package of that name: transformers imports Hugging Face's `kernels` (a dependency of recent releases) while
    loading a model, and would fail on this folder. So when imported under that name, load the installed package in
    its place (the import statement returns what sys.modules holds after this module ran); without one, stay."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    others = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("kernels", others)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["kernels"]
        raise


if __name__ == "kernels":
    _yield_top_level_name()


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1: kernels run on CPU tensors through Triton's numpy interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable() -> str | None:
    """None when the Triton kernels can launch here, else a sentence saying why not and what to do."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'emsedit_fast[triton]')"
    if interpreting():
        triton = sys.modules.get("triton")
        knobs = getattr(triton, "knobs", None) if triton is not None else None
        if knobs is not None and not knobs.runtime.interpret:
            return ("TRITON_INTERPRET=1 was set after triton had been imported; set it before starting Python "
                    "(TRITON_INTERPRET=1 pytest -m interpret)")
        return None
    import torch  # deferred: keeps `import emsedit_fast.kernels` cheap

    if not torch.cuda.is_available():
        return "no CUDA device, and TRITON_INTERPRET=1 was not set before triton was imported"
    return None


def is_available() -> bool:
    """True when `why_unavailable()` has nothing to report."""
    return why_unavailable() is None


__all__ = ["interpreting", "is_available", "why_unavailable"]
