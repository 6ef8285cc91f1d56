"""Model adapter: which linear modules are edited, their layout, and how they group by shape.

Orientation. Every edited module computes v = W u (+ b) with u ∈ ℝ^{d_in}, v ∈ ℝ^{d_out}; the editor always reasons
in this *linear orientation*, W ∈ ℝ^{d_out×d_in}. `nn.Linear` stores exactly that, `weight` of shape (d_out, d_in).
GPT-2's `Conv1D` computes v = u W_s + b and stores the transpose, `weight` of shape (d_in, d_out); such modules are
`transposed=True`. The bias is never edited.

Shape groups. Modules with the same (d_in, d_out, transposed) share one hypernetwork; i_ℓ is the index of a module
within its group in listing order, i.e. the order of the pattern list and then model order within a pattern.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from typing import Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

logger = logging.getLogger(__name__)

Regime = Literal["sequential", "batch"]


@dataclass(frozen=True)
class EditedModule:
    """One edited linear module.

    name: the module's name in `model.named_modules()`. module: the `nn.Linear` or GPT-2 `Conv1D` itself.
    d_in, d_out: the linear-orientation dimensions (v = W u with W ∈ ℝ^{d_out×d_in}), whatever the storage layout.
    transposed: True when the weight is stored (d_in, d_out) (GPT-2 `Conv1D`); False for `nn.Linear` (d_out, d_in).
    """

    name: str
    module: nn.Module = field(repr=False)  # compared and hashed by identity
    d_in: int
    d_out: int
    transposed: bool

    @property
    def weight(self) -> nn.Parameter:
        """The weight parameter in its storage layout: (d_out, d_in), or (d_in, d_out) when transposed."""
        return self.module.weight

    @property
    def shape(self) -> tuple[int, int]:
        """(d_in, d_out) for both layouts."""
        return self.d_in, self.d_out

    @property
    def group_key(self) -> tuple[int, int, bool]:
        """(d_in, d_out, transposed): modules with equal keys share one hypernetwork."""
        return self.d_in, self.d_out, self.transposed


def promote_edited_modules(modules: Sequence[EditedModule], dtype: torch.dtype = torch.float32) -> int:
    """Keep the edited modules' weights (and biases) in `dtype` inside a lower-precision model; returns how many
    modules were promoted (0 when they already are).

    An edit changes a weight by a small amount: in a bf16 weight (8 significant bits) a change below half a unit in
    the last place, about 0.2-0.4% of |W|, rounds away, and successive edits lose their sum. With the edited layers
    in fp32 the edits land as they would in an fp32 model, while the rest of the model stays in its dtype (the edited
    layers are a few percent of the parameters). A forward pre-hook casts the module's input to `dtype` and a
    forward hook casts its output back to the input's dtype, so the module is a drop-in for its neighbours. Undo,
    journals, edit files and LoRA export work on these fp32 weights and stay exact.
    """
    promoted = 0
    for m in modules:
        mod = m.module
        if getattr(mod, "_emsedit_promoted", None) is not None or mod.weight.dtype == dtype:
            continue
        original = mod.weight.dtype
        with torch.no_grad():
            mod.weight.data = mod.weight.data.to(dtype)  # exact: every bf16/fp16 value is an fp32 value
            if getattr(mod, "bias", None) is not None:
                mod.bias.data = mod.bias.data.to(dtype)

        def to_dtype(module, args, dtype=dtype):
            return (args[0].to(dtype),) + tuple(args[1:]) if args and torch.is_tensor(args[0]) else None

        def back(module, args, output, original=original):
            return output.to(original) if torch.is_tensor(output) else output

        mod.register_forward_pre_hook(to_dtype)
        mod.register_forward_hook(back)
        mod._emsedit_promoted = original
        promoted += 1
    return promoted


def set_attention(model: nn.Module, choice: str = "auto") -> str | None:
    """Set the attention implementation of a Hugging Face model's forward; returns the one in effect afterwards
    (None for a model without a transformers config).

    choice "eager" or "sdpa": that implementation (ValueError naming `model.attention` when the model cannot take
    it). "auto": "eager" for a bf16 / fp16 model on the CPU, else the model is left as it is.

    Why eager there: every capture pass, and in meta-training the meta-loss pass, runs the attention backward, and
    on the CPU PyTorch's fused SDPA kernel is slow at it in bf16. `python scripts/attention_check.py` times one
    SmolLM2 attention (9 query, 3 key/value heads of 64) forward + backward through transformers' two functions:
    over 10 prompts of 17 tokens 3.76 ms through SDPA and 0.84 ms as eager's matmul, fp32 softmax, matmul in bf16
    (3.5-4.5x across the shapes it times, two threads); in fp32 the two differ by 0.35-1.4 ms (1.4-1.5x), so fp32
    models keep their attention and their numerics. Eager's fp32 softmax is also the closer to the fp32 model: on 60
    zsRE validation prompts the bf16 model's next-token KL to the fp32 model is 0.0060 with eager and 0.0150 with SDPA
    (top-1 agreement 96.1% and 95.3%). End to end, benchmarks/bench_end_to_end.py times the engine with both side by
    side (BENCHMARKS.md).
    """
    if choice not in ("auto", "eager", "sdpa"):
        raise ValueError(f"model.attention: {choice!r} is not one of 'auto', 'eager', 'sdpa'")
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if choice == "auto":
        first = next((p for p in model.parameters() if p.is_floating_point()), None)
        low_precision_cpu = first is not None and first.device.type == "cpu" and first.dtype in (torch.bfloat16,
                                                                                                  torch.float16)
        if not low_precision_cpu or current in (None, "eager"):
            return current
        choice = "eager"
    if current == choice:
        return current
    if config is None:
        raise ValueError(f"model.attention: {type(model).__name__} has no transformers config, so its attention "
                         f"cannot be set to {choice!r}; use model.attention=auto")
    setter = getattr(model, "set_attn_implementation", None)
    try:
        if setter is not None:
            setter(choice)
        else:  # transformers before set_attn_implementation: the attention layers read the config at every call
            config._attn_implementation = choice
    except (ValueError, ImportError) as err:
        raise ValueError(f"model.attention: {type(model).__name__} cannot use {choice!r} attention ({err})") from err
    logger.info("attention implementation: %s (was %s)", choice, current)
    return config._attn_implementation


def module_layout(module: nn.Module) -> tuple[int, int, bool]:
    """(d_in, d_out, transposed) of an `nn.Linear` or GPT-2 `Conv1D`; TypeError for anything else.

    nn.Linear: weight (d_out, d_in), transposed False. Conv1D: weight (d_in, d_out) = (nx, nf), transposed True.
    """
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out), True
    if isinstance(module, nn.Linear):
        d_out, d_in = module.weight.shape
        return int(d_in), int(d_out), False
    raise TypeError(f"{type(module).__module__}.{type(module).__qualname__} is neither nn.Linear nor GPT-2 Conv1D")


def _example_names(model: nn.Module, limit: int = 6) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    shown = ", ".join(names[:limit])
    return f"{shown}, ... ({len(names)} linear modules)" if len(names) > limit else shown


def resolve_modules(model: nn.Module, patterns: Sequence[str]) -> list[EditedModule]:
    """Resolve regex patterns to the edited modules, in pattern order and then model order within a pattern.

    Each pattern is matched with `re.fullmatch` against the names of `model.named_modules()`. Raises ValueError,
    naming the pattern, when a pattern matches nothing, matches a module that is neither `nn.Linear` nor GPT-2
    `Conv1D` (the type is named), or matches a module that an earlier pattern (or another name) already matched.
    """
    if isinstance(patterns, str):
        raise TypeError("patterns must be a list of regexes, not one string")
    if not patterns:
        raise ValueError("no module patterns given: at least one module must be edited")
    named = list(model.named_modules())
    out: list[EditedModule] = []
    owner: dict[int, tuple[str, str]] = {}  # id(module) -> (pattern, name); catches a module reachable by two names
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"module pattern {pattern!r} is not a valid regex: {err}") from err
        matched = [(name, mod) for name, mod in named if name and regex.fullmatch(name)]
        if not matched:
            raise ValueError(f"module pattern {pattern!r} matched no module of {type(model).__name__} (re.fullmatch "
                             f"on named_modules names; linear modules look like: {_example_names(model)})")
        for name, mod in matched:
            try:
                d_in, d_out, transposed = module_layout(mod)
            except TypeError:
                raise ValueError(f"module pattern {pattern!r} matched {name!r} of type {type(mod).__name__}, but only "
                                 f"nn.Linear and GPT-2 Conv1D modules can be edited") from None
            if id(mod) in owner:
                prev_pattern, prev_name = owner[id(mod)]
                raise ValueError(f"module {name!r} matched by pattern {pattern!r} was already matched as {prev_name!r} "
                                 f"by pattern {prev_pattern!r}; every module may be edited once")
            owner[id(mod)] = (pattern, name)
            out.append(EditedModule(name=name, module=mod, d_in=d_in, d_out=d_out, transposed=transposed))
    return out


@dataclass(frozen=True)
class ShapeGroup:
    """The edited modules sharing one (d_in, d_out, transposed) key, in listing order.

    The position of a module in `modules` is its index i_ℓ within the group (the hypernetwork's per-module s, t, η,
    λ are indexed by it). D = d_in + d_out is the hypernetwork width.
    """

    key: tuple[int, int, bool]
    modules: tuple[EditedModule, ...]

    @property
    def d_in(self) -> int:
        return self.key[0]

    @property
    def d_out(self) -> int:
        return self.key[1]

    @property
    def transposed(self) -> bool:
        return self.key[2]

    @property
    def width(self) -> int:
        """D = d_in + d_out."""
        return self.key[0] + self.key[1]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    def index(self, name: str) -> int:
        """i_ℓ: the index of the module called `name` within this group."""
        for i, m in enumerate(self.modules):
            if m.name == name:
                return i
        raise KeyError(f"module {name!r} is not in shape group {self.key} ({', '.join(self.names)})")


def group_by_shape(modules: Sequence[EditedModule]) -> list[ShapeGroup]:
    """Group modules by (d_in, d_out, transposed), groups ordered by their first module, modules in listing order."""
    buckets: dict[tuple[int, int, bool], list[EditedModule]] = {}
    for m in modules:
        buckets.setdefault(m.group_key, []).append(m)
    return [ShapeGroup(key=k, modules=tuple(v)) for k, v in buckets.items()]


# ----------------------------------------------------------------------------------------------------------------------
# Default module lists, by model family (docs/models.md is the table of them, generated by
# tests/models/test_model_matrix.py)
# ----------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Span:
    """Module `template` (with `{i}` for the layer) on layers start..stop (inclusive) every `step` layers."""

    template: str
    start: int
    stop: int
    step: int = 1

    def layers(self) -> list[int]:
        return list(range(self.start, self.stop + 1, self.step))


@dataclass(frozen=True)
class _Recipe:
    """Reference module list of an architecture at depth `depth`; other depths are scaled from it."""

    depth: int
    spans: tuple[_Span, ...]


# model_type -> regime -> recipe at the reference depth (scaled for other depths). The published lists (the EMSEdit
# authors' code) are those of GPT-J-6B, LLaMA-3-8B, Gemma-2-9B, GPT-2-XL, Mistral-7B and Qwen2.5-7B; the other
# families borrow the list of the published model whose MLP they share:
#   OLMo / OLMo-2: SwiGLU MLP with LLaMA's module names and depth (32 layers at 7B): LLaMA-3's gate_proj + up_proj.
#   Phi-3: gate and up are one fused `gate_up_proj` (editing it would move both together and double d_out), so the
#     unfused output projection down_proj, at Mistral's layers 17-19 of 32 (Phi-3-mini also has 32 layers).
#   GPT-NeoX / Pythia: GPT-J's block (parallel attention and MLP, 4x GELU MLP); dense_h_to_4h / dense_4h_to_h take
#     the places of fc_in / fc_out in GPT-J's lists, scaled by relative depth.
_GPT2_CPROJ = "transformer.h.{i}.mlp.c_proj"
_GPTJ_FC_IN = "transformer.h.{i}.mlp.fc_in"
_GPTJ_FC_OUT = "transformer.h.{i}.mlp.fc_out"
_NEOX_IN = "gpt_neox.layers.{i}.mlp.dense_h_to_4h"
_NEOX_OUT = "gpt_neox.layers.{i}.mlp.dense_4h_to_h"
_GATE = "model.layers.{i}.mlp.gate_proj"
_UP = "model.layers.{i}.mlp.up_proj"
_DOWN = "model.layers.{i}.mlp.down_proj"

_LLAMA3 = _Recipe(32, (_Span(_GATE, 11, 15), _Span(_UP, 18, 24)))
_DOWN_17_19 = _Recipe(32, (_Span(_DOWN, 17, 19),))
_RECIPES: dict[str, dict[str, _Recipe]] = {
    # GPT-2: the 6 middle-late layers of the 12-layer model (the latter half), scaled by relative depth.
    "gpt2": {"sequential": _Recipe(12, (_Span(_GPT2_CPROJ, 6, 11),)),
             "batch": _Recipe(12, (_Span(_GPT2_CPROJ, 6, 11),))},
    "gptj": {"sequential": _Recipe(28, (_Span(_GPTJ_FC_IN, 10, 26, 2),)),
             "batch": _Recipe(28, (_Span(_GPTJ_FC_OUT, 22, 27),))},
    "gpt_neox": {"sequential": _Recipe(28, (_Span(_NEOX_IN, 10, 26, 2),)),
                 "batch": _Recipe(28, (_Span(_NEOX_OUT, 22, 27),))},
    "llama": {"sequential": _LLAMA3, "batch": _LLAMA3},
    "olmo": {"sequential": _LLAMA3, "batch": _LLAMA3},
    "olmo2": {"sequential": _LLAMA3, "batch": _LLAMA3},
    "gemma2": {"sequential": _Recipe(42, (_Span(_GATE, 32, 40), _Span(_UP, 32, 40))),
               "batch": _Recipe(42, (_Span(_DOWN, 32, 40),))},
    "mistral": {"sequential": _DOWN_17_19, "batch": _DOWN_17_19},
    "phi3": {"sequential": _DOWN_17_19, "batch": _DOWN_17_19},
    "qwen2": {"sequential": _Recipe(28, (_Span(_DOWN, 17, 19),)), "batch": _Recipe(28, (_Span(_DOWN, 17, 19),))},
}
_RECIPES["gemma"] = _RECIPES["gemma2"]  # Gemma (1): Gemma-2's MLP and names; its list scaled by relative depth

# Exact published lists, keyed by (model_type, n_layers, hidden, intermediate); they win over scaling.
_EXACT: dict[tuple[str, int, int, int | None], dict[str, _Recipe]] = {
    # GPT-2-XL: MLP c_proj of layers 6-11 (the authors' code).
    ("gpt2", 48, 1600, None): {r: _Recipe(48, (_Span(_GPT2_CPROJ, 6, 11),)) for r in ("sequential", "batch")},
    ("gptj", 28, 4096, 16384): _RECIPES["gptj"],
    ("llama", 32, 4096, 14336): _RECIPES["llama"],
    # The project's small-model profile (SmolLM2-135M, 30 layers): LLaMA-3's list by relative depth,
    # gate_proj 10-14 + up_proj 17-22.
    ("llama", 30, 576, 1536): {r: _Recipe(30, (_Span(_GATE, 10, 14), _Span(_UP, 17, 22)))
                               for r in ("sequential", "batch")},
    ("gemma2", 42, 3584, 14336): _RECIPES["gemma2"],
    ("mistral", 32, 4096, 14336): _RECIPES["mistral"],
    ("qwen2", 28, 3584, 18944): _RECIPES["qwen2"],
}

_TINY_MAX_LAYERS = 4


def _config_of(model_or_config: Any) -> Any:
    return getattr(model_or_config, "config", model_or_config)


def _n_layers(config: Any) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot read the number of layers from {type(config).__name__}")


def _hidden(config: Any) -> int | None:
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _intermediate(config: Any) -> int | None:
    for key in ("intermediate_size", "n_inner"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _scale_recipe(recipe: _Recipe, n_layers: int) -> list[tuple[str, list[int]]]:
    """Map each span of a reference list to `n_layers` layers by relative depth.

    The span keeps its relative centre ((c + 0.5) / L_ref = (c' + 0.5) / L) and its number of layers, which shrinks
    in proportion for shallower models (never below 1) and never grows for deeper ones, so the editor's size stays
    that of the published list. Strided spans (GPT-J fc_in every 2nd layer) scale their stride. The window is shifted
    to fit into [0, L-1].
    """
    if n_layers == recipe.depth:
        return [(s.template, s.layers()) for s in recipe.spans]
    ratio = n_layers / recipe.depth
    out = []
    for s in recipe.spans:
        count = len(s.layers())
        step = 1 if s.step == 1 else max(1, _round_half_up(s.step * ratio))
        count = max(1, min(count, _round_half_up(count * ratio), (n_layers - 1) // step + 1))
        extent = (count - 1) * step
        centre = ((s.start + s.stop) / 2 + 0.5) * ratio - 0.5
        start = min(max(_round_half_up(centre - extent / 2), 0), n_layers - 1 - extent)
        out.append((s.template, list(range(start, start + extent + 1, step))))
    return out


def _tiny_recipe(recipe: _Recipe, n_layers: int) -> list[tuple[str, list[int]]]:
    """Tiny models (<= 4 layers): the last two layers, so a group has m = 2 modules where the model allows it.

    Recipes with two disjoint layer ranges (LLaMA: gate_proj earlier, up_proj later) put their first module type on
    layer L-2 and the second on layer L-1; recipes whose types share layers (Gemma-2 gate+up) use both layers for each.
    """
    last_two = sorted({max(n_layers - 2, 0), n_layers - 1})
    spans = recipe.spans
    disjoint = len(spans) == 2 and spans[0].stop < spans[1].start and len(last_two) == 2
    if disjoint:
        return [(spans[0].template, [last_two[0]]), (spans[1].template, [last_two[1]])]
    return [(s.template, last_two) for s in spans]


def _as_pattern(template: str, layers: list[int]) -> str:
    head, tail = template.split("{i}")
    alternatives = "|".join(str(i) for i in layers)
    return f"{re.escape(head)}({alternatives}){re.escape(tail)}"


def default_module_spans(model_or_config: Any, regime: Regime = "sequential") -> list[tuple[str, list[int]]]:
    """The default edited modules of a causal LM as (name template with "{i}", layer indices), by family and regime.

    Published lists for GPT-J-6B, LLaMA-3-8B, Gemma-2-9B, GPT-2-XL, Mistral-7B, Qwen2.5-7B; the project's profile for
    a 30-layer 576/1536 LLaMA (SmolLM2-135M); borrowed lists for OLMo, Phi-3 and GPT-NeoX (see `_RECIPES`). Other
    depths scale the layer ranges of the family's reference list by relative depth (see `_scale_recipe`); models
    with <= 4 layers edit their last two layers (see `_tiny_recipe`). GPT-2's reference list is the latter half
    (layers 6-11) of the 12-layer model; GPT-2-XL itself (48 layers, d 1600) gets the published layers 6-11.
    Names assume the `*ForCausalLM` / `*LMHeadModel` wrappers (`transformer.h.*`, `model.layers.*`, `gpt_neox.*`).
    An unknown model_type raises ValueError saying how to name the modules instead.
    """
    if regime not in ("sequential", "batch"):
        raise ValueError(f"regime must be 'sequential' or 'batch', got {regime!r}")
    config = _config_of(model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in _RECIPES:
        seen = f" Its linear modules: {_example_names(model_or_config)}." if isinstance(model_or_config, nn.Module) \
            else ""
        raise ValueError(
            f"no default edited modules for model_type {model_type!r} (families with defaults: "
            f"{', '.join(sorted(_RECIPES))}; see docs/models.md). Name the modules to edit with regexes matched in "
            f"full against the names of model.named_modules() (nn.Linear or GPT-2 Conv1D only): on the command line "
            f"--set \"model.modules=['model\\.layers\\.(10|11)\\.mlp\\.down_proj']\", in Python "
            f"ModelConfig(modules=(...)).{seen}")
    n_layers = _n_layers(config)
    exact_key = (model_type, n_layers, _hidden(config), _intermediate(config))
    if exact_key in _EXACT:
        spans = _scale_recipe(_EXACT[exact_key][regime], n_layers)
    elif n_layers <= _TINY_MAX_LAYERS:
        spans = _tiny_recipe(_RECIPES[model_type][regime], n_layers)
    else:
        spans = _scale_recipe(_RECIPES[model_type][regime], n_layers)
    return spans


def default_module_patterns(model_or_config: Any, regime: Regime = "sequential") -> list[str]:
    """Default edited-module regexes (for `resolve_modules`) of a causal LM, by family and regime: the spans of
    `default_module_spans`, one regex per module template, e.g. 'model\\.layers\\.(11|12)\\.mlp\\.gate_proj'."""
    spans = default_module_spans(model_or_config, regime)
    patterns = [_as_pattern(t, layers) for t, layers in spans]
    logger.debug("default edited modules for %s (%s): %s", getattr(_config_of(model_or_config), "model_type", None),
                 regime, patterns)
    return patterns


# ----------------------------------------------------------------------------------------------------------------------
# Fingerprint
# ----------------------------------------------------------------------------------------------------------------------

_CONFIG_KEYS = (
    "model_type", "vocab_size", "hidden_size", "n_embd", "intermediate_size", "n_inner", "num_hidden_layers", "n_layer",
    "num_attention_heads", "n_head", "num_key_value_heads", "head_dim", "tie_word_embeddings", "hidden_act",
    "activation_function",
)


def _tensor_sha256(t: torch.Tensor) -> str:
    # Raw bytes in storage layout and dtype; bf16 has no numpy dtype, so view the bytes as uint8 first.
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def fingerprint_details(model: nn.Module, modules: Sequence[EditedModule]) -> dict[str, Any]:
    """The JSON-able record behind `fingerprint`: config essentials and, per module, name, layout, dtype, weight hash.

    Checkpoints store it so that a refused load can show which entry differs.
    """
    config = getattr(model, "config", None)
    essentials = {k: getattr(config, k) for k in _CONFIG_KEYS if config is not None and hasattr(config, k)}
    essentials = {k: v for k, v in essentials.items() if isinstance(v, (int, float, str, bool)) or v is None}
    return {
        "config": essentials,
        "modules": [
            {"name": m.name, "d_in": m.d_in, "d_out": m.d_out, "transposed": m.transposed,
             "dtype": str(m.weight.dtype).removeprefix("torch."), "weight_sha256": _tensor_sha256(m.weight)}
            for m in modules
        ],
    }


def fingerprint(model: nn.Module, modules: Sequence[EditedModule]) -> str:
    """Stable SHA-256 hex digest of config essentials, edited module names/layouts and the edited weights' bytes.

    Equal for the same model weights and module list across processes and devices; any change of an edited weight
    element, dtype, module list or architecture size changes it. Cost: one read of the edited weights.
    """
    blob = json.dumps(fingerprint_details(model, modules), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()
