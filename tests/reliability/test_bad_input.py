"""Bad input never corrupts a model and always gets a clear, one-line answer (issue 7).

Every command (train, evaluate, edit, compare) answers bad input with exit code 2 and ONE line `error: ...` on stderr
that names what is wrong and where (file, record, field, key, module), and no traceback unless -v/--verbose. Most
cases call each command's `main(argv)` in this process (the code path `python -m` runs; a stray exception would fail
the test instead of returning 2); one case per command also runs as a real subprocess, and -v shows the traceback.
The Python API raises typed errors with the same messages; an edit on non-finite values is refused and leaves the
weights bit-identical.
"""

import json
import os
import shutil

import pytest
import torch

from emsedit_fast import api
from emsedit_fast import compare
from emsedit_fast import edit
from emsedit_fast import evaluate
from emsedit_fast import train
from emsedit_fast.checkpoint import CheckpointError
from emsedit_fast.checkpoint import load_editor_state
from emsedit_fast.config import ConfigError
from emsedit_fast.config import load
from emsedit_fast.data.collate import collate
from emsedit_fast.data.edit_batch import tokenize_batch
from emsedit_fast.data.schemas import DataError
from emsedit_fast.data.schemas import EditRecord
from emsedit_fast.data.schemas import RecordError
from emsedit_fast.data.schemas import load_records
from emsedit_fast.editors import EditRefused
from emsedit_fast.models.adapter import resolve_modules

COMMANDS = {"train": train, "evaluate": evaluate, "edit": edit, "compare": compare}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor: equality that also holds for NaN payloads."""
    return t.view({torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
                   torch.float16: torch.int16}[t.dtype])


def same_bits(a, b) -> bool:
    return all(torch.equal(bits(x), bits(y)) for x, y in zip(a, b, strict=True))


def one_error_line(stderr: str) -> str:
    """The single `error: ...` line that must end stderr (library warnings may come before it)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr
    assert lines and lines[-1].startswith("error: "), stderr
    assert sum(ln.startswith("error: ") for ln in lines) == 1, stderr
    return lines[-1]


# ----------------------------------------------------------------------------------------------------------------------
# bad files


