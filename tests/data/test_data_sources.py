"""Every record source through one loader: files, Parquet, folders, `datasets` objects, cached Hub ids; lazy reading.

Each source kind must give the records the JSON file gives, and a bad record must be named by source, position
(record / line / row, with the split for datasets), case_id and field.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from emsedit_fast.data import sources
from emsedit_fast.data.schemas import DataError
from emsedit_fast.data.schemas import iter_records
from emsedit_fast.data.schemas import load_records
from emsedit_fast.data.schemas import records_to_dataset

datasets = pytest.importorskip("datasets")

CF_FLAT = [
    {"case_id": 7, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": " English ",
     "subject": "Danielle Darrieux", "ground_truth": "French",
     "rephrase_prompt": "Some context here. Danielle Darrieux, a native",
     "locality_prompt": "The mother tongue of Jean Gabin is", "locality_ground_truth": "French"},
    {"case_id": 9, "prompt": "Toko Yasuda, the", "target_new": "piano", "subject": "Toko Yasuda",
     "ground_truth": "guitar", "rephrase_prompt": "Toko Yasuda is incredible at",
     "locality_prompt": "John Lennon performs on the", "locality_ground_truth": "guitar"},
    {"case_id": 11, "prompt": "Oslo is the capital of", "target_new": "Sweden", "subject": "Oslo",
     "ground_truth": "Norway", "rephrase_prompt": "Oslo, the capital city of",
     "locality_prompt": "Stockholm is the capital of", "locality_ground_truth": "Sweden"},
]

# ROME format: nested structs, and keys only some records have (Arrow fills them with nulls)
CF_ROME = [
    {"case_id": 0,
     "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                           "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French"},
                           "relation_id": "P103"},
     "paraphrase_prompts": ["Shayna does this. Danielle Darrieux spoke the language"],
     "neighborhood_prompts": ["Jean Gabin speaks", "Michel Rocard, a native"],
     "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
     "generation_prompts": ["Danielle Darrieux's mother tongue is"]},
    {"case_id": 1,
     "requested_rewrite": {"prompt": "{} plays {{jazz}}? In", "subject": "Miles",
                           "target_new": {"str": "rock"}, "target_true": {"str": " jazz"}},
     "paraphrase_prompts": ["Miles performs"], "neighborhood_prompts": [], "generation_prompts": []},
]

ZSRE = [
    {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "rephrase": "What does UniFirst make?",
     "alt": " unmanned aircraft", "answers": ["uniform"], "loc": "nq question: who plays the lead in big lebowski",
     "loc_ans": " Jeff Bridges "},
    {"subject": "Marie", "src": "What is the gender of Marie?", "rephrase": "Marie is of which sex?", "alt": "   ",
     "answers": ["female"], "loc": "nq question: when was the eiffel tower built", "loc_ans": "1889"},
]


def write_json(path, data):
    path.write_text(json.dumps(data, indent=1))
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reference(tmp_path, rows, name="ref.json"):
    """The records the plain JSON file gives: every other source must agree with it."""
    return load_records(write_json(tmp_path / name, rows)).records


# ----------------------------------------------------------------------------------------------------------------------
# datasets objects


@pytest.mark.parametrize("rows", [CF_FLAT, CF_ROME], ids=["counterfact", "counterfact_rome"])
def test_dataset_objects_give_the_file_records(tmp_path, rows):
    expected = reference(tmp_path, rows)
    ds = datasets.Dataset.from_list(rows)
    result = load_records(ds)
    assert result.records == expected and result.n_read == len(rows) and result.path == "Dataset"
    assert load_records(ds.to_iterable_dataset()).records == expected
    assert load_records(ds.with_format("numpy")).records == expected  # the format does not leak into the rows
    dd = datasets.DatasetDict(train=ds, validation=ds.select([1]))
    result = load_records(dd, split="validation")
    assert result.records == expected[1:2] and result.path == "DatasetDict split 'validation'"
    with pytest.raises(DataError, match=r"DatasetDict: has splits \['train', 'validation'\]; pass split="):
        load_records(dd)
    with pytest.raises(DataError, match=r"no split 'test'; splits: \['train', 'validation'\]"):
        load_records(dd, split="test")
    assert load_records(datasets.DatasetDict(only=ds)).path == "DatasetDict split 'only'"  # one split: taken


@pytest.mark.parametrize("mutate, field, problem", [
    (lambda r: r.update(target_new=None), "target_new", "missing"),
    (lambda r: r.update(prompt="  "), "prompt", "empty prompt"),
    (lambda r: r.update(locality_ground_truth=""), "locality_ground_truth[0]", "empty answer"),
    (lambda r: r.update(target_new="guitar"), "target_new", "equals ground_truth"),
])
def test_bad_dataset_row_names_split_row_case_and_field(mutate, field, problem):
    rows = json.loads(json.dumps(CF_FLAT))
    mutate(rows[1])
    dd = datasets.DatasetDict(train=datasets.Dataset.from_list(CF_FLAT),
                              validation=datasets.Dataset.from_list(rows, split="validation"))
    with pytest.raises(DataError) as info:
        load_records(dd, split="validation")
    assert str(info.value).startswith("DatasetDict split 'validation': row 1 (case_id=9): ")
    assert f"field {field!r}: {problem}" in str(info.value)
    skipped = load_records(dd["validation"], skip_invalid=True)
    assert [r.case_id for r in skipped.records] == ["7", "11"] and [i for i, _ in skipped.skipped] == [1]
    assert skipped.skipped[0][1].startswith("Dataset split 'validation': row 1 (case_id=9)")


def test_dataset_cleaning_drop_and_duplicates_name_the_row():
    result = load_records(datasets.Dataset.from_list(ZSRE))
    assert result.format == "zsre" and len(result) == 1 and [i for i, _ in result.dropped] == [1]
    assert "Dataset: row 1 (case_id=zsre-1): field 'alt': empty edit target" in result.dropped[0][1]
    with pytest.raises(DataError, match=r"Dataset: row 2 \(case_id=7\): field 'case_id': duplicate of record 0"):
        load_records(datasets.Dataset.from_list(CF_FLAT[:2] + CF_FLAT[:1]))


# ----------------------------------------------------------------------------------------------------------------------
# Parquet, folders, cached Hub ids


def test_parquet_round_trip(tmp_path):
    records = reference(tmp_path, CF_ROME, "rome.json") + reference(tmp_path, ZSRE, "zsre.json")
    path = tmp_path / "records.parquet"
    records_to_dataset(records).to_parquet(str(path))
    result = load_records(path)
    assert result.format == "facts" and result.records == records and result.path == str(path)
    # the raw ROME rows (nested structs, ragged keys) too
    datasets.Dataset.from_list(CF_ROME).to_parquet(str(tmp_path / "rome.parquet"))
    assert load_records(tmp_path / "rome.parquet").records == reference(tmp_path, CF_ROME)
    bad = [dict(r) for r in CF_FLAT]
    bad[2]["rephrase_prompt"] = ""
    datasets.Dataset.from_list(bad).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad.parquet: row 2 \(case_id=11\): field 'rephrase_prompt\[0\]': empty"):
        load_records(tmp_path / "bad.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"broken.parquet: (cannot load a Parquet file|cannot read row 0)"):
        load_records(tmp_path / "broken.parquet")


def test_folders_of_data_files_and_saved_datasets(tmp_path):
    folder = tmp_path / "cf"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", CF_FLAT[:2])
    write_jsonl(folder / "validation.jsonl", CF_FLAT[2:])
    expected = reference(tmp_path, CF_FLAT)
    assert load_records(folder, split="train").records == expected[:2]
    result = load_records(folder, split="validation")
    assert result.records == expected[2:] and result.path == f"{folder} split 'validation'"
    with pytest.raises(DataError, match="has splits"):
        load_records(folder)
    write_jsonl(folder / "validation.jsonl", [dict(CF_FLAT[2], prompt="")])
    with pytest.raises(DataError, match=r"cf split 'validation': row 0 \(case_id=11\): field 'prompt': empty prompt"):
        load_records(folder, split="validation")
    saved = tmp_path / "saved"
    datasets.DatasetDict(train=datasets.Dataset.from_list(CF_ROME)).save_to_disk(str(saved))
    assert load_records(saved).records == reference(tmp_path, CF_ROME)
    assert load_records(saved).path == f"{saved} split 'train'"
    with pytest.raises(DataError, match="split='train' applies to datasets objects, folders and Hub ids"):
        load_records(write_json(tmp_path / "one.json", CF_FLAT), split="train")


def _cache_hub_dataset(cache_dir, repo_id, splits):
    """Put `repo_id` into a datasets cache the way a Hub download leaves it: <owner>___<name>/default/0.0.0/<commit>/
    with one Arrow file per split, built by the Hub loader's own builder class."""
    from datasets.packaged_modules.generator.generator import Generator

    for split, rows in splits.items():
        def gen(rows=rows):
            yield from rows

        builder = Generator(cache_dir=str(cache_dir), dataset_name=repo_id.split("/")[1], repo_id=repo_id,
                            config_name="default", config_id="default", hash="0" * 40, generator=gen, split=split)
        builder.download_and_prepare()


