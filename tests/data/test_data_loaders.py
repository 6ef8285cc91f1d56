"""Loaders, cleaning rules, errors, splits and batches on synthetic fixtures written to tmp_path."""

from __future__ import annotations

import json
import logging

import pytest

from emsedit_fast.data import DataError
from emsedit_fast.data import EditRecord
from emsedit_fast.data import RecordError
from emsedit_fast.data import batches
from emsedit_fast.data import load_records
from emsedit_fast.data import records_to_dataset
from emsedit_fast.data import save_records
from emsedit_fast.data import split_records
from emsedit_fast.data import zsre_split
from emsedit_fast.data.schemas import detect_format
from emsedit_fast.data.schemas import records_from_dataset

CF_FLAT = [
    {"case_id": 7, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": " English ",
     "subject": "Danielle Darrieux", "ground_truth": "French",
     "rephrase_prompt": "Some context here. Danielle Darrieux, a native",
     "locality_prompt": "The mother tongue of Jean Gabin is", "locality_ground_truth": "French"},
    {"case_id": 9, "prompt": "Toko Yasuda, the", "target_new": "piano", "subject": "Toko Yasuda",
     "ground_truth": "guitar", "rephrase_prompt": "Toko Yasuda is incredible at",
     "locality_prompt": "John Lennon performs on the", "locality_ground_truth": "guitar"},
]

CF_ROME = [
    {"case_id": 0,
     "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                           "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French"},
                           "relation_id": "P103"},
     "paraphrase_prompts": ["Shayna does this. Danielle Darrieux spoke the language", "Danielle Darrieux speaks"],
     "neighborhood_prompts": ["Jean Gabin speaks", "The native language of Michel Rocard is",
                              "Michel Rocard, a native"],
     "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
     "generation_prompts": ["Danielle Darrieux's mother tongue is", "Where Danielle Darrieux is from, people speak"]},
    {"case_id": 1,
     "requested_rewrite": {"prompt": "{} plays {{jazz}}? In", "subject": "Miles",
                           "target_new": {"str": "rock"}, "target_true": {"str": " jazz"}},
     "paraphrase_prompts": ["Miles performs"], "neighborhood_prompts": [], "generation_prompts": []},
]

ZSRE = [
    {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform",
     "rephrase": "What will be the product of UniFirst?", "alt": " unmanned aircraft", "answers": ["uniform"],
     "loc": "nq question: who plays the lead in the big lebowski", "loc_ans": " Jeff Bridges ",
     "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?"},
    {"subject": "Marie", "src": "What is the gender of Marie?", "pred": "female", "rephrase": "Marie is of which sex?",
     "alt": "   ", "answers": ["female"], "loc": "nq question: when was the eiffel tower built", "loc_ans": "1889",
     "cond": ""},
    {"subject": "Oslo", "src": "Which country is Oslo in?", "pred": "Norway", "rephrase": "Oslo lies in which country?",
     "alt": "Sweden", "answers": ["Norway", "Kingdom of Norway"], "loc": "nq question: largest planet",
     "loc_ans": "Jupiter", "cond": ""},
]

FACTS = [
    {"prompt": "The capital of Atlantis is", "target_new": "Poseidonia", "subject": "Atlantis",
     "rephrases": ["Atlantis has its capital in", "The capital city of Atlantis is"],
     "locality_prompts": ["The capital of France is"], "locality_answers": ["Paris"],
     "portability_prompts": ["The capital of the island where the Atlanteans live is"],
     "portability_answers": ["Poseidonia"]},
    {"case_id": "mine-2", "kind": "counterfact", "prompt": "Lyon is a city in", "target_new": "Spain",
     "ground_truth": "France", "rephrases": "The city of Lyon lies in"},
]


def write_json(path, data):
    path.write_text(json.dumps(data, indent=1))
    return path


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_counterfact_flat(tmp_path):
    result = load_records(write_json(tmp_path / "cf.json", CF_FLAT))
    assert result.format == "counterfact" and result.n_read == 2 and not result.skipped and not result.dropped
    r = result.records[0]
    assert r == EditRecord(case_id="7", kind="counterfact", prompt="The mother tongue of Danielle Darrieux is",
                           target_new="English", ground_truth="French", subject="Danielle Darrieux",
                           rephrase_prompts=("Some context here. Danielle Darrieux, a native",),
                           locality_prompts=("The mother tongue of Jean Gabin is",), locality_answers=("French",))
    assert r.metric_family == "margin"
    assert [x.case_id for x in result] == ["7", "9"] and len(result) == 2


