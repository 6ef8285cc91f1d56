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
    assert rows == ["method", "unedited", "untrained", "emsedit K=2 (trained)", "EMSEdit (K=1)"]
    assert (out / "results.json").is_file() and (out / "checkpoint").is_dir()
    losses = json.loads((out / "results.json").read_text())["train"]["losses"]
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert len(losses) == 2 and losses == state["report"]["losses"] and all(math.isfinite(x) for x in losses)
    # per batch and MSBP step: eta near the preset's start and the B norm that training moved away from 0
    scales = json.loads((out / "results.json").read_text())["train"]["scales"]
    assert len(scales) == 2 and scales == state["report"]["scales"]
    assert all(len(point["eta"]) == 2 and len(point["b_norm"]) == 2 for point in scales)
    assert all(x > 0 for point in scales for x in point["b_norm"])


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
