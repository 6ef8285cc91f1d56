"""The model matrix: every family with default edited modules, each tested end to end on a tiny random model.

For every family of FAMILIES that `transformers` can build from a config offline: a tiny random model (2 layers,
`emsedit_fast.models.tiny.tiny_causal_lm`), its default modules resolved for both regimes, one edit through the
public API, an exact undo (every parameter bit for bit), and the edit exported as a LoRA adapter that peft loads onto
a fresh copy of the unedited model and that reproduces the edited model's logits.

docs/models.md is generated from this module. After changing a family, its defaults or this list, regenerate it with

    python tests/models/test_model_matrix.py

which runs the family tests and writes the table from their outcomes; `test_docs_table_is_current` fails while the
file differs from what the passing tests give.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from emsedit_fast import api
from emsedit_fast.config import load
from emsedit_fast.data.schemas import EditRecord
from emsedit_fast.export import export_lora
from emsedit_fast.models import adapter
from emsedit_fast.models.adapter import default_module_patterns
from emsedit_fast.models.adapter import default_module_spans
from emsedit_fast.models.adapter import resolve_modules
from emsedit_fast.models.tiny import tiny_causal_lm
from emsedit_fast.models.tiny import tiny_config
from emsedit_fast.models.tiny import tiny_tokenizer

DOC = Path(__file__).resolve().parents[2] / "docs" / "models.md"


@dataclass(frozen=True)
class Family:
    """A row of the matrix. reference: the model whose default list the table shows, with its config sizes."""

    name: str
    model_type: str
    reference: str
    sizes: dict
    source: str  # where the default list comes from


def _decoder(layers: int, hidden: int, intermediate: int) -> dict:
    return {"num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": intermediate}


FAMILIES = (
    Family("LLaMA / LLaMA-3", "llama", "LLaMA-3-8B", _decoder(32, 4096, 14336), "published"),
    Family("Mistral", "mistral", "Mistral-7B", _decoder(32, 4096, 14336), "published"),
    Family("Qwen2 / Qwen2.5", "qwen2", "Qwen2.5-7B", _decoder(28, 3584, 18944), "published"),
    Family("Gemma-2", "gemma2", "Gemma-2-9B", _decoder(42, 3584, 14336), "published"),
    Family("Gemma", "gemma", "Gemma-7B", _decoder(28, 3072, 24576), "Gemma-2's, by relative depth"),
    Family("Phi-3", "phi3", "Phi-3-mini", _decoder(32, 3072, 8192),
           "Mistral's down_proj layers (gate and up are one fused gate_up_proj)"),
    Family("GPT-2", "gpt2", "GPT-2-XL", {"n_layer": 48, "n_embd": 1600}, "published"),
    Family("GPT-J", "gptj", "GPT-J-6B", {"n_layer": 28, "n_embd": 4096}, "published"),
    Family("GPT-NeoX / Pythia", "gpt_neox", "Pythia-6.9B", _decoder(32, 4096, 16384),
           "GPT-J's (same block), by relative depth"),
    Family("OLMo", "olmo", "OLMo-7B", _decoder(32, 4096, 11008), "LLaMA-3's (same MLP and depth)"),
    Family("OLMo-2", "olmo2", "OLMo-2-7B", _decoder(32, 4096, 11008), "LLaMA-3's (same MLP and depth)"),
)
IDS = [f.model_type for f in FAMILIES]

RECORDS = [
    EditRecord(case_id="m1", kind="facts", prompt="The capital of France is", target_new="Rome"),
    EditRecord(case_id="m2", kind="facts", prompt="The mother tongue of Albert Einstein is", target_new="Polish"),
    EditRecord(case_id="m3", kind="counterfact", prompt="Oslo is the capital city of", target_new="Sweden",
               ground_truth="Norway"),
]
PROBES = ["The capital of France is", "Albert Einstein was a German physicist born in", "People in Norway speak"]


def _missing(model_type: str) -> str | None:
    """Why transformers cannot build this family offline (None: it can)."""
    if model_type not in CONFIG_MAPPING:
        return f"transformers {transformers.__version__} has no model_type {model_type!r}"
    return None


# ----------------------------------------------------------------------------------------------------------------------
# the table


def _layers_text(layers: list[int]) -> str:
    """[11, 12, 13] -> '11..15'; [10, 12, ..., 26] -> '10,12..26'; [5] -> '5'."""
    if len(layers) == 1:
        return str(layers[0])
    step = layers[1] - layers[0]
    if all(b - a == step for a, b in zip(layers, layers[1:])) and len(layers) > 2:
        return f"{layers[0]}..{layers[-1]}" if step == 1 else f"{layers[0]},{layers[1]}..{layers[-1]}"
    return ",".join(str(x) for x in layers)


def _modules_text(spans: list[tuple[str, list[int]]]) -> str:
    return " + ".join("`" + template.replace("{i}", "{" + _layers_text(layers) + "}") + "`"
                      for template, layers in spans)


def _layout(model_type: str) -> str:
    """Linear or Conv1D, read from the default modules of a tiny model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    kinds = {"Conv1D" if m.transposed else "Linear" for m in resolve_modules(model, default_module_patterns(model))}
    return " + ".join(sorted(kinds))


