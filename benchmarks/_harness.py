"""Benchmark harness: cases from model presets, providers, the correctness gate, peak memory and bytes moved.

Every benchmark follows DESIGN.md section 7:

    inputs = spec.make(case, device)                    # emsedit_fast.testing factories, cached per case
    fn = provider_fn(spec, provider, inputs, ...)       # skips, with a reason, when the provider cannot serve
    gate(...)                                           # first call: correct against the reference, and the
                                                        # requested backend really ran (record_backends)
    peak memory                                         # CUDA allocator peak, or CPU RSS high-water mark
    benchmark.pedantic(fn, setup=inputs.reset, ...)     # in-place ops get an untimed restore before each round

Providers:
    reference           eager emsedit_fast.reference through the ops layer (backend="reference"): the denominator
    reference_compiled  torch.compile(emsedit_fast.reference.<op>), compiled before timing (skipped if it fails)
    foreach             torch._foreach_* multi-tensor baseline (apply_deltas_, apply_deltas_dense_, restore_)
    cpp                 the C++ kernels, forced with backend="cpp" (skipped while _C lacks the kernel)
    triton              the Triton kernels, timed only on CUDA (under TRITON_INTERPRET=1 with --smoke they run once
                        for correctness and are never used in ratios)

Peak memory. On CUDA: max_memory_allocated() minus the allocation before the call. On the CPU the allocator keeps no
peak, so the process's resident-set high-water mark is used: free heap memory is returned to the OS
(malloc_trim), /proc/self/clear_refs resets VmHWM to the current RSS, glibc's mmap threshold is lowered to 64 KiB
for that one call (so every sizeable buffer is a fresh mapping that
counts, and is returned to the OS when freed), and VmHWM - VmRSS(before) is the peak extra memory of the call,
outputs included. Outside that call the threshold is pinned at glibc's own ceiling (32 MiB), the steady state a
long-running process reaches anyway, so all providers time under the same allocator settings. Next to the measured
value each spec records an analytic workspace model (bytes of temporaries beyond inputs and outputs), documented in
BENCHMARKS.md; where the RSS probe is unavailable the model is all there is.

Bytes moved is the compulsory traffic of an op (inputs read once, outputs written once), the same number for every
provider, so GB/s is an effective bandwidth: the reference really moves several times more.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from types import SimpleNamespace
from typing import Any
from typing import Callable

import pytest
import torch

from emsedit_fast import ops
from emsedit_fast import reference
from emsedit_fast import testing
from emsedit_fast.ops._dispatch import BACKEND_NAMES
from emsedit_fast.ops._dispatch import cpp_has_kernel
from emsedit_fast.ops._dispatch import interpreting
from emsedit_fast.ops._dispatch import triton_unavailable

PROVIDERS = ("reference", "reference_compiled", "foreach", "cpp", "triton")
KERNEL_PROVIDERS = ("reference", "reference_compiled", "cpp", "triton")  # ops without a foreach formulation
ENGINE_PROVIDERS = ("reference", "cpp", "triton")  # editor-level benches: the engine with cfg.backend = provider

MiB = 1 << 20
GiB = 1 << 30

# ----------------------------------------------------------------------------------------------------------------------
# Settings (set once by conftest.py from the command line)


@dataclass
class Settings:
    smoke: bool = False
    device: str = "cpu"
    compiled: str = "primary"  # all | primary | none: which cases get a reference_compiled provider
    time_budget_s: float = 1.0  # target timed seconds per benchmark (rounds are chosen from the first call)
    max_rounds: int = 100
    cpu_flop_cap: float = 150e9  # ridge sweep: points whose cost model exceeds this are not run on the CPU
    loadavg_start: tuple[float, float, float] | None = None


SETTINGS = Settings()


def configure(*, smoke: bool, device: str, compiled: str) -> None:
    SETTINGS.loadavg_start = _loadavg()
    SETTINGS.smoke = smoke
    SETTINGS.device = device
    if compiled == "auto":
        compiled = "all" if device == "cuda" else ("none" if smoke else "primary")
    SETTINGS.compiled = compiled
    if device == "cpu":
        MALLOC.steady()


# ----------------------------------------------------------------------------------------------------------------------
# Machine and environment


def _loadavg() -> tuple[float, float, float] | None:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except OSError:
        return None


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return cpu_model()


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for dist in ("torch", "triton", "numpy", "transformers", "pytest", "pytest-benchmark", "emsedit_fast"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def git_revision() -> dict[str, Any]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, check=True).stdout.strip())
        return {"sha": sha, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"sha": "unknown", "dirty": None}


def environment(device: str) -> dict[str, Any]:
    """What the JSON and BENCHMARKS.md say about the machine and the build."""
    from emsedit_fast import _ext

    cpp_kernels = sorted(op for names in ops.OPS_BY_STEM.values() for op in names if cpp_has_kernel(op, device))
    return {
        "device": device,
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
        "git": git_revision(),
        "cpp_extension": _ext.load_error() or "loaded",
        "cpp_kernels": cpp_kernels,
        "triton": triton_unavailable() or ("interpreter" if interpreting() else "cuda"),
        "smoke": SETTINGS.smoke,
        "memory_probe": MALLOC.method if device == "cpu" else "cuda_allocator",
        # 1/5/15-minute load averages when the run started and when this was written: on a shared machine a load
        # above the core count means OpenMP barriers wait for descheduled threads, and timings inflate
        "loadavg_start": SETTINGS.loadavg_start,
        "loadavg_end": _loadavg(),
        "time_budget_s": SETTINGS.time_budget_s,
    }


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------------------
# CPU peak memory: RSS high-water mark with glibc's mmap threshold lowered for the measured call


class _Malloc:
    M_TRIM_THRESHOLD = -1
    M_MMAP_THRESHOLD = -3
    STEADY_MMAP = 32 * MiB  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: where its dynamic threshold ends up
    PROBE_MMAP = 64 * 1024

    def __init__(self):
        self.libc = None
        self.method = "analytic"
        try:
            libc = ctypes.CDLL("libc.so.6")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._status()
            self.libc = libc
            self.method = "rss_hwm"
        except (OSError, AttributeError, ValueError):
            pass

    @staticmethod
    def _status() -> tuple[int, int]:
        with open("/proc/self/status") as f:
            text = f.read()
        rss = int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) * 1024
        hwm = int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) * 1024
        return rss, hwm

    def steady(self) -> None:
        if self.libc is not None:
            self.libc.mallopt(self.M_MMAP_THRESHOLD, self.STEADY_MMAP)
            self.libc.mallopt(self.M_TRIM_THRESHOLD, 2 * self.STEADY_MMAP)

    def measure(self, fn: Callable[[], Any]) -> tuple[Any, int | None, float]:
        """(result, peak extra bytes or None, seconds) of one call."""
        if self.libc is None:
            start = time.perf_counter()
            out = fn()
            return out, None, time.perf_counter() - start
        self.libc.mallopt(self.M_MMAP_THRESHOLD, self.PROBE_MMAP)
        self.libc.mallopt(self.M_TRIM_THRESHOLD, self.PROBE_MMAP)
        # Give free heap memory back first: otherwise allocations served from retained (already resident) heap
        # pages would not raise the RSS, and the peak would be undercounted.
        self.libc.malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM <- VmRSS
            before, _ = self._status()
            start = time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - start
            _, hwm = self._status()
        finally:
            self.steady()
        return out, max(0, hwm - before), seconds


MALLOC = _Malloc()


def measure_call(fn: Callable[[], Any], device: str) -> tuple[Any, int | None, float, str]:
    """Run fn once; return (result, peak extra bytes, seconds, method)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return out, torch.cuda.max_memory_allocated() - base, seconds, "cuda_allocator"
    out, peak, seconds = MALLOC.measure(fn)
    return out, peak, seconds, MALLOC.method


# ----------------------------------------------------------------------------------------------------------------------
# Presets and cases


