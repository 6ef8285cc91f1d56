"""Numerical faults never reach the model (issue 7).

NaN/Inf in the captured keys or value-gradients, in the hypernetwork output, in the ridge solve, an update that
overflows the weights' dtype, or a step above `editor.max_delta_norm`: `Editor.edit` raises EditRefused and every
edited weight keeps its exact bits (fp32 and bf16), the normaliser statistics too, so the next clean edit equals a clean
edit made before the fault. Faults are injected at step 1 and at step 2 (when step 1 is already applied).

Meta-training skips such a batch (counted in `trainer.report.skipped`), and goes on; in the sequential regime a skipped
batch leaves no trace: training on [b1, b2 (faulty), b3] ends bit-identical to training on [b1, b3].
"""

import dataclasses
import math

import pytest
import torch

from emsedit_fast import api
from emsedit_fast import ops
from emsedit_fast.config import load
from emsedit_fast.data.edit_batch import tokenize_batch
from emsedit_fast.data.facts import bundled_facts
from emsedit_fast.editors import EditRefused
from emsedit_fast.nn import HyperNet
from emsedit_fast.trainer import MetaTrainer

TINY = ["model.name=tiny-llama", "model.device=cpu", "editor.rank=8"]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
                   torch.float16: torch.int16}[t.dtype])


def same_bits(a, b) -> bool:
    return all(torch.equal(bits(x), bits(y)) for x, y in zip(a, b, strict=True))


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(bits(a[k]), bits(b[k])) for k in a)


def nth_call(fn, at, change):
    """fn, except that its `at`-th call returns change(result)."""
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        calls["n"] += 1
        return change(out) if calls["n"] == at else out

    return wrapped


def poisoned(value, where=7):
    def change(t):
        t = t.clone()
        t.view(-1)[where % t.numel()] = value
        return t
    return change


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def setup(request):
    cfg = load("emsedit", mode="sequential",
               overrides=TINY + [f"model.dtype={request.param}", "model.edited_dtype=model"])
    session = api.open_session(cfg)
    assert session.editor.weights()[0].dtype == getattr(torch, request.param)
    batch = tokenize_batch(session.tokenizer, bundled_facts("eval")[:4], need_equiv=False)
    editor = session.editor
    state0 = {k: v.clone() for k, v in editor.state_dict().items()}
    clean = editor.edit(batch.edit)
    after_clean = [w.clone() for w in editor.weights()]
    norms = [float(g.delta_norms().max()) for step in clean.steps for g in step]
    editor.reset()
    editor.load_state_dict(state0)
    return {"session": session, "batch": batch, "state0": state0, "after_clean": after_clean, "norms": norms}


def _inject(fault, at, editor, monkeypatch, norms):
    if fault in ("keys-nan", "value-grads-inf"):
        field, value = ("keys", float("nan")) if fault == "keys-nan" else ("value_grads", float("inf"))

        def change(cap):
            tensors = getattr(cap, field)
            name = next(iter(tensors))
            tensors[name] = poisoned(value, 3)(tensors[name])
            return cap

        monkeypatch.setattr(editor, "capture", nth_call(editor.capture, at, change))
    elif fault in ("hypernet-nan", "hypernet-inf"):
        value = float("nan") if fault == "hypernet-nan" else float("-inf")
        monkeypatch.setattr(HyperNet, "forward", nth_call(HyperNet.forward, at, poisoned(value, 11)))
    elif fault in ("solve-nan", "solve-inf"):
        value = float("nan") if fault == "solve-nan" else float("inf")
        monkeypatch.setattr(ops, "ridge_solve", nth_call(ops.ridge_solve, at, poisoned(value)))
    elif fault == "overflow":  # finite factors whose update overflows the weights' dtype
        monkeypatch.setattr(ops, "ridge_solve", nth_call(ops.ridge_solve, at, lambda t: torch.full_like(t, 3e38)))
    elif fault == "delta-norm":  # a step 1000x larger than any clean step, against a bound 10x above them
        monkeypatch.setattr(ops, "ridge_solve", nth_call(ops.ridge_solve, at, lambda t: t * 1000.0))
        monkeypatch.setattr(editor, "cfg", dataclasses.replace(editor.cfg, max_delta_norm=10 * max(norms)))
    else:
        raise AssertionError(fault)


FAULTS = ["keys-nan", "value-grads-inf", "hypernet-nan", "hypernet-inf", "solve-nan", "solve-inf", "overflow",
          "delta-norm"]
MESSAGES = {"keys-nan": "non-finite keys", "value-grads-inf": "non-finite keys or value-grads",
            "hypernet-nan": "non-finite value targets", "hypernet-inf": "non-finite value targets",
            "solve-nan": "non-finite solution", "solve-inf": "non-finite solution", "overflow": "overflowed",
            "delta-norm": "exceeds max_delta_norm"}


