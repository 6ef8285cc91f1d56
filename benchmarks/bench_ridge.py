"""Ridge solve and its backward, plus the primal (d_in x d_in) vs dual (n x n) sweep.

bench_ridge_solve: the reference runs the published primal LU solve (what the reference editor does); the kernels
run form="auto" (`emsedit_fast.ops.choose_form`: dual while n < d_in) and are gated against the reference in that
same form. bench_ridge_solve_backward: from a dense dL/dW, through the primal form (reference) or the dual form
(kernels, including the K G^T product). bench_ridge_form_sweep: one layer, n = 16 .. 8192 rows, d_in 576, 1536, 4096
and 14336 (d_out from the same presets), each form with the reference and the C++ backend; points whose METHOD.md
7.3/7.4 cost model exceeds the CPU budget are skipped with the estimate (the issue's target point, d_in 4096, d_out
14336, n 256, always runs). BENCHMARKS.md puts the measured crossover next to where `choose_form` switches.
"""

import _harness
import pytest

SOLVE = _harness.RidgeSolveSpec()
BACKWARD = _harness.RidgeBackwardSpec()
SWEEP = _harness.RidgeSweepSpec()


@pytest.mark.bench("ridge", providers=_harness.KERNEL_PROVIDERS)
def bench_ridge_solve(benchmark, case, provider, device):
    _harness.run_op_bench(benchmark, SOLVE, case, provider, device)


@pytest.mark.bench("ridge_backward", providers=_harness.KERNEL_PROVIDERS)
def bench_ridge_solve_backward(benchmark, case, provider, device):
    _harness.run_op_bench(benchmark, BACKWARD, case, provider, device)


@pytest.mark.bench("ridge_sweep", providers=("reference", "cpp", "triton"))
def bench_ridge_form_sweep(benchmark, case, provider, device):
    _harness.run_op_bench(benchmark, SWEEP, case, provider, device)
