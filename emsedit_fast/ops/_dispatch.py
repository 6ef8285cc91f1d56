"""Backend selection for every op: declared support, explained refusals, recorded choices, and the callables that
reach each backend.

Precedence of the requested backend: the per-call `backend=` argument, then `with use_backend(...)`, then the
environment variable EMSEDIT_FAST_BACKEND, then "auto". Values:

    auto       first backend of the device's priority list that can serve the call (cuda: triton, cpp, reference;
               cpu: cpp, reference; Triton is never chosen automatically on the CPU, where it only interprets)
    fast       like auto, but raise instead of falling back to the reference
    reference | cpp | triton   exactly that backend, or NotImplementedError listing every backend's reasons

Every eager dispatch is recorded: `with record_backends() as seen:` collects {op: {backend, ...}}.

Under torch.compile the choice is made once, when the graph is traced: the environment-dependent parts (is _C loaded,
can Triton launch, is the request in a context or the environment) are evaluated eagerly at trace time through
`torch.compiler.assume_constant_result`, so a traced op is a plain call of its torch.ops.emsedit_fast operator and
`fullgraph=True` holds. Traced calls are not recorded.

How the backends are reached: C++ ops live under torch.ops.emsedit_fast.<op> once `emsedit_fast._C` is loaded
(`cpp_impl`); Triton ops are registered with `triton_op` as torch.ops.emsedit_fast.triton_<op> when their module in
`emsedit_fast.kernels` is imported (`triton_impl`). That import is lazy, because importing Triton is slow and the
interpreter flag must be set before it.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from emsedit_fast import _ext

log = logging.getLogger(__name__)

BACKEND_NAMES = ("reference", "cpp", "triton")
REQUESTS = ("auto", "fast") + BACKEND_NAMES
ENV_VAR = "EMSEDIT_FAST_BACKEND"

_PRIORITY = {"cuda": ("triton", "cpp", "reference"), "cpu": ("cpp", "reference")}

# Where the C++ backend hands an op's work to ATen, because the hand-written kernel lost to the plain PyTorch a
# competent engineer writes for the same algorithm (BENCHMARKS.md, "Fused vs competent PyTorch"). The op keeps its
# checks, schema and fake kernel; `python -m emsedit_fast.info` prints these lines. {(device, op): what runs}
CPP_ATEN_PATHS = {
    ("cpu", "restore_"): "ATen's multi-tensor copy (torch._foreach_copy_): faster than a parallel memcpy here",
    ("cpu", "apply_deltas_"): "fp32 weights: ATen W.addmm_(X^T, Y) per layer (bf16/fp16: the fused tiles, one "
                              "rounding)",
    ("cpu", "apply_deltas_dense_"): "fp32 Conv1D weights: ATen W.add_(S) per layer, S has W's layout (Linear, "
                                    "bf16/fp16: the fused transpose-add)",
}


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


_FLOATS = frozenset({torch.float32, torch.float64, torch.bfloat16, torch.float16})

BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", lambda: frozenset({"cpu", "cuda", "mps", "meta"}), _FLOATS, True, lambda: None),
    "cpp": Backend("cpp", _cpp_devices, _FLOATS, True, _cpp_unavailable),
    "triton": Backend("triton", _triton_devices, _FLOATS, True, triton_unavailable),
}

_CONTEXT_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar("emsedit_fast_backend", default=None)
_RECORDERS: contextvars.ContextVar[tuple[dict, ...]] = contextvars.ContextVar("emsedit_fast_recorders", default=())
_LOGGED: set[tuple] = set()


# ----------------------------------------------------------------------------------------------------------------------
# Callables that reach a backend's implementation of one op.


def cpp_impl(op: str) -> Callable:
    """The C++ implementation of `op`: torch.ops.emsedit_fast.<op>, resolved at call time."""

    def call(*args):
        return getattr(torch.ops.emsedit_fast, op)(*args)

    call.__name__ = f"cpp_{op}"
    return call


def triton_impl(stem: str, op: str, autograd: tuple[Callable, Callable] | None = None) -> Callable:
    """The Triton implementation of `op`: torch.ops.emsedit_fast.triton_<op>, registered by importing
    emsedit_fast.kernels.<stem> on first use. autograd: (backward, setup_context) to attach to that operator then."""
    if autograd is not None:
        _TRITON_AUTOGRAD[op] = autograd

    def call(*args):
        _load_triton(stem, op)
        return getattr(torch.ops.emsedit_fast, f"triton_{op}")(*args)

    call.__name__ = f"triton_{op}"
    return call


_TRITON_AUTOGRAD: dict[str, tuple[Callable, Callable]] = {}


def _constant_result(fn: Callable) -> Callable:
    """torch.compiler.assume_constant_result without importing torch._dynamo at module import: that import costs
    over a second and, from torch 2.13 on, imports Triton, which importing emsedit_fast must never do. Dynamo only
    reads a mark on the function at trace time; tests/test_build.py checks that this mark is the one the official
    decorator sets."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn



