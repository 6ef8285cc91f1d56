"""What every benchmark shares: settings, the correctness gate, peak memory, timing and the pytest-benchmark glue.

Each bench_<op>.py holds its op's own knowledge as an `OpSpec` (cases, inputs, providers, cost models). This module
runs the protocol they share:

    x = spec.make(case, device)            inputs, built once per case (the providers of a case run in a row)
    fn = the provider's callable           skipped, with the reason, when the provider cannot serve the case
    gate(...)                              first call, untimed: the reference's result relative to its scale, and
                                           the requested backend really ran (record_backends; no silent fallback)
    peak memory                            CUDA allocator peak, or the CPU resident-set high-water mark
    benchmark.pedantic(fn, setup=reset)    in-place ops get their inputs back, untimed, before every round

Providers (a ratio always names one of them as its denominator):
    reference           the published path: emsedit_fast.reference through the ops layer (backend="reference")
    competent           what a strong PyTorch engineer writes for the *same algorithm* as the kernels (same solve
                        form, grouped GEMMs, in-place addmm_); plain torch, defined in the op's bench file
    competent_compiled  torch.compile of `competent`, compiled in the untimed first call
    cpp, triton         the fused kernels, forced with backend=; Triton is timed only on CUDA

Peak memory: benchmarks/_memory.py. The machine and run metadata: benchmarks/conftest.py.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any
from typing import Callable

import _cases
import _memory
import pytest
import torch

from emsedit_fast import ops
from emsedit_fast.ops._dispatch import cpp_has_kernel
from emsedit_fast.ops._dispatch import interpreting
from emsedit_fast.ops._dispatch import triton_unavailable

PROVIDERS = ("reference", "competent", "competent_compiled", "cpp", "triton")
KERNELS = ("cpp", "triton")

# ----------------------------------------------------------------------------------------------------------------------
# Settings (set once by conftest.py)


@dataclass
class Settings:
    smoke: bool = False
    device: str = "cpu"
    compiled: str = "primary"  # all | primary | none: which cases get competent_compiled
    time_budget_s: float = 1.0  # target timed seconds per benchmark (rounds follow from the first call)
    max_rounds: int = 100
    zsre_data: str | None = None  # records of the end-to-end benchmarks on SmolLM2


SETTINGS = Settings()


def configure(*, smoke: bool, device: str, compiled: str) -> None:
    SETTINGS.smoke, SETTINGS.device = smoke, device
    if compiled == "auto":
        compiled = "all" if device == "cuda" else ("none" if smoke else "primary")
    SETTINGS.compiled = compiled
    if device == "cpu":
        _memory.MALLOC.steady()


# ----------------------------------------------------------------------------------------------------------------------
# The gate. A wrong result must fail it whatever the outputs' magnitude: every bound is relative to the scale of the
# expected output, or, for an in-place op, of the expected *change* (W' - W, not W'), so a kernel that returns zeros
# or leaves its input unchanged fails (benchmarks/test_gates.py shows it for every op).
#
#   scale      s = max |e|, e = expected (or expected - before); it must be finite and non-zero, else the case
#              cannot tell a wrong result from a right one and the gate fails
#   elements   |g - e| <= tol (|e| + s) + ulps * ulp(expected)     (tol: 1e-4 fp32, 1e-9 fp64; bf16/fp16: 0 and
#              1 ulp, the single rounding of an fp32 sum)
#   norm       ||g - e||_2 <= 0.1 ||e||_2                           (the result as a whole moves the right way)
#   oracle     where the element rule fails and the spec has an fp64 oracle o (ill-conditioned solves):
#              max|g - o| <= 2 max|exp - o| + tol s and <= 1e-2 max|o - before|  (no worse than the reference itself)

TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 0.0, torch.float16: 0.0}
NORM_TOL = 0.1


CHUNK = 1 << 22  # elements per pass of the gate: fp64 copies of a 4096 x 14336 weight would take gigabytes


def _ulp(t: torch.Tensor) -> torch.Tensor:
    return (torch.nextafter(t, torch.full_like(t, float("inf"))) - t).abs().double()


def _chunks(*ts):
    """Flat chunks of the tensors (None stays None), CHUNK elements at a time, on the first tensor's device: the gate
    then runs where the data is (on a GPU, a CPU gate over a 12-layer LLaMA-3 group took longer than the benchmark)."""
    flat = [None if t is None else t.detach().reshape(-1) for t in ts]
    device = flat[0].device
    n = flat[0].numel()
    for lo in range(0, n, CHUNK):
        yield [None if t is None else t[lo:lo + CHUNK].to(device) for t in flat]


def check_output(got: torch.Tensor, exp: torch.Tensor, *, label: str, before: torch.Tensor | None = None,
                 ulps: int | None = None, tol: float | None = None, norm_tol: float = NORM_TOL,
                 oracle: Callable[[], torch.Tensor | None] | None = None) -> str:
    """The gate for one output tensor (rules above); returns the rule that passed, raises AssertionError.
    oracle: computes the fp64 oracle of this output, only called when the element rule fails."""
    assert got.shape == exp.shape, f"[{label}] shape {tuple(got.shape)}, expected {tuple(exp.shape)}"
    tol = TOL.get(exp.dtype, 0.0) if tol is None else tol
    ulps = (1 if exp.dtype in (torch.bfloat16, torch.float16) or before is not None else 0) if ulps is None else ulps
    what = "expected change" if before is not None else "expected output"
    scale, ref_sq = 0.0, 0.0
    for _, e, b in _chunks(got, exp, before):
        ref = e.double() - b.double() if b is not None else e.double()
        scale, ref_sq = max(scale, ref.abs().max().item() if ref.numel() else 0.0), ref_sq + ref.square().sum().item()
    assert scale == scale and 1e-30 < scale < float("inf"), (
        f"[{label}] the {what} has scale {scale:.3g}: this case cannot tell a wrong result from a right one")
    bad, diff_sq, any_diff, worst = 0, 0.0, False, (-float("inf"), 0.0, 0.0)
    for g, e, b in _chunks(got, exp, before):
        g64, e64 = g.double(), e.double()
        assert torch.isfinite(g64).all(), f"[{label}] non-finite values in the result"
        ref = e64 - b.double() if b is not None else e64
        err = (g64 - e64).abs()
        bound = tol * (ref.abs() + scale) + (ulps * _ulp(e) if ulps else 0.0)
        over = err - bound
        bad += int((over > 0).sum())
        diff_sq += err.square().sum().item()
        any_diff = any_diff or bool(err.any())
        i = int(torch.argmax(over))
        if over[i].item() > worst[0]:
            worst = (over[i].item(), g64[i].item(), e64[i].item())
    ratio = (diff_sq / ref_sq) ** 0.5 if ref_sq > 0 else float("inf")
    if bad == 0 and ratio <= norm_tol:
        return "exact" if not any_diff else ("ulp" if tol == 0 else f"rel {tol:g}")
    o = oracle() if oracle is not None and ratio <= norm_tol else None
    if o is not None:
        dev = got.device
        o = o.detach().double().to(dev)
        e, g = exp.detach().double().to(dev), got.detach().double()
        err_got, err_ref = (g - o).abs().max().item(), (e - o).abs().max().item()
        o_scale = (o - before.detach().double().to(dev) if before is not None else o).abs().max().item()
        if err_got <= 2 * err_ref + tol * scale and err_got <= 1e-2 * o_scale:
            return "oracle"
        raise AssertionError(f"[{label}] max error vs the fp64 oracle {err_got:.3e} > 2 x the reference's "
                             f"{err_ref:.3e} + {tol:g} x scale {scale:.3e} (or > 1% of the oracle's scale)")
    raise AssertionError(
        f"[{label}] {bad} of {got.numel()} elements off (scale of the {what} {scale:.3e}, tol {tol:g}, {ulps} ulp); "
        f"worst: got {worst[1]:.8g}, expected {worst[2]:.8g}; ||got - expected|| / ||{what}|| = {ratio:.3g} "
        f"(allowed {norm_tol})")


def check_outputs(got, expected, *, label: str, before=None, exact: bool = False,
                  oracle: Callable[[], list[torch.Tensor] | None] | None = None, tol=None) -> str:
    """The gate over a list of outputs; `exact`: bit-for-bit (restore_), and the expected result must differ from
    `before` somewhere. oracle: computes the fp64 oracle of every output (at most once, only when needed). Returns
    the loosest rule any output needed."""
    assert len(got) == len(expected), f"[{label}] {len(got)} outputs, expected {len(expected)}"
    memo: dict[str, Any] = {}

    def oracle_of(i):
        def one():
            if "values" not in memo:
                memo["values"] = oracle()
            return None if memo["values"] is None else memo["values"][i]

        return one if oracle is not None else None

    rules = []
    for i, (g, e) in enumerate(zip(got, expected)):
        lab, b = f"{label}-out{i}", before[i] if before is not None else None
        if exact or not e.is_floating_point():
            assert torch.equal(g, e.to(g.device)), f"[{lab}] not bit-exact"
            assert b is None or not torch.equal(e, b.to(e.device)), f"[{lab}] the expected result equals the input"
            rules.append("exact")
            continue
        rules.append(check_output(g, e, label=lab, before=b, tol=tol, oracle=oracle_of(i)))
    order = ("exact", "ulp", "rel", "oracle")
    return max(rules, key=lambda r: order.index(r.split()[0]))


# ----------------------------------------------------------------------------------------------------------------------
# Op specs


def clone_all(ts) -> list[torch.Tensor]:
    return [t.detach().clone() for t in ts]


class OpSpec:
    """One op's benchmark knowledge; each bench_<op>.py subclasses it.

    make(case, device) returns the inputs as a namespace with `case` and `reset()` (in-place ops: put the mutated
    tensors back). kernel(x, backend) calls the public op with backend= in the kernels' form; published(x) is the
    published path (the same call with backend="reference" unless the published algorithm differs, as the primal
    ridge solve does); competent_fn(x) returns (function, args) of the competent PyTorch baseline."""

    op = ""  # the dispatched op name record_backends must show
    inplace = False
    exact = False  # bit-exact outputs (restore_)
    providers = PROVIDERS

    def cases(self, smoke: bool, device: str) -> list[_cases.Case]:
        raise NotImplementedError

    def make(self, case, device) -> SimpleNamespace:
        raise NotImplementedError

    def kernel(self, x, backend: str) -> Any:
        raise NotImplementedError

    def published(self, x) -> Any:
        return self.kernel(x, "reference")

    def published_is_expected(self, case) -> bool:
        """True when the published path computes what the kernels compute (its result is then the expectation)."""
        return True

    def competent_fn(self, x) -> tuple[Callable, tuple]:
        raise NotImplementedError

    def compiled_fn(self, x) -> tuple[Callable, tuple]:
        """competent_compiled: torch.compile of the competent function (compiled by its first, untimed call)."""
        fn, args = self.competent_fn(x)
        return torch.compile(fn, dynamic=False), args

    def outputs(self, x, result) -> list[torch.Tensor]:
        """The tensors the gate compares: the op's results, or the mutated tensors of an in-place op."""
        return list(result) if isinstance(result, (tuple, list)) else [result]

    def passthrough(self, x) -> list[torch.Tensor | None] | None:
        """For the gate tests, what 'the input handed back unchanged' means for an out-of-place op: per output, the
        input of its shape (None: no input twin; that output keeps its expected value). In-place ops use the state
        before the call instead."""
        return None

    def oracle(self, x) -> list[torch.Tensor] | None:
        """fp64 results for the oracle rule of ill-conditioned cases (None: no oracle)."""
        return None

    def skip_reason(self, case, provider: str, device: str) -> str | None:
        return None

    def info(self, case, provider: str) -> dict[str, Any]:
        """Cost models: bytes_moved (compulsory traffic, the same for every provider), flops, workspace_model_bytes
        (analytic temporaries beyond inputs and outputs), anything else the report reads."""
        return {}