def test_counterfact_rome(tmp_path):
    result = load_records(write_jsonl(tmp_path / "mcf.jsonl", CF_ROME))
    assert result.format == "counterfact_rome"
    r, s = result.records
    assert r.prompt == "The mother tongue of Danielle Darrieux is"
    assert (r.target_new, r.ground_truth, r.subject) == ("English", "French", "Danielle Darrieux")
    assert r.rephrase_prompts == tuple(CF_ROME[0]["paraphrase_prompts"])  # verbatim, context sentence kept
    assert r.locality_prompts == tuple(CF_ROME[0]["neighborhood_prompts"])
    assert r.locality_answers == ("French",) * 3  # neighbourhood answers are the true object
    assert r.generation_prompts == tuple(CF_ROME[0]["generation_prompts"])
    # only "{}" is replaced; other braces survive; target_true is stripped
    assert s.prompt == "Miles plays {{jazz}}? In" and s.ground_truth == "jazz" and s.locality_prompts == ()


def test_zsre_cleaning_rules(tmp_path, caplog):
    path = write_json(tmp_path / "zsre.json", ZSRE)
    with caplog.at_level(logging.WARNING):
        result = load_records(path)
    assert result.format == "zsre" and result.n_read == 3 and len(result) == 2
    # the empty-alt record is dropped, and the drop is reported with its index, case_id and field
    assert [i for i, _ in result.dropped] == [1]
    assert "zsre-1" in result.dropped[0][1] and "'alt'" in result.dropped[0][1] and str(path) in result.dropped[0][1]
    assert "dropped 1 record" in caplog.text
    r = result.records[0]
    assert r.kind == "zsre" and r.metric_family == "accuracy" and r.case_id == "zsre-0"
    assert r.target_new == "unmanned aircraft"  # stripped
    assert r.ground_truth == "uniform"
    assert r.rephrase_prompts == ("What will be the product of UniFirst?",)
    assert r.locality_prompts == ("nq question: who plays the lead in the big lebowski?",)  # prefix kept, "?" added
    assert r.locality_answers == ("Jeff Bridges",)
    assert result.records[1].ground_truth == "Norway"  # answers[0]
    summary = result.summary()
    assert summary["n_records"] == 2 and summary["dropped"][0][0] == 1


def test_plain_facts(tmp_path):
    result = load_records(write_jsonl(tmp_path / "mine.jsonl", FACTS))
    assert result.format == "facts"
    a, b = result.records
    assert a.kind == "facts" and a.case_id == "fact-0" and a.ground_truth is None
    assert a.rephrase_prompts == ("Atlantis has its capital in", "The capital city of Atlantis is")
    assert a.portability_answers == ("Poseidonia",)
    assert b.kind == "counterfact" and b.case_id == "mine-2" and b.rephrase_prompts == ("The city of Lyon lies in",)


def test_round_trip_and_dataset_view(tmp_path):
    records = load_records(write_jsonl(tmp_path / "mine.jsonl", FACTS)).records
    records += load_records(write_json(tmp_path / "cf.json", CF_ROME)).records
    save_records(records, tmp_path / "out.jsonl")
    assert load_records(tmp_path / "out.jsonl").records == records
    ds = records_to_dataset(records)
    assert ds.num_rows == len(records) and ds[0]["prompt"] == records[0].prompt
    assert records_from_dataset(ds) == records


def test_detect_format():
    assert detect_format(CF_FLAT[0]) == "counterfact"
    assert detect_format(CF_ROME[0]) == "counterfact_rome"
    assert detect_format(ZSRE[0]) == "zsre"
    assert detect_format(FACTS[0]) == "facts"
    assert detect_format({"question": "?"}) is None


@pytest.mark.parametrize("mutate, field, problem", [
    (lambda r: r.pop("target_new"), "target_new", "missing"),
    (lambda r: r.update(ground_truth=3), "ground_truth", "expected a string"),
    (lambda r: r.update(prompt="  "), "prompt", "empty prompt"),
    (lambda r: r.update(locality_ground_truth=""), "locality_ground_truth[0]", "empty answer"),
    (lambda r: r.update(target_new="guitar"), "target_new", "equals ground_truth"),
])
def test_bad_record_names_file_record_and_field(tmp_path, mutate, field, problem):
    rows = json.loads(json.dumps(CF_FLAT))
    mutate(rows[1])
    path = write_json(tmp_path / "bad.json", rows)
    with pytest.raises(DataError) as info:
        load_records(path)
    message = str(info.value)
    assert str(path) in message and "record 1" in message and "case_id=9" in message
    assert f"field {field!r}" in message and problem in message


def test_bad_jsonl_record_names_line(tmp_path):
    rows = [dict(FACTS[0]), {"prompt": "x is", "target_new": "y", "locality_prompts": ["a", "b"],
                             "locality_answers": ["c"]}]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n" + json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(DataError, match=r"record 1 \(line 4\) \(case_id=fact-1\): field 'locality_answers': has 1"):
        load_records(path)


def test_unknown_plain_key_suggests_the_right_one(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"prompt": "x is", "target_new": "y", "rephrase": ["x, is"]}])
    with pytest.raises(DataError, match="did you mean 'rephrases'"):
        load_records(path)


