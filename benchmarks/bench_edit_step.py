"""Editor work of one MSBP step, the end-to-end edit on SmolLM2-135M, and how editing scales.

bench_edit_step_editor_work: keys and value-grads given (a Capture built from testing.edit_rows), the engine's own
    Editor.predict_deltas + Editor.apply_step for one step: normalise (with the EMSEdit statistics update), the four
    hypernetwork blocks, value targets, the solve, the grouped update over every edited layer. SmolLM2 shapes
    (11 layers) and LLaMA-3-8B shapes (one layer on the CPU, all twelve on a GPU). reference = the published path
    (per-layer blocks, primal LU solve, dense delta); cpp / triton = the fused kernels (dual solve while n < d_in).
bench_edit_step_end_to_end: Editor.edit on the real SmolLM2-135M (the tiny LLaMA with --smoke), EMSEdit K = 2, a
    batch of 10 edits: per step capture (LLM forward + backward) then editor work. extra_info splits the time into
    capture_s, editor_s (predict + check + apply) and the rest; editor_fraction = editor_s / median.
bench_edit_step_scaling_rows / _layers: editor work vs rows per layer (16 -> 4096 on a GPU; 16 -> 1024 on the CPU,
    where 4096 rows x 11 layers is ~0.4 TFLOP of hypernetwork per step) and vs edited layers (1 -> 11).
"""

import _harness
import pytest
import torch

from emsedit_fast import ops
from emsedit_fast import testing
from emsedit_fast.editors import build_editor
from emsedit_fast.models.adapter import EditedModule
from emsedit_fast.models.hooks import Capture


def _stats_state(editor) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in editor.state_dict().items() if k.endswith((".count", ".mean", ".var", ".std"))}


class EditorWork(_harness.EngineWork):
    """One MSBP step of the engine on given rows: predict_deltas + apply_step over a stack of edited layers."""

    def __init__(self, case, provider, device, solve_form="auto"):
        super().__init__()
        self.case = case
        self.model = _harness.LayerStack(case, device)
        modules = [EditedModule(f"layers.{i}", m, case.d_in, case.d_out, case.layout_transposed)
                   for i, m in enumerate(self.model.layers)]
        cfg = _harness.editor_config(provider, case, solve_form)
        self.editor = build_editor(self.model, modules, cfg.editor, "sequential", seed=0, device=device)
        _harness.train_like_(self.editor, steps=1)
        keys, grads = testing.edit_rows(case.n_total, case.d_in, case.d_out, seed=3, device=device)
        n = case.rows
        names = [m.name for m in modules]
        self.cap = Capture(keys={nm: keys[i * n:(i + 1) * n] for i, nm in enumerate(names)},
                           value_grads={nm: grads[i * n:(i + 1) * n] for i, nm in enumerate(names)},
                           loss=0.0, n_rows=n, rows=torch.zeros(n, dtype=torch.long),
                           positions=torch.zeros(n, dtype=torch.long), row_micro_batch=None, token_mode="answer")
        self.stats0 = _stats_state(self.editor)
        self.predict = self.timing("editor", self.editor.predict_deltas)
        self.apply = self.timing("editor", self.editor.apply_step)

    def step(self):
        rec = self.predict(self.cap, 0)
        self.apply(rec)
        return rec

    def fast_form(self):
        return ops.choose_form(self.case.rows, self.case.d_in)

    def reset(self):
        self.editor.reset()
        self.editor.load_state_dict(self.stats0, strict=False)

    def gate_values(self, rec):
        return {"delta": _harness.delta_of(rec), "weights": [w.clone() for w in self.editor.weights()],
                "form": rec.groups[0].form}

    def compare(self, got, expected, label):
        _harness.compare_deltas(got["delta"], expected["delta"], f"{label}-delta")
        _harness.compare_updated_weights(got["weights"], expected["weights"], expected["delta"].abs().max().item(),
                                         label)
        return f"delta ({got['form']} vs {expected['form']}) and edited weights"

    def info(self):
        c = self.case
        form = self.editor.solve_form(c.rows, c.d_in)
        return {"form": form, "hypernet_flops": 4 * 4.0 * c.n_total * c.d * c.rank,
                "solve_flops": c.layers * _harness.ridge_flops(form, c.rows, c.d_in, c.d_out,
                                                               lu=self.editor.backend == "reference"),
                "flops": 4 * 4.0 * c.n_total * c.d * c.rank
                + c.layers * _harness.ridge_flops(form, c.rows, c.d_in, c.d_out)
                + 2.0 * c.layers * c.rows * c.d_in * c.d_out,
                "workspace_model_bytes": _editor_workspace(c, form, self.editor.backend)}

    def close(self):
        self.editor.reset()


