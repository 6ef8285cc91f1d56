"""train.step_credit: which loss reaches which MSBP step's networks in sequential meta-training.

The published credit ("final") sends the gradient G of the loss after all K steps to every step's networks, holding the
later steps' inputs fixed: exact for step K only. "last" trains step K alone, "per_step" trains step k on the loss
after step k; both are exact gradients of what they score, checked here against central differences of the real
K-step edit on the tiny LLaMA."""

import collections

import pytest
import torch

from emsedit_fast.config import ConfigError
from emsedit_fast.config import load
from emsedit_fast.testing import assert_matches_central_differences

K = 3


def _setup(tiny_trainer, tiny_batches, credit):
    trainer = tiny_trainer(f"editor.n_steps={K}", "editor.eta_init=1e-2", f"train.step_credit={credit}")
    batch = tiny_batches(1, 3)[0]
    state = {k: v.clone() for k, v in trainer.editor.state_dict().items()}
    return trainer, batch, state


def _loss_after(trainer, batch, state, n_steps, step, eta):
    """The meta-loss after the first n_steps MSBP steps of `batch` from W0, with step `step`'s eta (group 0) set."""
    editor = trainer.editor
    editor.load_state_dict(state)
    with torch.no_grad():
        editor.net(step, 0).eta.copy_(eta)
    trainer._apply_steps(batch, range(n_steps))
    loss, _ = trainer.weight_grads([(1.0, batch, None)])
    editor.reset()
    return loss


def _analytic(trainer, batch, state):
    editor = trainer.editor
    editor.load_state_dict(state)
    editor.zero_grad(set_to_none=True)
    loss, _ = trainer._sequential_batch_grads(batch, None, collections.deque(maxlen=1))
    weights = [w.detach().clone() for w in editor.weights()]
    grads = [None if editor.net(k, 0).eta.grad is None else editor.net(k, 0).eta.grad.clone() for k in range(K)]
    editor.reset()
    return loss, weights, grads


@pytest.mark.parametrize("credit", ["final", "last", "per_step"])
def test_credited_gradients_are_exact(tiny_trainer, tiny_batches, credit):
    trainer, batch, state = _setup(tiny_trainer, tiny_batches, credit)
    loss, _, grads = _analytic(trainer, batch, state)
    assert loss == pytest.approx(_loss_after(trainer, batch, state, K, 0, state["nets.0.0.eta"]), rel=1e-6)
    if credit == "last":
        assert all(g is None for g in grads[:-1])  # the earlier steps' networks stay as they are
    else:
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
    # step K's gradient is exact in every credit: nothing comes after it
    eta = state[f"nets.{K - 1}.0.eta"]
    assert_matches_central_differences(lambda e: _loss_after(trainer, batch, state, K, K - 1, e), eta, grads[-1])
    if credit == "per_step":  # step k's gradient is that of the loss after step k
        for k in range(K - 1):
            eta = state[f"nets.{k}.0.eta"]
            assert_matches_central_differences(lambda e, k=k: _loss_after(trainer, batch, state, k + 1, k, e), eta,
                                               grads[k])


def test_credit_changes_gradients_not_the_edit(tiny_trainer, tiny_batches):
    """The three credits apply the same K steps (same weights, same loss after K) and differ in the gradients of the
    steps before K only."""
    out = {}
    for credit in ("final", "last", "per_step"):
        trainer, batch, state = _setup(tiny_trainer, tiny_batches, credit)
        out[credit] = _analytic(trainer, batch, state)
    for credit in ("last", "per_step"):
        assert out[credit][0] == out["final"][0]
        assert all(torch.equal(a, b) for a, b in zip(out[credit][1], out["final"][1]))
        assert torch.equal(out[credit][2][-1], out["final"][2][-1])
    assert not torch.allclose(out["per_step"][2][0], out["final"][2][0])


def test_step_credit_is_sequential_only():
    with pytest.raises(ConfigError, match="train.step_credit"):
        load("emsedit", mode="batch", overrides=["train.step_credit=last"])


@pytest.mark.parametrize("reference", ["original", "pre_batch"])
def test_credit_check_reports_each_credit_against_finite_differences(tiny_trainer, tiny_batches, reference):
    trainer = tiny_trainer(f"editor.n_steps={K}", "editor.eta_init=1e-2", "editor.eta_param=log",
                           f"train.drift_reference={reference}")
    trainer._apply_steps(tiny_batches(2, 3)[1], range(K))  # an earlier batch's edit: pre_batch and W0 differ
    editor = trainer.editor
    before = {k: v.clone() for k, v in editor.state_dict().items()}
    weights = [w.detach().clone() for w in editor.weights()]
    rows = trainer.credit_check(tiny_batches(1, 3)[0], h=1e-3)
    assert [r["step"] for r in rows] == list(range(1, K + 1))
    for r in rows:
        assert r["per_step"] == pytest.approx(r["fd_own"], rel=2e-3)
        assert (r["last"] is None) == (r["step"] < K)
    assert rows[-1]["final"] == pytest.approx(rows[-1]["fd_final"], rel=2e-3)
    assert rows[-1]["last"] == pytest.approx(rows[-1]["fd_final"], rel=2e-3)
    assert rows[-1]["fd_own"] == rows[-1]["fd_final"]
    # the check leaves the editor and the model as they were
    assert all(torch.equal(v, before[k]) for k, v in editor.state_dict().items())
    assert all(torch.equal(a, b.detach()) for a, b in zip(weights, editor.weights()))
    assert all(p.grad is None for p in editor.parameters())


def test_credit_check_script_prints_a_row_per_step(capsys, monkeypatch):
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "credit_check.py"
    monkeypatch.setattr(sys, "argv", ["credit_check.py", "--model", "tiny-llama", "--device", "cpu", "--set",
                                      "editor.rank=8", "--steps", "2", "--pre", "1"])
    runpy.run_path(str(script), run_name="__main__")
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 |")]
    assert len(rows) == 2  # batch 2 (after one edited batch), steps 1 and 2
    final, last, per_step, fd_final, fd_own = (float(c) if c.strip() != "-" else None
                                               for c in rows[1].split("|")[3:8])
    assert last == pytest.approx(fd_final, rel=2e-2) and per_step == pytest.approx(fd_own, rel=2e-2)
