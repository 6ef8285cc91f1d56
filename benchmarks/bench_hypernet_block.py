"""One hypernetwork block over the stacked rows of a whole shape group: forward, the manual backward op, and
forward + backward under autograd (what meta-training runs per chunk). The reference calls the block once per layer
(A and B re-read L times); the kernels read them once."""

import _harness
import pytest

FORWARD = _harness.HypernetForwardSpec()
BACKWARD = _harness.HypernetBackwardSpec()
AUTOGRAD = _harness.HypernetAutogradSpec()


@pytest.mark.bench("hypernet_block", providers=_harness.KERNEL_PROVIDERS)
def bench_hypernet_block_forward(benchmark, case, provider, device):
    _harness.run_op_bench(benchmark, FORWARD, case, provider, device)


@pytest.mark.bench("hypernet_block", providers=_harness.KERNEL_PROVIDERS)
def bench_hypernet_block_backward(benchmark, case, provider, device):
    _harness.run_op_bench(benchmark, BACKWARD, case, provider, device)


@pytest.mark.bench("hypernet_block", providers=_harness.KERNEL_PROVIDERS)
def bench_hypernet_block_autograd(benchmark, case, provider, device):
    _harness.run_op_bench(benchmark, AUTOGRAD, case, provider, device)
