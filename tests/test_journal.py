"""Edit journal: bit-exact replay and revert (fp32, bf16, Linear and Conv1D), crash safety, edit files, backends.

A revert restores bytes, never subtracts. The journal's rebuild (base snapshot + active edits' factors
in order, on the recorded backend) must reproduce the live session's weights exactly (torch.equal).
"""

import os

import pytest
import torch

from emsedit_fast import api
from emsedit_fast import ops
from emsedit_fast.config import load
from emsedit_fast.data.facts import bundled_facts
from emsedit_fast.editfiles import base_header as journal_header
from emsedit_fast.editfiles import load_edit_file
from emsedit_fast.editfiles import save_edit_file
from emsedit_fast.editfiles import weights_by_name
from emsedit_fast.editors import build_editor
from emsedit_fast.journal import Journal
from emsedit_fast.journal import JournalError
from emsedit_fast.journal import open_journal
from emsedit_fast.models.adapter import default_module_patterns
from emsedit_fast.models.adapter import resolve_modules
from emsedit_fast.models.tiny import tiny_gpt2
from emsedit_fast.models.tiny import tiny_llama
from emsedit_fast.models.tiny import tiny_tokenizer
from emsedit_fast.updates import apply_edit_

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def _session(make_model, dtype):
    """An untrained editor with a large step size (visible edits) on a fresh tiny model in `dtype`."""
    model = make_model().to(dtype)
    model.requires_grad_(False)
    cfg = load("emsedit", mode="sequential", overrides=["editor.rank=8", "editor.eta_init=0.05",
                                                        "train.micro_batch=3"])
    modules = resolve_modules(model, default_module_patterns(model, "sequential"))
    editor = build_editor(model, modules, cfg.editor, "sequential", seed=0)
    return api.Session(cfg, model, tiny_tokenizer(), modules, editor, torch.device("cpu"))


def edit_facts(session, records, journal=None, header=None, n_edits=None, **kw):
    session.journal, session.header = journal, header
    return api.edit(session, records, n_edits=n_edits, **kw)


def _state(session):
    return [w.clone() for w in session.editor.weights()]


