"""One meta-training step end to end: MetaTrainer.train on one batch of 10 edits (EMSEdit, sequential, K = 2, l2
drift penalty): K captures + predictions + applications, the meta-loss pass, the decoupled meta-gradient through
ridge_solve_backward and the hypernetworks, clipping and the Adam step. SmolLM2-135M (the tiny LLaMA with --smoke),
fast vs reference backend. The gate compares the loss and every hypernetwork gradient of the step."""

import _harness
import pytest
import torch

from emsedit_fast import ops
from emsedit_fast import testing
from emsedit_fast.editors import build_editor
from emsedit_fast.training import MetaTrainer


class MetaTrainStep(_harness.EngineWork):
    def __init__(self, case, provider, device, solve_form="auto"):
        super().__init__()
        from emsedit_fast.data.edit_batch import tokenize_batch
        from emsedit_fast.models.adapter import default_module_patterns
        from emsedit_fast.models.adapter import resolve_modules

        self.case = case
        model, tok = _harness.language_model(_harness.model_name_for(case), device)
        modules = resolve_modules(model, default_module_patterns(model, "sequential"))
        self.cfg = _harness.editor_config(provider, case, solve_form)
        self.editor = build_editor(model, modules, self.cfg.editor, "sequential", seed=0, device=device)
        _harness.train_like_(self.editor)
        self.records = _harness.edit_records(_harness.EDITS_PER_BATCH, "train")
        self.batch = tokenize_batch(tok, self.records, _harness.MICRO_BATCH, self.cfg.model.max_length, device,
                                    need_equiv=True, need_unrel=self.cfg.train.loss != "l2")
        self.state0 = self.editor.editor_state()
        self.trainer = None
        self.grads: dict[str, torch.Tensor] = {}
        self.modules = modules

    def reset(self):
        self.editor.reset()
        self.editor.load_state_dict(self.state0)
        self.trainer = MetaTrainer(self.editor, self.cfg.train)
        self.grads = {}
        step = self.trainer.optimizer.step

        def spy(*args, **kwargs):  # keeps the gradients of the step for the gate (a dict lookup when timing)
            if not self.grads and not self.recording:
                self.grads.update({n: p.grad.detach().clone() for n, p in self.editor.named_parameters()
                                   if p.grad is not None})
            return step(*args, **kwargs)

        self.trainer.optimizer.step = spy

    def step(self):
        return self.trainer.train([self.batch], progress=False)

    def fast_form(self):
        rows = int(self.batch.edit.labels.ne(-100).sum())
        return ops.choose_form(rows, self.modules[0].d_in)

    def gate_values(self, report):
        return {"loss": report.losses[0], "skipped": report.skipped, "grads": dict(self.grads)}

    def compare(self, got, expected, label):
        assert got["skipped"] == expected["skipped"] == 0, f"[{label}] a step was refused: {got} / {expected}"
        assert _harness.math_isclose(got["loss"], expected["loss"]), \
            f"[{label}] loss {got['loss']} vs {expected['loss']}"
        assert got["grads"].keys() == expected["grads"].keys(), f"[{label}] different parameters got gradients"
        for name, e in expected["grads"].items():
            scale = e.abs().max().item() + 1e-30
            testing.assert_close_to_reference(got["grads"][name] / scale, e / scale, kind="reduction",
                                              label=f"{label}-grad-{name}")
        return "loss and hypernetwork gradients"

    def info(self):
        return {"edits": len(self.records), "steps": 1, "edited_modules": len(self.modules),
                "msbp_steps": self.cfg.editor.n_steps,
                "loss_kind": self.cfg.train.loss, "model": _harness.model_name_for(self.case)}

    def close(self):
        self.editor.reset()
        self.editor.load_state_dict(self.state0)


@pytest.mark.bench("meta_train_step", providers=("reference", "cpp"))
def bench_meta_train_step(benchmark, case, provider, device):
    _harness.run_engine_bench(benchmark, "meta_train_step", case, provider, device, MetaTrainStep)
