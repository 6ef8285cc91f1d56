"""The meta-optimiser: the per-tensor Adam that training uses computes what the multi-tensor Adam computes, bit for
bit, over a real training run, so results measured with either reproduce."""

import torch


def _trained(make_trainer, batches, foreach: bool):
    trainer = make_trainer("editor.eta_init=1e-2", "editor.eta_param=log", "train.meta_lr=1e-3",
                           "train.scalar_lr_scale=10")
    editor = trainer.editor
    assert trainer.optimizer.defaults["foreach"] is False and not trainer.optimizer.defaults["fused"]
    if foreach:
        for group in trainer.optimizer.param_groups:
            group["foreach"] = True
    before = {k: v.clone() for k, v in editor.state_dict().items()}
    trainer.train(batches, progress=False)
    after = {k: v.clone() for k, v in editor.state_dict().items()}
    assert sum(not torch.equal(before[k], after[k]) for k in after) > 4  # the optimiser moved the networks
    return trainer.report.losses, after


def test_per_tensor_adam_trains_exactly_as_the_multi_tensor_adam(tiny_trainer, tiny_batches):
    batches = tiny_batches(4)
    losses, state = _trained(tiny_trainer, batches, foreach=False)
    losses_foreach, state_foreach = _trained(tiny_trainer, batches, foreach=True)
    assert losses == losses_foreach
    assert state.keys() == state_foreach.keys()
    assert all(torch.equal(state[k], state_foreach[k]) for k in state)