def provider_callable(spec: OpSpec, x, provider: str) -> Callable[[], Any]:
    if provider == "reference":
        return lambda: spec.published(x)
    if provider in KERNELS:
        return lambda: spec.kernel(x, provider)
    if provider == "competent":
        fn, args = spec.competent_fn(x)
        return lambda: fn(*args)
    if provider == "competent_compiled":
        torch._dynamo.reset()
        fn, args = spec.compiled_fn(x)
        return lambda: fn(*args)
    raise ValueError(f"unknown provider {provider!r}")


def expected_outputs(spec: OpSpec, x) -> list[torch.Tensor]:
    """The reference semantics in the kernels' form (what every provider but `reference` is gated against)."""
    x.reset()
    return clone_all(spec.outputs(x, spec.kernel(x, "reference")))


def before_call(spec: OpSpec, x) -> list[torch.Tensor] | None:
    """In-place ops: the state the call starts from (after reset)."""
    x.reset()
    return clone_all(spec.outputs(x, None)) if spec.inplace else None


# ----------------------------------------------------------------------------------------------------------------------
# Skips


def skip_provider(op: str, provider: str, device: str, case=None) -> str | None:
    """Why `provider` cannot run here (None: it can)."""
    if provider == "competent_compiled" and case is not None:
        if SETTINGS.compiled == "none":
            return "competent_compiled disabled (--compiled none; torch.compile costs 10-30 s per graph on this CPU)"
        if SETTINGS.compiled == "primary" and not case.primary:
            return ("competent_compiled runs on the primary case of each op on the CPU (torch.compile costs 10-30 s "
                    "per graph here); use --compiled all")
    if provider == "triton":
        if device != "cuda" and not (interpreting() and SETTINGS.smoke):
            return ("Triton is timed only on CUDA (no GPU here); under TRITON_INTERPRET=1 with --smoke it runs once "
                    "for correctness")
        why = triton_unavailable()
        if why:
            return f"triton unavailable: {why}"
    if provider == "cpp" and not cpp_has_kernel(op, device):
        from emsedit_fast import _ext

        why = _ext.load_error()
        return f"C++ backend has no {device} kernel for {op}" + (f" (_C not loaded: {why})" if why else "")
    return None


