"""Grouped in-place weight updates: apply_deltas_ (low rank, W += M^T K) and apply_deltas_dense_ (W += S^T).

Cases: every preset's edited group (fp32 and bf16 weights; Linear and GPT-2 Conv1D layouts). Each timed round starts
from the original weights (untimed restore in `setup`). The reference materialises a dense fp32 delta per layer; the
fused kernels read and write W once.
"""

import _harness
import pytest

APPLY = _harness.ApplyDeltasSpec()
DENSE = _harness.ApplyDeltasDenseSpec()


@pytest.mark.bench("apply_deltas", providers=_harness.PROVIDERS)
def bench_apply_deltas_grouped(benchmark, case, provider, device):
    _harness.run_op_bench(benchmark, APPLY, case, provider, device)


@pytest.mark.bench("apply_deltas_dense", providers=_harness.PROVIDERS)
def bench_apply_deltas_dense(benchmark, case, provider, device):
    _harness.run_op_bench(benchmark, DENSE, case, provider, device)