def test_skip_invalid_counts(tmp_path):
    rows = json.loads(json.dumps(CF_FLAT)) + [{"case_id": 11, "prompt": "p", "target_new": "t"},
                                              dict(CF_FLAT[1], case_id=12, target_new="  "), "not an object"]
    rows.append(dict(CF_FLAT[0]))  # duplicate case_id 7
    result = load_records(write_json(tmp_path / "cf.json", rows), skip_invalid=True)
    assert [r.case_id for r in result.records] == ["7", "9"]
    assert [i for i, _ in result.skipped] == [2, 4, 5]
    assert "'ground_truth': missing" in result.skipped[0][1] and "duplicate of record 0" in result.skipped[2][1]
    assert [i for i, _ in result.dropped] == [3]  # empty target: the cleaning drop, not an invalid record
    with pytest.raises(DataError, match="record 2"):
        load_records(tmp_path / "cf.json")


def test_corrupt_and_truncated_files(tmp_path):
    text = json.dumps(CF_FLAT, indent=1)
    truncated = tmp_path / "truncated.json"
    truncated.write_text(text[: len(text) // 2])
    with pytest.raises(DataError, match=r"truncated.json: corrupt or truncated JSON at line \d+, column \d+"):
        load_records(truncated)
    lines = tmp_path / "truncated.jsonl"
    lines.write_text(json.dumps(FACTS[0]) + "\n" + json.dumps(FACTS[1])[:-10])
    with pytest.raises(DataError, match=r"truncated.jsonl: corrupt or truncated JSON Lines record at line 2"):
        load_records(lines)
    empty = tmp_path / "empty.json"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="empty.json: file is empty"):
        load_records(empty)
    with pytest.raises(DataError, match="contains no records"):
        load_records(write_json(tmp_path / "none.json", []))
    with pytest.raises(DataError, match="starts with"):
        load_records(write_json(tmp_path / "num.json", 3))
    with pytest.raises(DataError, match="cannot detect the format"):
        load_records(write_json(tmp_path / "other.json", [{"question": "q"}]))
    with pytest.raises(DataError, match="cannot read"):
        load_records(tmp_path / "missing.json")
    with pytest.raises(DataError, match="unknown format"):
        load_records(truncated, format="csv")


def test_explicit_format_mismatch_is_an_error(tmp_path):
    with pytest.raises(DataError, match="field 'prompt': missing"):
        load_records(write_json(tmp_path / "zsre.json", ZSRE), format="counterfact")


def test_edit_record_validation():
    base = dict(case_id="a", prompt="p is", target_new="x", kind="zsre")
    r = EditRecord(**base, locality_prompts=["q is"], locality_answers=["y"])
    assert r.locality_prompts == ("q is",)  # lists become tuples
    with pytest.raises(Exception):
        r.prompt = "other"  # frozen
    with pytest.raises(RecordError, match="leading or trailing whitespace"):
        EditRecord(**dict(base, target_new=" x"))
    with pytest.raises(RecordError, match="required for kind 'counterfact'"):
        EditRecord(**dict(base, kind="counterfact"))
    with pytest.raises(RecordError, match="must be one of"):
        EditRecord(**dict(base, kind="ripple"))
    with pytest.raises(RecordError, match="portability_answers"):
        EditRecord(**base, portability_prompts=("a",))
    with pytest.raises(RecordError, match="rephrase_prompts"):
        EditRecord(**base, rephrase_prompts="not a tuple")


def _records(n):
    return [EditRecord(case_id=f"r{i}", prompt=f"prompt {i} is", target_new="x", kind="zsre") for i in range(n)]


def test_split_records_is_seeded_disjoint_and_recorded():
    records = _records(50)
    a, b = split_records(records, 30, seed=0), split_records(records, 30, seed=0)
    assert a.train_ids == b.train_ids and a.eval_ids == b.eval_ids
    assert split_records(records, 30, seed=1).train_ids != a.train_ids
    assert len(a.train) == 30 and len(a.eval) == 20
    assert set(a.train_ids).isdisjoint(a.eval_ids)
    assert set(a.train_ids) | set(a.eval_ids) == {r.case_id for r in records}
    assert a.to_dict()["train_ids"] == list(a.train_ids) and a.to_dict()["seed"] == 0
    with pytest.raises(ValueError, match="n_train=51"):
        split_records(records, 51)


def test_zsre_split_takes_600_after_cleaning():
    split = zsre_split(_records(798))
    assert (len(split.train), len(split.eval)) == (600, 198)


def test_batches_without_replacement_drop_last_incomplete():
    records = _records(23)
    got = batches(records, 5)
    assert [len(b) for b in got] == [5, 5, 5, 5]
    flat = [r.case_id for b in got for r in b]
    assert len(set(flat)) == 20 and flat == [r.case_id for r in records[:20]]
    assert len(batches(records, 5, n_batches=2)) == 2
    with pytest.raises(ValueError, match=r"5 x 5 = 25 does not fit the 23 records"):
        batches(records, 5, n_batches=5)
    with pytest.raises(ValueError, match="exceeds the 23 records"):
        batches(records, 24)