@dataclass(frozen=True)
class Preset:
    """One edited shape group of a model (METHOD.md 14.3 / 14.4)."""

    name: str
    d_in: int
    d_out: int
    layers: int  # edited layers in the group
    transposed: bool  # storage layout: GPT-2 Conv1D stores (d_in, d_out)
    rank: int  # hypernetwork rank r
    rows: int  # n: cached answer-token rows per layer in one sequential step
    source: str


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("tiny", 64, 128, 2, False, 8, 8, "tiny LLaMA gate/up (emsedit_fast.models.tiny, smoke only)"),
    Preset("tiny-gpt2", 256, 64, 2, True, 8, 8, "tiny GPT-2 c_proj, Conv1D (emsedit_fast.models.tiny, smoke only)"),
    Preset("smollm2-135m", 576, 1536, 11, False, 256, 64,
           "SmolLM2-135M gate_proj 10-14 + up_proj 17-22, one group (METHOD.md 14.4), r = 256"),
    Preset("smollm2-135m-down", 1536, 576, 11, False, 256, 64, "SmolLM2-135M down_proj shape (ridge sweep only)"),
    Preset("gpt2-xl", 6400, 1600, 6, True, 1024, 90, "GPT-2-XL c_proj of layers 6-11, Conv1D (METHOD.md 14.3)"),
    Preset("gptj-fc_out", 16384, 4096, 6, False, 1024, 90, "GPT-J-6B fc_out of layers 22-27 (METHOD.md 14.3)"),
    Preset("llama3-gate_up", 4096, 14336, 12, False, 1024, 90,
           "LLaMA-3-8B gate_proj 11-15 + up_proj 18-24, one group (METHOD.md 14.3)"),
    Preset("mistral7b-down", 14336, 4096, 3, False, 1024, 90, "Mistral-7B down_proj 17-19 (ridge sweep only)"),
)}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Case:
    """One benchmark input size. str(case) is its pytest id (and the `case` param in the JSON)."""

    preset: str
    layers: int
    rows: int
    dtype: str = "fp32"  # model weight dtype (ops that touch weights)
    transposed: bool | None = None  # None: the preset's own layout
    weights: bool = False  # whether dtype and layout belong in the id
    form: str | None = None  # ridge: "primal" / "dual"
    tag: str = ""  # anything else that distinguishes the case (e.g. "K2")
    primary: bool = False  # the case that gets reference_compiled on the CPU

    @property
    def p(self) -> Preset:
        return PRESETS[self.preset]

    @property
    def d_in(self) -> int:
        return self.p.d_in

    @property
    def d_out(self) -> int:
        return self.p.d_out

    @property
    def d(self) -> int:
        return self.p.d_in + self.p.d_out

    @property
    def rank(self) -> int:
        return self.p.rank

    @property
    def n_total(self) -> int:
        return self.layers * self.rows

    @property
    def layout_transposed(self) -> bool:
        return self.p.transposed if self.transposed is None else self.transposed

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def cut(self) -> bool:
        return self.layers < self.p.layers

    def __str__(self) -> str:
        layers = f"L{self.layers}of{self.p.layers}" if self.cut else f"L{self.layers}"
        parts = [self.preset, layers, f"n{self.rows}", f"{self.d_in}x{self.d_out}"]
        if self.weights:
            parts += ["conv1d" if self.layout_transposed else "linear", self.dtype]
        if self.form:
            parts.append(self.form)
        if self.tag:
            parts.append(self.tag)
        return "-".join(parts)

    def describe(self) -> dict[str, Any]:
        return {"preset": self.preset, "layers": self.layers, "preset_layers": self.p.layers, "cut": self.cut,
                "rows_per_layer": self.rows, "rows": self.n_total, "d_in": self.d_in, "d_out": self.d_out,
                "rank": self.rank, "dtype": self.dtype, "layout": "conv1d" if self.layout_transposed else "linear",
                "form": self.form}


CASES: dict[str, Case] = {}  # id -> case, filled by `cases`


def _case(preset: str, *, layers: int | None = None, rows: int | None = None, **kw) -> Case:
    p = PRESETS[preset]
    return Case(preset, p.layers if layers is None else layers, p.rows if rows is None else rows, **kw)


# Layers actually run on a CPU where the full group does not fit the time budget (said in the id: "L2of12").
# Everything else runs the preset's full group. On CUDA every group runs in full.
_CPU_LAYERS = {
    "apply": {"gptj-fc_out": 1, "llama3-gate_up": 1},
    "hypernet": {"gptj-fc_out": 2, "llama3-gate_up": 2},
    "ridge": {"gpt2-xl": 1, "gptj-fc_out": 1, "llama3-gate_up": 1},
    "editor": {"llama3-gate_up": 1},
}


def _layers(kind: str, preset: str, device: str) -> int:
    full = PRESETS[preset].layers
    if device == "cuda":
        return full
    return _CPU_LAYERS.get(kind, {}).get(preset, full)


# The ridge sweep (bench_ridge_form_sweep): d_in from these presets, n rows per layer, one layer.
SWEEP_PRESETS = ("smollm2-135m", "smollm2-135m-down", "llama3-gate_up", "mistral7b-down")
SWEEP_ROWS = (16, 64, 256, 1024, 4096, 8192)
RIDGE_TARGET = ("llama3-gate_up", 256)  # the target point: d_in 4096, d_out 14336, n 256
# Scaling sweeps of the editor step at SmolLM2 shapes.
SCALING_ROWS = (16, 64, 256, 1024, 4096)
SCALING_ROWS_CPU = (16, 64, 256, 1024)  # 4096 rows x 11 layers: ~0.4 TFLOP of hypernetwork per step, ~10 s a call
SCALING_LAYERS = (1, 2, 4, 8, 11)


def cases(family: str, *, smoke: bool, device: str) -> list[Case]:
    """The cases of one benchmark family for this run; registers each in CASES."""
    out = _smoke_cases(family) if smoke else _full_cases(family, device)
    for c in out:
        CASES[str(c)] = c
    return out


def _weights_cases(presets_layouts, device, kind="apply") -> list[Case]:
    out = []
    for preset, transposed in presets_layouts:
        for dtype in ("fp32", "bf16"):
            primary = preset == "smollm2-135m" and not transposed and dtype == "fp32"
            out.append(_case(preset, layers=_layers(kind, preset, device), dtype=dtype, transposed=transposed,
                             weights=True, primary=primary))
    return out


def _smoke_cases(family: str) -> list[Case]:
    tiny = [("tiny", False), ("tiny-gpt2", True)]
    if family in ("apply_deltas", "restore"):
        return [Case(p, PRESETS[p].layers, PRESETS[p].rows, dtype=dt, transposed=tr, weights=True,
                     primary=(p == "tiny" and dt == "fp32"))
                for p, tr in tiny for dt in ("fp32", "bf16")]
    if family == "apply_deltas_dense":
        return [_case("tiny", dtype=dt, weights=True, primary=dt == "fp32") for dt in ("fp32", "bf16")]
    if family in ("running_stats", "hypernet_block", "value_targets", "ridge", "ridge_backward"):
        return [_case("tiny", primary=True), _case("tiny-gpt2")]
    if family == "ridge_sweep":
        return [_case("tiny", layers=1, rows=n, form=f) for n in (16, 128) for f in ("primal", "dual")]
    if family in ("editor_work", "edit_step", "meta_train_step"):
        return [_case("tiny", tag="K2" if family != "editor_work" else "")]
    if family == "scaling_rows":
        return [_case("tiny", rows=n) for n in (16, 64)]
    if family == "scaling_layers":
        return [_case("tiny", layers=n) for n in (1, 2)]
    raise KeyError(family)


