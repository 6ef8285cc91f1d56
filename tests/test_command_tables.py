"""train and compare end to end on the tiny model: the table they print is the one they write, with the unedited,
untrained, trained and baseline rows the README's tables have."""

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


def test_compare_writes_the_table_it_prints(tmp_path, capsys):
    rows = _printed_rows(compare, ["--methods", "emsedit,ultraedit", "--n-batches", "2"], tmp_path / "cmp", capsys)
    assert rows[:2] == ["method", "unedited"] and len(rows) == 5  # unedited, untrained, EMSEdit, UltraEdit