def _equal(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("model_name,dtype", [("llama", torch.float32), ("llama", torch.bfloat16),
                                              ("gpt2", torch.float32)], ids=["llama-fp32", "llama-bf16", "gpt2-fp32"])
def test_replay_and_revert_are_bit_exact(tmp_path, model_name, dtype):
    make_model = MODELS[model_name]
    session = _session(make_model, dtype)
    journal, header = open_journal(str(tmp_path / "j"), session.model, session.modules, model_name=model_name)
    records = bundled_facts("eval")[:9]
    states = [_state(session)]  # W0, then the weights after each edit
    for i in range(3):
        results, refused = edit_facts(session, records[3 * i:3 * i + 3], journal=journal, header=header,
                                      measure=(i == 0), progress=False)
        assert not refused and len(results) == 1 and results[0].line["id"] == i + 1
        states.append(_state(session))
        assert not _equal(states[-1], states[-2]), "the edit must change the weights for this test to mean anything"
    line = journal.edits[0]
    assert line["efficacy"] is not None and set(line["delta_norms"]) == {m.name for m in session.modules}
    assert line["base_fingerprint"] == header["base_fingerprint"] and line["backend"]["apply"]
    assert [f["case_id"] for f in line["facts"]] == [r.case_id for r in records[:3]]

    base, _ = journal.base()  # written once: W0 in the model dtype
    assert _equal([base[m.name] for m in session.modules], states[0])

    # A new process would load the base model again: replaying the journal gives the live weights bit for bit.
    other = _session(make_model, dtype)
    open_journal(str(tmp_path / "j"), other.model, other.modules, model_name=model_name)
    assert _equal(_state(other), states[3])

    weights = weights_by_name(other.model, [m.name for m in other.modules])
    line = journal.revert(3, weights)  # the last edit: exactly the state before it
    assert line["was_last"] and line["remaining"] == [1, 2]
    assert _equal(_state(other), states[2])

    journal.revert(1, weights)  # an earlier edit: base + edit 2's stored factors
    expected = _session(make_model, dtype)
    exp_w = weights_by_name(expected.model, [m.name for m in expected.modules])
    apply_edit_(exp_w, journal.load_factors(2))
    assert _equal(_state(other), _state(expected))
    assert not _equal(_state(other), states[2])  # edit 1 is really gone

    reopened = Journal(str(tmp_path / "j"), create=False)
    assert [e["reverted"] for e in reopened.edits] == [True, False, True]
    assert [ln["type"] for ln in reopened.lines] == ["edit", "edit", "edit", "revert", "revert"]
    assert reopened.active_ids() == [2]
    with pytest.raises(JournalError, match="already reverted"):
        reopened.revert(1)

    reopened.revert(2, weights)
    assert _equal(_state(other), states[0])  # nothing left: the base, bit for bit

    if dtype == torch.bfloat16:
        # why the journal replays instead of subtracting: round(round(W + d) - d) != W in bf16
        edit = journal.load_factors(1)
        b, a = edit.steps[0][0].layer_delta(0)
        w0 = states[0][0].float()
        delta = (b @ a) if not edit.steps[0][0].transposed else (b @ a).t()
        w1 = (w0 + delta).to(dtype)
        assert not torch.equal((w1.float() - delta).to(dtype), states[0][0])


def test_edit_file_round_trip_and_base_check(tmp_path):
    session = _session(tiny_llama, torch.float32)
    journal, header = open_journal(str(tmp_path / "j"), session.model, session.modules, model_name="tiny-llama")
    records = bundled_facts("eval")[:6]
    edit_facts(session, records, journal=journal, header=header, n_edits=3, measure=False,
               progress=False)
    edited = _state(session)
    path = str(tmp_path / "edit.safetensors")
    save_edit_file(path, journal.active_factors(), header)
    edits, saved_header = load_edit_file(path)
    assert [e.info["id"] for e in edits] == [1, 2] and saved_header["base_fingerprint"] == header["base_fingerprint"]
    assert os.path.getsize(path) < 200_000  # factors only: n (d_in + d_out) fp32 per layer and step

    from emsedit_fast.editfiles import apply_edit_file

    fresh = _session(tiny_llama, torch.float32)
    apply_edit_file(fresh.model, path)
    assert _equal(_state(fresh), edited)
    with pytest.raises(JournalError, match="not the base"):
        apply_edit_file(fresh.model, path)  # already edited: refused


def test_crash_between_factors_and_line_keeps_journal_consistent(tmp_path, monkeypatch):
    session = _session(tiny_llama, torch.float32)
    jdir = str(tmp_path / "j")
    journal, header = open_journal(jdir, session.model, session.modules, model_name="tiny-llama")
    records = bundled_facts("eval")[:9]
    edit_facts(session, records[:3], journal=journal, header=header, measure=False, progress=False)
    after_first = _state(session)

    def crash(self, line):
        raise OSError("simulated crash after the factors file was renamed into place")

    monkeypatch.setattr(Journal, "_append", crash)
    with pytest.raises(OSError, match="simulated crash"):
        edit_facts(session, records[3:6], journal=journal, header=header, measure=False, progress=False)
    monkeypatch.undo()
    assert os.path.exists(os.path.join(jdir, "factors", "2.safetensors"))
    assert _equal(_state(session), after_first)  # the unrecorded edit was taken back out of the live model

    reloaded = Journal(jdir, create=False)
    assert reloaded.active_ids() == [1]  # the uncommitted edit does not exist for the journal
    assert reloaded.orphans() == [os.path.join(reloaded.path, "factors", "2.safetensors")]
    other = _session(tiny_llama, torch.float32)
    journal2, header2 = open_journal(jdir, other.model, other.modules, model_name="tiny-llama")
    assert _equal(_state(other), after_first)

    # a torn last line (crash inside the append) is ignored on read and cut before the next append
    with open(os.path.join(jdir, "journal.jsonl"), "a") as f:
        f.write('{"type": "edit", "id": 2, "tim')
    journal2 = Journal(jdir, create=False)
    assert journal2.torn_tail and journal2.active_ids() == [1]
    results, _ = edit_facts(other, records[3:6], journal=journal2, header=header2, measure=False, progress=False)
    assert results[0].line["id"] == 2  # the orphan's id is reused, its file replaced atomically
    final = Journal(jdir, create=False)
    assert not final.torn_tail and final.active_ids() == [1, 2] and final.orphans() == []
    assert final.load_factors(2).info["id"] == 2  # sha256 of the replaced file matches its line
    third = _session(tiny_llama, torch.float32)
    open_journal(jdir, third.model, third.modules, model_name="tiny-llama")
    assert _equal(_state(third), _state(other))


def test_failed_factors_write_leaves_nothing_behind(tmp_path, monkeypatch):
    import emsedit_fast.editfiles as journal_mod

    session = _session(tiny_llama, torch.float32)
    jdir = str(tmp_path / "j")
    journal, header = open_journal(jdir, session.model, session.modules, model_name="tiny-llama")

    def broken(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(journal_mod, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        edit_facts(session, bundled_facts("eval")[:3], journal=journal, header=header, measure=False,
                   progress=False)
    assert os.listdir(os.path.join(jdir, "factors")) == []  # no temporary file, no file under the final name
    assert Journal(jdir, create=False).lines == []


def test_replay_refuses_another_backend_or_device_unless_allowed(tmp_path):
    session = _session(tiny_llama, torch.float32)
    journal, header = open_journal(str(tmp_path / "j"), session.model, session.modules, model_name="tiny-llama")
    edit_facts(session, bundled_facts("eval")[:3], journal=journal, header=header, measure=False, progress=False)
    edit = journal.load_factors(1)
    recorded = edit.backend["apply_deltas_"]
    assert recorded in ops.BACKENDS
    fresh = _session(tiny_llama, torch.float32)
    weights = weights_by_name(fresh.model, [m.name for m in fresh.modules])
    assert edit.device_type == "cpu"
    edit.device_type = "cuda"  # made on another device type: kernels there round differently
    with pytest.raises(JournalError, match="same device type"):
        apply_edit_(weights, edit)
    edit.device_type = "cpu"
    edit.backend["apply_deltas_"] = "triton"  # not runnable on the CPU without the interpreter
    if not ops.availability("cpu")["triton"]:
        pytest.skip("Triton can run here; no unavailable backend to test against")
    with pytest.raises(JournalError, match="allow_backend_change"):
        apply_edit_(weights, edit)
    apply_edit_(weights, edit, allow_backend_change=True)


def test_stale_writer_is_refused(tmp_path):
    session = _session(tiny_llama, torch.float32)
    jdir = str(tmp_path / "j")
    journal, header = open_journal(jdir, session.model, session.modules, model_name="tiny-llama")
    stale = Journal(jdir)
    edit_facts(session, bundled_facts("eval")[:3], journal=journal, header=header, measure=False, progress=False)
    with pytest.raises(JournalError, match="changed since it was opened"):
        stale.mark_reverted(1)
    assert journal_header(session.model, session.modules)["modules"] == header["modules"]


def test_bf16_model_keeps_its_edited_layers_in_fp32_and_replays_exactly(tmp_path):
    """model.edited_dtype auto: in a bf16 model the edited layers run in fp32 (edits are not rounded away); the journal
    and edit files replay onto a freshly loaded bf16 model bit for bit."""
    from emsedit_fast.editfiles import apply_edit_file
    from emsedit_fast.editfiles import prepare_base

    def fresh():
        model = tiny_llama().to(torch.bfloat16)
        model.requires_grad_(False)
        return model

    cfg = load("emsedit", mode="sequential", overrides=["editor.rank=8", "editor.eta_init=0.05",
                                                        "train.micro_batch=3", "model.dtype=bfloat16"])
    session = api.open_session(cfg, model=fresh(), tokenizer=tiny_tokenizer(), journal=str(tmp_path / "j"))
    assert {m.weight.dtype for m in session.modules} == {torch.float32}
    others = [p for n, p in session.model.named_parameters()
              if not any(n.startswith(m.name + ".") for m in session.modules)]
    assert {p.dtype for p in others} == {torch.bfloat16}
    results, _ = api.edit(session, bundled_facts("eval")[:6], n_edits=3, measure=False, progress=False)
    assert len(results) == 2 and session.header["model_dtype"] == "bfloat16" and session.header["dtype"] == "float32"
    edited = _state(session)
    save_edit_file(str(tmp_path / "e.safetensors"), session.journal.active_factors(), session.header)

    other = fresh()
    modules = prepare_base(session.header, other)
    open_journal(str(tmp_path / "j"), other, modules, model_name="tiny-llama", model_dtype="bfloat16")
    assert _equal([m.weight.data for m in modules], edited)
    third = fresh()
    apply_edit_file(third, str(tmp_path / "e.safetensors"))
    assert _equal(list(weights_by_name(third, [m.name for m in modules]).values()), edited)
    ids = torch.tensor([[1, 5, 7, 9]])
    assert third(input_ids=ids).logits.dtype == torch.bfloat16  # a drop-in: the output keeps the model's dtype
