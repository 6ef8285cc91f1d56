"""Undo that is exact and bounded: the editor's history (snapshot or replay policy, folding) and the journal's
compaction. Every undo is checked bit for bit against weights recorded when the edits were made."""

from __future__ import annotations

import pytest
import torch

from emsedit_fast import api
from emsedit_fast.config import load
from emsedit_fast.data.facts import bundled_facts
from emsedit_fast.editfiles import weights_by_name
from emsedit_fast.journal import Journal
from emsedit_fast.journal import JournalError
from emsedit_fast.journal import open_journal
from emsedit_fast.models.tiny import tiny_llama
from emsedit_fast.models.tiny import tiny_tokenizer


def _session(policy="replay", max_undo=0, dtype=torch.float32, journal=None):
    cfg = load("emsedit", overrides=["editor.rank=8", "editor.eta_init=0.05", "train.micro_batch=3",
                                     f"editor.undo={policy}", f"editor.max_undo={max_undo}"])
    model = tiny_llama().to(dtype)
    return api.open_session(cfg, model=model, tokenizer=tiny_tokenizer(), journal=journal)


def _state(session):
    return [w.clone() for w in session.editor.weights()]


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _edit_batches(session, n, size=2):
    records = bundled_facts("eval")
    states = [_state(session)]
    ids = []
    for i in range(n):
        results, refused = api.edit(session, records[size * i:size * (i + 1)], measure=False, progress=False)
        assert not refused
        ids.append(results[0].applied.edit_id)
        states.append(_state(session))
        assert not _equal(states[-1], states[-2])
    return ids, states


