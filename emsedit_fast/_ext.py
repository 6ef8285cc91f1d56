"""Soft import of the compiled extension `emsedit_fast._C`.

Importing `_C` runs its TORCH_LIBRARY registrations (the C++ ops appear under torch.ops.emsedit_fast). A missing or
broken build is not an error: the reference backend serves instead, and `python -m emsedit_fast.info` shows the
exception kept here, together with the record the build left next to `_C` (emsedit_fast/_build.json, written by
setup.py: the torch and C++ standard it built against, the CUDA toolkit, and why CUDA kernels or the whole extension
are missing).
"""

import json
import os

_C = None
_LOAD_ERROR: str | None = None

if os.environ.get("EMSEDIT_FAST_DISABLE_EXT", "0") == "1":
    _LOAD_ERROR = "disabled by EMSEDIT_FAST_DISABLE_EXT=1"
else:
    try:
        import torch  # noqa: F401  (libtorch must be loaded before the extension)

        from emsedit_fast import _C  # type: ignore[attr-defined,no-redef]
    except Exception as err:  # ImportError, undefined symbol, ABI mismatch, ...
        _LOAD_ERROR = f"{type(err).__name__}: {err}"


def load_error() -> str | None:
    """None when `_C` is loaded, else why not."""
    return _LOAD_ERROR


def build_record() -> dict:
    """What the last build of `_C` recorded (setup.py writes it, built or not), or {} when none is there."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def build_info() -> dict:
    """Compiler, flags, OpenMP threads and CUDA support of the loaded `_C` ({} when not loaded)."""
    if _C is None:
        return {}
    return dict(_C.build_info())


def has_cuda() -> bool:
    """True when `_C` was compiled with CUDA kernels."""
    return bool(build_info().get("cuda", False))
