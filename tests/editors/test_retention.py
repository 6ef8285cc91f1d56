"""The retention term of sequential meta-training (train.retain_batches): which earlier batches a step scores, and
that their cross-entropy enters the meta-loss at the current weights with total weight retain_coef."""

import pytest

from emsedit_fast.config import ConfigError
from emsedit_fast.config import load

RETENTION = ("editor.n_steps=2", "editor.eta_init=1e-2")  # on top of tests/editors/conftest.py's tiny trainer


def test_retained_batches_come_from_the_current_sequence_only(tiny_trainer):
    trainer = tiny_trainer(*RETENTION, "train.retain_batches=2", "train.sequence_length=4")
    batches = list(range(12))  # _retained only indexes the list
    drawn = {}
    for step in range(12):
        trainer.step = step
        drawn[step] = trainer._retained(batches)
        assert drawn[step] == trainer._retained(batches)  # seeded by the step: a resumed run draws the same
    assert drawn[0] == drawn[4] == drawn[8] == []  # a sequence's first batch has nothing before it
    assert drawn[5] == [4] and drawn[6] == [4, 5]
    for step in (7, 11):  # three earlier batches in the sequence, two drawn, sorted, never the current one
        start = step - step % 4
        assert len(drawn[step]) == 2 and drawn[step] == sorted(set(drawn[step]))
        assert all(start <= i < step for i in drawn[step])
    trainer._refused.add(9)  # a refused batch was never applied: nothing to keep
    trainer.step = 10
    assert trainer._retained(batches) == [8]


def test_without_sequences_every_earlier_batch_can_be_retained(tiny_trainer):
    trainer = tiny_trainer(*RETENTION, "train.retain_batches=3")
    trainer.step = 3
    assert trainer._retained(list(range(5))) == [0, 1, 2]


def test_retention_terms_enter_the_meta_loss(tiny_trainer, tiny_batches):
    trainer = tiny_trainer(*RETENTION, "train.retain_batches=2", "train.retain_coef=0.5", "train.reg_coef=0")
    batches = tiny_batches(3)
    seen = []
    weight_grads = trainer.weight_grads

    def spy(terms, *args, **kwargs):
        loss, grads = weight_grads(terms, *args, **kwargs)
        # the same weights, each term on its own: the merged loss is their weighted sum
        parts = [weight_grads([(1.0, tup, ref)])[0] for _, tup, ref in terms]
        seen.append(([(w, batches.index(tup)) for w, tup, _ in terms], loss, parts))
        return loss, grads

    trainer.weight_grads = spy
    trainer.train(batches, progress=False)
    assert [t for t, _, _ in seen] == [[(1.0, 0)], [(1.0, 1), (0.5, 0)], [(1.0, 2), (0.25, 0), (0.25, 1)]]
    for terms, loss, parts in seen:
        assert loss == pytest.approx(sum(w * p for (w, _), p in zip(terms, parts)), rel=1e-5)
    # the retained CE is scored after the current batch's edit: batch 0's loss at step 2 is not its loss at step 0
    assert seen[2][2][1] != pytest.approx(seen[0][2][0], rel=1e-6)


def test_retention_is_off_by_default_and_checked():
    assert load("emsedit").train.retain_batches == 0
    with pytest.raises(ConfigError, match="train.retain_batches"):
        load("emsedit", overrides=["train.retain_batches=-1"])
    with pytest.raises(ConfigError, match="train.retain_coef"):
        load("emsedit", overrides=["train.retain_coef=-1"])