def render(outcomes: dict[str, str]) -> str:
    """docs/models.md from the outcome of each family's test ("passed", "failed", "skipped: why")."""
    lines = [
        "# Model matrix",
        "",
        "<!-- Generated by `python tests/models/test_model_matrix.py` from the tests that back it; do not edit. -->",
        "",
        "Default edited modules by model family (`emsedit_fast.models.adapter.default_module_spans`), shown for a",
        "reference model of the family; other depths scale the layer ranges by relative depth, and models with at",
        "most 4 layers edit their last two. Layout: `Linear` stores W as (d_out, d_in), GPT-2's `Conv1D` as",
        "(d_in, d_out).",
        "",
        "Tested: a tiny random model of the family built from its `transformers` config offline (2 layers, hidden",
        "64), its default modules resolved for both regimes, one edit through `api.edit`, an exact undo",
        "(`editor.revert`: every parameter bit for bit), and a LoRA export (`export.export_lora`) that peft loads",
        "onto a fresh copy of the unedited model and that reproduces the edited model's logits",
        "(`tests/models/test_model_matrix.py`).",
        "",
        "| family | model_type | reference model | sequential | batch | default list | layout | tested |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in FAMILIES:
        config = CONFIG_MAPPING[f.model_type](**f.sizes) if _missing(f.model_type) is None else None
        seq = _modules_text(default_module_spans(config, "sequential")) if config is not None else "-"
        batch = _modules_text(default_module_spans(config, "batch")) if config is not None else "-"
        if batch == seq:
            batch = "same"
        layers = f.sizes.get("num_hidden_layers", f.sizes.get("n_layer"))
        layout = _layout(f.model_type) if config is not None else "-"
        outcome = outcomes.get(f.model_type, "not run")
        tested = "yes" if outcome == "passed" else f"no ({outcome})"
        lines.append(f"| {f.name} | `{f.model_type}` | {f.reference} ({layers} layers) | {seq} | {batch} | "
                     f"{f.source} | {layout} | {tested} |")
    lines += [
        "",
        "Any other model_type has no default list: name the modules to edit with regexes matched in full against",
        "the names of `model.named_modules()` (`nn.Linear` or GPT-2 `Conv1D`), e.g.",
        "`--set \"model.modules=['model\\.layers\\.(10|11)\\.mlp\\.down_proj']\"` on the command line or",
        "`ModelConfig(modules=(...))` in Python.",
        "",
    ]
    return "\n".join(lines)


def expected_outcomes() -> dict[str, str]:
    """What this module's family tests give on this installation: passed, or skipped where transformers lacks it."""
    return {f.model_type: "passed" if _missing(f.model_type) is None else f"skipped: {_missing(f.model_type)}"
            for f in FAMILIES}


def test_docs_table_is_current():
    assert DOC.is_file(), f"{DOC} is missing: python tests/models/test_model_matrix.py"
    assert DOC.read_text() == render(expected_outcomes()), (
        f"{DOC} is stale: regenerate it with `python tests/models/test_model_matrix.py`")


def test_every_family_with_defaults_is_in_the_table():
    assert sorted(IDS) == sorted(adapter._RECIPES)


def test_chosen_lists_of_the_unpublished_families():
    """Phi-3, GPT-NeoX and OLMo borrow a published list (see adapter._RECIPES); pinned here at their reference sizes."""
    cfg = {f.model_type: CONFIG_MAPPING[f.model_type](**f.sizes) for f in FAMILIES}
    for regime in ("sequential", "batch"):
        assert default_module_spans(cfg["phi3"], regime) == [("model.layers.{i}.mlp.down_proj", [17, 18, 19])]
        for olmo in ("olmo", "olmo2"):
            assert default_module_spans(cfg[olmo], regime) == default_module_spans(cfg["llama"], regime)
    # Pythia-6.9B (32 layers) from GPT-J's 28: fc_in every 2nd of 10..26 -> 9 layers at stride 2 around the same
    # relative centre (18.5 / 28 of the depth); fc_out 22..27 -> the 6 layers around 25 / 28 of the depth.
    assert default_module_spans(cfg["gpt_neox"], "sequential") == [
        ("gpt_neox.layers.{i}.mlp.dense_h_to_4h", list(range(13, 30, 2)))]
    assert default_module_spans(cfg["gpt_neox"], "batch") == [
        ("gpt_neox.layers.{i}.mlp.dense_4h_to_h", list(range(26, 32)))]


def test_unknown_family_says_how_to_name_the_modules():
    config = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=40)
    model = transformers.BertModel(config)
    with pytest.raises(ValueError) as err:
        default_module_patterns(model)
    message = str(err.value)
    assert message.startswith("no default edited modules for model_type 'bert' (families with defaults: gemma, ")
    assert "--set \"model.modules=['model\\.layers\\.(10|11)\\.mlp\\.down_proj']\"" in message
    assert "encoder.layer.0.attention.self.query" in message  # the model's own linear module names
    # the suggested syntax is what the config loader takes
    cfg = load("emsedit", overrides=["model.modules=['model\\.layers\\.(10|11)\\.mlp\\.down_proj']"])
    assert cfg.model.modules == ("model\\.layers\\.(10|11)\\.mlp\\.down_proj",)


