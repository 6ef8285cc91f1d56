"""Benchmark cases: the edited shape groups of real models (presets) and the `Case` every benchmark is keyed by.

Each bench_<op>.py picks its own cases from these presets (`OpSpec.cases`); nothing here knows about any op. A case id
reads `preset-L<layers>[of<preset layers>]-n<rows>-<d_in>x<d_out>[-layout-dtype][-form][-tag]`; `L2of12` marks a
group cut down on the CPU because the full group does not fit the time budget (on CUDA every group runs in full).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Preset:
    """One edited shape group of a model (docs/method.md, "Editors")."""

    name: str
    d_in: int
    d_out: int
    layers: int  # edited layers in the group
    transposed: bool  # storage layout: GPT-2 Conv1D stores (d_in, d_out)
    rank: int  # hypernetwork rank r
    rows: int  # n: cached answer-token rows per layer in one step (90 for sequential editing, 64 for SmolLM2)
    source: str


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("tiny", 64, 128, 2, False, 8, 8, "tiny LLaMA gate/up (emsedit_fast.models.tiny, smoke only)"),
    Preset("tiny-gpt2", 256, 64, 2, True, 8, 8, "tiny GPT-2 c_proj, Conv1D (emsedit_fast.models.tiny, smoke only)"),
    Preset("smollm2-135m", 576, 1536, 11, False, 256, 64,
           "SmolLM2-135M gate_proj 10-14 + up_proj 17-22, one group (the small-model profile), r = 256"),
    Preset("smollm2-135m-down", 1536, 576, 11, False, 256, 64, "SmolLM2-135M down_proj shape (ridge sweep only)"),
    Preset("gpt2-xl", 6400, 1600, 6, True, 1024, 90, "GPT-2-XL c_proj of layers 6-11, Conv1D"),
    Preset("gptj-fc_out", 16384, 4096, 6, False, 1024, 90, "GPT-J-6B fc_out of layers 22-27"),
    Preset("llama3-gate_up", 4096, 14336, 12, False, 1024, 90,
           "LLaMA-3-8B gate_proj 11-15 + up_proj 18-24, one group"),
    Preset("mistral7b-down", 14336, 4096, 3, False, 1024, 90, "Mistral-7B down_proj 17-19 (ridge sweep only)"),
)}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The presets every op grid runs on, and the ones smoke mode uses.
MODEL_PRESETS = ("smollm2-135m", "gpt2-xl", "gptj-fc_out", "llama3-gate_up")
SMOKE_PRESETS = ("tiny", "tiny-gpt2")


@dataclass(frozen=True)
class Case:
    """One benchmark input size. str(case) is its pytest id (and the `case` param in the JSON)."""

    preset: str
    layers: int
    rows: int
    dtype: str = "fp32"  # model weight dtype (ops that touch weights)
    transposed: bool | None = None  # None: the preset's own layout
    weights: bool = False  # whether dtype and layout belong in the id
    form: str | None = None  # ridge: "primal" / "dual"
    tag: str = ""  # anything else that distinguishes the case (e.g. "K2")
    primary: bool = False  # the case that gets competent_compiled on the CPU

    @property
    def p(self) -> Preset:
        return PRESETS[self.preset]

    @property
    def d_in(self) -> int:
        return self.p.d_in

    @property
    def d_out(self) -> int:
        return self.p.d_out

    @property
    def d(self) -> int:
        return self.p.d_in + self.p.d_out

    @property
    def rank(self) -> int:
        return self.p.rank

    @property
    def n_total(self) -> int:
        return self.layers * self.rows

    @property
    def layout_transposed(self) -> bool:
        return self.p.transposed if self.transposed is None else self.transposed

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def cut(self) -> bool:
        return self.layers < self.p.layers

    def __str__(self) -> str:
        layers = f"L{self.layers}of{self.p.layers}" if self.cut else f"L{self.layers}"
        parts = [self.preset, layers, f"n{self.rows}", f"{self.d_in}x{self.d_out}"]
        if self.weights:
            parts += ["conv1d" if self.layout_transposed else "linear", self.dtype]
        if self.form:
            parts.append(self.form)
        if self.tag:
            parts.append(self.tag)
        return "-".join(parts)

    def describe(self) -> dict[str, Any]:
        return {"preset": self.preset, "layers": self.layers, "preset_layers": self.p.layers, "cut": self.cut,
                "rows_per_layer": self.rows, "rows": self.n_total, "d_in": self.d_in, "d_out": self.d_out,
                "rank": self.rank, "dtype": self.dtype, "layout": "conv1d" if self.layout_transposed else "linear",
                "form": self.form}


def case(preset: str, *, layers: int | None = None, rows: int | None = None, **kw) -> Case:
    """A case of `preset`: its full group and its own row count unless given."""
    p = PRESETS[preset]
    return Case(preset, p.layers if layers is None else layers, p.rows if rows is None else rows, **kw)


def layers_on(device: str, preset: str, cpu_layers: dict[str, int]) -> int:
    """Layers to run: the full group on CUDA; on the CPU `cpu_layers[preset]` where the full group does not fit."""
    full = PRESETS[preset].layers
    return full if device == "cuda" else cpu_layers.get(preset, full)


def weight_cases(presets_layouts, device: str, cpu_layers: dict[str, int] | None = None) -> list[Case]:
    """fp32 and bf16 weights of each (preset, transposed); the SmolLM2 Linear fp32 case is primary."""
    out = []
    for preset, transposed in presets_layouts:
        for dtype in ("fp32", "bf16"):
            primary = preset in ("smollm2-135m", "tiny") and not transposed and dtype == "fp32"
            out.append(case(preset, layers=layers_on(device, preset, cpu_layers or {}), dtype=dtype,
                            transposed=transposed, weights=True, primary=primary))
    return out


CASES: dict[str, Case] = {}  # id -> case, filled by `register` while pytest parametrises


def register(cases: list[Case]) -> list[Case]:
    for c in cases:
        CASES[str(c)] = c
    return cases