def _full_cases(family: str, device: str) -> list[Case]:
    if family == "apply_deltas":
        return _weights_cases([("smollm2-135m", False), ("smollm2-135m", True), ("gpt2-xl", True),
                               ("gptj-fc_out", False), ("llama3-gate_up", False)], device)
    if family == "restore":  # a copy: the layout does not matter
        return _weights_cases([("smollm2-135m", False), ("gpt2-xl", True), ("gptj-fc_out", False),
                               ("llama3-gate_up", False)], device)
    if family == "apply_deltas_dense":
        return _weights_cases([("smollm2-135m", False), ("gpt2-xl", True)], device)
    if family == "running_stats" or family == "value_targets":
        return [_case(p, primary=p == "smollm2-135m") for p in ("smollm2-135m", "gpt2-xl", "gptj-fc_out",
                                                                  "llama3-gate_up")]
    if family == "hypernet_block":
        return [_case(p, layers=_layers("hypernet", p, device), primary=p == "smollm2-135m")
                for p in ("smollm2-135m", "gpt2-xl", "gptj-fc_out", "llama3-gate_up")]
    if family == "ridge":
        return [_case(p, layers=_layers("ridge", p, device), primary=p == "smollm2-135m")
                for p in ("smollm2-135m", "gpt2-xl", "gptj-fc_out", "llama3-gate_up")]
    if family == "ridge_backward":
        return [_case(p, layers=_layers("ridge", p, device), primary=p == "smollm2-135m")
                for p in ("smollm2-135m", "llama3-gate_up")]
    if family == "ridge_sweep":
        return [_case(p, layers=1, rows=n, form=f) for p in SWEEP_PRESETS for n in SWEEP_ROWS
                for f in ("primal", "dual")]
    if family == "editor_work":
        return [_case("smollm2-135m"), _case("llama3-gate_up", layers=_layers("editor", "llama3-gate_up", device))]
    if family in ("edit_step", "meta_train_step"):
        return [_case("smollm2-135m", tag="K2")]
    if family == "scaling_rows":
        return [_case("smollm2-135m", rows=n) for n in (SCALING_ROWS if device == "cuda" else SCALING_ROWS_CPU)]
    if family == "scaling_layers":
        return [_case("smollm2-135m", layers=n) for n in SCALING_LAYERS]
    raise KeyError(family)


# ----------------------------------------------------------------------------------------------------------------------
# One-entry caches: inputs and reference results of the case being benchmarked (providers of a case run in a row)


class _OneEntry:
    def __init__(self):
        self.key = None
        self.value = None

    def get(self, key, make: Callable[[], Any]) -> Any:
        if key != self.key:
            self.key, self.value = None, None
            gc.collect()
            self.value = make()
            self.key = key
        return self.value

    def peek(self, key) -> Any:
        return self.value if key == self.key else None

    def put(self, key, value) -> None:
        self.key, self.value = key, value

    def clear(self) -> None:
        self.key, self.value = None, None


INPUTS = _OneEntry()
EXPECTED: dict[Any, Any] = {}  # (spec, case, gate key) -> reference result; cleared when the case changes


def _expected_scope(key) -> None:
    stale = [k for k in EXPECTED if k[:2] != key[:2]]
    for k in stale:
        del EXPECTED[k]


# ----------------------------------------------------------------------------------------------------------------------
# Op specs: how to build inputs, call each provider, compare, and count bytes, FLOP and workspace


def _clone_all(ts) -> list[torch.Tensor]:
    return [t.detach().clone() for t in ts]


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


class OpSpec:
    """Base class: subclasses fill in make/run and the models."""

    op: str = ""  # the dispatched op name that record_backends must show
    family: str = ""
    inplace: bool = False
    has_foreach: bool = False

    def make(self, case: Case, device: str) -> SimpleNamespace:
        raise NotImplementedError

    def run(self, x: SimpleNamespace, backend: str) -> Any:
        """Call the public op with backend= (returns the op's result)."""
        raise NotImplementedError

    def reference_callable(self, x: SimpleNamespace, case: Case, provider: str) -> tuple[Callable, tuple]:
        """(emsedit_fast.reference function, args) for reference_compiled."""
        raise NotImplementedError

    def foreach(self, x: SimpleNamespace) -> Any:
        raise NotImplementedError

    def outputs(self, x: SimpleNamespace, result: Any) -> list[torch.Tensor]:
        """The tensors the gate compares (the op's results, or the mutated tensors of an in-place op)."""
        return list(result) if isinstance(result, (tuple, list)) else [result]

    def gate_key(self, case: Case, provider: str) -> str:
        """Which reference result `provider` is compared with (ridge compares each form with its own reference)."""
        return "reference"

    def self_expected(self, case: Case) -> bool:
        """True when the reference provider's own result is the expectation of its gate key (no second run)."""
        return True

    def expected(self, x: SimpleNamespace, key: str) -> list[torch.Tensor]:
        x.reset()
        return _clone_all(self.outputs(x, self.run(x, "reference")))

    def oracle(self, x: SimpleNamespace, key: str) -> list[torch.Tensor] | None:
        """fp64 results for the relative rule when the fixed fp32 tolerance is not met (None: no oracle)."""
        return None

    def compare(self, got, expected, x, key, label) -> str:
        return compare_outputs(got, expected, label=label, oracle=lambda: self.oracle(x, key))

    def skip_reason(self, case: Case, provider: str, device: str) -> str | None:
        return None

    def bytes_moved(self, case: Case) -> int | None:
        return None

    def flops(self, case: Case) -> float | None:
        return None

    def workspace_model(self, case: Case, provider: str) -> int | None:
        """Analytic bytes of temporaries beyond inputs and outputs (None: not modelled)."""
        return None

    def extra(self, case: Case) -> dict[str, Any]:
        return {}


def compare_outputs(got: list[torch.Tensor], expected: list[torch.Tensor], *, label: str,
                    oracle: Callable[[], list[torch.Tensor] | None] | None = None) -> str:
    """The gate's comparison (DESIGN.md 6.2): bit-exact ints, 1 ulp for low-precision weights (METHOD.md F5), the
    fixed fp32 table for long reductions, and the relative rule against an fp64 oracle where the fixed table is
    not met. Returns which rule passed."""
    assert len(got) == len(expected), f"[{label}] {len(got)} outputs, expected {len(expected)}"
    rule = "fixed"
    oracle_values = None
    for i, (a, e) in enumerate(zip(got, expected)):
        lab = f"{label}-out{i}"
        if a is None or e is None:
            assert a is None and e is None, f"[{lab}] one output is None"
            continue
        if not e.is_floating_point():
            assert torch.equal(a.cpu(), e.cpu()), f"[{lab}] integer outputs differ"
        elif e.dtype in (torch.bfloat16, torch.float16):
            testing.assert_ulp_close(a, e, ulps=1, label=lab)
            rule = "ulp"
        else:
            try:
                testing.assert_close_to_reference(a, e, kind="reduction", label=lab, dtype=e.dtype)
            except AssertionError:
                if oracle is None:
                    raise
                if oracle_values is None:
                    oracle_values = oracle()
                if oracle_values is None:
                    raise
                testing.assert_relative_rule(a, e, oracle_values[i], dtype=e.dtype, label=lab)
                rule = "relative"
    return rule


def _reset_weights(weights, snapshots):
    for w, s in zip(weights, snapshots):
        w.copy_(s)


