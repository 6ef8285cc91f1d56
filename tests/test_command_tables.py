"""train and compare end to end on the tiny model: the table they print is the one they write, with the unedited,
untrained, trained and baseline rows the README's tables have."""

import json
import math

import torch

from emsedit_fast import compare
from emsedit_fast import train

TINY = ["--model", "tiny-llama", "--device", "cpu", "--no-progress", "--n-edits", "2", "--eval-batches", "2",
        "--set", "editor.rank=8"]


def _rows(table: str) -> list[str]:
    """The first cell of every row of a Markdown table, header included."""
    return [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line]


def _printed_rows(command, argv: list[str], out, capsys) -> list[str]:
    """Run `command.main(TINY + argv --output out)`, check that the table it wrote is the one it printed, and return
    that table's row names."""
    assert command.main(TINY + argv + ["--output", str(out)]) == 0
    table = (out / "results.md").read_text()
    assert table.strip() in capsys.readouterr().out
    return _rows(table)


def test_train_writes_the_table_it_prints(tmp_path, capsys):
    out = tmp_path / "run"
    rows = _printed_rows(train, ["--n-batches", "2", "--baselines", "emsedit1"], out, capsys)
    # the main job's profile validates during training and keeps the best editor: every trained row says which
    # validation point it kept (0 = the untrained editor)
    assert rows[:3] == ["method", "unedited", "untrained"] and len(rows) == 5
    results = json.loads((out / "results.json").read_text())
    kept = results["train"]["kept_step"]
    assert kept in (0, 1, 2) and rows[3] == "emsedit K=4 (" + (
        "untrained: best on validation)" if kept == 0 else f"trained, kept after {kept} of 2 batches)")
    kept = results["eval"][rows[4]]["train_kept_step"]
    assert kept in (0, 1, 2) and rows[4].startswith("EMSEdit (K=1) (") and (kept == 0) == ("untrained" in rows[4])
    assert (out / "results.json").is_file() and (out / "checkpoint").is_dir()
    losses = json.loads((out / "results.json").read_text())["train"]["losses"]
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert len(losses) == 2 and losses == state["report"]["losses"] and all(math.isfinite(x) for x in losses)
    # per batch and MSBP step: eta near the preset's start and the B norm that training moved away from 0; with the
    # profile's exact credit for the last step (train.step_credit last) only step K's networks learn
    scales = json.loads((out / "results.json").read_text())["train"]["scales"]
    assert len(scales) == 2 and scales == state["report"]["scales"]
    assert all(len(point["eta"]) == 4 and len(point["b_norm"]) == 4 for point in scales)  # K = 4
    assert all(point["b_norm"][:3] == [0.0, 0.0, 0.0] and point["b_norm"][3] > 0 for point in scales)


def test_compare_writes_the_table_it_prints(tmp_path, capsys):
    rows = _printed_rows(compare, ["--methods", "emsedit,ultraedit", "--n-batches", "2"], tmp_path / "cmp", capsys)
    assert rows[:2] == ["method", "unedited"] and len(rows) == 5  # unedited, untrained, EMSEdit, UltraEdit


def test_evaluate_offset_scores_the_records_from_that_index_on(tmp_path):
    """--offset I scores records I, I+1, ... of the split: the unedited row equals the protocol run on records[I:]
    through the API, and another offset scores other records."""
    import json

    from emsedit_fast import api
    from emsedit_fast import evaluate
    from emsedit_fast.config import load

    argv = ["--model", "tiny-llama", "--device", "cpu", "--no-progress", "--unedited", "--n-edits", "2",
            "--batches", "2"]
    scores = {}
    for offset in (0, 4):
        out = tmp_path / f"ev{offset}"
        assert evaluate.main(argv + ["--offset", str(offset), "--output", str(out)]) == 0
        saved = json.loads((out / "results.json").read_text())
        assert saved["offset"] == offset and (("records from 4 on" in saved["title"]) == (offset == 4))
        scores[offset] = saved["rows"]["unedited"]
    session = api.open_session(load("emsedit", overrides=["model.name=tiny-llama", "model.device=cpu"]))
    records = api.load_split(session, "eval")
    direct = api.evaluate_protocol(session, records[4:8], "sequential", 2, 2, edit=False, progress=False)
    for key in ("es", "gs", "ls_agree"):
        assert scores[4][key] == direct[key], key
    assert [r.case_id for r in records[0:4]] != [r.case_id for r in records[4:8]]


