"""Editor-level benchmarks: the real engine (emsedit_fast.editors, emsedit_fast.training) under three providers.

    reference   EditorConfig.backend = "reference": the published path (one hypernetwork call per layer, the primal
                LU solve, a dense delta per layer)
    competent   the same engine code with every emsedit_fast op replaced, for the duration of the step, by the
                competent PyTorch baseline of its bench file (grouped hypernetwork GEMMs, the dual Cholesky solve,
                addmm_ updates): what the engine costs with the kernels' algorithm and no custom kernel
    cpp/triton  EditorConfig.backend = that backend: the fused kernels

So the editor-step speedup splits into "algorithm" = reference / competent (dual vs primal, grouping, no dense delta)
and "kernels" = competent / fused (same algorithm). The competent engine must dispatch no emsedit_fast op at all
(record_backends stays empty), so an op the substitution missed fails the benchmark instead of running a kernel.

`PhaseClock` splits a step into phases by wrapping the engine's own entry points; only the outermost phase counts,
so the solve inside the meta-gradient counts as meta-gradient.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import tempfile
import time
from typing import Any
from typing import Callable

import _cases
import _harness
import _memory
import bench_apply_deltas
import bench_hypernet_block
import bench_restore
import bench_ridge
import bench_running_stats
import bench_value_targets
import pytest
import torch

from emsedit_fast import ops
from emsedit_fast import testing

ENGINE_PROVIDERS = ("reference", "competent", "cpp", "triton")

COMPETENT_OPS: dict[str, Callable] = {
    "running_stats_update_": bench_running_stats.stats_update_,
    "running_stats_normalize": bench_running_stats.normalize,
    "hypernet_block": bench_hypernet_block.block,
    "hypernet_block_backward": bench_hypernet_block.block_backward,
    "value_targets": bench_value_targets.value_targets,
    "ridge_solve": bench_ridge.cholesky_ridge,
    "ridge_solve_backward": bench_ridge.cholesky_ridge_backward,
    "apply_deltas_": bench_apply_deltas.addmm_update_,
    "apply_deltas_dense_": bench_apply_deltas.add_update_,
    "restore_": bench_restore.foreach_restore_,
}

# Editor.reset / revert and MetaTrainer.load_state_dict may call restore_ without backend= (auto); it is a bit-exact
# copy on every backend, so the no-fallback check leaves it out.
AUTO_OPS = ("restore_",)


@contextlib.contextmanager
def patched_ops(table: dict[str, Callable], drop_backend: bool = True):
    """Replace emsedit_fast.ops.<name> by table[name] inside the block (called without `backend=` when
    drop_backend: the competent functions are plain torch)."""
    saved = {name: getattr(ops, name) for name in table}

    def without_backend(fn):
        def call(*args, backend=None, **kwargs):
            return fn(*args, **kwargs)

        return call

    try:
        for name, fn in table.items():
            setattr(ops, name, without_backend(fn) if drop_backend else fn)
        yield
    finally:
        for name, fn in saved.items():
            setattr(ops, name, fn)


def engine_backend(provider: str) -> str:
    """EditorConfig.backend of a provider: the competent engine runs on `auto` so its solve form is the kernels'
    (dual while n < d_in), and any op its substitution missed would show up as a dispatched kernel."""
    return "auto" if provider == "competent" else provider


def skip_engine(provider: str, device: str) -> str | None:
    if provider in _harness.KERNELS:
        missing = [op for names in ops.OPS_BY_STEM.values() for op in names
                   if _harness.skip_provider(op, provider, device)]
        if missing:
            return (_harness.skip_provider(missing[0], provider, device) + f"; the {provider} engine needs "
                    f"{', '.join(missing)}")
    return None


def expect_engine_backends(seen: dict[str, set[str]], provider: str, label: str) -> None:
    strict = {op: b for op, b in seen.items() if op not in AUTO_OPS}
    if provider == "competent":
        assert not strict, f"[{label}] the competent engine dispatched emsedit_fast ops {seen}: a substitution missed"
    else:
        ran = set().union(*strict.values()) if strict else set()
        assert ran == {provider}, f"[{label}] engine with backend={provider!r} ran {seen}: no silent fallback"


def train_like_(editor, seed: int = 40, steps: int | None = None) -> None:
    """Non-trivial hypernetworks for the first `steps` MSBP steps (all by default): B != 0, s != 1, t != 0."""
    with torch.no_grad():
        for k, nets in enumerate(editor.nets[:steps]):
            for g, net in enumerate(nets):
                for b in range(len(net.a)):
                    p = testing.hypernet_params(net.a[b].shape[0], net.a[b].shape[1], net.s[b].shape[0],
                                                seed=seed + 100 * k + 10 * g + b, device=net.a[b].device)
                    for name in ("a", "b", "c", "s", "t"):
                        getattr(net, name)[b].copy_(p[name])


def delta_of(group) -> torch.Tensor:
    """dW (L, d_in, d_out) fp64 of one shape group's update (a StepRecord group or a recorded GroupUpdate): S for the
    primal form, K^T M for the dual and outer forms."""
    if group.form == "primal":
        return group.solution.double()
    return group.factor_keys.double().transpose(1, 2) @ group.solution.double()


def check_delta(fast: torch.Tensor, ref: torch.Tensor, label: str, tol: float = 1e-4) -> str:
    """Deltas of two engines, relative to the reference delta's scale (fp32 solves: 1e-4)."""
    return _harness.check_output(fast, ref, label=label, tol=tol, ulps=0)