class ApplyDeltasSpec(OpSpec):
    """apply_deltas_: W_l <- round(W_l + M_l^T K_l) over every layer of the group (alpha = None, as the editor)."""

    op = "apply_deltas_"
    family = "apply_deltas"
    inplace = True
    has_foreach = True

    def make(self, case, device):
        weights = testing.layer_weights(case.layers, case.d_in, case.d_out, seed=1, dtype=case.torch_dtype,
                                        transposed=case.layout_transposed, device=device)
        coeffs, keys = testing.low_rank_factors(case.layers, case.rows, case.d_in, case.d_out, seed=2, device=device)
        snap = _clone_all(weights)
        x = SimpleNamespace(weights=weights, coeffs=coeffs, keys=keys, transposed=case.layout_transposed, snap=snap)
        x.reset = lambda: _reset_weights(weights, snap)
        return x

    def run(self, x, backend):
        ops.apply_deltas_(x.weights, x.coeffs, x.keys, None, x.transposed, backend=backend)

    def reference_callable(self, x, case, provider):
        return reference.apply_deltas_, (x.weights, x.coeffs, x.keys, None, x.transposed)

    def foreach(self, x):
        # one batched GEMM for the group's deltas, then one multi-tensor add (fp32 sum, one rounding per element)
        deltas = torch.bmm(torch.stack(x.keys).transpose(1, 2), torch.stack(x.coeffs))  # (L, d_in, d_out) fp32
        torch._foreach_add_(x.weights, list(deltas.unbind(0)) if x.transposed else [d.t() for d in deltas])

    def outputs(self, x, result):
        return x.weights

    def oracle(self, x, key):
        out = []
        for w0, m, k in zip(x.snap, x.coeffs, x.keys):
            delta = k.double().t() @ m.double()
            out.append(w0.double() + (delta if x.transposed else delta.t()))
        return out

    def bytes_moved(self, case):
        e = case.d_in * case.d_out
        w = case.torch_dtype.itemsize
        return case.layers * (2 * e * w + 4 * case.rows * (case.d_in + case.d_out))

    def flops(self, case):
        return 2.0 * case.layers * case.rows * case.d_in * case.d_out

    def workspace_model(self, case, provider):
        e = case.d_in * case.d_out
        low = case.dtype != "fp32"
        if provider == "reference":
            # per layer, freed before the next: dense fp32 delta + fp32 sum (+ fp32 upcast of W for bf16/fp16)
            return e * (8 + (4 if low else 0))
        if provider == "reference_compiled":
            return 4 * e  # the GEMM's dense fp32 output (an extern mm); the add and cast fuse into one kernel
        if provider == "foreach":
            return 4 * e * case.layers  # every layer's dense fp32 delta at once
        if provider == "cpp":
            return 64 * 1024 * 4 * torch.get_num_threads()  # one 64 x 1024 fp32 tile per thread (apply_deltas.cpp)
        if provider == "triton":
            return 0  # tiles live in registers
        return None

    def extra(self, case):
        return {"factor_bytes": 4 * case.layers * case.rows * (case.d_in + case.d_out),
                "dense_delta_bytes": 4 * case.d_in * case.d_out}


class ApplyDeltasDenseSpec(ApplyDeltasSpec):
    """apply_deltas_dense_: W_l <- round(W_l + S_l^T) (the primal-form update, S_l (d_in, d_out) fp32)."""

    op = "apply_deltas_dense_"
    family = "apply_deltas_dense"

    def make(self, case, device):
        x = super().make(case, device)
        x.shifts = [testing.randn(case.d_in, case.d_out, seed=30 + i, device=device, scale=1e-4)
                    for i in range(case.layers)]
        return x

    def run(self, x, backend):
        ops.apply_deltas_dense_(x.weights, x.shifts, None, x.transposed, backend=backend)

    def reference_callable(self, x, case, provider):
        return reference.apply_deltas_dense_, (x.weights, x.shifts, None, x.transposed)

    def foreach(self, x):
        torch._foreach_add_(x.weights, x.shifts if x.transposed else [s.t() for s in x.shifts])

    def oracle(self, x, key):
        return [w0.double() + (s.double() if x.transposed else s.double().t()) for w0, s in zip(x.snap, x.shifts)]

    def bytes_moved(self, case):
        e = case.d_in * case.d_out
        return case.layers * e * (2 * case.torch_dtype.itemsize + 4)

    def flops(self, case):
        return float(case.layers * case.d_in * case.d_out)

    def workspace_model(self, case, provider):
        e = case.d_in * case.d_out
        low = case.dtype != "fp32"
        if provider == "reference":
            return e * (4 + (4 if low else 0))  # fp32 sum (+ fp32 upcast of W)
        if provider in ("cpp", "triton", "foreach"):
            return 0
        return None

    def extra(self, case):
        return {}


class RestoreSpec(OpSpec):
    """restore_: weights[l] <- snapshots[l], bit for bit (a grouped copy)."""

    op = "restore_"
    family = "restore"
    inplace = True
    has_foreach = True

    def make(self, case, device):
        weights = testing.layer_weights(case.layers, case.d_in, case.d_out, seed=1, dtype=case.torch_dtype,
                                        transposed=case.layout_transposed, device=device)
        snaps = testing.layer_weights(case.layers, case.d_in, case.d_out, seed=2, dtype=case.torch_dtype,
                                      transposed=case.layout_transposed, device=device)
        edited = _clone_all(weights)
        x = SimpleNamespace(weights=weights, snaps=snaps, edited=edited)
        x.reset = lambda: _reset_weights(weights, edited)  # the "edited" bytes that restore_ overwrites
        return x

    def run(self, x, backend):
        ops.restore_(x.weights, x.snaps, backend=backend)

    def reference_callable(self, x, case, provider):
        return reference.restore_, (x.weights, x.snaps)

    def foreach(self, x):
        torch._foreach_copy_(x.weights, x.snaps)

    def outputs(self, x, result):
        return x.weights

    def compare(self, got, expected, x, key, label):
        for i, (a, e) in enumerate(zip(got, expected)):
            assert torch.equal(a, e), f"[{label}] layer {i}: restore is not bit-exact"
        return "bit-exact"

    def bytes_moved(self, case):
        return 2 * case.layers * case.d_in * case.d_out * case.torch_dtype.itemsize

    def workspace_model(self, case, provider):
        return 0


def _rows_inputs(case, device):
    keys, grads = testing.edit_rows(case.n_total, case.d_in, case.d_out, seed=3, device=device)
    idx = testing.layer_index(case.layers, case.rows, device=device)
    return keys, grads, idx


class RunningStatsUpdateSpec(OpSpec):
    """running_stats_update_: merge N = L n rows [U | Delta] into (count, mean, var, std)."""

    op = "running_stats_update_"
    family = "running_stats"
    inplace = True

    def make(self, case, device):
        keys, grads, _ = _rows_inputs(case, device)
        state = testing.running_stats_state(case.d, seed=4, device=device)
        snap = {k: v.clone() for k, v in state.items()}

        def reset():
            for k in state:
                state[k].copy_(snap[k])

        return SimpleNamespace(keys=keys, grads=grads, state=state, reset=reset)

    def _args(self, x):
        s = x.state
        return s["count"], s["mean"], s["var"], s["std"], x.keys, x.grads

    def run(self, x, backend):
        ops.running_stats_update_(*self._args(x), backend=backend)

    def reference_callable(self, x, case, provider):
        return reference.running_stats_update_, self._args(x)

    def outputs(self, x, result):
        return [x.state[k] for k in ("count", "mean", "var", "std")]

    def bytes_moved(self, case):
        return 4 * case.n_total * case.d + 2 * 3 * 4 * case.d

    def flops(self, case):
        return 4.0 * case.n_total * case.d

    def workspace_model(self, case, provider):
        if provider == "reference":
            return 3 * 8 * case.n_total * case.d  # fp64 [U | Delta], x - xbar, its square
        return None


class RunningStatsNormalizeSpec(OpSpec):
    """running_stats_normalize: Z = ([U | Delta] - mean) / (std + eps), a new (N, D) fp32 tensor."""

    op = "running_stats_normalize"
    family = "running_stats"

    def make(self, case, device):
        keys, grads, _ = _rows_inputs(case, device)
        state = testing.running_stats_state(case.d, seed=4, device=device)
        return SimpleNamespace(keys=keys, grads=grads, mean=state["mean"], std=state["std"], reset=lambda: None)

    def run(self, x, backend):
        return ops.running_stats_normalize(x.keys, x.grads, x.mean, x.std, backend=backend)

    def reference_callable(self, x, case, provider):
        return reference.running_stats_normalize, (x.keys, x.grads, x.mean, x.std)

    def bytes_moved(self, case):
        return 8 * case.n_total * case.d

    def flops(self, case):
        return 2.0 * case.n_total * case.d

    def workspace_model(self, case, provider):
        if provider == "reference":
            return 2 * 4 * case.n_total * case.d  # the concatenation and X - mean
        if provider in ("cpp", "triton"):
            return 0
        return None


