"""The drift penalty c tr(D Q D^T), D = W - W_ref: its value and its factored gradient (WeightGrad) against autograd
on a dense D, for the identity metric and the key prior's Sigma, factored and streamed, Linear and Conv1D layouts;
train.drift_reference pre_batch scores only the current batch's steps; and the meta-gradient through a real edit
matches finite differences with the Sigma metric."""

import pytest
import torch

from emsedit_fast import api
from emsedit_fast.config import ConfigError
from emsedit_fast.config import load
from emsedit_fast.editors import WeightGrad
from emsedit_fast.editors.weight_grad import drift_sq_norm
from emsedit_fast.editors.weight_grad import lowrank_drift_sq_norm
from emsedit_fast.testing import assert_matches_central_differences
from emsedit_fast.trainer import MetaTrainer


def _spd(d: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(3 * d, d, generator=gen, dtype=torch.float64)
    return x.t() @ x / (3 * d)


@pytest.mark.parametrize("metric", ["identity", "sigma"])
@pytest.mark.parametrize("held", ["factors", "weights", "weights_transposed"])
def test_drift_value_and_gradient_match_autograd(metric, held):
    gen = torch.Generator().manual_seed(0)
    d_out, d_in, c = 12, 9, 0.7
    # two steps' factors: the value must carry the cross terms between them
    # fp32 inputs as in training; the reference is fp64 autograd on the same values
    factors = [(torch.randn(d_out, n, generator=gen), torch.randn(n, d_in, generator=gen)) for n in (3, 2)]
    drift = sum(b.double() @ a.double() for b, a in factors)
    q = _spd(d_in, gen).float() if metric == "sigma" else None
    qd = q.double() if q is not None else torch.eye(d_in, dtype=torch.float64)
    d = drift.clone().requires_grad_(True)
    value = c * torch.trace(d @ qd @ d.t())
    (grad,) = torch.autograd.grad(value, d)  # 2 c D Q (d_out, d_in)

    wg = WeightGrad(drift_coef=c, drift_metric=q, d_out=d_out)
    if held == "factors":
        wg.drift_factors = [(b.t(), a) for b, a in factors]
        got = c * lowrank_drift_sq_norm(factors, q)
    else:
        w0 = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
        w, base, transposed = w0 + drift, w0, False  # fp64 weights: W - W0 is the drift up to fp64 rounding
        if held == "weights_transposed":  # GPT-2 Conv1D stores (d_in, d_out)
            w, base, transposed = w.t().contiguous(), base.t().contiguous(), True
        wg.drift_weights = (w, base, transposed)
        got = c * drift_sq_norm(w, base, block=4, metric=q, transposed=transposed)
    assert value.item() > 1.0
    assert got == pytest.approx(value.item(), rel=1e-6)
    keys = torch.randn(5, d_in, generator=gen, dtype=torch.float64)
    keys = keys.float().double()
    torch.testing.assert_close(wg.times_keys(keys.float()).double(), keys @ grad.t(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(wg.hat().double(), grad.t(), rtol=1e-4, atol=1e-4)


def test_sigma_metric_is_not_the_identity():
    gen = torch.Generator().manual_seed(1)
    factors = [(torch.randn(6, 2, generator=gen, dtype=torch.float64),
                torch.randn(2, 5, generator=gen, dtype=torch.float64))]
    q = _spd(5, gen) * 4.0
    assert lowrank_drift_sq_norm(factors, q) != pytest.approx(lowrank_drift_sq_norm(factors), rel=1e-2)


def test_pre_batch_scores_only_this_batchs_steps(tiny_trainer, tiny_batches):
    from emsedit_fast import ops

    b1, b2 = tiny_batches(2, 3)
    trainer = tiny_trainer("editor.eta_init=1e-2", "train.reg_coef=0.5", "train.drift_reference=pre_batch")
    editor = trainer.editor
    editor.edit(b1.edit)  # an earlier batch of the sequence: in W - W0, not in this batch's drift
    before = ops.snapshot(editor.weights())
    records = trainer._apply_steps(b2, range(editor.cfg.n_steps))
    terms = [(1.0, b2, None)]
    loss_pb, grads_pb = trainer.weight_grads(terms, records, before)
    loss_orig, _ = trainer.weight_grads(terms)
    plain = MetaTrainer(editor, load("emsedit", mode="sequential", overrides=["train.reg_coef=0"]).train)
    loss_ce, _ = plain.weight_grads(terms)
    batch_drift = sum(float(((w.double() - b.double()) ** 2).sum()) for w, b in zip(editor.weights(), before))
    total_drift = sum(float(((w.double() - b.double()) ** 2).sum()) for w, b in zip(editor.weights(), editor.base))
    assert batch_drift > 0 and total_drift > 1.5 * batch_drift
    assert loss_pb == pytest.approx(loss_ce + 0.5 * batch_drift, rel=1e-4)
    assert loss_orig == pytest.approx(loss_ce + 0.5 * total_drift, rel=1e-4)
    for m, w, b in zip(editor.modules_, editor.weights(), before):  # the factored gradient is the dense one's
        dense = WeightGrad(drift_coef=0.5, drift_weights=(w, b, m.transposed), d_out=m.d_out)
        keys = torch.randn(4, w.shape[1] if not m.transposed else w.shape[0])
        torch.testing.assert_close(grads_pb[m.name].times_keys(keys) - plain.weight_grads(terms)[1][m.name]
                                   .times_keys(keys), dense.times_keys(keys), rtol=1e-3, atol=1e-5)


def test_keys_metric_needs_the_key_prior(tiny_trainer):
    with pytest.raises(ConfigError, match="train.drift_metric"):
        tiny_trainer("train.drift_metric=keys", "train.reg_coef=0.1")


@pytest.mark.parametrize("path", ["factored", "streamed"])
def test_meta_gradient_with_the_sigma_metric_matches_finite_differences(path):
    cfg = load("emsedit", mode="batch", overrides=["model.name=tiny-llama", "editor.rank=8", "editor.eta_init=1e-1",
                                                    "train.reg_coef=50", "train.drift_metric=keys", "editor.n_steps=1",
                                                    "editor.key_prior=10", "editor.backend=reference"])
    session = api.open_session(cfg)
    records = api.load_split(cfg, "train", source="bundled")
    batch = api.make_batches(session.tokenizer, records, 6, 1, cfg.train.micro_batch, cfg.model.max_length,
                             "cpu")[0]
    api.fit_key_prior(session, records[6:40])
    editor, trainer = session.editor, MetaTrainer(session.editor, cfg.train)
    net = editor.net(0, 0)
    eta0 = net.eta.detach().clone()
    state = {k: v.clone() for k, v in editor.state_dict().items()}

    def edit_and_loss(eta, backward=False, drift=True):
        editor.load_state_dict(state)
        with torch.no_grad():
            net.eta.copy_(eta)
        rec = editor.predict_deltas(editor.capture(batch.edit), 0)
        editor.apply_step(rec)
        trainer.cfg = cfg.train if drift else load("emsedit", mode="batch", overrides=["train.reg_coef=0"]).train
        loss, grads = trainer.weight_grads([(1.0, batch, None)], [rec] if path == "factored" else None)
        if backward:
            editor.zero_grad()
            editor.meta_backward([rec], grads)
        editor.reset()
        return loss

    edit_and_loss(eta0, backward=True, drift=False)
    without = net.eta.grad.clone()
    edit_and_loss(eta0, backward=True)
    analytic = net.eta.grad.clone()
    assert (analytic - without).abs().max() > 1e-2 * without.abs().max()  # the penalty moves the gradient
    assert_matches_central_differences(edit_and_loss, eta0, analytic)
