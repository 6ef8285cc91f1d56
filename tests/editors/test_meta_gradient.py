"""End-to-end meta-gradient: the decoupled chain rule (capture -> hypernetwork -> aggregation -> edited model -> loss,
docs/method.md, Meta-gradient) gives dL/deta equal to central finite differences of the meta-loss through a real
edit."""

import pytest
import torch

from emsedit_fast import api
from emsedit_fast.config import load
from emsedit_fast.testing import assert_matches_central_differences
from emsedit_fast.trainer import MetaTrainer


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("editor", ["emsedit", "mend"])
def test_meta_gradient_matches_finite_differences(editor, model):
    cfg = load(editor, mode="batch", overrides=[f"model.name={model}", "editor.rank=8", "editor.eta_init=1e-2",
                                                 "train.reg_coef=0", "editor.n_steps=1", "train.loss=l2",
                                                 "editor.backend=reference"])
    session = api.open_session(cfg)
    batch = api.make_batches(session.tokenizer, api.load_split(cfg, "train", source="bundled"), 6, 1,
                             cfg.train.micro_batch, cfg.model.max_length, "cpu")[0]
    editor_, trainer = session.editor, MetaTrainer(session.editor, cfg.train)
    net = editor_.net(0, 0)
    eta0 = net.eta.detach().clone()
    state = {k: v.clone() for k, v in editor_.state_dict().items()}

    def edit_and_loss(eta, backward=False):
        editor_.load_state_dict(state)
        with torch.no_grad():
            net.eta.copy_(eta)
        rec = editor_.predict_deltas(editor_.capture(batch.edit), 0)
        editor_.apply_step(rec)
        loss, grads = trainer.weight_grads([(1.0, batch, None)])
        if backward:
            editor_.zero_grad()
            editor_.meta_backward([rec], grads)
        editor_.reset()
        return loss

    edit_and_loss(eta0, backward=True)
    analytic = net.eta.grad.clone()
    assert_matches_central_differences(edit_and_loss, eta0, analytic)