# ----------------------------------------------------------------------------------------------------------------------
# One-entry caches: the inputs and the expected result of the case being benchmarked


class OneEntry:
    def __init__(self):
        self.key, self.value = None, None

    def get(self, key, make: Callable[[], Any]) -> Any:
        if key != self.key:
            self.clear()
            gc.collect()
            self.value, self.key = make(), key
        return self.value

    def clear(self) -> None:
        self.key, self.value = None, None


INPUTS, EXPECTED = OneEntry(), OneEntry()


def choose_rounds(first_call_s: float) -> int:
    if SETTINGS.smoke:
        return 1
    if first_call_s > 2 * SETTINGS.time_budget_s:
        return 1
    return max(2, min(SETTINGS.max_rounds, int(SETTINGS.time_budget_s / max(first_call_s, 1e-6))))


def timed(fn: Callable[[], Any], device: str) -> Callable[[], None]:
    def call():
        fn()
        if device == "cuda":
            torch.cuda.synchronize()

    return call


def paired_rounds(calls: dict[str, tuple[Callable[[], Any], Callable[[], None] | None]], rounds: int,
                  device: str) -> dict[str, list[float]]:
    """Side-by-side timing: {name: seconds of each round} for calls {name: (fn, setup or None)}, the names taking
    turns within every round and the order reversed every other round. Load that drifts over a run then falls on
    every name alike, so the ratio of two medians compares the work itself (pytest-benchmark times one provider
    after another, and on a shared machine identical work then reads up to +-30% apart)."""
    import time

    names = list(calls)
    out = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            fn, setup = calls[name]
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            out[name].append(time.perf_counter() - t0)
    return out


