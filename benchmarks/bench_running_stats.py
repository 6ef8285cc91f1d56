"""Running normaliser: running_stats_update_ (parallel merge of N = L n rows) and running_stats_normalize."""

import _harness
import pytest

UPDATE = _harness.RunningStatsUpdateSpec()
NORMALIZE = _harness.RunningStatsNormalizeSpec()


@pytest.mark.bench("running_stats", providers=_harness.KERNEL_PROVIDERS)
def bench_running_stats_update(benchmark, case, provider, device):
    _harness.run_op_bench(benchmark, UPDATE, case, provider, device)


@pytest.mark.bench("running_stats", providers=_harness.KERNEL_PROVIDERS)
def bench_running_stats_normalize(benchmark, case, provider, device):
    _harness.run_op_bench(benchmark, NORMALIZE, case, provider, device)