@_constant_result
def _load_triton(stem: str, op: str) -> bool:
    # Runs eagerly even while torch.compile traces (an import cannot be traced); the traced call is the operator.
    importlib.import_module(f"emsedit_fast.kernels.{stem}")
    if op in _TRITON_AUTOGRAD:
        register_autograd_once(f"emsedit_fast::triton_{op}", *_TRITON_AUTOGRAD[op])
    return True


def register_autograd_once(qualname: str, backward: Callable, setup_context: Callable) -> None:
    """Attach autograd to a registered custom op; later calls for the same op are no-ops."""
    if qualname in _AUTOGRAD_DONE:
        return
    torch.library.register_autograd(qualname, backward, setup_context=setup_context)
    _AUTOGRAD_DONE.add(qualname)


_AUTOGRAD_DONE: set[str] = set()


# ----------------------------------------------------------------------------------------------------------------------
# Requests and selection.


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
    may add op-specific refusals (shape limits, say); it must depend only on shapes, so that it can be traced.
    """
    compiling = torch.compiler.is_compiling()
    request = _traced_request(backend) if compiling else requested_backend(backend)
    device = tensors[0].device.type if tensors else "cpu"
    dtypes = tuple(sorted({str(t.dtype) for t in tensors if t.is_floating_point()}))
    # The choice depends only on (op, request, device, dtypes) when the op adds no shape limits and the backend's
    # support is fixed once imported (reference, C++): such choices are cached, which takes the selection off the
    # per-call cost of small ops (a few microseconds of a ~0.5 ms op at SmolLM2 shapes). A choice that weighed Triton
    # is not cached: its support follows the environment (TRITON_INTERPRET, the device) and is re-checked each call.
    key = (op, request, device, dtypes, tuple(impls)) if extra_reasons is None and not compiling else None
    name = _CHOSEN.get(key) if key is not None else None
    if name is not None:
        _record(op, name, device, tensors)
        return name, impls[name]

    def reasons(name: str) -> list[str]:
        if name not in impls:
            return [f"{op} has no {name} implementation"]
        out = list(_static_reasons(op, name, device, dtypes))
        if extra_reasons is not None:
            out += extra_reasons(name)
        return out

    if request in BACKEND_NAMES:
        candidates = (request,)
    else:
        candidates = tuple(n for n in _PRIORITY.get(device, ("reference",)) if request == "auto" or n != "reference")
    for name in candidates:
        if not reasons(name):
            if not compiling:
                _record(op, name, device, tensors)
                if key is not None and "triton" not in candidates[:candidates.index(name) + 1]:
                    _CHOSEN[key] = name
            return name, impls[name]
    detail = "; ".join(f"{n}: {', '.join(reasons(n)) or 'ok'}" for n in BACKEND_NAMES)
    raise NotImplementedError(
        f"{op}: no backend can serve backend={request!r} for inputs [{_describe(tensors)}]. Reasons: {detail}"
    )


@_constant_result
def _traced_request(backend: str | None) -> str:
    # The request as it stands when torch.compile traces the call (context variables cannot be traced).
    return requested_backend(backend)


@_constant_result
def _static_reasons(op: str, name: str, device: str, dtypes: tuple[str, ...]) -> tuple[str, ...]:
    """Why backend `name` cannot serve `op` for tensors on `device` with these floating dtypes ('torch.float32', ...):
    everything that depends on the installation, not on the data (a trace-time constant under torch.compile).
    Cached for the reference and C++ backends, whose support is fixed once _C is imported; Triton's depends on the
    environment (TRITON_INTERPRET, the device) and is evaluated every time."""
    key = (op, name, device, dtypes)
    cached = _STATIC_REASONS.get(key)
    if cached is not None:
        return cached
    b = BACKENDS[name]
    why = b.unavailable()
    out = [why] if why else []
    devices = b.devices()
    if device not in devices:
        out.append(f"device={device} (supported: {sorted(devices)})")
    supported = {str(d) for d in b.dtypes}
    unsupported = [d for d in dtypes if d not in supported]
    if unsupported:
        out.append(f"dtype={unsupported[0]} (supported: {sorted(supported)})")
    if name == "cpp" and not out and not cpp_has_kernel(op, device):
        out.append(f"emsedit_fast._C has no {device} kernel for {op}")
    if name != "triton":
        _STATIC_REASONS[key] = tuple(out)
    return tuple(out)


_STATIC_REASONS: dict[tuple, tuple[str, ...]] = {}


# {(op, request, device, floating dtypes, the backends the op implements): backend name}, see select
_CHOSEN: dict[tuple, str] = {}


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
