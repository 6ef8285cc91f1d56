"""The correctness gates can fail: for every op benchmark and the engine benchmarks, on the smoke cases, a result of
zeros and the input handed back unchanged are rejected, while the competent baseline and the C++ kernels pass.

Runs in the CI smoke tier (`pytest -q benchmarks --benchmark-only --smoke`; conftest.py keeps pytest-benchmark from
skipping these non-benchmarks) and on its own: `pytest benchmarks/test_gates.py`.
"""

import _harness
import bench_apply_deltas
import bench_edit_step
import bench_end_to_end
import bench_hypernet_block
import bench_restore
import bench_ridge
import bench_running_stats
import bench_value_targets
import pytest
import torch

from emsedit_fast import ops

SPECS = (bench_apply_deltas.APPLY, bench_apply_deltas.DENSE, bench_restore.RESTORE, bench_running_stats.UPDATE,
         bench_running_stats.NORMALIZE, bench_hypernet_block.FORWARD, bench_hypernet_block.BACKWARD,
         bench_hypernet_block.AUTOGRAD, bench_value_targets.FORWARD, bench_value_targets.BACKWARD,
         bench_ridge.SOLVE, bench_ridge.SWEEP, bench_ridge.BACKWARD)
CASES = [(spec, case) for spec in SPECS for case in spec.cases(smoke=True, device="cpu")]


def _gate(spec, x, expected, before, got):
    return _harness.check_outputs(got, expected, label=f"{spec.op}-{x.case}", before=before, exact=spec.exact,
                                  oracle=lambda: spec.oracle(x))


@pytest.mark.parametrize("spec,case", CASES, ids=[f"{type(s).__module__}.{type(s).__name__}-{c}" for s, c in CASES])
def test_wrong_results_fail_every_op_gate(spec, case):
    x = spec.make(case, "cpu")
    expected = _harness.expected_outputs(spec, x)
    before = _harness.before_call(spec, x)
    providers = ["competent"] + (["cpp"] if not _harness.skip_provider(spec.op, "cpp", "cpu") else [])
    for provider in providers:  # right results pass
        x.reset()
        out = _harness.provider_callable(spec, x, provider)()
        _gate(spec, x, expected, before, _harness.clone_all(spec.outputs(x, out)))
    with pytest.raises(AssertionError):
        _gate(spec, x, expected, before, [torch.zeros_like(e) for e in expected])
    twins = before if spec.inplace else spec.passthrough(x)
    if twins is not None:
        unchanged = [e if t is None else t.clone() for t, e in zip(twins, expected)]
        with pytest.raises(AssertionError):
            _gate(spec, x, expected, before, unchanged)


def test_an_expectation_of_zeros_is_refused():
    zeros = torch.zeros(4, 3)
    with pytest.raises(AssertionError, match="cannot tell a wrong result"):
        _harness.check_output(zeros, zeros, label="zeros")
    w = torch.randn(4, 3)
    with pytest.raises(AssertionError, match="cannot tell a wrong result"):
        _harness.check_output(w, w, before=w, label="no change")


def test_wrong_results_fail_the_editor_step_gate():
    case = bench_edit_step.WORK.cases(smoke=True, device="cpu")[0]
    _register(case)
    ref = bench_edit_step.EditorWork(case, "reference", "cpu", solve_form=ops.choose_form(case.rows, case.d_in))
    ref.reset()
    expected = ref.gate_values(ref.run())
    for provider in ("competent", "cpp"):
        work = bench_edit_step.EditorWork(case, provider, "cpu")
        work.reset()
        got = work.gate_values(work.run())
        work.compare(got, expected, provider)  # right results pass
        with pytest.raises(AssertionError):
            work.compare({**got, "delta": torch.zeros_like(got["delta"])}, expected, f"{provider}-zero-delta")
        with pytest.raises(AssertionError):
            work.compare({**got, "weights": [w.clone() for w in work.before]}, expected, f"{provider}-unchanged")
        work.close()
    ref.close()


def test_wrong_results_fail_the_end_to_end_gates():
    work = bench_end_to_end.SPEC.cases(smoke=True, device="cpu")[0]
    for kind in (bench_end_to_end.EditStep, bench_end_to_end.TrainStep):
        probe = kind(work, "cpp", "cpu")
        ref = kind(work, "reference", "cpu", solve_form=probe.fast_form())
        ref.reset()
        expected = ref.gate_values(ref.run())
        ref.close()
        probe.reset()
        got = probe.gate_values(probe.run())
        probe.compare(got, expected, kind.__name__)  # right results pass
        if kind is bench_end_to_end.EditStep:
            zeros = {**got, "deltas": [torch.zeros_like(d) for d in got["deltas"]]}
        else:
            zeros = {**got, "grads": {k: torch.zeros_like(v) for k, v in got["grads"].items()}}
        with pytest.raises(AssertionError):
            probe.compare(zeros, expected, f"{kind.__name__}-zeros")
        probe.close()


def _register(case):
    import _cases

    _cases.register([case])
