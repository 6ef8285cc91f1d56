"""The EasyEdit-style API (emsedit_fast.easyedit, emsedit_fast.easyedit_hparams) on tiny-llama.

The EasyEdit examples of the README and docs/easyedit.md run as written (in a folder holding the paths they name);
the metrics have EasyEdit's layout and equal a hand computation of teacher-forced token accuracy and agreement with
the unedited model; sequential_edit=False isolates every request and leaves the model bit-identical,
sequential_edit=True keeps the edits; the hyperparameter reader maps what means the same thing and refuses the rest
by name.
"""

import math
import re
from pathlib import Path

import pytest
import torch

from emsedit_fast import api
from emsedit_fast import easyedit_hparams as eh
from emsedit_fast.checkpoint import save_checkpoint
from emsedit_fast.config import ConfigError
from emsedit_fast.config import load
from emsedit_fast.easyedit import EasyEditor
from emsedit_fast.easyedit import load_hparams
from emsedit_fast.easyedit import summarize
from emsedit_fast.models.tiny import tiny_llama
from emsedit_fast.models.tiny import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "easyedit.md"
README = ROOT / "README.md"
MARK = "<!-- runs in tests/test_easyedit.py -->"

PROMPTS = ["The capital of France is", "The mother tongue of Danielle Darrieux is", "Albert Einstein was born in"]
TARGETS = ["Rome", "English", "Sweden"]
REPHRASES = ["France's capital city is", ["Danielle Darrieux speaks", "The language of Danielle Darrieux is"],
             "The birthplace of Albert Einstein is"]
LOCALITY = {"neighborhood": {"prompt": ["The capital of Germany is", "The capital of Spain is", "Pablo Picasso was a"],
                             "ground_truth": ["Berlin", "Madrid", "painter"]},
            "other": {"prompt": [["The capital of Italy is", "Leo Tolstoy was a"], "The capital of Japan is", None],
                      "ground_truth": [["Rome", "writer"], "Tokyo", None]}}