def _editor_workspace(case, form, backend):
    """Largest temporaries of one step beyond inputs, weights and hypernetwork parameters (model, BENCHMARKS.md)."""
    e = case.d_in * case.d_out
    rows = 4 * case.n_total * case.d * 3  # hypernet: z, P B + c, z' alive together (N x D fp32)
    if form == "primal":
        # every layer's Gram + K^T V + LAPACK copies (one batched solve), S, then one dense fp32 delta + sum
        solve = 4 * case.layers * (2 * case.d_in ** 2 + 3 * e)
        return rows + solve + 8 * e
    solve = 4 * case.layers * (2 * case.rows ** 2 + case.rows * case.d_out)
    return rows + solve + 64 * 1024 * 4 * torch.get_num_threads()


class EndToEnd(_harness.EngineWork):
    """Editor.edit on a real LM: K = 2 MSBP steps, each capture (forward + backward) then editor work."""

    def __init__(self, case, provider, device, solve_form="auto"):
        super().__init__()
        from emsedit_fast.data.edit_batch import tokenize_batch
        from emsedit_fast.models.adapter import default_module_patterns
        from emsedit_fast.models.adapter import resolve_modules

        self.case = case
        model, tok = _harness.language_model(_harness.model_name_for(case), device)
        modules = resolve_modules(model, default_module_patterns(model, "sequential"))
        cfg = _harness.editor_config(provider, case, solve_form)
        self.editor = build_editor(model, modules, cfg.editor, "sequential", seed=0, device=device)
        _harness.train_like_(self.editor)
        self.records = _harness.edit_records(_harness.EDITS_PER_BATCH)
        self.batch = tokenize_batch(tok, self.records, _harness.MICRO_BATCH, cfg.model.max_length, device,
                                    need_equiv=False)
        self.stats0 = _stats_state(self.editor)
        ed = self.editor
        ed.capture = self.timing("capture", ed.capture)
        ed.predict_deltas = self.timing("editor", ed.predict_deltas)
        ed.check_record = self.timing("editor", ed.check_record)
        ed.apply_step = self.timing("editor", ed.apply_step)
        self.modules = modules

    def step(self):
        return self.editor.edit(self.batch.edit)

    def fast_form(self):
        rows = int(self.batch.edit.labels.ne(-100).sum())
        return ops.choose_form(rows, self.modules[0].d_in)

    def reset(self):
        self.editor.reset()
        self.editor.load_state_dict(self.stats0, strict=False)

    def gate_values(self, entry):
        return {"deltas": [_harness.delta_of(rec) for rec in entry.steps],
                "rows": [rec.n_rows for rec in entry.steps]}

    def compare(self, got, expected, label):
        assert got["rows"] == expected["rows"], f"[{label}] captured rows {got['rows']} vs {expected['rows']}"
        for k, (a, e) in enumerate(zip(got["deltas"], expected["deltas"])):
            _harness.compare_deltas(a, e, f"{label}-step{k + 1}")
        return "deltas of both steps"

    def info(self):
        rows = self.batch.edit.labels.ne(-100).sum().item()
        return {"edits": len(self.records), "answer_rows": rows, "edited_modules": len(self.modules),
                "msbp_steps": self.editor.cfg.n_steps, "model": _harness.model_name_for(self.case)}

    def close(self):
        self.editor.reset()  # the model is shared by the session: leave it unedited


@pytest.mark.bench("editor_work", providers=_harness.ENGINE_PROVIDERS)
def bench_edit_step_editor_work(benchmark, case, provider, device):
    _harness.run_engine_bench(benchmark, "edit_step_editor_work", case, provider, device, EditorWork)


@pytest.mark.bench("edit_step", providers=("reference", "cpp"))
def bench_edit_step_end_to_end(benchmark, case, provider, device):
    _harness.run_engine_bench(benchmark, "edit_step_end_to_end", case, provider, device, EndToEnd)
    info = benchmark.extra_info
    if info.get("editor_s") is not None and benchmark.stats:
        median = benchmark.stats.stats.median
        info["editor_fraction"] = info["editor_s"] / median
        info["capture_fraction"] = info["capture_s"] / median


@pytest.mark.bench("scaling_rows", providers=("reference", "cpp"))
def bench_edit_step_scaling_rows(benchmark, case, provider, device):
    _harness.run_engine_bench(benchmark, "edit_step_scaling_rows", case, provider, device, EditorWork)


@pytest.mark.bench("scaling_layers", providers=("reference", "cpp"))
def bench_edit_step_scaling_layers(benchmark, case, provider, device):
    _harness.run_engine_bench(benchmark, "edit_step_scaling_layers", case, provider, device, EditorWork)