# ----------------------------------------------------------------------------------------------------------------------
# one edit, exact undo, LoRA export, per family


def _logits(model, tok) -> torch.Tensor:
    batch = tok(PROBES, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_family_edit_undo_and_lora_export(family, tmp_path):
    peft = pytest.importorskip("peft")
    if _missing(family.model_type):
        pytest.skip(_missing(family.model_type))
    tok = tiny_tokenizer()
    model = tiny_causal_lm(family.model_type)
    assert model.config.model_type == family.model_type and len(tok) == model.config.vocab_size
    for regime in ("sequential", "batch"):
        mods = resolve_modules(model, default_module_patterns(model, regime))
        assert mods, regime
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base_logits = _logits(model, tok)

    cfg = load("emsedit", mode="sequential", overrides=["model.device=cpu", "editor.rank=8", "editor.eta_init=0.05",
                                                        "train.micro_batch=3"])
    session = api.open_session(cfg, model=model, tokenizer=tok)
    assert [m.name for m in session.modules] == [m.name for m in resolve_modules(model, default_module_patterns(model))]
    results, refused = api.edit(session, RECORDS, measure=False, progress=False)
    assert not refused and len(results) == 1
    applied = results[0].applied
    edited_logits = _logits(model, tok)
    moved = float((edited_logits - base_logits).abs().max())
    assert moved > 1e-3, f"the edit must move the logits for this test to mean anything (moved {moved:.2e})"

    layouts = [{"name": m.name, "d_in": m.d_in, "d_out": m.d_out, "transposed": m.transposed}
               for m in session.modules]
    export_lora([applied], layouts, str(tmp_path / "lora"), base_model=family.model_type)

    session.editor.revert(applied.edit_id)
    after = model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert not changed, f"undo left {changed} different from the unedited model"

    adapted = peft.PeftModel.from_pretrained(tiny_causal_lm(family.model_type), str(tmp_path / "lora"))
    torch.testing.assert_close(_logits(adapted, tok), edited_logits, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# regenerating docs/models.md


def _family_of(nodeid: str) -> str | None:
    match = re.search(r"test_family_edit_undo_and_lora_export\[(\w+)\]", nodeid)
    return match.group(1) if match else None


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    outcomes: dict[str, str] = {}

    class Recorder:
        def pytest_runtest_logreport(self, report):
            family = _family_of(report.nodeid)
            if family is None or (report.when != "call" and report.outcome == "passed"):
                return
            if report.skipped:
                reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
                outcomes[family] = f"skipped: {reason.removeprefix('Skipped: ')}"
            else:
                outcomes[family] = report.outcome

    code = pytest.main([__file__, "-q", "-p", "no:cacheprovider", "-k", "test_family_edit_undo_and_lora_export"],
                       plugins=[Recorder()])
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render(outcomes))
    print(f"wrote {DOC}: " + ", ".join(f"{k} {v}" for k, v in outcomes.items()))
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
