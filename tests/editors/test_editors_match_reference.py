"""Fast vs reference on tiny models: the engine, not just the ops.

For every editor, on a tiny GPT-2 (Conv1D) and a tiny LLaMA (Linear): identical seeds, once with backend="reference"
(per-layer hypernetwork calls, primal LU solve, dense delta) and once with backend="fast" (compiled kernels, which
raise rather than fall back). One meta-training step and one multi-step edit must give the same losses, hypernetwork
gradients and edited weights, and the fast run must show that only compiled backends ran.
"""

import pytest
import torch

from emsedit_fast import ops
from emsedit_fast.config import load
from emsedit_fast.data.edit_batch import tokenize_batch
from emsedit_fast.data.facts import bundled_facts
from emsedit_fast.editors import build_editor
from emsedit_fast.models.adapter import default_module_patterns
from emsedit_fast.models.adapter import resolve_modules
from emsedit_fast.models.tiny import tiny_gpt2
from emsedit_fast.models.tiny import tiny_llama
from emsedit_fast.models.tiny import tiny_tokenizer
from emsedit_fast.testing import assert_close_to_reference
from emsedit_fast.trainer import MetaTrainer

CASES = [("emsedit", "sequential"), ("emsedit", "batch"), ("malmen", "batch"), ("rledit", "sequential"),
         ("mend", "batch"), ("ultraedit", "sequential")]


def _fast_available():
    from emsedit_fast.ops._dispatch import cpp_has_kernel

    missing = [op for names in ops.OPS_BY_STEM.values() for op in names if not cpp_has_kernel(op, "cpu")]
    return missing


def _run(editor_name, regime, make_model, backend, steps=2):
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = make_model()
    cfg = load(editor_name, mode=regime, overrides=["editor.rank=8", f"editor.backend={backend}",
                                                    "editor.n_steps=2", "train.meta_lr=1e-3"])
    modules = resolve_modules(model, default_module_patterns(model, regime))
    editor = build_editor(model, modules, cfg.editor, regime, seed=0)
    trainer = MetaTrainer(editor, cfg.train)
    records = bundled_facts("train")
    batches = [tokenize_batch(tok, records[i * 4:(i + 1) * 4], 2, need_unrel=True) for i in range(steps)]
    grads = {}

    first_optimizer_step = trainer.optimizer.step

    def spy_step(*a, **k):
        if not grads:
            grads.update({n: p.grad.clone() for n, p in editor.named_parameters() if p.grad is not None})
        return first_optimizer_step(*a, **k)

    trainer.optimizer.step = spy_step
    with ops.record_backends() as seen:
        report = trainer.train(batches, progress=False)
        edit_batch = tokenize_batch(tok, bundled_facts("eval")[:6], 3, need_equiv=False)
        editor.edit(edit_batch.edit)
    weights = [w.clone() for w in editor.weights()]
    return report.losses, grads, editor.state_dict(), weights, seen


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama], ids=["gpt2-conv1d", "llama-linear"])
@pytest.mark.parametrize("editor_name,regime", CASES, ids=[f"{e}-{r}" for e, r in CASES])
def test_editor_fast_matches_reference(editor_name, regime, make_model):
    missing = _fast_available()
    if missing:
        pytest.skip(f"C++ backend lacks CPU kernels for {missing}")
    ref = _run(editor_name, regime, make_model, "reference")
    fast = _run(editor_name, regime, make_model, "fast")
    for a, b in zip(fast[0], ref[0]):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), f"losses {fast[0]} vs {ref[0]}"
    assert fast[1].keys() == ref[1].keys()
    for name in ref[1]:
        scale = ref[1][name].abs().max().item() + 1e-12
        assert_close_to_reference(fast[1][name] / scale, ref[1][name] / scale, kind="reduction", label=f"grad {name}")
    for name in ref[2]:
        # trained parameters after two optimiser steps through two solve forms (primal LU vs dual Cholesky): the
        # fp32 reduction tolerance in absolute terms, as the parameters are O(1e-3) to O(1)
        torch.testing.assert_close(fast[2][name], ref[2][name], rtol=1e-5, atol=1e-4, msg=f"state {name}")
    for i, (a, b) in enumerate(zip(fast[3], ref[3])):
        assert_close_to_reference(a, b, kind="reduction", label=f"edited weight {i}")
    fast_backends = set().union(*fast[4].values())
    assert fast_backends == {"cpp"}, fast[4]
    assert set().union(*ref[4].values()) == {"reference"}
