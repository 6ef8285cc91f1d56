"""Backend selection for every op: declared support, explained refusals, recorded choices.

Precedence of the requested backend: the per-call `backend=` argument, then `with use_backend(...)`, then the
environment variable EMSEDIT_FAST_BACKEND, then "auto". Values:

    auto       first backend of the device's priority list that can serve the call (cuda: triton, cpp, reference;
               cpu: cpp, reference; Triton is never chosen automatically on the CPU, where it only interprets)
    fast       like auto, but raise instead of falling back to the reference
    reference | cpp | triton   exactly that backend, or NotImplementedError listing every backend's reasons

Every dispatch is recorded: `with record_backends() as seen:` collects {op: {backend, ...}}.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from emsedit_fast import _ext

log = logging.getLogger(__name__)

BACKEND_NAMES = ("reference", "cpp", "triton")
REQUESTS = ("auto", "fast") + BACKEND_NAMES
ENV_VAR = "EMSEDIT_FAST_BACKEND"

_PRIORITY = {"cuda": ("triton", "cpp", "reference"), "cpu": ("cpp", "reference")}


def _cpp_unavailable() -> str | None:
    err = _ext.load_error()
    if err is not None:
        return f"emsedit_fast._C not built or not loadable ({err}); see python -m emsedit_fast.info"
    return None


def triton_unavailable() -> str | None:
    """None when Triton kernels can launch on some device here, else why not (checked without importing triton)."""
    from emsedit_fast import kernels

    return kernels.why_unavailable()


def interpreting() -> bool:
    """True when Triton runs through its CPU interpreter (TRITON_INTERPRET=1)."""
    from emsedit_fast import kernels

    return kernels.interpreting()


def cpp_has_kernel(op: str, device: str) -> bool:
    """True when the loaded _C registered an implementation of `op` for `device` (CPU or CUDA dispatch key)."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device)
    if key is None or _ext.load_error() is not None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"emsedit_fast::{op}", key)
    except RuntimeError:  # schema not registered
        return False


def _cpp_devices() -> frozenset[str]:
    return frozenset({"cpu", "cuda"}) if _ext.has_cuda() else frozenset({"cpu"})


def _triton_devices() -> frozenset[str]:
    return frozenset({"cpu", "cuda"}) if interpreting() else frozenset({"cuda"})


@dataclass(frozen=True)
class Backend:
    """What a backend can serve, and why it cannot when it cannot."""

    name: str
    devices: Callable[[], frozenset[str]]
    dtypes: frozenset[torch.dtype]
    deterministic: bool
    unavailable: Callable[[], str | None]

    def not_supported_reasons(self, *tensors: torch.Tensor) -> list[str]:
        why = self.unavailable()
        reasons = [why] if why else []
        devices = self.devices()
        for t in tensors:
            if t.device.type not in devices:
                reasons.append(f"device={t.device.type} (supported: {sorted(devices)})")
                break
        for t in tensors:
            if t.is_floating_point() and t.dtype not in self.dtypes:
                reasons.append(f"dtype={t.dtype} (supported: {sorted(str(d) for d in self.dtypes)})")
                break
        return reasons


_FLOATS = frozenset({torch.float32, torch.float64, torch.bfloat16, torch.float16})

BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", lambda: frozenset({"cpu", "cuda", "mps", "meta"}), _FLOATS, True, lambda: None),
    "cpp": Backend("cpp", _cpp_devices, _FLOATS, True, _cpp_unavailable),
    "triton": Backend("triton", _triton_devices, _FLOATS, True, triton_unavailable),
}

_CONTEXT_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar("emsedit_fast_backend", default=None)
_RECORDERS: contextvars.ContextVar[tuple[dict, ...]] = contextvars.ContextVar("emsedit_fast_recorders", default=())
_LOGGED: set[tuple] = set()


def _check_request(name: str, where: str) -> str:
    if name not in REQUESTS:
        raise ValueError(f"{where}: unknown backend {name!r}; choose one of {', '.join(REQUESTS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Within the block, ops without an explicit `backend=` use `name`."""
    token = _CONTEXT_BACKEND.set(_check_request(name, "use_backend"))
    try:
        yield
    finally:
        _CONTEXT_BACKEND.reset(token)


@contextlib.contextmanager
def record_backends():
    """Collect {op: set of backends that ran} for every op dispatched inside the block."""
    seen: dict[str, set[str]] = {}
    token = _RECORDERS.set(_RECORDERS.get() + (seen,))
    try:
        yield seen
    finally:
        _RECORDERS.reset(token)


def requested_backend(backend: str | None = None) -> str:
    """Resolve the request by precedence: argument, context, environment, auto."""
    if backend is not None:
        return _check_request(backend, "backend=")
    ctx = _CONTEXT_BACKEND.get()
    if ctx is not None:
        return ctx
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_request(env, ENV_VAR)
    return "auto"


def _describe(tensors) -> str:
    return ", ".join(f"{tuple(t.shape)}:{str(t.dtype).replace('torch.', '')}@{t.device.type}" for t in tensors)


def select(op: str, impls: dict[str, Callable], tensors: tuple[torch.Tensor, ...], backend: str | None = None,
           extra_reasons: Callable[[str], list[str]] | None = None) -> tuple[str, Callable]:
    """Choose the backend for one call of `op`; record it; return (name, implementation).

    impls maps backend name -> callable. tensors are the inputs whose device and dtype decide. extra_reasons(name)
    may add op-specific refusals (shape limits, say).
    """
    request = requested_backend(backend)
    device = tensors[0].device.type if tensors else "cpu"

    def reasons(name: str) -> list[str]:
        if name not in impls:
            return [f"{op} has no {name} implementation"]
        out = BACKENDS[name].not_supported_reasons(*tensors)
        if name == "cpp" and not out and not cpp_has_kernel(op, device):
            out.append(f"emsedit_fast._C has no {device} kernel for {op}")
        if extra_reasons is not None:
            out += extra_reasons(name)
        return out

    if request in BACKEND_NAMES:
        candidates = (request,)
    else:
        candidates = tuple(n for n in _PRIORITY.get(device, ("reference",)) if request == "auto" or n != "reference")
    for name in candidates:
        if not reasons(name):
            _record(op, name, device, tensors)
            return name, impls[name]
    detail = "; ".join(f"{n}: {', '.join(reasons(n)) or 'ok'}" for n in BACKEND_NAMES)
    raise NotImplementedError(
        f"{op}: no backend can serve backend={request!r} for inputs [{_describe(tensors)}]. Reasons: {detail}"
    )


def _record(op: str, name: str, device: str, tensors) -> None:
    for seen in _RECORDERS.get():
        seen.setdefault(op, set()).add(name)
    key = (op, name, device, tensors[0].dtype if tensors else None)
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.debug("emsedit_fast.%s -> %s backend on %s (%s)", op, name, device, key[3])


def availability(device: str = "cpu") -> dict[str, str | None]:
    """{backend: None if it can run on `device`, else why not}, for `python -m emsedit_fast.info`."""
    out = {}
    for name, b in BACKENDS.items():
        why = b.unavailable()
        if why is None and device not in b.devices():
            why = f"device {device} not supported (supported: {sorted(b.devices())})"
        out[name] = why
    return out