def paired_with_competent(spec: OpSpec, case, x, fn: Callable[[], Any], rounds: int, device: str
                          ) -> dict[str, list[float]] | None:
    """The fused provider `fn` and the competent baseline timed side by side on the same inputs (None when the
    competent provider cannot serve the case)."""
    if skip_provider(spec.op, "competent", device, case) or spec.skip_reason(case, "competent", device):
        return None
    try:
        competent = provider_callable(spec, x, "competent")
    except NotImplementedError:
        return None
    reset = x.reset if spec.inplace else None
    if reset is not None:
        reset()
    competent()  # its first call allocates what later calls reuse, as the fused provider's untimed gate call did
    times = paired_rounds({"self": (fn, reset), "competent": (competent, reset)}, rounds, device)
    x.reset()
    return times


def base_info(case, provider: str, device: str) -> dict[str, Any]:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"case": str(case), "provider": provider, "device": device, "pid": os.getpid(), "smoke": SETTINGS.smoke,
            "threads": torch.get_num_threads(), "loadavg_1m": load, **case.describe()}


def finish_info(benchmark, info: dict[str, Any]) -> None:
    """Throughputs that need the measured median."""
    median = benchmark.stats.stats.median if benchmark.stats else None
    if median:
        for key, out, scale in (("bytes_moved", "gb_per_s", 1e9), ("flops", "gflop_per_s", 1e9),
                                ("edits", "edits_per_s", 1.0), ("steps", "steps_per_s", 1.0)):
            if info.get(key):
                info[out] = info[key] / median / scale
    benchmark.extra_info.update(info)