PORTABILITY = {"two_hop": {"prompt": ["The language spoken in the capital of France is", None, None],
                           "ground_truth": ["Italian", None, None]}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained EMSEdit editor with a large step size (visible edits) for tiny-llama, saved as a checkpoint."""
    cfg = load("emsedit", mode="sequential", overrides=["editor.rank=8", "editor.eta_init=0.05", "model.device=cpu"])
    session = api.open_session(cfg, model=tiny_llama(), tokenizer=tiny_tokenizer())
    return save_checkpoint(str(tmp_path_factory.mktemp("easyedit") / "checkpoint"), session.editor, cfg)


def _editor(checkpoint, **kw):
    return EasyEditor(tiny_llama(), tiny_tokenizer(), checkpoint, **kw)


@torch.no_grad()
def _answer_argmax(model, tok, prompt, answer):
    """Teacher-forced top-1 tokens at the answer positions, by hand: input = tok(prompt) + answer tokens but the last,
    where the answer is tokenised apart with one leading space; position len(prompt) - 1 + j predicts token j."""
    p = tok(prompt)["input_ids"]
    a = tok(" " + answer, add_special_tokens=False)["input_ids"]
    logits = model(input_ids=torch.tensor([p + a[:-1]])).logits[0]
    return logits[len(p) - 1:].argmax(-1), torch.tensor(a)


def _accuracy(model, tok, prompt, answer):
    pred, gold = _answer_argmax(model, tok, prompt, answer)
    return (pred == gold).double().mean().item()


def _weights(editor):
    return {f"{n}.weight": w.clone() for n, w in editor.session.editor.named_weights().items()}


# ----------------------------------------------------------------------------------------------------------------------
# the documented example


def _doc_blocks():
    """The marked blocks of the README's EasyEdit section, then those of docs/easyedit.md, in order."""
    blocks = []
    for part in README.read_text().split(MARK)[1:] + DOC.read_text().split(MARK)[1:]:
        found = re.match(r"\s*```(\w+)\n(.*?)\n```", part, re.S)
        assert found, "a marked example must be followed by a fenced block"
        blocks.append((found.group(1), found.group(2)))
    return blocks


def test_docs_example_runs_as_written(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    tiny_llama().save_pretrained("models/my-llama")  # the stand-in for "your model folder"
    tiny_tokenizer().save_pretrained("models/my-llama")
    blocks = _doc_blocks()
    assert [lang for lang, _ in blocks] == ["python", "yaml", "python"]
    yaml_text = blocks[1][1]
    yaml_path = Path(yaml_text.splitlines()[0].lstrip("# ").strip())
    yaml_path.parent.mkdir(parents=True)
    yaml_path.write_text(yaml_text)
    # the stand-in for a trained checkpoint: the file's editor, untrained, with a large step size
    cfg = load_hparams(yaml_path, overrides=["editor.rank=8", "editor.eta_init=0.05"])
    session = api.open_session(cfg, model=AutoModelForCausalLM.from_pretrained("models/my-llama"),
                               tokenizer=tiny_tokenizer())
    save_checkpoint("runs/my-llama/checkpoint", session.editor, cfg)

    first, second = {}, {}
    exec(compile(blocks[0][1], f"{README}:easyedit-example", "exec"), first)
    exec(compile(blocks[2][1], f"{DOC}:example", "exec"), second)

    metrics, summary = first["metrics"], first["summarize"](first["metrics"])
    assert len(metrics) == 2 and [m["case_id"] for m in metrics] == [0, 1]
    assert summary["post"]["rewrite_acc"] > summary["pre"]["rewrite_acc"]
    assert set(metrics[0]["post"]["locality"]) == {"neighborhood_acc"}
    editor = first["editor"]  # reset() at the end of the example took both edits back out, bit for bit
    assert all(torch.equal(w, first["weights_copy"][n]) for n, w in _weights(editor).items())

    assert second["cfg"].editor.name == "malmen" and second["cfg"].model.max_length == 40
    assert second["cfg"].model.modules == (r"model\.layers\.0\.mlp\.gate_proj", r"model\.layers\.1\.mlp\.up_proj")
    assert second["editor"].session.cfg.editor.rank == 8  # the hypernetwork shape came from the checkpoint
    assert list(second["metrics"][0]["post"]) == ["rewrite_acc", "locality", "portability"]
    assert second["metrics"][0]["post"]["rewrite_acc"][0] > second["metrics"][0]["pre"]["rewrite_acc"][0]


# ----------------------------------------------------------------------------------------------------------------------
# metrics and editing semantics


def test_sequential_metrics_have_easyedit_layout_and_hand_computed_values(checkpoint):
    editor = _editor(checkpoint)
    model, tok = editor.model, editor.tok
    before = _weights(editor)
    pre_rewrite = [_accuracy(model, tok, p, t) for p, t in zip(PROMPTS, TARGETS)]
    loc_pairs = [[("neighborhood", LOCALITY["neighborhood"]["prompt"][i], LOCALITY["neighborhood"]["ground_truth"][i])]
                 for i in range(3)]
    loc_pairs[0] += [("other", "The capital of Italy is", "Rome"), ("other", "Leo Tolstoy was a", "writer")]
    loc_pairs[1] += [("other", "The capital of Japan is", "Tokyo")]
    pre_argmax = [[_answer_argmax(model, tok, p, a)[0] for _, p, a in pairs] for pairs in loc_pairs]

    metrics, edited_model, weights_copy = editor.edit(
        prompts=PROMPTS, target_new=TARGETS, rephrase_prompts=REPHRASES, locality_inputs=LOCALITY,
        portability_inputs=PORTABILITY, sequential_edit=True, verbose=False)

    assert edited_model is model
    assert weights_copy.keys() == before.keys() and all(torch.equal(weights_copy[n], before[n]) for n in before)
    assert any(not torch.equal(w, before[n]) for n, w in _weights(editor).items())  # the edits stayed
    for i, m in enumerate(metrics):
        assert set(m) == {"pre", "post", "case_id", "requested_rewrite", "time"} and m["case_id"] == i
        assert list(m["pre"]) == ["rewrite_acc", "rephrase_acc", "portability"]
        assert list(m["post"]) == ["rewrite_acc", "rephrase_acc", "locality", "portability"]
        assert m["requested_rewrite"]["ground_truth"] == "<|endoftext|>" and m["time"] > 0
        n_rephrase = 1 if isinstance(REPHRASES[i], str) else len(REPHRASES[i])
        assert len(m["pre"]["rephrase_acc"]) == len(m["post"]["rephrase_acc"]) == n_rephrase
        assert m["pre"]["rewrite_acc"] == [pytest.approx(pre_rewrite[i], abs=1e-9)]
        # scored on the model after all three edits
        assert m["post"]["rewrite_acc"] == [pytest.approx(_accuracy(model, tok, PROMPTS[i], TARGETS[i]), abs=1e-9)]
        rephrases = [REPHRASES[i]] if isinstance(REPHRASES[i], str) else REPHRASES[i]
        assert m["post"]["rephrase_acc"] == pytest.approx([_accuracy(model, tok, p, TARGETS[i]) for p in rephrases],
                                                          abs=1e-9)
        expected: dict = {}
        for (name, p, a), ref in zip(loc_pairs[i], pre_argmax[i]):
            expected.setdefault(f"{name}_acc", []).append((_answer_argmax(model, tok, p, a)[0] == ref).double()
                                                          .mean().item())
        assert m["post"]["locality"] == {k: pytest.approx(v, abs=1e-9) for k, v in expected.items()}
    assert metrics[0]["post"]["portability"] == {"two_hop_acc": [pytest.approx(_accuracy(
        model, tok, PORTABILITY["two_hop"]["prompt"][0], "Italian"), abs=1e-9)]}
    assert metrics[1]["post"]["portability"] == {} and "other_acc" not in metrics[2]["post"]["locality"]
    summary = summarize(metrics)
    assert summary["post"]["rewrite_acc"] > summary["pre"]["rewrite_acc"]  # large step size: the edits land
    assert min(v for m in metrics for vs in m["post"]["locality"].values() for v in vs) < 1  # and move neighbours
    editor.reset()
    assert all(torch.equal(w, before[n]) for n, w in _weights(editor).items())


def test_single_edit_mode_isolates_requests_and_restores_the_model(checkpoint):
    editor = _editor(checkpoint)
    before, stats = _weights(editor), editor.session.editor.normaliser_state()
    metrics, _, _ = editor.edit(prompts=PROMPTS, target_new=TARGETS, rephrase_prompts=REPHRASES,
                                locality_inputs=LOCALITY, sequential_edit=False, verbose=False)
    after = editor.session.editor.normaliser_state()
    assert all(torch.equal(w, before[n]) for n, w in _weights(editor).items())  # every edit taken back out exactly
    assert all(torch.equal(after[k], stats[k]) for k in stats)
    assert summarize(metrics)["post"]["rewrite_acc"] > summarize(metrics)["pre"]["rewrite_acc"]
    for i in range(len(PROMPTS)):  # each request as if it had been the only one, on a fresh editor
        alone, _, _ = _editor(checkpoint).edit(
            prompts=[PROMPTS[i]], target_new=[TARGETS[i]], rephrase_prompts=[REPHRASES[i]],
            locality_inputs={k: {f: [v[f][i]] for f in v} for k, v in LOCALITY.items() if v["prompt"][i]},
            sequential_edit=True, verbose=False)
        assert alone[0]["post"] == metrics[i]["post"]


def test_sequential_and_single_edits_score_differently(checkpoint):
    """Request 0 scored after all three edits (sequential) vs after its own edit only (single)."""
    single, _, _ = _editor(checkpoint).edit(PROMPTS, TARGETS, locality_inputs=LOCALITY, verbose=False)
    sequential, _, _ = _editor(checkpoint).edit(PROMPTS, TARGETS, locality_inputs=LOCALITY, sequential_edit=True,
                                                verbose=False)
    assert [m["pre"] for m in single] == [m["pre"] for m in sequential]
    assert [m["post"] for m in single] != [m["post"] for m in sequential]


def test_refused_edit_leaves_the_model_and_full_locality(checkpoint):
    cfg = load("emsedit", mode="sequential", overrides=["editor.rank=8", "editor.max_delta_norm=1e-12"])
    editor = _editor(checkpoint, hparams=cfg)
    before = _weights(editor)
    metrics, _, _ = editor.edit(PROMPTS[:2], TARGETS[:2], locality_inputs={
        "neighborhood": {k: v[:2] for k, v in LOCALITY["neighborhood"].items()}}, sequential_edit=True, verbose=False)
    assert all(torch.equal(w, before[n]) for n, w in _weights(editor).items())
    for m in metrics:
        assert "exceeds max_delta_norm" in m["refused"]
        assert m["post"]["rewrite_acc"] == m["pre"]["rewrite_acc"]
        assert m["post"]["locality"] == {"neighborhood_acc": [1.0]}  # the unedited model agrees with itself


def test_bad_requests_are_refused_before_any_edit(checkpoint):
    editor = _editor(checkpoint)
    before = _weights(editor)
    with pytest.raises(ValueError, match="target_new: expected 3 entries"):
        editor.edit(PROMPTS, TARGETS[:2])
    with pytest.raises(ValueError, match=r"locality_inputs\['neighborhood'\]\['prompt'\]"):
        editor.edit(PROMPTS, TARGETS, locality_inputs={"neighborhood": {"prompt": ["a"], "ground_truth": ["b"]}})
    with pytest.raises(ValueError, match=r"request 0 has 2 prompt\(s\) but 1 answer"):
        editor.edit(PROMPTS[:1], TARGETS[:1], locality_inputs={"x": {"prompt": [["a", "b"]], "ground_truth": [["c"]]}})
    with pytest.raises(ValueError, match=r"target_new\[1\]"):
        editor.edit(PROMPTS[:2], ["Rome", "  "])
    assert all(torch.equal(w, before[n]) for n, w in _weights(editor).items())
    with pytest.raises(ValueError, match="checkpoint"):
        EasyEditor(tiny_llama(), tiny_tokenizer())


def test_summarize_means_of_request_means():
    metrics = [{"pre": {"rewrite_acc": [0.0], "portability": {}},
                "post": {"rewrite_acc": [1.0], "rephrase_acc": [0.5, 1.0], "locality": {"n_acc": [1.0, 0.0]}}},
               {"pre": {"rewrite_acc": [0.5], "portability": {}},
                "post": {"rewrite_acc": [0.0], "rephrase_acc": [0.25], "locality": {"n_acc": [float("nan"), 0.5]}}}]
    assert summarize(metrics) == {"pre": {"rewrite_acc": 0.25},
                                  "post": {"rewrite_acc": 0.5, "rephrase_acc": 0.5, "locality": {"n_acc": 0.5}}}
    assert math.isclose(summarize(metrics)["post"]["rephrase_acc"], (0.75 + 0.25) / 2)


# ----------------------------------------------------------------------------------------------------------------------
# hyperparameter files


def _write(tmp_path, text, name="h.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_mend_file_maps_keys_that_mean_the_same(tmp_path):
    path = _write(tmp_path, """
alg_name: "MEND"
alg: MEND
archive: ./results/models/MEND/tiny
device: 1
model_name: tiny-llama
model_class: LlamaForCausalLM
tokenizer_name: tiny-llama
inner_params:
- model.layers.0.mlp.gate_proj.weight
- model.layers.1.mlp.up_proj.weight
lr: 1e-5
edit_lr: 0.01
lr_lr: 1e-3
lr_scale: 1.0
seed: 7
cedit: 0.1
cloc: 1.0
cbase: 1.0
dropout: 0.0
train_base: False
no_grad_layers: null
one_sided: False
n_hidden: 1
hidden_dim: null
init: id
norm: True
combine: True
x_only: False
delta_only: False
act: relu
rank: 16
mlp_class: IDMLP
shared: True
batch_size: 4
max_iters: 300
max_epochs: null
val_interval: 100
early_stop_key: "loss/total_edit_val"
half: False
accumulate_bs: 1
opt: Adam
grad_clip: 100.
max_length: 32
results_dir: ./results
""")
    cfg = load_hparams(path)
    assert cfg.editor.name == "mend" and cfg.editor.aggregation == "outer"  # the preset, then the file's keys
    assert (cfg.train.meta_lr, cfg.editor.eta_init) == (1e-5, 0.01)  # MEND: lr is the meta learning rate
    assert cfg.train.scalar_lr_scale == pytest.approx(1e-3 / 1e-5)
    assert (cfg.editor.n_blocks, cfg.editor.rank, cfg.data.n_edits) == (2, 16, 4)
    assert (cfg.train.edit_coef, cfg.train.loc_coef, cfg.train.max_grad_norm) == (0.1, 1.0, 100.0)
    assert (cfg.train.n_batches, cfg.train.epochs, cfg.train.eval_every) == (300, 0.0, 100.0)
    assert (cfg.model.name, cfg.model.device, cfg.model.dtype, cfg.model.max_length, cfg.seed) == (
        "tiny-llama", "cuda:1", "float32", 32, 7)
    assert re.fullmatch(cfg.model.modules[0], "model.layers.0.mlp.gate_proj")
    assert not re.fullmatch(cfg.model.modules[0], "model.layers.0.mlp.gate_projX")
    assert load_hparams(path, overrides=["editor.rank=4"]).editor.rank == 4


def test_malmen_file_maps_lr_to_the_step_size(tmp_path):
    path = _write(tmp_path, """
alg_name: MALMEN
model_name: tiny-llama
device: cpu
rewrite_module_tmp: model.layers.{}.mlp.down_proj
layers: [0, 1]
rank: 32
n_blocks: 2
lr: 1e-6
meta_lr: 1e-5
loc_coef: 1
max_grad_norm: 1
token: ans
n_edits: 8
batch_size: 2
editor_batch_size: 64
half: true
model_parallel: false
""")
    cfg = load_hparams(path)
    assert cfg.editor.name == "malmen" and cfg.train.mode == "batch"
    assert (cfg.editor.eta_init, cfg.train.meta_lr) == (1e-6, 1e-5)  # MALMEN: lr is eta, meta_lr the optimiser's
    assert (cfg.data.n_edits, cfg.train.micro_batch, cfg.editor.hypernet_chunk) == (8, 2, 64)
    assert (cfg.editor.rank, cfg.editor.n_blocks, cfg.train.loc_coef, cfg.model.dtype) == (32, 2, 1.0, "bfloat16")
    assert cfg.model.modules == (r"model\.layers\.0\.mlp\.down_proj", r"model\.layers\.1\.mlp\.down_proj")
    session = api.open_session(cfg, model=tiny_llama(), tokenizer=tiny_tokenizer())  # the modules resolve
    assert [m.name for m in session.modules] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_keys_without_an_equivalent_are_refused_by_name(tmp_path):
    path = _write(tmp_path, """
alg_name: MALMEN
model_name: tiny-llama
token: mask
accumulate_bs: 10
dropout: 0.1
mlp_class: MLP
v_lr: 0.5
inner_params: [model.layers.0.mlp.down_proj.bias]
results_dir: ./results
""")
    with pytest.raises(ConfigError) as err:
        load_hparams(path)
    message = str(err.value)
    assert message.startswith(f"{path}: 6 key(s) refused")
    for part in ("token='mask'", "answer tokens", "accumulate_bs=10", "dropout=0.1", "mlp_class='MLP'",
                 "v_lr: no equivalent", "is a bias", "docs/easyedit.md"):
        assert part in message, part
    assert "results_dir" not in message.split(". Mapped keys")[0]  # accepted and not used


def test_unknown_algorithms_and_contradictions_are_refused(tmp_path):
    for name in ("ROME", "MEMIT"):
        with pytest.raises(ConfigError, match=f"alg_name '{name}' has no equivalent.*MEND, MALMEN, RLEDIT, EMSEDIT"):
            load_hparams(_write(tmp_path, f"alg_name: {name}\n"))
    with pytest.raises(ConfigError, match="alg_name None"):
        load_hparams(_write(tmp_path, "rank: 8\n"))
    with pytest.raises(ConfigError, match=r"n_blocks=4 contradicts n_hidden=1 \(both set editor.n_blocks\)"):
        load_hparams(_write(tmp_path, "alg_name: MEND\nn_hidden: 1\nn_blocks: 4\n"))
    with pytest.raises(ConfigError, match="alg='MALMEN' disagrees with alg_name='MEND'"):
        load_hparams(_write(tmp_path, "alg_name: MEND\nalg: MALMEN\n"))
    with pytest.raises(ConfigError, match=r"max_length \(-> model.max_length\): model.max_length: must be >= 8"):
        load_hparams(_write(tmp_path, "alg_name: RLEDIT\nmax_length: 4\n"))
    with pytest.raises(ConfigError, match="lr_lr='fast': expected a number"):
        load_hparams(_write(tmp_path, "alg_name: MEND\nlr_lr: fast\n"))
    with pytest.raises(ConfigError, match="device='tpu'"):
        load_hparams(_write(tmp_path, "alg_name: EMSEDIT\ndevice: tpu\n"))


def test_archive_must_be_a_checkpoint_of_the_same_editor(tmp_path, checkpoint):
    (tmp_path / "mend.pt").write_bytes(b"not ours")
    path = _write(tmp_path, f"alg_name: MEND\nmodel_name: tiny-llama\narchive: {tmp_path / 'mend.pt'}\n")
    with pytest.raises(ConfigError, match=r"is not an emsedit_fast editor checkpoint.*\.pt archives cannot be loaded"):
        EasyEditor.from_hparams(path)
    path = _write(tmp_path, f"alg_name: MEND\nmodel_name: tiny-llama\narchive: {checkpoint}\n")
    with pytest.raises(ConfigError, match="alg_name asks for mend, but .* holds a emsedit editor"):
        EasyEditor.from_hparams(path)
    path = _write(tmp_path, f"alg_name: EMSEDIT\nmodel_name: tiny-llama\ndevice: cpu\narchive: {checkpoint}\n")
    editor = EasyEditor.from_hparams(path)  # the checkpoint's config, with the file's keys over it
    assert editor.hparams.editor.rank == 8 and editor.hparams.model.device == "cpu"


def test_docs_table_lists_every_key():
    text = DOC.read_text()
    table_keys = set()
    for line in text.split("## Hyperparameter keys")[1].splitlines():
        if line.startswith("| `"):
            table_keys |= set(re.findall(r"`([a-z_0-9]+)`", line.split("|")[1]))
    known = set(eh.MAPPED) | set(eh.FIXED) | set(eh.IGNORED) | set(eh.SPECIAL)
    assert table_keys == known


def test_ultraedit_files_map_to_the_training_free_editor(tmp_path):
    """EasyEdit's UltraEdit files: lr is the target scale eta, no archive is needed (nothing is trained)."""
    cfg = load_hparams(_write(tmp_path, "alg_name: ULTRAEDIT\nlr: 1.0e-6\nbatch_size: 4\nbatch_size_once: 16\n"
                                        "editor_batch_size: 1024\ntoken: ans\nmax_length: 40\n"))
    assert cfg.editor.name == "ultraedit" and not cfg.editor.trainable and cfg.editor.n_blocks == 0
    assert cfg.editor.eta_init == 1.0e-6 and cfg.editor.coeff_keys == "normalised"