def test_cached_hub_dataset_id_loads_offline(tmp_path, monkeypatch):
    assert datasets.config.HF_HUB_OFFLINE and datasets.config.HF_DATASETS_OFFLINE  # tests/conftest.py
    cache = tmp_path / "hf-datasets"
    rows = json.loads(json.dumps(CF_FLAT))
    rows[1]["locality_prompt"] = None
    _cache_hub_dataset(cache, "someone/tiny-cf", {"validation": CF_FLAT})
    _cache_hub_dataset(cache, "someone/bad-cf", {"train": rows})
    assert (cache / "someone___tiny-cf" / "default" / "0.0.0" / ("0" * 40) / "tiny-cf-validation.arrow").is_file()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))  # what HF_DATASETS_CACHE sets at import
    monkeypatch.chdir(tmp_path)  # no local path of that name: the id must go to the Hub loader
    result = load_records("someone/tiny-cf")
    assert result.records == reference(tmp_path, CF_FLAT)
    assert result.path == "someone/tiny-cf split 'validation'"
    assert [r.case_id for r in iter_records("someone/tiny-cf", split="validation")] == ["7", "9", "11"]
    with pytest.raises(DataError, match=r"someone/bad-cf split 'train': row 1 \(case_id=9\): field 'locality_prompt'"):
        load_records("someone/bad-cf")
    with pytest.raises(DataError, match=r"someone/absent: not a local file or folder, and datasets.load_dataset cannot "
                                        r"load it as a Hub dataset id .*only datasets already in the local cache"):
        load_records("someone/absent")
    with pytest.raises(DataError, match="absent.json: cannot read"):  # a file name is never taken for a Hub id
        load_records("someone/absent.json")


