"""Test tiers, offline mode and seeding.

Tiers skip with a reason rather than deselect, so `pytest -m cuda` on a CPU machine exits 0:
    interpret  Triton kernels under TRITON_INTERPRET=1 (which must be set before triton is imported, so that tier
               runs in its own process: TRITON_INTERPRET=1 pytest -m interpret)
    cuda       needs a CUDA device
    slow       real-model runs; needs --run-slow
"""

import os

# Before anything imports transformers or datasets: a hub look-up without network costs close to a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=50, derandomize=True, deadline=None)
settings.register_profile("interpret", max_examples=20, derandomize=True, deadline=None)
settings.register_profile("dev", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "interpret" if os.environ.get("TRITON_INTERPRET") == "1"
                                     else "ci"))


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="run the slow (real-model) tier")


def pytest_collection_modifyitems(config, items):
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "interpret" in item.keywords and not interpreting and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="Triton tier: run with TRITON_INTERPRET=1 pytest -m interpret"))
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(pytest.mark.skip(reason="slow tier: pass --run-slow"))


# Tests use tiny tensors: one intra-op thread avoids OpenMP spin overhead (60x slowdowns on a loaded 2-core box).
torch.set_num_threads(int(os.environ.get("EMSEDIT_FAST_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_batches():
    """make(n, size=3): n training batches of `size` consecutive bundled training facts, tokenised for the tiny
    models."""
    from emsedit_fast.data.edit_batch import tokenize_batch
    from emsedit_fast.data.facts import bundled_facts
    from emsedit_fast.models.tiny import tiny_tokenizer

    def make(n: int, size: int = 3) -> list:
        tok, records = tiny_tokenizer(), bundled_facts("train")
        return [tokenize_batch(tok, records[i * size:(i + 1) * size], size) for i in range(n)]

    return make
