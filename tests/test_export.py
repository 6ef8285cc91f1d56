"""LoRA export through peft: PeftModel.from_pretrained(unedited base, dir) must behave like the edited model.

Exact exports (rank = total rows N) match the edited model's logits to fp32 rounding; truncated exports (SVD) report
the relative Frobenius error of the dropped singular values, which the merged adapter must reproduce.
"""

import json
import os

import pytest
import torch

from emsedit_fast.editfiles import weights_by_name
from emsedit_fast.export import export_lora
from emsedit_fast.models.adapter import default_module_patterns
from emsedit_fast.models.adapter import group_by_shape
from emsedit_fast.models.adapter import resolve_modules
from emsedit_fast.models.tiny import tiny_gpt2
from emsedit_fast.models.tiny import tiny_llama
from emsedit_fast.models.tiny import tiny_tokenizer
from emsedit_fast.updates import AppliedEdit as EditFactors
from emsedit_fast.updates import GroupUpdate as GroupFactors
from emsedit_fast.updates import apply_edit_
from emsedit_fast.updates import total_deltas

peft = pytest.importorskip("peft")


def _modules(model):
    return resolve_modules(model, default_module_patterns(model, "sequential"))


def _layouts(modules):
    return [{"name": m.name, "d_in": m.d_in, "d_out": m.d_out, "transposed": m.transposed} for m in modules]


def _synthetic_edit(modules, n_steps=2, n=5, form="dual", seed=0, scale=0.3):
    """Random factors with a visible effect: dW_l = M^T K per step (or a dense rank-n S^T for form='primal')."""
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(n_steps):
        groups = []
        for g in group_by_shape(modules):
            m = len(g)
            k = torch.randn(m, n, g.d_in, generator=gen) / g.d_in ** 0.5
            coeffs = scale * torch.randn(m, n, g.d_out, generator=gen) / n ** 0.5
            if form == "primal":
                shift = k.transpose(1, 2) @ coeffs  # (m, d_in, d_out), rank n
                groups.append(GroupFactors(tuple(g.names), g.transposed, "primal", shift.contiguous(), None, n))
            else:
                groups.append(GroupFactors(tuple(g.names), g.transposed, form, coeffs, k, n))
        steps.append(groups)
    return EditFactors(steps, {"apply_deltas_": "reference", "apply_deltas_dense_": "reference"}, info={"id": 1})


def _logits(model, tok):
    batch = tok(["The capital of Italy is", "Danielle Darrieux speaks the language"], return_tensors="pt",
                padding=True)
    with torch.no_grad():
        return model(**batch).logits


def _edited(make_model, edit, modules_of):
    model = make_model()
    apply_edit_(weights_by_name(model, [m.name for m in modules_of(model)]), edit)
    return model


@pytest.mark.parametrize("make_model,form", [(tiny_llama, "dual"), (tiny_gpt2, "dual"), (tiny_llama, "primal")],
                         ids=["llama-linear", "gpt2-conv1d", "llama-primal"])
def test_exact_export_loads_in_peft_and_matches_edited_model(tmp_path, make_model, form):
    tok = tiny_tokenizer()
    base = make_model()
    modules = _modules(base)
    edit = _synthetic_edit(modules, form=form)
    edited = _edited(make_model, edit, _modules)
    result = export_lora([edit], _layouts(modules), str(tmp_path / "lora"), base_model="tiny")
    n_total = 2 * 5
    assert all(x.rank == n_total for x in result.layers) and result.rel_error < 1e-5
    assert {x.method for x in result.layers} == ({"exact"} if form == "dual" else {"svd"})
    cfg = json.load(open(tmp_path / "lora" / "adapter_config.json"))
    assert cfg["fan_in_fan_out"] == modules[0].transposed and cfg["peft_type"] == "LORA"

    reference = _logits(edited, tok)
    unedited = _logits(base, tok)
    adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "lora"))
    got = _logits(adapted, tok)
    assert (reference - unedited).abs().max() > 1e-2, "the edit must move the logits for the test to mean anything"
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)


def test_truncated_export_reports_the_svd_error(tmp_path):
    tok = tiny_tokenizer()
    base = tiny_llama()
    modules = _modules(base)
    edit = _synthetic_edit(modules, n_steps=2, n=4)
    exact = {name: (b @ a) for name, (b, a) in total_deltas([edit]).items()}
    edited_logits = _logits(_edited(tiny_llama, edit, _modules), tok)
    errors, logit_errors = [], []
    for rank in (1, 3, 8):
        out = str(tmp_path / f"lora{rank}")
        result = export_lora([edit], _layouts(modules), out, rank=rank)
        assert all(x.rank == rank for x in result.layers)
        assert all(x.method == ("svd" if rank < 8 else "exact") for x in result.layers)
        summary = json.load(open(os.path.join(out, "emsedit_export.json")))
        assert summary["requested_rank"] == rank and abs(summary["rel_error"] - result.rel_error) < 1e-12
        model = peft.PeftModel.from_pretrained(tiny_llama(), out)
        logit_errors.append(float((_logits(model, tok) - edited_logits).abs().max()))
        merged = model.merge_and_unload()
        w0 = dict(tiny_llama().named_modules())
        for layer in result.layers:
            delta = (dict(merged.named_modules())[layer.name].weight - w0[layer.name].weight).detach().double()
            err = float((delta - exact[layer.name]).norm() / exact[layer.name].norm())
            assert abs(err - layer.rel_error) < 1e-4, (layer.name, err, layer.rel_error)
        errors.append(result.rel_error)
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5 and errors[0] > 0.05
    assert logit_errors[0] > logit_errors[2] and logit_errors[2] < 1e-4


def test_export_of_a_real_editor_edit(tmp_path):
    """End to end: an editor's recorded dual-form edit (two MSBP steps) exported and loaded through peft."""
    from emsedit_fast import api
    from emsedit_fast.config import load
    from emsedit_fast.data.facts import bundled_facts
    from emsedit_fast.editors import build_editor

    model = tiny_gpt2()
    modules = _modules(model)
    cfg = load("emsedit", mode="sequential", overrides=["editor.rank=8", "editor.eta_init=0.05",
                                                        "editor.solve_form=dual"])
    editor = build_editor(model, modules, cfg.editor, "sequential", seed=0)
    session = api.Session(cfg, model, tiny_tokenizer(), modules, editor, torch.device("cpu"))
    results, _ = api.edit(session, bundled_facts("eval")[:4], measure=False, progress=False)
    edit = results[0].applied
    assert {g.form for step in edit.steps for g in step} == {"dual"} and len(edit.steps) == 2
    export_lora([edit], _layouts(modules), str(tmp_path / "lora"))
    tok = tiny_tokenizer()
    adapted = peft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "lora"))
    assert (_logits(model, tok) - _logits(tiny_gpt2(), tok)).abs().max() > 1e-3
    torch.testing.assert_close(_logits(adapted, tok), _logits(model, tok), rtol=1e-4, atol=1e-4)