def test_without_datasets_files_still_load_and_the_rest_says_what_is_missing(tmp_path, monkeypatch):
    datasets.Dataset.from_list(CF_FLAT).to_parquet(str(tmp_path / "cf.parquet"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    assert len(load_records(write_jsonl(tmp_path / "cf.jsonl", CF_FLAT))) == 3
    with pytest.raises(DataError, match=r"cf.parquet: reading a Parquet file needs the `datasets` package"):
        load_records(tmp_path / "cf.parquet")
    with pytest.raises(DataError, match=r"someone/cf: reading a Hub dataset id needs the `datasets` package"):
        load_records("someone/cf")
    with pytest.raises(DataError, match="cannot read records from a int"):
        load_records(3)


# ----------------------------------------------------------------------------------------------------------------------
# lazy reading


def test_json_list_is_decoded_in_chunks_like_json_loads(tmp_path, monkeypatch):
    """The streaming JSON-list reader against json.loads, with 1-7 byte chunks so values and multi-byte characters
    straddle chunk boundaries: the same objects, and for damaged files the same line, column, character and message."""
    rows = [{"a": [1, 2.5e3, None], "b\u00e9": "caf\u00e9 \u4e2d\u6587 \\n", "n": 12345}, {"x": {"y": True}}, {}]
    path = tmp_path / "list.json"
    for text in (json.dumps(rows, ensure_ascii=False), "\n  " + json.dumps(rows, indent=2, ensure_ascii=False)):
        good = text.encode()
        at = good.index(b"[")  # cuts and insertions after it: before it, the file is not a JSON list
        damaged = [good[:n] for n in (at + 1, at + 9, len(good) // 2, len(good) - 1)]
        damaged += [good[:n] + b"x" + good[n:] for n in (at + 5, at + 30, len(good) - 3)]
        damaged += [good + b" ]", good + b","]
        for chunk in (1, 2, 7):
            monkeypatch.setattr(sources, "CHUNK_BYTES", chunk)
            monkeypatch.setattr(sources, "_COMPACT_CHARS", 3)
            path.write_bytes(good)
            assert [obj for obj, _ in sources.open_source(path).items] == json.loads(text)
            for data in damaged:
                path.write_bytes(data)
                try:
                    want = json.loads(data.decode("utf-8"))
                except UnicodeDecodeError as e:  # cut inside a multi-byte character
                    message = f"{path}: not valid UTF-8 at byte {e.start}: {e.reason}"
                except json.JSONDecodeError as e:
                    message = (f"{path}: corrupt or truncated JSON at line {e.lineno}, column {e.colno} "
                               f"(character {e.pos}): {e.msg}")
                else:  # the damage landed inside a string: still valid
                    assert [obj for obj, _ in sources.open_source(path).items] == want
                    continue
                with pytest.raises(DataError) as got:
                    list(sources.open_source(path).items)
                assert str(got.value) == message, (chunk, data)
    monkeypatch.setattr(sources, "CHUNK_BYTES", 3)  # "\xc3\xa9" (bytes 8, 9) is cut by a chunk boundary
    path.write_bytes(b'[{"a": "\xc3\xa9"}, {"b": "\xff"}]')
    with pytest.raises(DataError, match=r"list.json: not valid UTF-8 at byte 21: invalid start byte"):
        list(sources.open_source(path).items)
    path.write_bytes(b'[{"a": "\xc3x"}]')  # a cut character that does not go on
    with pytest.raises(DataError, match=r"list.json: not valid UTF-8 at byte 8: invalid continuation byte"):
        list(sources.open_source(path).items)


def test_iter_records_reads_lazily_and_accounts_as_it_goes(tmp_path):
    rows = [dict(CF_FLAT[0], case_id=i) for i in range(50)]
    rows[3]["target_new"] = "  "  # dropped
    rows[6]["ground_truth"] = None  # invalid
    path = write_jsonl(tmp_path / "cf.jsonl", rows)
    stream = iter_records(path, skip_invalid=True)
    assert stream.format == "counterfact" and stream.source == str(path)
    it = iter(stream)
    first = [next(it) for _ in range(5)]
    assert stream.n_read == 6 and [r.case_id for r in first] == ["0", "1", "2", "4", "5"]
    assert [i for i, _ in stream.dropped] == [3] and not stream.skipped
    rest = list(it)
    assert len(first) + len(rest) == 48 and stream.n_read == 50 and [i for i, _ in stream.skipped] == [6]
    assert "record 6 (line 7) (case_id=6): field 'ground_truth': missing" in stream.skipped[0][1]
    with pytest.raises(RuntimeError, match="read once"):
        iter(stream)
    with pytest.raises(DataError, match=r"record 6 \(line 7\)"):
        list(iter_records(path))  # strict: the error comes when the record is reached


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS is read from /proc/self/statm (Linux)")
@pytest.mark.parametrize("n", [50_000, pytest.param(200_000, marks=pytest.mark.slow)], ids=["50k", "200k"])
def test_large_file_is_read_lazily_in_bounded_memory(tmp_path, n):
    """n generated records (about 240 bytes of JSON Lines each): lazy reading holds one record at a time plus the
    case_id index (duplicates are errors; about 130 bytes per record), a small fraction of what the whole list of
    records takes. 200k records (46 MiB), on 2 cores shared with other jobs: lazy 9.3 s and 26 MiB peak RSS growth,
    whole 10.2 s and 161 MiB."""
    path = tmp_path / "large.jsonl"
    line = ('{{"case_id": "c{i}", "prompt": "The capital of country number {i} is", "target_new": "City{j}", '
            '"rephrases": ["Country number {i} has its capital in"], "locality_prompts": ["The capital of France '
            'is"], "locality_answers": ["Paris"]}}\n')
    with open(path, "w") as f:
        f.writelines(line.format(i=i, j=i % 977) for i in range(n))
    size_mib = path.stat().st_size / 2 ** 20

    before, peak, count, last = _rss_mib(), 0.0, 0, None
    start = time.perf_counter()
    for record in iter_records(path):
        count += 1
        if count % 2000 == 0:
            peak = max(peak, _rss_mib() - before)
        last = record
    lazy_s = time.perf_counter() - start
    assert count == n and last.case_id == f"c{n - 1}" and last.target_new == f"City{(n - 1) % 977}"

    before = _rss_mib()
    start = time.perf_counter()
    records = load_records(path).records
    whole_s = time.perf_counter() - start
    whole = _rss_mib() - before
    assert len(records) == n
    print(f"\n{n} records, {size_mib:.0f} MiB JSON Lines: lazy {lazy_s:.1f} s, peak RSS growth {peak:.1f} MiB; "
          f"whole {whole_s:.1f} s, RSS growth {whole:.1f} MiB")
    assert whole > 2 * size_mib, "the whole list must be large for the comparison to mean anything"
    assert peak < 0.35 * whole and peak < 0.8 * size_mib
