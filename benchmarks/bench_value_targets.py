"""value_targets (coeff_j = -eta <u_j, u~_j>, V_j = coeff_j delta~_j) and its manual backward."""

import _harness
import pytest

FORWARD = _harness.ValueTargetsSpec()
BACKWARD = _harness.ValueTargetsBackwardSpec()


@pytest.mark.bench("value_targets", providers=_harness.KERNEL_PROVIDERS)
def bench_value_targets_forward(benchmark, case, provider, device):
    _harness.run_op_bench(benchmark, FORWARD, case, provider, device)


@pytest.mark.bench("value_targets", providers=_harness.KERNEL_PROVIDERS)
def bench_value_targets_backward(benchmark, case, provider, device):
    _harness.run_op_bench(benchmark, BACKWARD, case, provider, device)