class PhaseClock:
    """Wall time per phase of the engine's work; a call inside a running phase counts to that outer phase."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.active: str | None = None
        self.recording = False

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            if not self.recording or self.active is not None:
                return fn(*args, **kwargs)
            self.active, start = name, time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
                self.active = None

        return timed

    def wrap_methods(self, obj: Any, phases: dict[str, str]) -> None:
        """obj.<method> -> its timed version, for every {method: phase} the object has."""
        for method, phase in phases.items():
            if hasattr(obj, method):
                setattr(obj, method, self.wrap(phase, getattr(obj, method)))

    PHASES = {"running_stats_update_": "normaliser", "running_stats_normalize": "normaliser",
              "hypernet_block": "hypernet", "value_targets": "value targets", "ridge_solve": "solve",
              "apply_deltas_": "update", "apply_deltas_dense_": "update"}

    def ops_table(self, base: dict[str, Callable]) -> dict[str, Callable]:
        """Timed versions of the ops the engine calls in its phases, from `base` (name -> function)."""
        return {name: self.wrap(phase, base[name]) for name, phase in self.PHASES.items()}


class EngineWork:
    """One timed `step()` of the engine, an untimed `reset()`, the values its gate compares, its phases."""

    def __init__(self, provider: str):
        self.provider = provider
        self.clock = PhaseClock()

    @contextlib.contextmanager
    def engine(self):
        """The ops the engine runs on for this provider, timed per phase."""
        if self.provider == "competent":
            with patched_ops({**COMPETENT_OPS, **self.clock.ops_table(COMPETENT_OPS)}):
                yield
        else:
            real = {name: getattr(ops, name) for name in PhaseClock.PHASES}
            with patched_ops(self.clock.ops_table(real), drop_backend=False):
                yield

    def run(self) -> Any:
        with self.engine():
            return self.step()

    def step(self) -> Any:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def fast_form(self) -> str | None:
        """The solve form of the kernels' engine on this workload (the gate runs the reference in it)."""
        return None

    def gate_values(self, out: Any) -> dict[str, Any]:
        return {}

    def compare(self, got: dict[str, Any], expected: dict[str, Any], label: str) -> str:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


class SpilledEntry:
    """The reference engine's gate values for one (workload, case, solve form), kept in a temporary file instead of
    in memory. They are as large as what the engines allocate (a dense fp64 dW per step, every hypernetwork
    gradient), and the fused providers' peak RSS is measured while they are cached: held in memory they would count
    as the engine's own."""

    def __init__(self):
        self.key, self._path = None, None
        atexit.register(self.clear)

    def put(self, key, value) -> None:
        self.clear()
        fd, path = tempfile.mkstemp(prefix="emsedit-bench-expected-", suffix=".pt")
        os.close(fd)
        torch.save(value, path)
        self.key, self._path = key, path

    def load(self) -> Any:
        return torch.load(self._path, weights_only=True)

    def clear(self) -> None:
        if self._path is not None and os.path.exists(self._path):
            os.remove(self._path)
        self.key, self._path = None, None


EXPECTED = SpilledEntry()
# workloads whose fused provider is also timed side by side with the competent engine (the kernel-gain target; end
# to end, where one provider after the other read up to 25% apart on identical model passes)
PAIRED = ("edit_step_editor_work", "end_to_end_edit", "end_to_end_train")


def _paired_with_competent(work: EngineWork, make: Callable[..., EngineWork], case, device: str, rounds: int
                           ) -> dict[str, list[float]]:
    """The fused engine and the competent engine on the same workload, timed side by side (_harness.paired_rounds)."""
    competent = make(case, "competent", device)
    try:
        competent.reset()
        competent.run()  # untimed first call, as the fused engine's gate call was
        return _harness.paired_rounds({"self": (work.run, work.reset), "competent": (competent.run, competent.reset)},
                                      rounds if _harness.SETTINGS.smoke else max(rounds, 3), device)
    finally:
        competent.close()
        del competent
        gc.collect()