def test_evaluate_untrained_row_is_trains_untrained_row(tmp_path):
    """--untrained rebuilds the checkpoint's editor before meta-training: on the records `train` scored, its row is
    train's "untrained" row, and the trained row beside it is train's trained row (both exact)."""
    from emsedit_fast import evaluate

    run = tmp_path / "run"
    # keep the end editor (the profile's keep-best may keep the untrained one on this tiny run)
    assert train.main(TINY + ["--n-batches", "2", "--baselines", "", "--set", "train.keep=last",
                              "--output", str(run)]) == 0
    trained = json.loads((run / "results.json").read_text())
    names = list(trained["eval"])
    slices = len(trained["eval"]["unedited"].get("slices", [None]))
    out = tmp_path / "ev"
    assert evaluate.main(["--checkpoint", str(run / "checkpoint"), "--no-progress", "--n-edits", "2", "--batches", "2",
                          "--slices", str(slices), "--untrained", "--output", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert list(rows) == ["unedited", "emsedit K=4 untrained", "emsedit K=4"]
    for key in ("es", "gs", "ls_agree"):
        assert rows["emsedit K=4 untrained"][key] == trained["eval"]["untrained"][key], key
        assert rows["emsedit K=4"][key] == trained["eval"][names[2]][key], key
    # the rows are two editors, not one scored twice: training moved the networks
    assert names[2].startswith("emsedit K=4 (trained")
    scores = ("es", "gs", "ls", "ls_agree")
    assert [rows["emsedit K=4 untrained"][k] for k in scores] != [rows["emsedit K=4"][k] for k in scores]


def test_evaluate_untrained_needs_a_checkpoint(tmp_path, capsys):
    from emsedit_fast import evaluate

    assert evaluate.main(["--model", "tiny-llama", "--unedited", "--untrained", "--output", str(tmp_path / "x")]) != 0
    assert "--untrained needs --checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_open_session_takes_key_statistics_instead_of_estimating_them(monkeypatch):
    """open_session(key_statistics=prior) copies another editor's estimated Sigma (bit for bit, token count included)
    and runs no capture pass for it; a prior over other layers is refused."""
    import pytest

    from emsedit_fast import api
    from emsedit_fast.config import load

    base = ["model.name=tiny-llama", "model.device=cpu", "editor.key_prior=100", "editor.rank=8"]
    first = api.open_session(load("emsedit", overrides=base))  # estimates the statistics from the training split
    prior = first.editor.prior
    assert float(prior.key_tokens) > 0 and prior.key_moment_0.abs().sum() > 0
    one_layer = "model.modules=['model\\.layers\\.0\\.mlp\\.up_proj']"
    elsewhere = api.open_session(load("emsedit", overrides=base + [one_layer]), model=first.model,
                                 tokenizer=first.tokenizer)

    def no_fit(*args, **kwargs):
        raise AssertionError("the key statistics were estimated again")

    monkeypatch.setattr(api, "fit_key_prior", no_fit)
    second = api.open_session(first.cfg, model=first.model, tokenizer=first.tokenizer, key_statistics=prior)
    own = second.editor.prior
    assert own is not prior and torch.equal(own.key_tokens, prior.key_tokens)
    for g in range(len(prior.names)):
        assert torch.equal(getattr(own, f"key_moment_{g}"), getattr(prior, f"key_moment_{g}"))
    with pytest.raises(ValueError, match="cover different layers"):
        own.take_key_statistics(elsewhere.editor.prior)
