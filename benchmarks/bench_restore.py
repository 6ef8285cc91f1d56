"""restore_: bit-exact grouped copy of snapshots back into the edited weights (every round overwrites "edited"
weights restored in an untimed setup)."""

import _harness
import pytest

RESTORE = _harness.RestoreSpec()


@pytest.mark.bench("restore", providers=_harness.PROVIDERS)
def bench_restore_grouped(benchmark, case, provider, device):
    _harness.run_op_bench(benchmark, RESTORE, case, provider, device)
