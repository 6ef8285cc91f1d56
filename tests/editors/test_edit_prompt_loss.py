"""train.edit_prompt_coef: the edit prompts' cross-entropy joins the paraphrases' in the meta-loss, in the loss value
and in the factored weight gradient."""

import dataclasses

import pytest
import torch

from emsedit_fast.config import ConfigError
from emsedit_fast.config import load


def test_edit_prompt_term_adds_its_weighted_cross_entropy(tiny_trainer, tiny_batches):
    batch = tiny_batches(1, 4)[0]
    # the same paraphrase-only trainer scores the paraphrases, and the edit prompts when they stand in for them
    plain = tiny_trainer("train.reg_coef=0")
    loss_equiv, g_equiv = plain.weight_grads([(1.0, batch, None)])
    loss_edit, g_edit = plain.weight_grads([(1.0, dataclasses.replace(batch, equiv=batch.edit), None)])
    both = tiny_trainer("train.reg_coef=0", "train.edit_prompt_coef=0.5")
    loss, grads = both.weight_grads([(1.0, batch, None)])
    assert loss_edit > 0 and loss_equiv > 0 and loss_edit != pytest.approx(loss_equiv)
    assert loss == pytest.approx(loss_equiv + 0.5 * loss_edit, rel=1e-5)
    for name, g in grads.items():
        expected = g_equiv[name].hat() + 0.5 * g_edit[name].hat()
        torch.testing.assert_close(g.hat(), expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())
        assert (g_edit[name].hat().abs().max() > 0)


def test_edit_prompt_coef_must_not_be_negative():
    with pytest.raises(ConfigError, match="train.edit_prompt_coef"):
        load("emsedit", overrides=["train.edit_prompt_coef=-1"])
