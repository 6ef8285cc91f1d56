"""The production edit runs the fused path: the normaliser folded into the first hypernetwork block (no separate
normalise op), the grouped hypernetwork, solve and update on the fast backend, at the profiles' ranks."""

from __future__ import annotations

import pytest

from emsedit_fast import api
from emsedit_fast import ops
from emsedit_fast.config import load
from emsedit_fast.data.edit_batch import tokenize_batch
from emsedit_fast.data.facts import bundled_facts
from emsedit_fast.models.tiny import tiny_llama
from emsedit_fast.models.tiny import tiny_tokenizer

FUSED = {"running_stats_update_", "hypernet_block", "value_targets", "ridge_solve", "apply_deltas_"}


def _edit_ops(backend: str, rank: int, train: bool = False) -> tuple[dict[str, set[str]], set[str]]:
    """(the backends each dispatched op ran on, the names of every operator the profiler saw)."""
    import torch

    cfg = load("emsedit", overrides=[f"editor.rank={rank}", f"editor.backend={backend}", "editor.eta_init=1e-2",
                                     "train.micro_batch=2", "train.n_batches=1", "data.n_edits=2"])
    session = api.open_session(cfg, model=tiny_llama(), tokenizer=tiny_tokenizer())
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    with ops.record_backends() as seen, profiler as prof:
        if train:
            api.train(session, bundled_facts("train")[:4], progress=False)
        batch = tokenize_batch(session.tokenizer, bundled_facts("eval")[:2], 2, need_equiv=False)
        session.editor.edit(batch.edit)
    return seen, {e.name for e in prof.events()}


@pytest.mark.parametrize("rank", [256, 1024])
def test_edit_runs_the_fused_ops_on_the_cpp_backend(rank):
    if ops.availability("cpu")["cpp"] is not None:
        pytest.skip("the C++ extension is not built")
    seen, ran = _edit_ops("fast", rank, train=True)
    assert "running_stats_normalize" not in seen  # folded into the first block
    assert FUSED <= set(seen), seen
    assert all(seen[op] == {"cpp"} for op in FUSED), seen
    # the meta-gradient back-propagates through the fused block backward, not through PyTorch autograd of its parts
    assert "emsedit_fast::hypernet_block_backward" in ran


@pytest.mark.interpret
def test_edit_runs_the_fused_triton_block_at_rank_256():
    if ops.availability("cpu")["triton"] is not None:
        pytest.skip("Triton cannot run here (needs TRITON_INTERPRET=1 on the CPU)")
    seen, _ = _edit_ops("triton", 256)
    assert "running_stats_normalize" not in seen
    assert seen["hypernet_block"] == {"triton"}, seen