@pytest.mark.parametrize("policy", ["replay", "snapshot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_undo_is_exact_under_both_policies(policy, dtype):
    session = _session(policy, dtype=dtype)
    ids, states = _edit_batches(session, 3)
    assert (session.editor.history._before is not None) == (policy == "snapshot")  # memory is the policy's choice
    session.editor.revert(ids[2])  # the last edit: exactly the state before it
    assert _equal(_state(session), states[2])
    session.editor.revert(ids[0])  # an earlier edit: the base + edit 2's factors replayed
    expected = _session(policy, dtype=dtype)
    named = weights_by_name(expected.model, [m.name for m in expected.modules])
    from emsedit_fast.updates import apply_edit_

    apply_edit_(named, session.editor.history[0])
    assert _equal(_state(session), list(named.values()))
    session.editor.revert(ids[1])
    assert _equal(_state(session), states[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_folding_bounds_the_history_and_keeps_undo_exact_after_it(dtype):
    session = _session(max_undo=2, dtype=dtype)
    # a bf16 model's edited layers get fp32 master weights; W0 is kept compact, in bf16, and the folded base in fp32
    assert [w.dtype for w in session.editor.weights()] == [torch.float32] * len(session.modules)
    assert {b.dtype for b in session.editor.base} == {dtype}
    ids, states = _edit_batches(session, 5)
    history = session.editor.history
    assert {b.dtype for b in history.base} == {torch.float32}
    assert len(history) == 2 and history.folded == 3 and history.ids() == ids[3:]
    assert _equal(history.base, states[3])  # the base is now the weights after the first three edits
    with pytest.raises(KeyError, match="folded into the base"):
        session.editor.revert(ids[0])
    session.editor.revert(ids[4])
    assert _equal(_state(session), states[4])
    session.editor.revert(ids[3])
    assert _equal(_state(session), states[3])
    session.editor.reset()  # W0 is still there
    assert _equal(_state(session), states[0]) and len(history) == 0 and history.base is None


def test_a_refused_second_step_leaves_the_model_exactly_as_it_was():
    """Without a per-edit snapshot (replay policy) the rollback of a half-applied edit replays the history."""
    from emsedit_fast.editors import EditRefused

    session = _session("replay")
    _edit_batches(session, 2)
    before = _state(session)
    stats = session.editor.normaliser_state()
    real = session.editor.check_record

    def refuse_second(record):
        if record.step == 1:
            raise EditRefused("step 2: refused for the test")
        real(record)

    session.editor.check_record = refuse_second
    _, refused = api.edit(session, bundled_facts("eval")[10:12], measure=False, progress=False)
    assert refused and _equal(_state(session), before)
    assert all(torch.equal(stats[k], v) for k, v in session.editor.normaliser_state().items())


def test_journal_compaction_folds_edits_and_keeps_undo_exact(tmp_path):
    jdir = str(tmp_path / "j")
    session = _session(journal=jdir)
    _, states = _edit_batches(session, 4)
    journal = session.journal
    line = journal.compact(2)
    assert line["folded"] == [1, 2] and journal.active_ids() == [3, 4] and journal.compacted_upto() == 2
    assert sorted(p.name for p in (tmp_path / "j" / "factors").iterdir()) == ["3.safetensors", "4.safetensors"]
    base, _ = journal.base()
    assert _equal([base[m.name] for m in session.modules], states[2])
    with pytest.raises(JournalError, match="folded into the base snapshot"):
        journal.revert(1)
    # a fresh process replays the compacted journal to the live weights
    other = _session()
    open_journal(jdir, other.model, other.modules)
    assert _equal(_state(other), states[4])
    weights = weights_by_name(other.model, [m.name for m in other.modules])
    journal.revert(4, weights)
    assert _equal(_state(other), states[3])
    reopened = Journal(jdir, create=False)
    assert [e["folded"] for e in reopened.edits] == [True, True, False, False]
    assert "folded" in reopened.format_table()
    # compacting again supersedes the earlier base file
    reopened.compact(3)
    assert reopened.active_ids() == [] and len(list((tmp_path / "j" / "bases").iterdir())) == 1
    with pytest.raises(JournalError, match="cannot compact"):
        reopened.compact(2)


def test_the_edit_term_of_the_key_prior_follows_undo_folding_and_the_journal(tmp_path):
    """editor.edit_prior: the prior keeps earlier edits' keys; it is rebuilt from the recorded keys, so undo, folding
    and a journal reopened in another process all see exactly the edits that are applied."""
    def session(journal=None, max_undo=0):
        cfg = load("emsedit", overrides=["editor.rank=8", "editor.eta_init=0.05", "train.micro_batch=3",
                                         "editor.key_prior=10", "editor.edit_prior=1", f"editor.max_undo={max_undo}"])
        s = api.open_session(cfg, model=tiny_llama(), tokenizer=tiny_tokenizer(), journal=journal)
        return s

    def moments(s):
        return {k: v.clone() for k, v in s.editor.prior.state_dict().items() if k.startswith("edit_moment")}

    live = session(journal=str(tmp_path / "j"), max_undo=2)
    assert all(float(v.abs().sum()) == 0 for v in moments(live).values())
    snaps = [moments(live)]
    ids, _ = _edit_batches(live, 3)
    snaps.append(moments(live))
    assert any(float(v.abs().sum()) > 0 for v in snaps[-1].values())
    expected = {}
    for edit in [live.journal.load_factors(i) for i in live.journal.active_ids()]:
        for name, u in edit.keys.items():
            expected[name] = expected.get(name, 0) + u.double().t() @ u.double()
    layer = live.modules[0].name
    torch.testing.assert_close(live.editor.prior.edit_moments()[layer], expected[layer].float())
    live.editor.revert(ids[2])  # undone: its keys leave the prior
    live.journal.revert(3)
    after_revert = moments(live)
    assert not all(torch.equal(after_revert[k], snaps[-1][k]) for k in after_revert)
    # a new process continuing the journal gets the same edit term (two folded edits included after compaction)
    live.journal.compact(1)
    other = session(journal=str(tmp_path / "j"))
    for k, v in after_revert.items():
        torch.testing.assert_close(moments(other)[k], v, rtol=1e-6, atol=1e-6)
    live.editor.reset()
    assert all(float(v.abs().sum()) == 0 for v in moments(live).values())
