"""python -m emsedit_fast.edit end to end on tiny-llama with an editor checkpoint trained here (rank 8, 2 batches).

Checks that the CLI's saved model equals the Python API's edited weights bit for bit, that --apply-edit onto the base
model reproduces it, that --revert rebuilds the expected state, that a journal continued by a second invocation
equals one continuous session, and that --export-lora writes a peft adapter.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from emsedit_fast import api
from emsedit_fast.checkpoint import save_checkpoint
from emsedit_fast.config import load
from emsedit_fast.data.facts import bundled_facts
from emsedit_fast.data.schemas import save_records
from emsedit_fast.edit import main
from emsedit_fast.editfiles import weights_by_name
from emsedit_fast.journal import Journal
from emsedit_fast.models.smollm2 import load_model
from emsedit_fast.updates import apply_edit_

MODULES = ("model.layers.0.mlp.gate_proj", "model.layers.1.mlp.up_proj")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit_cli")
    cfg = load("emsedit", mode="sequential", overrides=[
        "model.name=tiny-llama", "model.device=cpu", "editor.rank=8", "train.n_batches=2", "data.n_edits=4",
        "train.micro_batch=4", "train.meta_lr=1e-3", f"output={root / 'run'}"])
    session = api.open_session(cfg)
    trainer = api.train(session, progress=False)
    ckpt = save_checkpoint(str(root / "run" / "checkpoint"), session.editor, cfg, trainer)
    facts = bundled_facts("eval")
    save_records(facts[:6], root / "facts.jsonl")
    save_records(facts[6:9], root / "more.jsonl")
    return {"root": root, "ckpt": ckpt, "facts": str(root / "facts.jsonl"), "more": str(root / "more.jsonl"),
            "records": facts[:9]}


def _saved_weights(folder):
    state = load_file(os.path.join(folder, "model.safetensors"))
    return [state[f"{name}.weight"] for name in MODULES], state


def _api_weights(ckpt, records, batches):
    """The same edits through the Python API in one continuous session: the reference for the CLI."""
    session = api.open_session(checkpoint=ckpt)
    for chunk in batches:
        api.edit(session, [records[i] for i in chunk], measure=False, progress=False)
    return [w.clone() for w in session.editor.weights()]


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_cli_edits_journals_saves_and_reapplies(workspace, capsys):
    root, ckpt = workspace["root"], workspace["ckpt"]
    out = root / "out1"
    rc = main(["--editor-checkpoint", ckpt, "--facts", workspace["facts"], "--n-edits", "3",
               "--output", str(out), "--save-model", str(out / "model"), "--save-edit", str(out / "edit.safetensors"),
               "--export-lora", str(out / "lora"), "--editor-device", "cpu", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "edit 1: 3 facts" in printed and "edit 2: 3 facts" in printed

    journal = Journal(str(out / "journal"), create=False)
    assert journal.active_ids() == [1, 2]
    line = journal.edits[0]
    for key in ("id", "time", "request_ids", "facts", "editor_checkpoint", "base_fingerprint", "backend",
                "delta_norms", "efficacy", "factors", "factors_sha256"):
        assert key in line, key
    assert line["editor_checkpoint"]["hash"] and set(line["delta_norms"]) == set(MODULES)
    assert [f["target_new"] for f in line["facts"]] == [r.target_new for r in workspace["records"][:3]]
    assert os.path.exists(out / "journal" / "base_snapshot.safetensors")
    assert os.path.exists(out / "journal" / "factors" / "2.safetensors")

    saved, state = _saved_weights(out / "model")
    assert _equal(saved, _api_weights(ckpt, workspace["records"], [range(0, 3), range(3, 6)]))
    model, _ = load_model(str(out / "model"))  # a loadable Hugging Face folder (weights + tokenizer)
    assert torch.equal(dict(model.named_parameters())[f"{MODULES[0]}.weight"], saved[0])

    rc = main(["--apply-edit", str(out / "edit.safetensors"), "--model", "tiny-llama",
               "--save-model", str(out / "reapplied"), "--no-progress"])
    assert rc == 0
    reapplied, state2 = _saved_weights(out / "reapplied")
    assert _equal(reapplied, saved) and all(torch.equal(state[k], state2[k]) for k in state)

    export = json.load(open(out / "lora" / "emsedit_export.json"))
    assert export["rel_error"] < 1e-6 and os.path.exists(out / "lora" / "adapter_model.safetensors")

    rc = main(["--journal", str(out / "journal"), "--list"])
    listing = capsys.readouterr().out
    assert rc == 0 and "| 1 |" in listing and "| 2 |" in listing and "active" in listing


def test_cli_revert_and_materialise(workspace, capsys):
    root, ckpt = workspace["root"], workspace["ckpt"]
    out = root / "out2"
    assert main(["--editor-checkpoint", ckpt, "--facts", workspace["facts"], "--n-edits", "3",
                 "--journal", str(out / "journal"), "--no-efficacy", "--no-progress"]) == 0
    journal = Journal(str(out / "journal"), create=False)
    after_first = _api_weights(ckpt, workspace["records"], [range(0, 3)])

    # revert the last edit: bit-exactly the state after edit 1; the model comes from the journal's header
    assert main(["--journal", str(out / "journal"), "--revert", "2", "--save-model", str(out / "r2")]) == 0
    assert "the last edit" in capsys.readouterr().out
    assert _equal(_saved_weights(out / "r2")[0], after_first)
    journal.reload()
    assert [ln["type"] for ln in journal.lines] == ["edit", "edit", "revert"]

    # --list shows the reverted edit; materialising with no facts writes the current state
    assert main(["--journal", str(out / "journal"), "--list"]) == 0
    assert "reverted" in capsys.readouterr().out
    assert main(["--journal", str(out / "journal"), "--save-model", str(out / "current")]) == 0
    assert _equal(_saved_weights(out / "current")[0], after_first)

    # revert the remaining one: back to the base model
    assert main(["--journal", str(out / "journal"), "--revert", "1", "--save-model", str(out / "r1")]) == 0
    base, _ = load_model("tiny-llama")
    assert _equal(_saved_weights(out / "r1")[0], [w.data for w in weights_by_name(base, MODULES).values()])

    # errors are reported, not raised
    assert main(["--journal", str(out / "journal"), "--revert", "1"]) == 2
    assert "already reverted" in capsys.readouterr().err
    assert main(["--facts", workspace["facts"]]) == 2


def test_cli_revert_earlier_edit_rebuilds_from_remaining_factors(workspace, capsys):
    root, ckpt = workspace["root"], workspace["ckpt"]
    out = root / "out3"
    assert main(["--editor-checkpoint", ckpt, "--facts", workspace["facts"], "--n-edits", "3",
                 "--journal", str(out / "journal"), "--no-efficacy", "--no-progress"]) == 0
    assert main(["--journal", str(out / "journal"), "--revert", "1", "--save-model", str(out / "r")]) == 0
    assert "an earlier edit" in capsys.readouterr().out
    journal = Journal(str(out / "journal"), create=False)
    base, _ = load_model("tiny-llama")
    weights = weights_by_name(base, MODULES)
    apply_edit_(weights, journal.load_factors(2))
    assert _equal(_saved_weights(out / "r")[0], list(weights.values()))


def test_cli_continued_journal_equals_one_continuous_session(workspace):
    """Two invocations on one journal (the normaliser statistics travel with the edits) = one API session."""
    root, ckpt = workspace["root"], workspace["ckpt"]
    out = root / "out4"
    assert main(["--editor-checkpoint", ckpt, "--facts", workspace["facts"], "--n-edits", "0",
                 "--output", str(out), "--no-efficacy", "--no-progress"]) == 0
    assert main(["--editor-checkpoint", ckpt, "--facts", workspace["more"], "--n-edits", "0", "--steps", "1",
                 "--output", str(out), "--no-efficacy", "--no-progress", "--save-model", str(out / "model"),
                 "--save-edit", str(out / "all.safetensors")]) == 0
    journal = Journal(str(out / "journal"), create=False)
    assert journal.active_ids() == [1, 2] and journal.edits[1]["editor"]["n_steps"] == 1

    session = api.open_session(checkpoint=ckpt)
    api.edit(session, workspace["records"][:6], measure=False, progress=False)
    api.edit(session, workspace["records"][6:9], n_steps=1, measure=False, progress=False)
    assert _equal(_saved_weights(out / "model")[0], [w.clone() for w in session.editor.weights()])

    # the edit file holds both batches: applied onto the base it gives the same model
    assert main(["--apply-edit", str(out / "all.safetensors"), "--save-model", str(out / "again")]) == 0
    assert _equal(_saved_weights(out / "again")[0], _saved_weights(out / "model")[0])


def test_cli_help_documents_the_guarantees(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for phrase in ("--editor-checkpoint", "--revert", "--apply-edit", "--export-lora", "--lora-rank", "--list",
                   "bit-exactly", "EARLIER", "--editor-device"):
        assert phrase in text, phrase
