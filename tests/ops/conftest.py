"""Op tests run the compiled kernels with two threads, so their parallel paths (OpenMP over layers and rows) are the
ones under test, not a serial special case."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