def _hypernet_inputs(case, device):
    z = testing.randn(case.n_total, case.d, seed=5, device=device)
    params = testing.hypernet_params(case.d, case.rank, case.layers, seed=6, trained=True, device=device)
    idx = testing.layer_index(case.layers, case.rows, device=device)
    return z, params, idx


def _hypernet_flops(case) -> float:
    return 4.0 * case.n_total * case.d * case.rank  # two GEMMs, (N x D)(D x r) and (N x r)(r x D)


class HypernetForwardSpec(OpSpec):
    """hypernet_block forward: z' = z + s[idx] * relu(z A B + c) + t[idx] over all layers' rows (ReLU first)."""

    op = "hypernet_block"
    family = "hypernet_block"

    def make(self, case, device):
        z, params, idx = _hypernet_inputs(case, device)
        return SimpleNamespace(z=z, idx=idx, reset=lambda: None, **params)

    def _args(self, x):
        return x.z, x.a, x.b, x.c, x.s, x.t, x.idx

    def run(self, x, backend):
        return ops.hypernet_block(*self._args(x), backend=backend)

    def reference_callable(self, x, case, provider):
        return reference.hypernet_block, self._args(x)

    def oracle(self, x, key):
        return [reference.hypernet_block(*(t.double() if t.is_floating_point() else t for t in self._args(x)))]

    def bytes_moved(self, case):
        # z in, z' out, A and B read once (the reference re-reads them once per layer)
        return 8 * case.n_total * case.d + 8 * case.d * case.rank + 4 * 4 * case.layers * case.d

    def flops(self, case):
        return _hypernet_flops(case)

    def workspace_model(self, case, provider):
        nd, n_r = 4 * case.n_total * case.d, 4 * case.n_total * case.rank
        if provider == "reference":
            # out-of-place index_copy: two (N, D) outputs alive, plus per-layer row gathers and activations
            return nd + 5 * 4 * case.rows * case.d + 4 * case.rows * case.rank
        if provider in ("cpp", "triton"):
            return n_r  # P = z A (N, r); the epilogue writes z' directly
        return None


class HypernetBackwardSpec(HypernetForwardSpec):
    """hypernet_block_backward: the manual backward (METHOD.md 8.4), recomputing the forward."""

    op = "hypernet_block_backward"

    def make(self, case, device):
        x = super().make(case, device)
        x.grad_out = testing.randn(case.n_total, case.d, seed=7, device=device, scale=1e-2)
        return x

    def run(self, x, backend):
        return ops.hypernet_block_backward(x.grad_out, *self._args(x), backend=backend)

    def reference_callable(self, x, case, provider):
        return reference.hypernet_block_backward, (x.grad_out, *self._args(x))

    def oracle(self, x, key):
        args = (x.grad_out, *self._args(x))
        return list(reference.hypernet_block_backward(*(t.double() if t.is_floating_point() else t for t in args)))

    def bytes_moved(self, case):
        return 3 * 4 * case.n_total * case.d + 4 * 4 * case.d * case.rank + 4 * 4 * case.layers * case.d

    def flops(self, case):
        return 3 * _hypernet_flops(case)  # recomputed forward + dA, dB, dz GEMMs

    def workspace_model(self, case, provider):
        if provider == "reference":
            return 6 * 4 * case.n_total * case.d + 2 * 4 * case.n_total * case.rank
        return None


class HypernetAutogradSpec(HypernetForwardSpec):
    """hypernet_block forward + backward under autograd (what meta-training runs per chunk)."""

    op = "hypernet_block"

    def make(self, case, device):
        x = super().make(case, device)
        x.grad_out = testing.randn(case.n_total, case.d, seed=7, device=device, scale=1e-2)
        return x

    def _grads(self, fn, x):
        leaves = [t.detach().requires_grad_() for t in (x.z, x.a, x.b, x.c, x.s, x.t)]
        out = fn(*leaves, x.idx)
        return torch.autograd.grad(out, leaves, x.grad_out)

    def run(self, x, backend):
        return self._grads(functools.partial(ops.hypernet_block, backend=backend), x)

    def reference_callable(self, x, case, provider):
        return functools.partial(self._grads, reference.hypernet_block), (x,)

    def compiled_callable(self, x, case, provider):
        fwd = torch.compile(reference.hypernet_block, dynamic=False)
        return functools.partial(self._grads, fwd), (x,)

    def oracle(self, x, key):
        d = SimpleNamespace(**{k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                               for k, v in vars(x).items()})
        return list(self._grads(reference.hypernet_block, d))

    def flops(self, case):
        return 3 * _hypernet_flops(case)

    def workspace_model(self, case, provider):
        return None


class ValueTargetsSpec(OpSpec):
    """value_targets: coeff_j = -eta[idx_j] <u_j, u~_j>, V_j = coeff_j delta~_j."""

    op = "value_targets"
    family = "value_targets"

    def make(self, case, device):
        keys, _, idx = _rows_inputs(case, device)
        z = testing.randn(case.n_total, case.d, seed=8, device=device)
        eta = testing.randn(case.layers, seed=9, device=device, scale=1e-3).abs()
        return SimpleNamespace(keys=keys, z=z, eta=eta, idx=idx, reset=lambda: None)

    def _args(self, x):
        return x.keys, x.z, x.eta, x.idx

    def run(self, x, backend):
        return ops.value_targets(*self._args(x), backend=backend)

    def reference_callable(self, x, case, provider):
        return reference.value_targets, self._args(x)

    def oracle(self, x, key):
        return list(reference.value_targets(*(t.double() if t.is_floating_point() else t for t in self._args(x))))

    def bytes_moved(self, case):
        return 4 * case.n_total * (case.d_in + case.d + case.d_out + 1)

    def flops(self, case):
        return 2.0 * case.n_total * (case.d_in + case.d_out)

    def workspace_model(self, case, provider):
        if provider == "reference":
            return 4 * case.n_total * case.d_in  # keys * pseudo_keys before the row sum
        if provider in ("cpp", "triton"):
            return 0
        return None


class ValueTargetsBackwardSpec(ValueTargetsSpec):
    """value_targets_backward: (dL/dz, dL/deta) from dL/dV (METHOD.md 8.3)."""

    op = "value_targets_backward"

    def make(self, case, device):
        x = super().make(case, device)
        x.grad_targets = testing.randn(case.n_total, case.d_out, seed=10, device=device, scale=1e-2)
        return x

    def _bargs(self, x):
        return x.grad_targets, None, x.keys, x.z, x.eta, x.idx

    def run(self, x, backend):
        return ops.value_targets_backward(*self._bargs(x), backend=backend)

    def reference_callable(self, x, case, provider):
        return reference.value_targets_backward, self._bargs(x)

    def oracle(self, x, key):
        args = [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in self._bargs(x)]
        return list(reference.value_targets_backward(*args))

    def bytes_moved(self, case):
        return 4 * case.n_total * (case.d_out + case.d_in + case.d + case.d)

    def workspace_model(self, case, provider):
        if provider == "reference":
            return 4 * case.n_total * (2 * case.d_in + 2 * case.d_out)
        if provider in ("cpp", "triton"):
            return 0
        return None


def ridge_flops(form: str, n: int, d_in: int, d_out: int, *, lu: bool = False) -> float:
    """METHOD.md 7.3 / 7.4 cost models per layer. primal: 2n d_in^2 (Gram) + d_in^3/3 (Cholesky; 2/3 for LU) +
    2n d_in d_out (K^T V) + 2 d_in^2 d_out (two triangular solves). dual: 2n^2 d_in + n^3/3 + 2n^2 d_out."""
    if form == "primal":
        return 2.0 * n * d_in ** 2 + (2 if lu else 1) * d_in ** 3 / 3 + 2.0 * n * d_in * d_out + 2.0 * d_in ** 2 * d_out
    return 2.0 * n * n * d_in + (2 if lu else 1) * n ** 3 / 3 + 2.0 * n * n * d_out


