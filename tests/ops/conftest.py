"""Op tests run the compiled kernels with two threads, so their parallel paths (OpenMP over layers and rows) are the
ones under test, not a serial special case.

Marker `compile`: torch.compile smoke tests (tests/ops/test_registration.py); `pytest -m compile tests/ops` selects
them, e.g. on a GPU machine.
"""

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "compile: torch.compile(fullgraph=True) smoke tests of the ops")


@pytest.fixture(autouse=True)
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