def run_engine_bench(benchmark, name: str, case_id: str, provider: str, device: str,
                     make: Callable[..., EngineWork]) -> None:
    """Gate, memory, timing and phases of one editor-level workload. make(case, provider, device, solve_form=None)
    builds it; solve_form forces the reference engine into the kernels' form for the gate.

    The gate: record_backends shows exactly `provider` (nothing for competent), and the results match the reference
    engine run in the same solve form as the kernels (the published primal fp32 LU is itself off by ~1e-4 relative
    at these shapes, while the n x n dual system is well conditioned). The published reference is its own
    expectation."""
    case = _cases.CASES[case_id]
    why = skip_engine(provider, device)
    if why:
        pytest.skip(why)
    benchmark.group = f"{name}[{case}]"
    label = f"{name}-{case}-{provider}"
    _harness.INPUTS.clear()
    _harness.EXPECTED.clear()
    gc.collect()
    work = make(case, provider, device)
    try:
        form = work.fast_form()
        key = (name, case_id, form)
        if provider not in ("reference", "floor", "floor_all_logits") and EXPECTED.key != key:
            EXPECTED.clear()
            ref = make(case, "reference", device, solve_form=form)
            try:
                ref.reset()
                EXPECTED.put(key, ref.gate_values(ref.run()))
            finally:
                ref.close()
                del ref
                gc.collect()
        work.reset()
        with ops.record_backends() as seen:
            out, peak, peak_abs, seconds = _memory.measure_call(work.run, device)
        if provider.startswith("floor"):
            rule = "none (no edit)"
        else:
            expect_engine_backends(seen, provider, label)
            got = work.gate_values(out)
            if provider == "reference":
                rule = "self"
            else:
                rule = work.compare(got, EXPECTED.load(), label) + f" vs the reference engine ({form} solve)"
            del got
        del out
        if device == "cuda":  # the first call also compiled and autotuned: measure memory on a warm call
            work.reset()
            _, peak, peak_abs, _ = _memory.measure_call(work.run, device)
        rounds = _harness.choose_rounds(seconds)
        work.clock.seconds.clear()
        work.clock.recording = True
        benchmark.pedantic(_harness.timed(work.run, device), setup=work.reset, rounds=rounds, warmup_rounds=0,
                           iterations=1)
        work.clock.recording = False
        info = _harness.base_info(case, provider, device)
        info.update({"op": name, "backends": {k: sorted(v) for k, v in seen.items()}, "gate": rule,
                     "first_call_s": seconds, "peak_bytes": peak, "peak_rss_bytes": peak_abs,
                     "peak_method": _memory.MALLOC.method if device == "cpu" else "cuda_allocator",
                     "interpreted": provider == "triton" and device == "cpu", "rounds": rounds,
                     "phases_s": {k: v / rounds for k, v in work.clock.seconds.items()}})
        info.update(work.info())
        if provider in _harness.KERNELS and name in PAIRED and not info["interpreted"]:
            info["paired_s"] = _paired_with_competent(work, make, case, device, rounds)
        _harness.finish_info(benchmark, info)
    finally:
        work.close()
        del work
        gc.collect()  # workloads hold reference cycles (timing wrappers): free their editors now


def editor_config(provider: str, *, rank: int, solve_form: str | None = None, small_model: bool = True,
                  overrides: tuple[str, ...] = (), extra: dict | None = None):
    """EMSEdit, sequential regime, K = 2, rank r, the provider's backend (engine_backend). small_model: the
    small-model profile (eta 1e-3 learned as log eta, Adam 1e-4, drift penalty 0.01) without its key prior, else
    the 7B-scale preset (eta 1e-6). solve_form None: the engine's own choice (the reference backend solves primal,
    as published)."""
    from emsedit_fast.config import load
    from emsedit_fast.profiles import SMALL_MODEL_PROFILE

    # The profile's key prior is plain torch in every provider (a whitening GEMM) and needs key statistics fitted from
    # data: the benchmarks time the engine without it, so every provider runs the same algorithm.
    sets = ["editor.key_prior=0", "editor.edit_prior=0",
            f"editor.backend={engine_backend(provider)}", f"editor.rank={rank}", "editor.n_steps=2",
            f"editor.solve_form={solve_form or 'auto'}", *overrides]
    return load("emsedit", mode="sequential", defaults=SMALL_MODEL_PROFILE if small_model else None, extra=extra,
                overrides=sets)