def ridge_model_crossover(d_in: int, d_out: int) -> int:
    """Smallest n at which the dual cost model reaches the primal one."""
    lo, hi = 1, 1 << 20
    while lo < hi:
        mid = (lo + hi) // 2
        if ridge_flops("dual", mid, d_in, d_out) >= ridge_flops("primal", mid, d_in, d_out):
            hi = mid
        else:
            lo = mid + 1
    return lo


class RidgeSolveSpec(OpSpec):
    """ridge_solve. reference = the published primal LU solve (what the reference editor runs); the kernels run
    form="auto" (dual while n < d_in), gated against the reference in that same form."""

    op = "ridge_solve"
    family = "ridge"
    reference_form = "primal"

    def make(self, case, device):
        keys, targets, log_ridge = testing.ridge_problem(case.layers, case.rows, case.d_in, case.d_out, seed=11,
                                                         device=device)
        return SimpleNamespace(keys=keys, targets=targets, log_ridge=log_ridge, reset=lambda: None)

    def form_of(self, case, provider):
        if case.form:
            return case.form
        if provider in ("reference", "reference_compiled"):
            return self.reference_form
        return ops.choose_form(case.rows, case.d_in)

    def run_form(self, x, backend, form):
        return ops.ridge_solve(x.keys, x.targets, x.log_ridge, form, backend=backend)

    def reference_callable(self, x, case, provider):
        return reference.ridge_solve, (x.keys, x.targets, x.log_ridge, self.form_of(case, provider))

    def gate_key(self, case, provider):
        return self.form_of(case, provider)

    def expected(self, x, key):
        return [self.run_form(x, "reference", key)]

    def oracle(self, x, key):
        if key == "primal" and x.keys.shape[2] > 2048:
            return None  # an fp64 d_in x d_in solve is out of budget
        return [reference.ridge_solve(x.keys.double(), x.targets.double(), x.log_ridge.double(), key)]

    def skip_reason(self, case, provider, device):
        if device != "cpu" or SETTINGS.smoke:
            return None
        form = self.form_of(case, provider)
        cost = case.layers * ridge_flops(form, case.rows, case.d_in, case.d_out, lu=provider.startswith("reference"))
        limit = 1.5e12 if not case.form else SETTINGS.cpu_flop_cap
        if case.form and (case.preset, case.rows) == RIDGE_TARGET:
            limit = 1.5e12  # the target point always runs
        if cost > limit:
            return (f"{form} solve costs {cost / 1e9:.0f} GFLOP by the METHOD.md 7.3/7.4 model (> {limit / 1e9:.0f} "
                    f"GFLOP CPU budget per call)")
        return None

    def bytes_moved(self, case):
        return 4 * case.layers * (case.rows * (case.d_in + 2 * case.d_out))

    def extra(self, case):
        return {"flops_primal": case.layers * ridge_flops("primal", case.rows, case.d_in, case.d_out),
                "flops_dual": case.layers * ridge_flops("dual", case.rows, case.d_in, case.d_out),
                "auto_form": ops.choose_form(case.rows, case.d_in),
                "model_crossover_n": ridge_model_crossover(case.d_in, case.d_out)}

    def workspace_model(self, case, provider):
        return _ridge_workspace(case, self.form_of(case, provider), provider)


def _ridge_workspace(case, form, provider) -> int | None:
    ll, n, d_in, d_out = case.layers, case.rows, case.d_in, case.d_out
    if form == "primal":
        # Gram (d_in x d_in), K^T V (d_in x d_out), LAPACK's copies of both for the in-place factorisation
        return 4 * ll * (2 * d_in * d_in + 2 * d_in * d_out)
    if provider.startswith("reference"):
        return 4 * ll * (2 * n * n + n * d_out)  # Gram + LAPACK copies of Gram and V
    return 4 * ll * n * n  # one Cholesky factor


class RidgeSweepSpec(RidgeSolveSpec):
    """ridge_solve in a fixed form, one layer: the primal (d_in x d_in) vs dual (n x n) sweep."""

    def form_of(self, case, provider):
        return case.form


class RidgeBackwardSpec(RidgeSolveSpec):
    """ridge_solve_backward from a dense dL/dW: the reference maps it through the primal form (dL/dS = G^T), the
    kernels through the dual (dL/dM = K G^T, included in the timing). Both give dL/dV and dL/dlog_ridge."""

    op = "ridge_solve_backward"
    family = "ridge_backward"

    def make(self, case, device):
        x = super().make(case, device)
        m = reference.ridge_solve(x.keys, x.targets, x.log_ridge, "dual")  # (L, n, d_out)
        x.solution = {"dual": m, "primal": x.keys.transpose(1, 2) @ m}  # S = K^T M (push-through identity)
        x.grad_w = testing.randn(case.layers, case.d_out, case.d_in, seed=12, device=device, scale=1e-2)  # G
        return x

    def _grad_solution(self, x, form):
        return x.keys @ x.grad_w.transpose(1, 2) if form == "dual" else x.grad_w.transpose(1, 2)

    def run_form(self, x, backend, form):
        return ops.ridge_solve_backward(self._grad_solution(x, form), x.keys, x.solution[form], x.log_ridge, form,
                                        backend=backend)

    def reference_callable(self, x, case, provider):
        form = self.reference_form

        def call():
            return reference.ridge_solve_backward(self._grad_solution(x, form), x.keys, x.solution[form],
                                                  x.log_ridge, form)

        return call, ()

    def gate_key(self, case, provider):
        return "any"  # both forms give the same dL/dV and dL/dlog_ridge

    def self_expected(self, case):
        return False  # the expectation is the (cheap) dual reference; the primal reference is checked against it

    def expected(self, x, key):
        return list(self.run_form(x, "reference", "dual"))

    def oracle(self, x, key):
        d = {k: getattr(x, k).double() for k in ("keys", "log_ridge", "grad_w")}
        m = x.solution["dual"].double()
        return list(reference.ridge_solve_backward(d["keys"] @ d["grad_w"].transpose(1, 2), d["keys"], m,
                                                   d["log_ridge"], "dual"))

    def workspace_model(self, case, provider):
        return _ridge_workspace(case, self.form_of(case, provider), provider)


# ----------------------------------------------------------------------------------------------------------------------
# Providers, gate and timing


def _compile_allowed(case: Case, provider: str) -> str | None:
    if provider != "reference_compiled":
        return None
    mode = SETTINGS.compiled
    if mode == "none":
        return "reference_compiled disabled (--compiled none; torch.compile costs 10-30 s per graph on this CPU)"
    if mode == "primary" and not case.primary:
        return ("reference_compiled runs on the primary case of each op only on the CPU (torch.compile costs 10-30 s "
                "per graph here); use --compiled all")
    return None


def backend_of(provider: str) -> str | None:
    return provider if provider in BACKEND_NAMES else None


def check_provider(op: str, provider: str, device: str) -> None:
    """Skip, with the reason, providers that cannot run here at all (before any input is built)."""
    if provider == "triton":
        if device != "cuda" and not (interpreting() and SETTINGS.smoke):
            pytest.skip("Triton is timed only on CUDA (no GPU here); under TRITON_INTERPRET=1 with --smoke it runs "
                        "once for correctness")
        why = triton_unavailable()
        if why:
            pytest.skip(f"triton unavailable: {why}")
    if provider == "cpp":
        if not cpp_has_kernel(op, device):
            from emsedit_fast import _ext

            why = _ext.load_error()
            pytest.skip(f"C++ backend has no {device} kernel for {op} yet"
                        + (f" (_C not loaded: {why})" if why else " (rebuild: pip install -e . --no-build-isolation)"))


