"""Editor work of one MSBP step with keys and value-grads given, at SmolLM2 and LLaMA-3-8B shapes, and how it scales.

The engine's own Editor.predict_deltas + Editor.apply_step for one step over a stack of edited layers: the normaliser
(with the EMSEdit statistics update), the four hypernetwork blocks, the value targets, the ridge solve, the grouped
update. Providers (benchmarks/_engine.py): reference (the published engine: per-layer hypernetwork, primal LU, dense
delta), competent (the same engine on the competent PyTorch ops: grouped GEMMs, dual Cholesky, addmm_), cpp/triton
(the fused kernels). reference / competent is the algorithm's gain, competent / cpp the kernels'.

bench_edit_step_editor_work: SmolLM2-135M (11 layers, r 256, 64 rows per layer) and LLaMA-3-8B (r 1024, 90 rows;
one layer of twelve on the CPU). bench_edit_step_scaling_rows / _layers: SmolLM2 shapes, 16 -> 1024 rows per layer
(4096 on a GPU) and 1 -> 11 layers. The gate compares dW = M^T K (or S) and the edited weights with the reference
engine run in the kernels' solve form.
"""

import _cases
import _engine
import _harness
import bench_ridge
import pytest
import torch

from emsedit_fast import ops
from emsedit_fast import testing
from emsedit_fast.editors import build_editor
from emsedit_fast.models.adapter import EditedModule
from emsedit_fast.models.hooks import Capture

SCALING_ROWS_CPU, SCALING_ROWS_CUDA = (16, 64, 256, 1024), (16, 64, 256, 1024, 4096)
SCALING_LAYERS = (1, 2, 4, 8, 11)


class LayerStack(torch.nn.Module):
    """A model that is only the edited layers of one shape group (nn.Linear, or GPT-2 Conv1D when transposed)."""

    def __init__(self, case, device):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        weights = testing.layer_weights(case.layers, case.d_in, case.d_out, seed=1, transposed=case.layout_transposed,
                                        device=device)
        mods = []
        for w in weights:
            m = Conv1D(case.d_out, case.d_in) if case.layout_transposed else torch.nn.Linear(case.d_in, case.d_out,
                                                                                              bias=False)
            m.weight = torch.nn.Parameter(w, requires_grad=False)
            mods.append(m.to(device))
        self.layers = torch.nn.ModuleList(mods)


def _stats(editor) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in editor.state_dict().items() if k.endswith((".count", ".mean", ".var", ".std"))}


class EditorWork(_engine.EngineWork):
    """One MSBP step of the engine on given rows: predict_deltas + apply_step over a stack of edited layers."""

    def __init__(self, case, provider, device, solve_form=None):
        super().__init__(provider)
        self.case = case
        self.model = LayerStack(case, device)
        modules = [EditedModule(f"layers.{i}", m, case.d_in, case.d_out, case.layout_transposed)
                   for i, m in enumerate(self.model.layers)]
        cfg = _engine.editor_config(provider, rank=case.rank, solve_form=solve_form,
                                    small_model=case.preset.startswith(("smollm2", "tiny")))
        self.editor = build_editor(self.model, modules, cfg.editor, "sequential", seed=0, device=device)
        _engine.train_like_(self.editor, steps=1)
        keys, grads = testing.edit_rows(case.n_total, case.d_in, case.d_out, seed=3, device=device)
        n, names = case.rows, [m.name for m in modules]
        self.cap = Capture(keys={nm: keys[i * n:(i + 1) * n] for i, nm in enumerate(names)},
                           value_grads={nm: grads[i * n:(i + 1) * n] for i, nm in enumerate(names)},
                           loss=0.0, n_rows=n, rows=torch.zeros(n, dtype=torch.long),
                           positions=torch.zeros(n, dtype=torch.long), row_micro_batch=None, token_mode="answer")
        self.stats0 = _stats(self.editor)
        self.before = [w.clone() for w in self.editor.weights()]

    def step(self):
        rec = self.editor.predict_deltas(self.cap, 0)
        self.editor.apply_step(rec)
        return rec

    def fast_form(self):
        return ops.choose_form(self.case.rows, self.case.d_in)

    def reset(self):
        with self.engine():
            self.editor.reset()
        self.editor.load_state_dict(self.stats0, strict=False)

    def gate_values(self, rec):
        return {"delta": _engine.delta_of(rec.groups[0]), "weights": [w.clone() for w in self.editor.weights()],
                "form": rec.groups[0].form}

    def compare(self, got, expected, label):
        _engine.check_delta(got["delta"], expected["delta"], f"{label}-delta")
        for i, (w, e, b) in enumerate(zip(got["weights"], expected["weights"], self.before)):
            _harness.check_output(w, e, before=b, tol=1e-4, label=f"{label}-weight{i}")
        return f"dW ({got['form']} vs {expected['form']}) and edited weights"

    def info(self):
        c = self.case
        form = self.editor.solve_form(c.rows, c.d_in)
        hyper = 4 * 4.0 * c.n_total * c.d * c.rank  # four blocks
        solve = c.layers * bench_ridge.ridge_flops(form, c.rows, c.d_in, c.d_out, lu=self.provider == "reference")
        update = 2.0 * c.layers * c.rows * c.d_in * c.d_out
        return {"form": form, "hypernet_flops": hyper, "solve_flops": solve, "flops": hyper + solve + update,
                "workspace_model_bytes": _workspace(c, form, self.provider)}

    def close(self):
        self.reset()


