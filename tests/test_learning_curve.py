"""The learning curve of `train --eval-every`: validation points at the requested fractions, and validating never
changes what training computes (the evaluation puts weights, normaliser statistics, key prior and history back)."""

import torch

from emsedit_fast import api
from emsedit_fast.config import load


def _train(every):
    torch.manual_seed(0)
    cfg = load("emsedit", mode="sequential", overrides=[
        "model.name=tiny-llama", "editor.rank=8", "train.n_batches=6", f"train.eval_every={every}", "data.n_edits=3",
        "data.eval_batches=2", "train.sequence_length=3", "editor.key_prior=100", "editor.edit_prior=1"])
    session = api.open_session(cfg)
    if not session.editor.prior.ready():
        api.fit_key_prior(session)
    trainer = api.train(session, progress=False)
    state = {k: v.clone() for k, v in session.editor.state_dict().items()}
    return trainer.report, state, [w.clone() for w in session.editor.weights()]


def test_validation_points_land_at_the_requested_fractions():
    report, _, _ = _train(0.5)
    assert [p["step"] for p in report.curve] == [0, 3, 6]
    assert [p["fraction"] for p in report.curve] == [0.0, 0.5, 1.0]
    for p in report.curve:
        assert all(0.0 <= p[k] <= 100.0 for k in ("es", "gs", "ls_agree"))
    assert report.curve[1] != report.curve[0]  # training moved the editor between the points


def test_validating_during_training_leaves_training_unchanged():
    plain, plain_state, plain_weights = _train(0)
    curved, curved_state, curved_weights = _train(0.5)
    assert plain.curve == [] and len(curved.curve) == 3
    assert plain.losses == curved.losses
    assert plain_state.keys() == curved_state.keys()
    assert all(torch.equal(plain_state[k], curved_state[k]) for k in plain_state)
    assert all(torch.equal(a, b) for a, b in zip(plain_weights, curved_weights))


def _params(state):
    return {k: v for k, v in state.items() if ".stats." not in k and "prior" not in k}


def test_keep_best_ends_with_the_editor_of_the_best_validation_point(monkeypatch):
    # make the middle point the best one, so that neither "last" nor "untrained" would pass
    monkeypatch.setattr(api, "selection_score", lambda point: -abs(point["step"] - 3))
    torch.manual_seed(0)
    cfg = load("emsedit", mode="sequential", overrides=[
        "model.name=tiny-llama", "editor.rank=8", "train.n_batches=6", "train.eval_every=0.5", "train.keep=best",
        "data.n_edits=3", "data.eval_batches=2", "train.sequence_length=3", "editor.key_prior=100",
        "editor.edit_prior=1"])
    session = api.open_session(cfg)
    api.fit_key_prior(session)
    trainer = api.train(session, progress=False)
    assert trainer.report.kept_step == 3 and [p["step"] for p in trainer.report.curve] == [0, 3, 6]
    kept = session.editor.state_dict()
    _, last, _ = _train(0)  # six batches, keep last
    assert any(not torch.equal(kept[k], v) for k, v in _params(last).items())
    # the kept editor is the one three batches of training give, statistics included; W0 and no edit term
    torch.manual_seed(0)
    short = load("emsedit", mode="sequential", overrides=[
        "model.name=tiny-llama", "editor.rank=8", "train.n_batches=3", "data.n_edits=3", "data.eval_batches=2",
        "train.sequence_length=3", "editor.key_prior=100", "editor.edit_prior=1"])
    other = api.open_session(short)
    api.fit_key_prior(other)
    api.train(other, progress=False)
    ref = other.editor.state_dict()
    assert kept.keys() == ref.keys() and all(torch.equal(kept[k], ref[k]) for k in ref)
    assert all(torch.equal(w, b) for w, b in zip(session.editor.weights(), session.editor.base))


def test_keep_best_needs_validation_points():
    import pytest

    from emsedit_fast.config import ConfigError

    with pytest.raises(ConfigError, match="train.keep"):
        load("emsedit", mode="sequential", overrides=["train.keep=best"])


def test_with_ema_the_run_validates_and_ends_with_the_average():
    torch.manual_seed(0)
    cfg = load("emsedit", mode="sequential", overrides=[
        "model.name=tiny-llama", "editor.rank=8", "train.n_batches=6", "train.eval_every=0.5", "train.ema=0.5",
        "train.meta_lr=1e-3", "data.n_edits=3", "data.eval_batches=2", "train.sequence_length=3",
        "editor.key_prior=100", "editor.edit_prior=1"])
    session = api.open_session(cfg)
    api.fit_key_prior(session)
    trainer = api.train(session, progress=False)
    params = list(session.editor.parameters())
    assert all(torch.equal(p, a) for p, a in zip(params, trainer.average))
    # the last validation point scored the editor the run ended with (the average, not the last iterate)
    valid = api.load_split(session, "valid")
    again = api.evaluate_protocol(session, valid, "sequential", 3, min(2, len(valid) // 3), progress=False)
    assert all(again[k] == trainer.report.curve[-1][k] for k in ("es", "gs", "ls_agree"))
    _, last, _ = _train(0)  # the same run without the average ends elsewhere
    ended = session.editor.state_dict()
    assert any(not torch.equal(ended[k], v) for k, v in _params(last).items())