def provider_fn(spec: OpSpec, case: Case, provider: str, x: SimpleNamespace, device: str) -> Callable[[], Any]:
    """A zero-argument callable running `provider` on the inputs x (skips with a reason when it cannot)."""
    why = _compile_allowed(case, provider) or spec.skip_reason(case, provider, device)
    if why:
        pytest.skip(why)
    check_provider(spec.op, provider, device)
    backend = backend_of(provider)
    if backend is not None:
        if hasattr(spec, "run_form"):
            form = spec.form_of(case, provider)
            return lambda: spec.run_form(x, backend, form)
        return lambda: spec.run(x, backend)
    if provider == "reference_compiled":
        torch._dynamo.reset()
        if hasattr(spec, "compiled_callable"):
            fn, args = spec.compiled_callable(x, case, provider)
            return lambda: fn(*args)
        fn, args = spec.reference_callable(x, case, provider)
        compiled = torch.compile(fn, dynamic=False)
        return lambda: compiled(*args)
    if provider == "foreach":
        if not spec.has_foreach:
            pytest.skip(f"{spec.op} has no torch._foreach_* formulation")
        return lambda: spec.foreach(x)
    raise ValueError(f"unknown provider {provider!r}")


def _expect_backends(seen: dict[str, set[str]], provider: str, op: str, label: str) -> None:
    backend = backend_of(provider)
    if backend is None:
        assert not seen, f"[{label}] {provider} should not dispatch emsedit_fast ops, but ran {seen}"
    else:
        assert seen.get(op) == {backend}, (f"[{label}] asked for backend {backend!r} but record_backends saw {seen}: "
                                           "no silent fallback")


@dataclass
class GateResult:
    seconds: float
    peak: int | None
    peak_method: str | None
    rule: str
    backends: dict[str, list[str]] = field(default_factory=dict)
    first_call_s: float = 0.0  # includes compilation for reference_compiled and on CUDA


def gate(spec: OpSpec, case: Case, provider: str, fn: Callable[[], Any], x: SimpleNamespace,
         device: str) -> GateResult:
    """First call: correct against the reference and run on the requested backend, or the benchmark fails."""
    label = f"{spec.op}-{case}-{provider}"
    key = (type(spec).__name__, str(case), spec.gate_key(case, provider))
    _expected_scope(key)
    own = provider == "reference" and spec.self_expected(case)
    if key not in EXPECTED and not own:
        EXPECTED[key] = spec.expected(x, key[2])
    x.reset()
    measure_here = device == "cpu" and provider != "reference_compiled"
    with ops.record_backends() as seen:
        try:
            if measure_here:
                out, peak, seconds, method = measure_call(fn, device)
            else:
                start = time.perf_counter()
                out = fn()
                sync(device)
                seconds = time.perf_counter() - start
                peak, method = None, None
        except NotImplementedError as err:
            pytest.skip(f"{provider} cannot serve {case}: {err}")
        except Exception as err:
            if provider == "reference_compiled":
                pytest.skip(f"torch.compile of the reference failed: {type(err).__name__}: {str(err)[:300]}")
            raise
    _expect_backends(seen, provider, spec.op, label)
    got = _clone_all(spec.outputs(x, out))
    del out
    if key not in EXPECTED:
        EXPECTED[key] = got  # the reference provider is its own expectation
        rule = "self"
    else:
        rule = spec.compare(got, EXPECTED[key], x, key[2], label)
    del got
    first = seconds
    if not measure_here:  # the first call compiled (torch.compile, Triton autotune): measure a warm one
        x.reset()
        out, peak, seconds, method = measure_call(fn, device)
        del out
    return GateResult(seconds, peak, method, rule, {k: sorted(v) for k, v in seen.items()}, first)


def choose_rounds(first_call_s: float) -> int:
    if SETTINGS.smoke:
        return 1
    if first_call_s > 2 * SETTINGS.time_budget_s:
        return 1
    return max(2, min(SETTINGS.max_rounds, int(SETTINGS.time_budget_s / max(first_call_s, 1e-6))))


def timed(fn: Callable[[], Any], device: str) -> Callable[[], None]:
    if device == "cuda":
        def call():
            fn()
            torch.cuda.synchronize()
    else:
        def call():
            fn()
    return call


def base_info(case: Case, provider: str, device: str) -> dict[str, Any]:
    return {"case": str(case), "provider": provider, "device": device, "device_name": device_name(device),
            "pid": os.getpid(), "smoke": SETTINGS.smoke, "threads": torch.get_num_threads(), **case.describe()}


def finish_info(benchmark, info: dict[str, Any]) -> None:
    """Throughput numbers that need the measured median."""
    median = benchmark.stats.stats.median if benchmark.stats else None
    if median:
        if info.get("bytes_moved"):
            info["gb_per_s"] = info["bytes_moved"] / median / 1e9
        if info.get("flops"):
            info["gflop_per_s"] = info["flops"] / median / 1e9
        if info.get("edits"):
            info["edits_per_s"] = info["edits"] / median
        if info.get("steps"):
            info["steps_per_s"] = info["steps"] / median
    benchmark.extra_info.update(info)


def run_op_bench(benchmark, spec: OpSpec, case_id: str, provider: str, device: str) -> None:
    """The whole protocol for one (op, case, provider)."""
    case = CASES[case_id]
    why = _compile_allowed(case, provider) or spec.skip_reason(case, provider, device)
    if why:
        pytest.skip(why)
    check_provider(spec.op, provider, device)
    benchmark.group = f"{spec.op}[{case}]"
    x = INPUTS.get((type(spec).__name__, case_id, device), lambda: spec.make(case, device))
    fn = provider_fn(spec, case, provider, x, device)
    g = gate(spec, case, provider, fn, x, device)
    interpreted = provider == "triton" and device == "cpu"
    info = base_info(case, provider, device)
    info.update({
        "op": spec.op, "backends": g.backends, "gate": g.rule, "first_call_s": g.first_call_s,
        "peak_bytes": g.peak, "peak_method": g.peak_method, "workspace_model_bytes": spec.workspace_model(case,
                                                                                                        provider),
        "bytes_moved": spec.bytes_moved(case), "flops": spec.flops(case), "interpreted": interpreted,
        **spec.extra(case),
    })
    if hasattr(spec, "form_of"):
        info["form"] = spec.form_of(case, provider)
    call = timed(fn, device)
    benchmark.pedantic(call, setup=x.reset if spec.inplace else None, rounds=choose_rounds(g.seconds),
                       warmup_rounds=0, iterations=1)
    if spec.inplace:
        x.reset()
    finish_info(benchmark, info)


# ----------------------------------------------------------------------------------------------------------------------
# Editor-level helpers (bench_edit_step.py, bench_meta_train_step.py)


class LayerStack(torch.nn.Module):
    """A model that is only the edited layers of one shape group (nn.Linear, or GPT-2 Conv1D when transposed)."""

    def __init__(self, case: Case, device: str):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        weights = testing.layer_weights(case.layers, case.d_in, case.d_out, seed=1, dtype=torch.float32,
                                        transposed=case.layout_transposed, device=device)
        mods = []
        for w in weights:
            if case.layout_transposed:
                m = Conv1D(case.d_out, case.d_in)
            else:
                m = torch.nn.Linear(case.d_in, case.d_out, bias=False)
            m.weight = torch.nn.Parameter(w, requires_grad=False)
            mods.append(m.to(device))
        self.layers = torch.nn.ModuleList(mods)


def editor_config(provider: str, case: Case, solve_form: str = "auto"):
    """EMSEdit, sequential regime, K = 2 (METHOD.md 14.1 / 14.4), the preset's rank, backend = provider.

    solve_form "auto" is the engine's own choice (the reference backend: the published primal solve; the kernels:
    dual while n < d_in); the gates force the reference into the kernels' form."""
    from emsedit_fast.config import load

    return load("emsedit", mode="sequential", overrides=[f"editor.backend={provider}", f"editor.rank={case.rank}",
                                                         "editor.n_steps=2", f"editor.solve_form={solve_form}"])


def engine_missing(device: str) -> list[str]:
    """Ops the C++ backend still lacks on `device` (the fast engine needs every one)."""
    return [op for names in ops.OPS_BY_STEM.values() for op in names if not cpp_has_kernel(op, device)]


def check_engine_provider(provider: str, device: str) -> None:
    if provider == "cpp":
        missing = engine_missing(device)
        if missing:
            pytest.skip(f"the C++ backend lacks {device} kernels for {', '.join(missing)}; the fast editor needs all")
    if provider == "triton":
        check_provider("hypernet_block", provider, device)


