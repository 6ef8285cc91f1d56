"""The meta-optimiser: the sliced per-tensor Adam that training uses computes what torch's multi-tensor Adam
computes, bit for bit, on random tensors and over a real training run, so results measured with either reproduce."""

import math

import pytest
import torch

from emsedit_fast.callbacks import Callback
from emsedit_fast.trainer import SlicedAdam
from emsedit_fast.trainer import lr_factor


def _params(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=gen)) for shape in [(37, 11), (5,), (64, 3), (1,)]]


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("slice_numel", [1, 7, 1 << 18], ids=["1", "7", "whole"])
def test_sliced_adam_matches_torch_adam_bit_for_bit(slice_numel, amsgrad):
    ours, theirs = _params(0), _params(0)
    groups = lambda ps: [{"params": ps[:2], "lr": 1e-2}, {"params": ps[2:], "lr": 3e-4}]  # noqa: E731
    opt = SlicedAdam(groups(ours), slice_numel=slice_numel, betas=(0.9, 0.999), eps=1e-8, foreach=False,
                     amsgrad=amsgrad)
    ref = torch.optim.Adam(groups(theirs), betas=(0.9, 0.999), eps=1e-8, foreach=True, amsgrad=amsgrad)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=gen) * 10 ** (step - 2) for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = (None, None) if step == 1 and p.ndim == 1 else (g.clone(), g.clone())
        opt.step()
        ref.step()
        assert all(torch.equal(p, q) for p, q in zip(ours, theirs))
    assert any(not torch.equal(p, q) for p, q in zip(ours, _params(0)))  # the parameters moved
    # the state is torch's: the same keys and values as torch.optim.Adam's
    mine, torchs = opt.state_dict(), ref.state_dict()
    for i in torchs["state"]:
        assert torchs["state"][i].keys() == mine["state"][i].keys()
        assert all(torch.equal(mine["state"][i][k], torchs["state"][i][k]) for k in torchs["state"][i])


def test_sliced_adam_refuses_the_multi_tensor_modes():
    opt = SlicedAdam(_params(0), foreach=True)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="per-tensor update only"):
        opt.step()


def _trained(make_trainer, batches, foreach: bool):
    trainer = make_trainer("editor.eta_init=1e-2", "editor.eta_param=log", "train.meta_lr=1e-3",
                           "train.scalar_lr_scale=10")
    editor = trainer.editor
    assert isinstance(trainer.optimizer, SlicedAdam) and trainer.optimizer.defaults["foreach"] is False
    if foreach:  # torch's multi-tensor Adam over the same groups
        trainer.optimizer = torch.optim.Adam([{k: v for k, v in g.items() if k != "foreach"}
                                              for g in trainer.optimizer.param_groups], foreach=True)
    else:
        trainer.optimizer.slice_numel = 100  # the tiny model's blocks span several slices
    before = {k: v.clone() for k, v in editor.state_dict().items()}
    trainer.train(batches, progress=False)
    after = {k: v.clone() for k, v in editor.state_dict().items()}
    assert sum(not torch.equal(before[k], after[k]) for k in after) > 4  # the optimiser moved the networks
    return trainer.report.losses, after


def test_sliced_adam_trains_exactly_as_the_multi_tensor_adam(tiny_trainer, tiny_batches):
    batches = tiny_batches(4)
    losses, state = _trained(tiny_trainer, batches, foreach=False)
    losses_foreach, state_foreach = _trained(tiny_trainer, batches, foreach=True)
    assert losses == losses_foreach
    assert state.keys() == state_foreach.keys()
    assert all(torch.equal(state[k], state_foreach[k]) for k in state)