@pytest.fixture(scope="module")
def bad(trained, tmp_path_factory):
    """Bad inputs derived from the good ones: facts files, data files, config files, checkpoints, journals."""
    root = tmp_path_factory.mktemp("bad_input")
    good = [json.loads(line) for line in open(trained["facts"])]

    def facts(name, *edits):
        rows = []
        for i, change in enumerate(edits):
            row = dict(good[i % len(good)], case_id=f"c{i}")
            for key, value in change.items():
                if value is None:
                    row.pop(key, None)
                else:
                    row[key] = value
            rows.append(row)
        path = root / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    def text(name, content, mode="w"):
        path = root / name
        with open(path, mode) as f:
            f.write(content)
        return str(path)

    def ckpt_copy(name):
        return shutil.copytree(trained["ckpt"], root / name)

    out = {"root": root, "ckpt": trained["ckpt"], "facts": trained["facts"]}
    out["no_target_2nd"] = facts("no_target_2nd.jsonl", {}, {"target_new": None})
    out["no_target_1st"] = facts("no_target_1st.jsonl", {"target_new": None}, {})
    out["blank_target"] = facts("blank_target.jsonl", {}, {"target_new": "   "})
    out["empty_prompt"] = facts("empty_prompt.jsonl", {"prompt": ""})
    out["long_prompt"] = facts("long_prompt.jsonl", {}, {"prompt": "word " * 400 + "is"})
    out["typo_key"] = facts("typo_key.jsonl", {"rephrase": ["x"]})
    out["truncated_json"] = text("truncated.json", json.dumps(good)[:120])
    out["binary"] = text("binary.json", b"\x00\xff\xfe\x01garbage", "wb")
    out["empty_file"] = text("empty.jsonl", "")
    out["bad_yaml"] = text("bad.yaml", "editor: [rank: 3\n  x")
    out["list_yaml"] = text("list.yaml", "- editor\n- rank\n")

    trunc = ckpt_copy("ckpt_truncated")
    with open(trunc / "hypernets.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(trunc / "hypernets.safetensors") // 2)
    out["ckpt_truncated"] = str(trunc)
    garbled = ckpt_copy("ckpt_meta_garbled")
    (garbled / "meta.json").write_text((garbled / "meta.json").read_text()[:-40])
    out["ckpt_meta_garbled"] = str(garbled)
    no_meta = ckpt_copy("ckpt_no_meta")
    os.remove(no_meta / "meta.json")
    out["ckpt_no_meta"] = str(no_meta)
    wrong_meta = ckpt_copy("ckpt_meta_list")
    (wrong_meta / "meta.json").write_text("[1, 2, 3]")
    out["ckpt_meta_list"] = str(wrong_meta)

    # a journal with two edits, then damaged copies of it
    journal = root / "journal"
    assert edit.main(["--editor-checkpoint", trained["ckpt"], "--facts", trained["facts"],
                      "--n-edits", "2", "--journal", str(journal), "--no-efficacy", "--no-progress"]) == 0
    out["journal"] = str(journal)
    garbled_j = shutil.copytree(journal, root / "journal_garbled")
    lines = (garbled_j / "journal.jsonl").read_text().splitlines(keepends=True)
    lines[1] = lines[1][:30] + "#%&" + lines[1][40:]
    (garbled_j / "journal.jsonl").write_text("".join(lines))
    out["journal_garbled"] = str(garbled_j)
    odd_j = shutil.copytree(journal, root / "journal_not_event")
    (odd_j / "journal.jsonl").write_text('{"hello": "world"}\n' + "".join(lines[:1]))
    out["journal_not_event"] = str(odd_j)
    factors_j = shutil.copytree(journal, root / "journal_factors")
    with open(factors_j / "factors" / "2.safetensors", "r+b") as f:
        f.truncate(100)
    out["journal_factors"] = str(factors_j)
    base_j = shutil.copytree(journal, root / "journal_base")
    with open(base_j / "base_snapshot.safetensors", "r+b") as f:
        f.truncate(64)
    out["journal_base"] = str(base_j)
    return out


TINY = ["--model", "tiny-llama", "--device", "cpu", "--no-progress"]
TRAIN_BASE = TINY + ["--set", "editor.rank=8", "--output", "{root}/train_out"]
TRAIN = TRAIN_BASE + ["--n-batches", "1", "--n-edits", "2", "--no-eval"]

# (id, command, argv with {placeholders} from the `bad` fixture, substrings the one error line must contain)
CASES = [
    # configuration: unknown keys, out-of-range or mistyped values, bad config files
    ("unknown-key", "train", TRAIN + ["--set", "editor.rnak=8"], ["unknown config key 'editor.rnak'", "'rank'"]),
    ("unknown-section", "train", TRAIN + ["--set", "trian.meta_lr=1"], ["unknown config key 'trian'", "'train'"]),
    ("n-steps-0", "train", TRAIN + ["--set", "editor.n_steps=0"], ["editor.n_steps", "1..8"]),
    ("meta-lr-negative", "train", TRAIN + ["--set", "train.meta_lr=-1"], ["train.meta_lr", "> 0"]),
    ("meta-lr-nan", "train", TRAIN + ["--set", "train.meta_lr=.nan"], ["train.meta_lr", "finite"]),
    ("eta-inf", "train", TRAIN + ["--set", "editor.eta_init=.inf"], ["editor.eta_init", "finite"]),
    ("rank-not-int", "train", TRAIN + ["--set", "editor.rank=abc"], ["editor.rank", "integer"]),
    ("override-no-equals", "train", TRAIN + ["--set", "editor.rank"], ["editor.rank", "section.key=value"]),
    ("override-bad-yaml", "train", TRAIN + ["--set", "editor.rank=[1"], ["editor.rank=[1", "YAML"]),
    ("dtype-int8", "train", TRAIN + ["--set", "model.dtype=int8"], ["model.dtype", "'int8'"]),
    ("device-unknown", "train", TRAIN + ["--device", "tpu9"], ["model.device", "'tpu9'"]),
    ("config-bad-yaml", "train", TRAIN + ["--config", "{bad_yaml}"], ["bad.yaml", "not valid YAML", "line"]),
    ("config-not-mapping", "train", TRAIN + ["--config", "{list_yaml}"], ["list.yaml", "mapping"]),
    ("config-missing", "train", TRAIN + ["--config", "{root}/nope.yaml"], ["nope.yaml"]),
    ("too-many-edits", "train", TRAIN_BASE + ["--n-edits", "100000", "--no-eval"], ["data.n_edits=100000"]),
    # edited modules
    ("modules-match-nothing", "train", TRAIN + ["--set", r"model.modules=model\.nothing"],
     ["module pattern", "matched no module", "gate_proj"]),
    ("modules-not-linear", "train", TRAIN + ["--set", r"model.modules=model\.norm"],
     ["'model.norm'", "LlamaRMSNorm", "nn.Linear"]),
    ("modules-bad-regex", "train", TRAIN + ["--set", "model.modules=model.(layers"], ["not a valid regex"]),
    # data files
    ("data-missing-field", "train", TRAIN + ["--train-data", "{no_target_2nd}"],
     ["no_target_2nd.jsonl", "record 1", "c1", "'target_new'", "missing"]),
    ("data-first-missing-field", "train", TRAIN + ["--train-data", "{no_target_1st}"],
     ["no_target_1st.jsonl", "record 0", "'target_new'", "missing"]),
    ("data-typo-key", "train", TRAIN + ["--train-data", "{typo_key}"], ["'rephrase'", "did you mean 'rephrases'"]),
    ("data-truncated", "train", TRAIN + ["--train-data", "{truncated_json}"], ["truncated.json", "truncated"]),
    ("data-binary", "train", TRAIN + ["--train-data", "{binary}"], ["binary.json"]),
    ("data-empty", "train", TRAIN + ["--train-data", "{empty_file}"], ["empty.jsonl", "empty"]),
    ("data-missing", "train", TRAIN + ["--train-data", "{root}/nope.jsonl"], ["nope.jsonl", "cannot read"]),
    # checkpoints
    ("resume-truncated", "train", TRAIN + ["--resume", "{ckpt_truncated}"],
     ["hypernets.safetensors", "corrupt or truncated"]),
    ("resume-meta-garbled", "train", TRAIN + ["--resume", "{ckpt_meta_garbled}"], ["meta.json", "corrupt"]),
    ("resume-meta-list", "train", TRAIN + ["--resume", "{ckpt_meta_list}"], ["meta.json", "corrupt"]),
    ("resume-no-meta", "train", TRAIN + ["--resume", "{ckpt_no_meta}"], ["meta.json missing"]),
    ("resume-missing", "train", TRAIN + ["--resume", "{root}/nope"], ["nope", "no checkpoint"]),
    ("resume-other-model", "train", TRAIN[:1] + ["tiny-gpt2"] + TRAIN[2:] + ["--resume", "{ckpt}"],
     ["different model", "'tiny-llama'", "model_type"]),
    ("resume-other-rank", "train", TRAIN_BASE + ["--set", "editor.rank=16", "--resume", "{ckpt}", "--no-eval"],
     ["hypernetwork shapes", "editor.rank", "checkpoint (", "editor ("]),
    ("eval-truncated", "evaluate", TINY + ["--checkpoint", "{ckpt_truncated}", "--output", "{root}/ev"],
     ["hypernets.safetensors", "corrupt or truncated"]),
    ("eval-other-model", "evaluate", ["--model", "tiny-gpt2", "--device", "cpu", "--no-progress", "--checkpoint",
                                      "{ckpt}", "--output", "{root}/ev"], ["different model", "gpt2"]),
    ("eval-bad-curve", "evaluate", TINY + ["--checkpoint", "{ckpt}", "--curve", "1,two", "--output", "{root}/ev"],
     ["--curve", "'1,two'"]),
    ("eval-bad-data", "evaluate", TINY + ["--unedited", "--data", "{truncated_json}", "--output", "{root}/ev"],
     ["truncated.json"]),
    ("eval-negative-n", "evaluate", TINY + ["--unedited", "--n-edits", "-3", "--output", "{root}/ev"], ["n_edits"]),
    ("eval-batches-0", "evaluate", TINY + ["--unedited", "--batches", "0", "--output", "{root}/ev"],
     ["--batches", ">= 1", "got 0"]),
    ("eval-offset-past-the-end", "evaluate", TINY + ["--unedited", "--offset", "100000", "--output", "{root}/ev"],
     ["--offset 100000", "eval split has", "records"]),
    ("eval-fluency-negative", "evaluate", TINY + ["--unedited", "--fluency-tokens", "-1", "--output", "{root}/ev"],
     ["--fluency-tokens", ">= 0"]),
    # facts given to the edit command
    ("edit-blank-target", "edit", ["--editor-checkpoint", "{ckpt}", "--facts", "{blank_target}", "--journal",
                                   "{root}/j_blank", "--no-progress"],
     ["blank_target.jsonl", "record 1", "c1", "'target_new'", "empty"]),
    ("edit-empty-prompt", "edit", ["--editor-checkpoint", "{ckpt}", "--facts", "{empty_prompt}", "--journal",
                                   "{root}/j_prompt", "--no-progress"], ["empty_prompt.jsonl", "'prompt'", "empty"]),
    ("edit-too-long", "edit", ["--editor-checkpoint", "{ckpt}", "--facts", "{long_prompt}", "--journal",
                               "{root}/j_long", "--no-progress"], ["'c1'", "max_length=128", "chars"]),
    ("edit-max-length", "edit", ["--editor-checkpoint", "{ckpt}", "--facts", "{facts}", "--set",
                                 "model.max_length=8", "--journal", "{root}/j_max", "--no-progress"],
     ["record '", "max_length=8"]),
    ("edit-other-model", "edit", ["--editor-checkpoint", "{ckpt}", "--model", "tiny-gpt2", "--facts", "{facts}",
                                  "--journal", "{root}/j_gpt2", "--no-progress"], ["different model"]),
    ("edit-steps-0", "edit", ["--editor-checkpoint", "{ckpt}", "--facts", "{facts}", "--steps", "0", "--journal",
                              "{root}/j_steps", "--no-progress", "--no-efficacy"], ["n_steps", ">= 1"]),
    ("edit-steps-9", "edit", ["--editor-checkpoint", "{ckpt}", "--facts", "{facts}", "--steps", "9", "--journal",
                              "{root}/j_steps9", "--no-progress", "--no-efficacy"], ["2 step networks", "9 steps"]),
    ("edit-truncated-ckpt", "edit", ["--editor-checkpoint", "{ckpt_truncated}", "--facts", "{facts}", "--journal",
                                     "{root}/j_trunc", "--no-progress"], ["hypernets.safetensors", "corrupt"]),
    # journals
    ("journal-garbled", "edit", ["--journal", "{journal_garbled}", "--list"], ["journal.jsonl", "line 2", "corrupt"]),
    ("journal-not-event", "edit", ["--journal", "{journal_not_event}", "--list"],
     ["journal.jsonl", "line 1", "not an edit or revert event"]),
    ("journal-factors", "edit", ["--journal", "{journal_factors}", "--save-model", "{root}/m_factors"],
     ["2.safetensors", "sha256"]),
    ("journal-base", "edit", ["--journal", "{journal_base}", "--save-model", "{root}/m_base"],
     ["base_snapshot.safetensors"]),
    ("journal-unknown-id", "edit", ["--journal", "{journal}", "--revert", "99"], ["no edit with id 99"]),
    ("journal-missing", "edit", ["--journal", "{root}/no_journal", "--list"], ["no_journal", "no journal folder"]),
    # compare
    ("compare-method", "compare", ["--mode", "sequential", "--model", "tiny-llama", "--methods", "mend,foo",
                                   "--output", "{root}/cmp"], ["unknown method", "'foo'"]),
    ("compare-range", "compare", ["--mode", "sequential", "--model", "tiny-llama", "--set", "editor.rank=0",
                                  "--output", "{root}/cmp"], ["editor.rank", ">= 1"]),
]
if not torch.cuda.is_available():
    CASES += [("device-cuda", "train", TRAIN + ["--device", "cuda"], ["model.device", "'cuda'", "no CUDA"]),
              ("edit-cuda", "edit", ["--editor-checkpoint", "{ckpt}", "--facts", "{facts}", "--device", "cuda",
                                     "--journal", "{root}/j_cuda", "--no-progress"], ["'cuda'", "no CUDA device"])]


@pytest.mark.parametrize("command, argv, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cli_answers_bad_input_with_one_error_line(bad, capsys, command, argv, expected):
    argv = [a.format(**bad) for a in argv]
    rc = COMMANDS[command].main(argv)  # must return, not raise
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2
    for text in expected:
        assert text in line, (text, line)


def test_argparse_choices_are_usage_errors(capsys):
    """Choices argparse knows (--dtype, --mode, --editor) fail in argparse itself: exit 2, its usage line, then one
    `error:` line naming the option and the valid choices."""
    for command, argv, needle in (("train", ["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
                                  ("evaluate", ["--unedited", "--mode", "lifelong"], "argument --mode"),
                                  ("compare", ["--mode", "batch", "--n-edits", "x"], "argument --n-edits"),
                                  ("edit", ["--editor", "rome"], "argument --editor")):
        with pytest.raises(SystemExit) as exit_:
            COMMANDS[command].main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "Traceback" not in err
        assert err.strip().splitlines()[-1].count("error: ") == 1 and needle in err, err


def test_commands_as_subprocesses(bad, spawn):
    """The same contract through `python -m` (exit status, stderr), one case per command, run side by side."""
    runs = {
        "train": (["-m", "emsedit_fast.train", *(a.format(**bad) for a in TRAIN), "--set", "train.meta_lr=-1"], 2,
                  "train.meta_lr"),
        "evaluate": (["-m", "emsedit_fast.evaluate", *TINY, "--checkpoint", bad["ckpt_truncated"], "--output",
                      str(bad["root"] / "ev_sub")], 2, "corrupt or truncated"),
        "edit": (["-m", "emsedit_fast.edit", "--journal", bad["journal_garbled"], "--list"], 2, "line 2"),
        "compare": (["-m", "emsedit_fast.compare", "--mode", "batch", "--methods", "foo", "--output",
                     str(bad["root"] / "cmp_sub")], 2, "unknown method"),
    }
    procs = {name: spawn(args, cwd=str(bad["root"])) for name, (args, _, _) in runs.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        _, code, needle = runs[name]
        assert proc.returncode == code, (name, err)
        assert needle in one_error_line(err), (name, err)


def test_verbose_shows_the_exception(bad, capsys):
    """-v / --verbose: the error propagates with its traceback (python -m then exits 1 and prints it)."""
    from emsedit_fast.journal import JournalError

    with pytest.raises(JournalError, match="line 2 is corrupt"):
        edit.main(["-v", "--journal", bad["journal_garbled"], "--list"])
    with pytest.raises(ConfigError, match="train.meta_lr"):
        train.main([*(a.format(**bad) for a in TRAIN), "--verbose", "--set", "train.meta_lr=-1"])
    with pytest.raises(ValueError, match="unknown method"):
        compare.main(["--mode", "batch", "--methods", "foo", "-v", "--output", str(bad["root"] / "cmp_v")])


# ----------------------------------------------------------------------------------------------------------------------
# the Python API


@pytest.fixture(scope="module")
def session():
    cfg = load("emsedit", mode="sequential", overrides=["model.name=tiny-llama", "model.device=cpu", "editor.rank=8"])
    return api.open_session(cfg)


def test_api_raises_typed_errors_that_name_the_problem(session, trained, tmp_path):
    with pytest.raises(ConfigError, match="train.meta_lr"):
        load("emsedit", overrides=["train.meta_lr=-1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'editor.rnak' \(did you mean 'rank'\?\)"):
        load("emsedit", overrides=["editor.rnak=3"])
    with pytest.raises(RecordError, match="'target_new'.*empty"):
        EditRecord(case_id="x", prompt="The capital of France is", target_new="   ", kind="facts")
    with pytest.raises(ValueError, match="matched no module"):
        resolve_modules(session.model, [r"model\.nothing"])
    with pytest.raises(ValueError, match="LlamaRMSNorm"):
        resolve_modules(session.model, [r"model\.norm"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            api.resolve_device("cuda")
    with pytest.raises(ValueError, match="at least one record"):
        api.edit(session, [])
    long = EditRecord(case_id="long-1", prompt="word " * 300 + "is", target_new="Paris", kind="facts")
    with pytest.raises(ValueError, match=r"record 'long-1' \(edit tuple\).*more than max_length=128"):
        api.edit(session, [trained["records"][0], long])
    before = [w.clone() for w in session.editor.weights()]
    with pytest.raises(ValueError, match="n_steps must be >= 1"):
        api.edit(session, trained["records"][:1], n_steps=-1)
    assert same_bits(before, session.editor.weights()) and not session.editor.history

    # a record file: strict by default, skip_invalid counts what it skipped
    path = tmp_path / "mixed.jsonl"
    good = trained["records"][0].to_dict()
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "case_id": "b", "prompt": 3}) + "\n")
    with pytest.raises(DataError, match=r"mixed.jsonl: record 1 \(line 2\) \(case_id=b\): field 'prompt'"):
        load_records(path)
    result = load_records(path, skip_invalid=True)
    assert len(result.records) == 1 and [i for i, _ in result.skipped] == [1]


def test_api_checkpoint_for_another_model_is_refused(trained):
    """Train on tiny-llama, load onto tiny-gpt2: refused, naming the differences, the gpt2 editor untouched."""
    cfg = load("emsedit", mode="sequential", overrides=["model.name=tiny-gpt2", "model.device=cpu", "editor.rank=8"])
    other = api.open_session(cfg)
    state = {k: v.clone() for k, v in other.editor.state_dict().items()}
    with pytest.raises(CheckpointError, match="different model.*model_type") as err:
        load_editor_state(trained["ckpt"], other.editor)
    assert "\n" not in str(err.value)
    assert all(torch.equal(state[k], v) for k, v in other.editor.state_dict().items())


class _EmptyTokenizer:
    """A tokenizer that drops everything: prompts and answers tokenise to nothing."""

    pad_token_id = 0

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[] for _ in texts]}


def test_text_that_tokenises_to_nothing_is_named():
    with pytest.raises(ValueError, match="prompt 'The capital of France is' is empty or tokenises to nothing"):
        collate(_EmptyTokenizer(), [("The capital of France is", "Paris")])
    record = EditRecord(case_id="r1", prompt="The capital of France is", target_new="Paris", kind="facts")
    with pytest.raises(ValueError, match=r"record 'r1' \(edit tuple\): collate: prompt"):
        tokenize_batch(_EmptyTokenizer(), [record], need_equiv=False)


@pytest.mark.parametrize("where", ["embedding", "edited weight"])
def test_non_finite_model_weights_are_refused_bit_exactly(session, trained, where):
    """The facts are fine but the model holds a NaN (upstream of the edited layers, or in an edited weight itself):
    Editor.edit refuses and every edited weight keeps its exact bits (NaN payload included)."""
    editor = session.editor
    target = (session.model.model.embed_tokens.weight if where == "embedding" else editor.weights()[0])
    keep = target.data.clone()
    batch = tokenize_batch(session.tokenizer, trained["records"], need_equiv=False)
    try:
        with torch.no_grad():
            target.data.view(-1)[:: max(1, target.numel() // 64)] = float("nan")
        before = [w.clone() for w in editor.weights()]
        stats = {k: v.clone() for k, v in editor.state_dict().items()}
        with pytest.raises(EditRefused, match="non-finite"):
            editor.edit(batch.edit)
        assert same_bits(before, editor.weights())
        assert all(torch.equal(bits(stats[k]), bits(v)) if v.is_floating_point() else torch.equal(stats[k], v)
                   for k, v in editor.state_dict().items())
        assert not editor.history
    finally:
        with torch.no_grad():
            target.data.copy_(keep)