def seen_backends(seen: dict[str, set[str]]) -> set[str]:
    return set().union(*seen.values()) if seen else set()


# Editor.reset / revert / replay and MetaTrainer call ops.restore_ without backend= (auto), so restore_ may run on
# the device's automatic choice whatever the editor's backend; it is a bit-exact copy on every backend.
ENGINE_AUTO_OPS = ("restore_",)


def expect_engine_backends(seen: dict[str, set[str]], provider: str, label: str) -> None:
    strict = {op: b for op, b in seen.items() if op not in ENGINE_AUTO_OPS}
    ran = seen_backends(strict)
    assert ran == {provider}, f"[{label}] editor with backend={provider!r} ran {seen}: no silent fallback"


def train_like_(editor, seed: int = 40, steps: int | None = None) -> None:
    """Give the hypernetworks of the first `steps` MSBP steps (all by default) non-trivial parameters (B != 0,
    s != 1, t != 0), so no block is the identity."""
    with torch.no_grad():
        for k, nets in enumerate(editor.nets[:steps]):
            for g, net in enumerate(nets):
                for b in range(len(net.a)):
                    p = testing.hypernet_params(net.a[b].shape[0], net.a[b].shape[1], net.s[b].shape[0],
                                                seed=seed + 100 * k + 10 * g + b, device=net.a[b].device)
                    for name in ("a", "b", "c", "s", "t"):
                        getattr(net, name)[b].copy_(p[name])


def delta_of(record, group: int = 0) -> torch.Tensor:
    """dW (L, d_in, d_out) = S, or K^T M, of one group of a StepRecord, fp64."""
    gs = record.groups[group]
    if gs.form == "primal":
        return gs.solution.double()
    return gs.factor_keys.double().transpose(1, 2) @ gs.solution.double()


def compare_deltas(fast: torch.Tensor, ref: torch.Tensor, label: str) -> None:
    """Deltas of the reference (primal LU) and fast (dual Cholesky) engines, relative to the largest entry: the
    METHOD.md 7.5 primal = dual check (1e-4 relative in fp32), through the fixed 'reduction' tolerance."""
    scale = ref.abs().max().item() + 1e-30
    testing.assert_close_to_reference((fast / scale).float(), (ref / scale).float(), kind="reduction", label=label)


def compare_updated_weights(got: list[torch.Tensor], expected: list[torch.Tensor], delta_scale: float,
                            label: str) -> None:
    """Edited weights of the fast and reference engines: |W_fast - W_ref| <= 1 ulp(W_ref) + 1e-4 max|dW_ref|.

    The ulp term covers the single rounding of W + dW when dW is below W's resolution, the second the fp32
    difference of the two solves when dW is large (as compare_deltas allows)."""
    for i, (a, e) in enumerate(zip(got, expected)):
        ulp = (torch.nextafter(e, torch.full_like(e, math.inf)) - e).abs().double()
        diff = (a.double() - e.double()).abs()
        bad = diff > ulp + 1e-4 * delta_scale
        assert not bad.any(), (f"[{label}-weight{i}] {int(bad.sum())} elements differ by more than 1 ulp + 1e-4 x "
                               f"max|dW| ({delta_scale:.3e}); worst {diff.max().item():.3e}")


@functools.lru_cache(maxsize=2)
def language_model(name: str, device: str = "cpu"):
    """(model, tokenizer) loaded once per session: SmolLM2-135M (offline) or the tiny LLaMA in smoke mode, fp32
    (METHOD.md 14.4: the small-model profile runs the model in fp32)."""
    from emsedit_fast.models.smollm2 import load_model

    model, tok = load_model(name, dtype=torch.float32, device=device)
    model.eval()
    model.requires_grad_(False)
    return model, tok


def model_name_for(case: Case) -> str:
    return "tiny-llama" if case.preset == "tiny" else "smollm2-135m"


def edit_records(n: int, split: str = "eval"):
    from emsedit_fast.data.facts import bundled_facts

    return bundled_facts(split)[:n]


EDITS_PER_BATCH = 10  # zsRE-style sequential batch of the small-model profile (METHOD.md 14.4)
MICRO_BATCH = 4


class EngineWork:
    """Base of the editor-level workloads: one timed `step()`, an untimed `reset()`, values for the gate, phases.

    Subclasses set self.phases (name -> accumulated seconds while self.recording) and wrap the engine's methods.
    """

    name = ""

    def __init__(self):
        self.phases: dict[str, float] = {}
        self.recording = False
        self.calls = 0

    def step(self) -> Any:
        raise NotImplementedError

    def fast_form(self) -> str:
        """The solve form the kernels' engine uses on this workload (choose_form of its rows and d_in)."""
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def gate_values(self, out: Any) -> dict[str, Any]:
        raise NotImplementedError

    def compare(self, got: dict[str, Any], expected: dict[str, Any], label: str) -> str:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass

    def timing(self, name: str, fn: Callable) -> Callable:
        """fn, with its wall time added to self.phases[name] while recording."""

        def wrapped(*args, **kwargs):
            if not self.recording:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start

        return wrapped


def run_engine_bench(benchmark, name: str, case_id: str, provider: str, device: str,
                     make: Callable[..., EngineWork]) -> None:
    """Gate, memory, timing and phases of one editor-level workload.

    The gate: record_backends shows only `provider`, and the results match the reference engine run in the *same*
    solve form as the kernels (the published primal fp32 LU solve is itself off by ~1e-4 relative at these shapes,
    cond(K^T K + lambda I) ~ 1e3, while the n x n dual system is well conditioned; the op-level ridge gate does
    the same). The reference provider is the published engine and is its own expectation.
    make(case, provider, device, solve_form="auto") builds the workload.
    """
    case = CASES[case_id]
    check_engine_provider(provider, device)
    benchmark.group = f"{name}[{case}]"
    label = f"{name}-{case}-{provider}"
    INPUTS.clear()
    gc.collect()
    work = make(case, provider, device)
    try:
        form = work.fast_form()
        key = (name, case_id, form)
        _expected_scope(key)
        if provider != "reference" and key not in EXPECTED:
            ref = make(case, "reference", device, solve_form=form)
            try:
                ref.reset()
                EXPECTED[key] = ref.gate_values(ref.step())
            finally:
                ref.close()
                del ref
                gc.collect()
        work.reset()
        with ops.record_backends() as seen:
            try:
                out, peak, seconds, method = measure_call(work.step, device)
            except NotImplementedError as err:
                pytest.skip(f"the {provider} engine cannot run {case}: {err}")
        expect_engine_backends(seen, provider, label)
        got = work.gate_values(out)
        del out
        if provider == "reference":
            EXPECTED[(name, case_id, "primal")] = got  # the published engine solves in the primal form
            rule = "self"
        else:
            rule = work.compare(got, EXPECTED[key], label) + f" vs the reference engine ({form} solve)"
        del got
        if device == "cuda":  # the first call also compiled and autotuned: measure memory on a warm call
            work.reset()
            _, peak, _, method = measure_call(work.step, device)
        rounds = choose_rounds(seconds)
        work.phases.clear()
        work.recording = True
        benchmark.pedantic(timed(work.step, device), setup=work.reset, rounds=rounds, warmup_rounds=0, iterations=1)
        work.recording = False
        info = base_info(case, provider, device)
        info.update({"op": name, "backends": {k: sorted(v) for k, v in seen.items()}, "gate": rule,
                     "first_call_s": seconds, "peak_bytes": peak, "peak_method": method,
                     "interpreted": provider == "triton" and device == "cpu", "rounds": rounds})
        info.update({f"{k}_s": v / rounds for k, v in work.phases.items()})
        info.update(work.info())
        finish_info(benchmark, info)
    finally:
        work.close()
        del work
        gc.collect()  # the workloads hold reference cycles (timing wrappers); free their editors now


def math_isclose(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)


__all__ = ["CASES", "PROVIDERS", "SETTINGS", "Case", "replace"]
