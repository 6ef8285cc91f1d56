"""Train / validation / evaluation splits: validation is carved from the training source, never overlaps training or
evaluation, and the evaluation split is never the training file itself."""

from __future__ import annotations

import json

import pytest

from emsedit_fast.data.schemas import EditRecord
from emsedit_fast.data.schemas import save_records
from emsedit_fast.data.splits import DEFAULT_VALID
from emsedit_fast.data.splits import carve_valid
from emsedit_fast.data.splits import load_split
from emsedit_fast.data.splits import locality_overlap


def _records(n, kind="facts"):
    return [EditRecord(case_id=str(i), prompt=f"Fact {i} is", target_new=f"new{i}", kind=kind,
                       ground_truth=f"old{i}", rephrase_prompts=(f"Fact number {i} is",),
                       locality_prompts=(f"Other {i} is",), locality_answers=(f"x{i}",)) for i in range(n)]


def _zsre_file(path, n):
    rows = [{"subject": f"s{i}", "src": f"What is q{i}?", "pred": "p", "rephrase": f"Tell me q{i}?", "alt": f"a{i}",
             "answers": [f"g{i}"], "loc": f"nq question: where {i}", "loc_ans": "l", "cond": "c"} for i in range(n)]
    path.write_text(json.dumps(rows))
    return str(path)


def test_validation_is_carved_from_training_and_disjoint(tmp_path):
    records = _records(50)
    parts = carve_valid(records, 10, seed=0)
    train, valid = {r.case_id for r in parts.train}, {r.case_id for r in parts.eval}
    assert len(valid) == 10 and len(train) == 40 and train.isdisjoint(valid)
    assert carve_valid(records, 10, seed=0).eval_ids == parts.eval_ids  # seeded
    assert len(carve_valid(records, 0).eval) == 5  # default: a tenth
    with pytest.raises(ValueError, match="leaves nothing to train on"):
        carve_valid(records, 50)

    path = tmp_path / "facts.jsonl"
    save_records(records, path)
    t = {r.case_id for r in load_split(str(path), "train", valid_size=10)}
    v = {r.case_id for r in load_split(str(path), "valid", valid_size=10)}
    assert t.isdisjoint(v) and len(t | v) == 50
    other = tmp_path / "eval.jsonl"
    save_records(_records(5), other)
    assert len(load_split(str(other), "eval", train_source=str(path))) == 5  # a separate file: used whole
    with pytest.raises(ValueError, match="evaluation data is the training data"):
        load_split(str(path), "eval", train_source=str(path))


def test_zsre_file_gives_three_disjoint_parts(tmp_path):
    path = _zsre_file(tmp_path / "zsre.json", 700)
    parts = {split: {r.case_id for r in load_split(path, split)} for split in ("train", "valid", "eval")}
    assert len(parts["valid"]) == DEFAULT_VALID["zsre"] and len(parts["train"]) == 600 - DEFAULT_VALID["zsre"]
    assert len(parts["eval"]) == 100
    assert parts["train"].isdisjoint(parts["valid"]) and parts["train"].isdisjoint(parts["eval"])
    assert parts["valid"].isdisjoint(parts["eval"])


def test_locality_overlap_finds_prompts_that_an_edit_changes():
    records = _records(3)
    clash = EditRecord(case_id="c", prompt="Q is", target_new="t", kind="facts",
                       locality_prompts=("Fact 1 is", "Fact number 2 is", "Unrelated is"), locality_answers=("a",) * 3)
    assert locality_overlap([clash], records) == [("c", "Fact 1 is"), ("c", "Fact number 2 is")]
    assert locality_overlap(records, records) == []