def test_lr_factor_matches_the_schedules_by_hand():
    assert [lr_factor("constant", s, 4) for s in range(4)] == [1.0] * 4
    assert [lr_factor("linear", s, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    cos = [lr_factor("cosine", s, 4) for s in range(4)]
    assert cos == pytest.approx([1.0, (1 + 2 ** -0.5) / 2, 0.5, (1 - 2 ** -0.5) / 2], abs=1e-12)
    with pytest.raises(ValueError, match="train.lr_schedule"):
        lr_factor("step", 1, 4)


def test_warmup_ramps_the_first_batches_then_hands_over_to_the_schedule():
    # warmup 0.25 of 8 batches: w = 2, factors 1/2 and 1 on the first two, then the schedule alone
    assert [lr_factor("constant", s, 8, 0.25) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert [lr_factor("linear", s, 8, 0.25) for s in range(3)] == [0.5, 0.875, 0.75]
    # w = ceil(0.1 * 50) = 5 batches: 1/5 ... 5/5
    assert [lr_factor("cosine", s, 50, 0.1) for s in range(5)] == pytest.approx(
        [(s + 1) / 5 * 0.5 * (1 + math.cos(math.pi * s / 50)) for s in range(5)], abs=1e-12)
    assert lr_factor("cosine", 7, 50, 0.1) == lr_factor("cosine", 7, 50)
    assert [lr_factor("constant", s, 3, 1.0) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0], abs=1e-12)


class _Stop(Exception):
    pass


def _stopped_after_two(make_trainer, overrides, batches):
    """A trainer whose run over `batches` was interrupted after its second batch (its state is what resumes)."""

    class StopAfterTwo(Callback):
        def on_train_step(self, trainer, metrics):
            if metrics["step"] == 2:
                raise _Stop

    stopped = make_trainer(*overrides)
    stopped.callbacks.append(StopAfterTwo())
    with pytest.raises(_Stop):
        stopped.train(batches, progress=False)
    return stopped


@pytest.mark.parametrize("schedule,warmup", [("cosine", 0.0), ("linear", 0.0), ("cosine", 0.5)])
def test_training_follows_the_lr_schedule_and_a_resumed_run_continues_it(tiny_trainer, tiny_batches, schedule,
                                                                         warmup):
    batches = tiny_batches(4)
    overrides = ("editor.eta_param=log", "train.meta_lr=1e-3", "train.scalar_lr_scale=10",
                 f"train.lr_schedule={schedule}", f"train.warmup={warmup}")
    seen = []

    class Rates(Callback):
        def on_train_step(self, trainer, metrics):
            seen.append([g["lr"] for g in trainer.optimizer.param_groups])

    trainer = tiny_trainer(*overrides)
    trainer.callbacks.append(Rates())
    trainer.train(batches, progress=False)
    expected = [[1e-3 * lr_factor(schedule, s, 4, warmup), 1e-2 * lr_factor(schedule, s, 4, warmup)]
                for s in range(4)]
    assert seen == [pytest.approx(e, rel=1e-12) for e in expected]
    assert seen[0] != seen[-1]  # the rate did change

    # stopped after two batches and resumed from its state: the last two batches train at the full run's rates
    stopped = _stopped_after_two(tiny_trainer, overrides, batches)
    resumed = tiny_trainer(*overrides)
    resumed.load_state_dict(stopped.state_dict())
    seen.clear()
    resumed.callbacks.append(Rates())
    resumed.train(batches, progress=False)
    assert seen == [pytest.approx(e, rel=1e-12) for e in expected[2:]]


def _record_iterates(trainer):
    seen = []

    class Iterates(Callback):  # after every batch's optimiser step
        def on_train_step(self, trainer_, metrics):
            seen.append([p.detach().clone() for p in trainer_.editor.parameters()])

    trainer.callbacks.append(Iterates())
    return seen


def test_ema_follows_the_recurrence_by_hand_and_the_iterate_keeps_training(tiny_trainer, tiny_batches):
    # a_0 = theta_0 (untrained), a_t = 0.6 a_(t-1) + 0.4 theta_t after each of the 3 optimiser steps
    overrides = ("editor.eta_param=log", "train.meta_lr=1e-3", "train.scalar_lr_scale=10")
    batches = tiny_batches(3)
    trainer = tiny_trainer(*overrides, "train.ema=0.6")
    start = [p.detach().clone() for p in trainer.editor.parameters()]
    seen = _record_iterates(trainer)
    trainer.train(batches, progress=False)
    expected = start
    for theta in seen:
        expected = [0.6 * a + 0.4 * t for a, t in zip(expected, theta)]
    assert all(torch.allclose(a, e, rtol=1e-6, atol=1e-7) for a, e in zip(trainer.average, expected))
    # the average is neither the untrained editor nor the last iterate, and training ran on the iterates:
    # the same losses and parameters as a run without the average
    assert any(not torch.equal(a, s) for a, s in zip(trainer.average, start))
    assert any(not torch.allclose(a, t) for a, t in zip(trainer.average, seen[-1]))
    plain = tiny_trainer(*overrides)
    plain.train(batches, progress=False)
    assert plain.average is None and plain.report.losses == trainer.report.losses
    assert all(torch.equal(p, q) for p, q in zip(plain.editor.parameters(), trainer.editor.parameters()))


def test_averaged_swaps_the_average_in_and_puts_the_iterate_back(tiny_trainer, tiny_batches):
    trainer = tiny_trainer("editor.eta_param=log", "train.meta_lr=1e-3", "train.ema=0.5")
    trainer.train(tiny_batches(2), progress=False)
    params = list(trainer.editor.parameters())
    iterate = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="inside"):
        with trainer.averaged():
            assert all(torch.equal(p, a) for p, a in zip(params, trainer.average))
            raise RuntimeError("inside")
    assert all(torch.equal(p, x) for p, x in zip(params, iterate))
    trainer.use_average()
    assert all(torch.equal(p, a) for p, a in zip(params, trainer.average))
    assert any(not torch.equal(p, x) for p, x in zip(params, iterate))


def test_ema_is_refused_outside_0_1():
    from emsedit_fast.config import ConfigError
    from emsedit_fast.config import load

    for bad in ("1", "-0.1"):
        with pytest.raises(ConfigError, match="train.ema"):
            load("emsedit", mode="sequential", overrides=[f"train.ema={bad}"])


def test_a_resumed_run_ends_with_the_uninterrupted_runs_average(tiny_trainer, tiny_batches):
    overrides = ("editor.eta_param=log", "train.meta_lr=1e-3", "train.ema=0.7")
    batches = tiny_batches(4)
    whole = tiny_trainer(*overrides)
    whole.train(batches, progress=False)

    stopped = _stopped_after_two(tiny_trainer, overrides, batches)
    resumed = tiny_trainer(*overrides)
    resumed.editor.load_state_dict(stopped.editor.state_dict())
    resumed.load_state_dict(stopped.state_dict())
    resumed.train(batches, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(resumed.average, whole.average))


def test_network_scales_start_at_eta_init_with_b_at_zero_and_follow_training(tiny_trainer, tiny_batches):
    trainer = tiny_trainer("editor.eta_init=1e-2", "editor.eta_param=log", "train.meta_lr=1e-3")
    start = trainer.network_scales()
    assert start["b_norm"] == [0.0, 0.0] and start["eta"] == pytest.approx([1e-2, 1e-2], rel=1e-6)
    trainer.train(tiny_batches(2), progress=False)
    assert len(trainer.report.scales) == 2
    last = trainer.report.scales[-1]
    by_hand = [math.sqrt(sum(float((b.detach() ** 2).sum()) for net in nets for b in net.b))
               for nets in trainer.editor.nets]
    etas = [math.exp(float(torch.cat([net.log_eta.detach() for net in nets]).mean())) for nets in trainer.editor.nets]
    assert last["b_norm"] == pytest.approx(by_hand, rel=1e-6) and all(x > 0 for x in by_hand)
    assert last["eta"] == pytest.approx(etas, rel=1e-6) and last["eta"] != start["eta"]