def _workspace(case, form, provider):
    """Largest temporaries of one step beyond inputs, weights and hypernetwork parameters."""
    e = case.d_in * case.d_out
    rows = 4 * case.n_total * case.d * 3  # hypernetwork: z, P B + c, z' alive together (N x D fp32)
    if form == "primal":  # every layer's Gram + K^T V + LAPACK copies, S, then one dense fp32 delta + sum
        return rows + 4 * case.layers * (2 * case.d_in ** 2 + 3 * e) + 8 * e
    solve = 4 * case.layers * (2 * case.rows ** 2 + case.rows * case.d_out)
    return rows + solve + (0 if provider == "competent" else 64 * 1024 * 4 * torch.get_num_threads())


class Spec:
    """Cases and providers of one editor-level benchmark."""

    providers = _engine.ENGINE_PROVIDERS

    def __init__(self, full, smoke, providers=None):
        self.full, self.smoke = full, smoke
        if providers:
            self.providers = providers

    def cases(self, smoke, device):
        return self.smoke() if smoke else self.full(device)


WORK = Spec(lambda device: [_cases.case("smollm2-135m"),
                            _cases.case("llama3-gate_up", layers=_cases.layers_on(device, "llama3-gate_up",
                                                                                  {"llama3-gate_up": 1}))],
            lambda: [_cases.case("tiny")])
ROWS = Spec(lambda device: [_cases.case("smollm2-135m", rows=n)
                            for n in (SCALING_ROWS_CUDA if device == "cuda" else SCALING_ROWS_CPU)],
            lambda: [_cases.case("tiny", rows=n) for n in (16, 64)], ("reference", "competent", "cpp"))
LAYERS = Spec(lambda device: [_cases.case("smollm2-135m", layers=n) for n in SCALING_LAYERS],
              lambda: [_cases.case("tiny", layers=n) for n in (1, 2)], ("reference", "competent", "cpp"))


@pytest.mark.bench(WORK)
def bench_edit_step_editor_work(benchmark, case, provider, device):
    _engine.run_engine_bench(benchmark, "edit_step_editor_work", case, provider, device, EditorWork)


@pytest.mark.bench(ROWS)
def bench_edit_step_scaling_rows(benchmark, case, provider, device):
    _engine.run_engine_bench(benchmark, "edit_step_scaling_rows", case, provider, device, EditorWork)


@pytest.mark.bench(LAYERS)
def bench_edit_step_scaling_layers(benchmark, case, provider, device):
    _engine.run_engine_bench(benchmark, "edit_step_scaling_layers", case, provider, device, EditorWork)
