"""Logits only where a loss or metric reads them: the language-model head cut to the answer positions gives the
values full logits hold there, for every model family, and the capture pass built on it gives the same rows."""

from __future__ import annotations

import pytest
import torch

from emsedit_fast.data.collate import collate
from emsedit_fast.models.adapter import default_module_patterns
from emsedit_fast.models.adapter import resolve_modules
from emsedit_fast.models.hooks import answer_positions
from emsedit_fast.models.hooks import capture
from emsedit_fast.models.hooks import logits_at
from emsedit_fast.models.tiny import TINY_CONFIGS
from emsedit_fast.models.tiny import tiny_causal_lm
from emsedit_fast.models.tiny import tiny_tokenizer

PAIRS = [("The capital of France is", "Rome"), ("Albert Einstein was born in", "the city of Ulm"),
         ("People in Norway speak", "Norwegian")]


def _batch(tok):
    return collate(tok, PAIRS, micro_batch=2, max_length=32)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_cut_head_equals_full_logits_at_the_answer_positions(model_type):
    tok = tiny_tokenizer()
    model = tiny_causal_lm(model_type, vocab_size=len(tok))
    batch = _batch(tok)
    keep = answer_positions(batch.labels)
    assert 0 < keep.numel() < batch.labels.shape[1]  # a real cut: prompts are longer than answers
    with torch.no_grad():
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        fired = []
        handle = model.get_output_embeddings().register_forward_hook(lambda m, a, o: fired.append(o.shape))
        with logits_at(model, keep) as cut:
            part = cut(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits)
        handle.remove()
    assert fired and fired[0][1] == keep.numel()  # the head itself ran on the kept positions only
    assert part.shape == (full.shape[0], keep.numel(), full.shape[2])
    torch.testing.assert_close(part, full.index_select(1, keep), rtol=1e-5, atol=1e-6)
    assert torch.equal(part.argmax(-1), full.index_select(1, keep).argmax(-1))


def test_capture_with_the_cut_head_matches_full_logits(monkeypatch):
    """The capture pass (logits at the answer positions only) gives the rows a full-logits pass gives."""
    import emsedit_fast.models.hooks as hooks

    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tok))
    modules = resolve_modules(model, default_module_patterns(model, "sequential"))
    batch = _batch(tok)
    cut = capture(model, modules, batch.input_ids, batch.attention_mask, batch.labels, batch.micro_batch)
    everywhere = torch.arange(batch.labels.shape[1])
    monkeypatch.setattr(hooks, "answer_positions", lambda *labels: everywhere)  # keep every position: full logits
    full = capture(model, modules, batch.input_ids, batch.attention_mask, batch.labels, batch.micro_batch)
    assert abs(cut.loss - full.loss) <= 1e-6 * max(1.0, abs(full.loss))
    for m in modules:
        torch.testing.assert_close(cut.keys[m.name], full.keys[m.name], rtol=0, atol=0)
        torch.testing.assert_close(cut.value_grads[m.name], full.value_grads[m.name], rtol=1e-5, atol=1e-7)