@pytest.mark.parametrize("at", [1, 2], ids=["step1", "step2"])
@pytest.mark.parametrize("fault", FAULTS)
def test_faulty_edit_is_refused_and_the_model_keeps_its_bits(setup, fault, at, monkeypatch):
    session, batch = setup["session"], setup["batch"]
    editor = session.editor
    before = [w.clone() for w in editor.weights()]
    try:
        with monkeypatch.context() as patch:
            _inject(fault, at, editor, patch, setup["norms"])
            with pytest.raises(EditRefused, match=MESSAGES[fault]) as err:
                editor.edit(batch.edit)
        assert f"step {at}" in str(err.value) and "left unchanged" in str(err.value)
        assert same_bits(before, editor.weights())
        assert same_state(setup["state0"], editor.state_dict())  # normaliser statistics rolled back too
        assert not editor.history
        # nothing hidden was poisoned: a clean edit now equals the clean edit made before the fault, bit for bit
        editor.edit(batch.edit)
        assert same_bits(setup["after_clean"], editor.weights())
    finally:
        editor.reset()
        editor.load_state_dict(setup["state0"])


def test_refusal_inside_evaluation_is_counted_and_restored(setup, monkeypatch):
    """evaluate_protocol counts a refused batch and puts model and editor back exactly."""
    session = setup["session"]
    editor = session.editor
    before = [w.clone() for w in editor.weights()]
    monkeypatch.setattr(ops, "ridge_solve", nth_call(ops.ridge_solve, 2, poisoned(float("nan"))))
    try:
        metrics = api.evaluate_protocol(session, bundled_facts("eval")[:8], "sequential", 4, 2, progress=False)
        assert metrics["refused_batches"] == 1
        assert same_bits(before, editor.weights()) and same_state(setup["state0"], editor.state_dict())
    finally:
        editor.reset()
        editor.load_state_dict(setup["state0"])


# ----------------------------------------------------------------------------------------------------------------------
# meta-training


def _trainer_setup(regime):
    cfg = load("emsedit", mode=regime, overrides=TINY + ["train.n_batches=3", "data.n_edits=4", "train.meta_lr=1e-3"])
    session = api.open_session(cfg)
    batches = api.make_batches(session.tokenizer, bundled_facts("train"), 4, 3, cfg.train.micro_batch,
                               cfg.model.max_length, session.device, shuffle_seed=0)
    return cfg, session, batches


# the call of the patched function that falls in training batch 2: sequential K = 2 runs both steps then one loss and
# one meta-backward per batch; batch mode runs step, loss, backward (and an optimiser step) K = 2 times per batch
CALL_IN_BATCH_2 = {("solve", "sequential"): 4, ("loss", "sequential"): 2, ("grads", "sequential"): 2,
                   ("solve", "batch"): 3, ("loss", "batch"): 3, ("grads", "batch"): 4}


def _poison_grad(editor):
    def change(out):
        p = next(iter(editor.parameters()))
        p.grad.view(-1)[0] = float("nan")
        return out
    return change


@pytest.mark.parametrize("regime", ["sequential", "batch"])
@pytest.mark.parametrize("fault", ["solve", "loss", "grads"])
def test_training_skips_a_faulty_batch_and_goes_on(regime, fault, monkeypatch):
    cfg, session, batches = _trainer_setup(regime)
    editor = session.editor
    w0 = [w.clone() for w in editor.weights()]
    init = {k: v.clone() for k, v in editor.state_dict().items()}
    trainer = MetaTrainer(editor, cfg.train)
    at = CALL_IN_BATCH_2[(fault, regime)]
    if fault == "solve":
        monkeypatch.setattr(ops, "ridge_solve", nth_call(ops.ridge_solve, at, poisoned(float("nan"))))
    elif fault == "loss":
        monkeypatch.setattr(trainer, "weight_grads",
                            nth_call(trainer.weight_grads, at, lambda out: (float("inf"), out[1])))
    else:
        monkeypatch.setattr(editor, "meta_backward", nth_call(editor.meta_backward, at, _poison_grad(editor)))
    report = trainer.train(batches, progress=False)
    monkeypatch.undo()

    assert report.skipped == 1 and report.steps == 3 and trainer.step == 3
    assert math.isfinite(report.losses[0]) and math.isnan(report.losses[1]) and math.isfinite(report.losses[2])
    assert all(torch.isfinite(p).all() for p in editor.parameters())
    assert any(not torch.equal(init[k], v) for k, v in editor.state_dict().items())  # it did train
    assert same_bits(w0, editor.weights())  # training ends on W0

    if regime == "sequential":  # the skipped batch left no trace (weights, statistics, optimiser, recent batches)
        _, other, _ = _trainer_setup(regime)
        MetaTrainer(other.editor, cfg.train).train([batches[0], batches[2]], progress=False)
        assert same_state(other.editor.state_dict(), editor.state_dict())