def _expect_backends(seen: dict[str, set[str]], provider: str, op: str, label: str) -> None:
    if provider in ("reference", *KERNELS):
        assert seen.get(op) == {provider}, (f"[{label}] asked for backend {provider!r} but record_backends saw "
                                            f"{seen}: no silent fallback")
    else:
        assert not seen, f"[{label}] {provider} is plain torch and must dispatch no emsedit_fast op, but ran {seen}"


def run_op_bench(benchmark, spec: OpSpec, case_id: str, provider: str, device: str) -> None:
    """The whole protocol for one (op, case, provider)."""
    case = _cases.CASES[case_id]
    why = skip_provider(spec.op, provider, device, case) or spec.skip_reason(case, provider, device)
    if why:
        pytest.skip(why)
    benchmark.group = f"{spec.op}[{case}]"
    label = f"{spec.op}-{case}-{provider}"
    key = (type(spec).__name__, case_id, device)
    if INPUTS.key != key:
        EXPECTED.clear()
    x = INPUTS.get(key, lambda: spec.make(case, device))
    fn = provider_callable(spec, x, provider)
    expected = None if provider == "reference" else EXPECTED.get(key, lambda: expected_outputs(spec, x))
    before = before_call(spec, x)
    compiles = provider == "competent_compiled" or device == "cuda"
    with ops.record_backends() as seen:
        try:
            out, peak, _, seconds = _memory.measure_call(fn, device) if not compiles else (fn(), None, None, 0.0)
        except NotImplementedError as err:
            pytest.skip(f"{provider} cannot serve {case}: {err}")
        except Exception as err:
            if provider == "competent_compiled":
                pytest.skip(f"torch.compile of the competent baseline failed: {type(err).__name__}: {str(err)[:300]}")
            raise
    _expect_backends(seen, provider, spec.op, label)
    got = clone_all(spec.outputs(x, out))
    del out
    if expected is None:  # the published reference defines the result; the kernels' form is gated against it
        rule = "self"
        if spec.published_is_expected(case):
            EXPECTED.key, EXPECTED.value = key, got
    else:
        rule = check_outputs(got, expected, label=label, before=before, exact=spec.exact,
                             oracle=lambda: spec.oracle(x))
    del got, before
    if compiles:  # the first call compiled (torch.compile, Triton autotune): measure a warm one
        x.reset()
        _, peak, _, seconds = _memory.measure_call(fn, device)
    info = base_info(case, provider, device)
    if provider == "cpp":  # what the automatic dispatch picks for these inputs (the engine's default)
        x.reset()
        with ops.record_backends() as auto:
            spec.kernel(x, "auto")
        info["auto_backends"] = sorted(auto.get(spec.op, ()))
    info.update({"op": spec.op, "backends": {k: sorted(v) for k, v in seen.items()}, "gate": rule,
                 "first_call_s": seconds, "peak_bytes": peak,
                 "peak_method": _memory.MALLOC.method if device == "cpu" else "cuda_allocator",
                 "interpreted": provider == "triton" and device == "cpu", **spec.info(case, provider)})
    rounds = choose_rounds(seconds)
    benchmark.pedantic(timed(fn, device), setup=x.reset if spec.inplace else None,
                       rounds=rounds, warmup_rounds=0, iterations=1)
    x.reset()
    if provider in KERNELS and not info["interpreted"]:
        info["paired_s"] = paired_with_competent(spec, case, x, fn, rounds if SETTINGS.smoke else max(rounds, 3),
                                                 device)
    finish_info(benchmark, info)
