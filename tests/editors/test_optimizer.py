"""The meta-optimiser: the per-tensor Adam that training uses computes what the multi-tensor Adam computes, bit for
bit, over a real training run, so results measured with either reproduce."""

import torch

from emsedit_fast.config import load
from emsedit_fast.data.edit_batch import tokenize_batch
from emsedit_fast.data.facts import bundled_facts
from emsedit_fast.editors import build_editor
from emsedit_fast.models.adapter import default_module_patterns
from emsedit_fast.models.adapter import resolve_modules
from emsedit_fast.models.tiny import tiny_llama
from emsedit_fast.models.tiny import tiny_tokenizer
from emsedit_fast.trainer import MetaTrainer


def _trained(foreach: bool):
    torch.manual_seed(0)
    model = tiny_llama()
    cfg = load("emsedit", mode="sequential", overrides=["editor.rank=8", "editor.eta_init=1e-2", "editor.eta_param=log",
                                                         "train.meta_lr=1e-3", "train.scalar_lr_scale=10",
                                                         "editor.backend=reference"])
    editor = build_editor(model, resolve_modules(model, default_module_patterns(model, "sequential")), cfg.editor,
                          "sequential", seed=0)
    trainer = MetaTrainer(editor, cfg.train)
    assert trainer.optimizer.defaults["foreach"] is False and not trainer.optimizer.defaults["fused"]
    if foreach:
        for group in trainer.optimizer.param_groups:
            group["foreach"] = True
    before = {k: v.clone() for k, v in editor.state_dict().items()}
    tok, records = tiny_tokenizer(), bundled_facts("train")
    trainer.train([tokenize_batch(tok, records[i * 3:(i + 1) * 3], 3) for i in range(4)], progress=False)
    after = {k: v.clone() for k, v in editor.state_dict().items()}
    assert sum(not torch.equal(before[k], after[k]) for k in after) > 4  # the optimiser moved the networks
    return trainer.report.losses, after


def test_per_tensor_adam_trains_exactly_as_the_multi_tensor_adam():
    losses, state = _trained(foreach=False)
    losses_foreach, state_foreach = _trained(foreach=True)
    assert losses == losses_foreach
    assert state.keys() == state_foreach.keys()
    assert all(torch.equal(state[k], state_foreach[k]) for k in state)
