"""Result files: the Markdown table and strict, atomic JSON."""

import json
import math
import os

import pytest

from emsedit_fast.report import results_table
from emsedit_fast.report import write_json


def test_write_json_turns_non_finite_numbers_into_null_and_leaves_no_temporary_file(tmp_path):
    path = str(tmp_path / "results.json")
    payload = {"rows": [("unedited", {"es": 12.5, "ls": math.nan, "ps": math.inf})], "seconds": -math.inf,
               "path": tmp_path, "ok": True, "n": 3}
    write_json(path, payload)
    text = open(path).read()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"rows": [["unedited", {"es": 12.5, "ls": None, "ps": None}]], "seconds": None,
                                "path": str(tmp_path), "ok": True, "n": 3}
    assert os.listdir(tmp_path) == ["results.json"]


def test_write_json_failure_keeps_the_previous_file(tmp_path):
    path = str(tmp_path / "results.json")
    write_json(path, {"version": 1})

    class Exploding:
        def __str__(self):
            raise RuntimeError("cannot serialise")

    with pytest.raises(RuntimeError, match="cannot serialise"):
        write_json(path, {"version": 2, "bad": Exploding()})
    assert json.load(open(path)) == {"version": 1}
    assert os.listdir(tmp_path) == ["results.json"]


def test_results_table_shows_only_present_metrics_and_fluency():
    rows = [("unedited", {"es": 10.0, "gs": 20.0, "fluency": 5.4321, "protocol": {"edited": False},
                          "edit_seconds_per_edit": 0.0}),
            ("EMSEdit", {"es": 90.0, "gs": math.nan, "fluency": 5.1, "train_seconds_per_edit": 0.25,
                         "edit_seconds_per_edit": 0.125})]
    table = results_table(rows, "title").splitlines()
    assert table[0] == "**title**"
    assert table[2] == "| method | ES | GS | Fluency | train s/edit | edit s/edit |"
    assert table[4] == "| unedited | 10.00 | 20.00 | 5.43 | - | - |"
    assert table[5] == "| EMSEdit | 90.00 | nan | 5.10 | 0.250 | 0.125 |"
