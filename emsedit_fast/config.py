"""Typed, frozen configuration with a strict YAML loader and dotted command-line overrides.

    RunConfig
      model:   ModelConfig    which causal LM, dtype, device, edited modules
      editor:  EditorConfig   method, MSBP steps K, hypernetwork shape, solve form, backend
      train:   TrainConfig    regime (sequential | batch), losses, optimiser, budgets
      data:    DataConfig     records for training and evaluation, edits per batch, batches
      profile, seed, output

The loader rejects unknown keys (naming the valid ones and the closest match), coerces values to the declared field
type (PyYAML reads `1e-6` as a string; an int where a float is declared becomes a float), checks Literal choices and
ranges, and builds nested dataclasses. `--set editor.rank=128` style overrides go through the same coercion.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from dataclasses import field
from importlib import resources
from typing import Any
from typing import Literal

import yaml


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key and what is allowed."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2-135m"  # "smollm2-135m", "tiny-llama", "tiny-gpt2", or a local Hugging Face model folder
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"  # "auto" = cuda when available, else cpu
    modules: tuple[str, ...] = ()  # regexes over module names; () = the architecture's default list
    max_length: int = 128

    def __post_init__(self):
        _check(self.max_length >= 8, "model.max_length", "must be >= 8")


@dataclass(frozen=True)
class EditorConfig:
    name: Literal["mend", "malmen", "rledit", "emsedit"] = "emsedit"
    n_steps: int = 2  # K: backpropagation steps per edit batch (MSBP); 1 = the single-step editors
    rank: int = 256  # hypernetwork rank r (sequential step k uses floor(r / k) when rank_schedule = divide)
    n_blocks: int = 4
    block_order: Literal["relu_affine", "affine_relu"] = "relu_affine"
    aggregation: Literal["ridge", "outer"] = "ridge"  # MALMEN/RLEdit/EMSEdit least squares, or MEND's sum
    eta_init: float = 1e-6
    lambda_init: float = 0.0
    rank_schedule: Literal["divide", "constant"] = "divide"
    solve_form: Literal["auto", "dual", "primal"] = "auto"
    freeze_normaliser_at_eval: bool = False  # MEND behaviour: statistics only move while training
    std_floor: float = 0.0  # clamp the normaliser's std from below (0 = reference)
    hypernet_chunk: int = 128  # rows per recomputation chunk in the meta-gradient
    max_delta_norm: float = 0.0  # refuse an edit whose per-layer ||dW||_F exceeds this (0 = no bound)
    backend: Literal["auto", "fast", "reference", "cpp", "triton"] = "auto"

    def __post_init__(self):
        _check(1 <= self.n_steps <= 8, "editor.n_steps", "must be in 1..8")
        _check(self.rank >= 1, "editor.rank", "must be >= 1")
        _check(self.n_blocks >= 1, "editor.n_blocks", "must be >= 1")
        _check(self.hypernet_chunk >= 1, "editor.hypernet_chunk", "must be >= 1")
        _check(self.std_floor >= 0 and self.max_delta_norm >= 0, "editor.std_floor/max_delta_norm", "must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    mode: Literal["sequential", "batch"] = "sequential"
    loss: Literal["l2", "kl", "rledit_decay"] = "l2"  # EMSEdit drift penalty, KL locality, RLEdit decayed loss
    edit_coef: float = 1.0
    loc_coef: float = 0.6  # KL weight
    reg_coef: float = 0.5  # c in c * sum_l ||W_l - W_l^0||_F^2 (applied once in every mode)
    shift_reg: float = 1e-4  # RLEdit's r_S on ||S_k||_F^2 (rledit_decay only)
    back_depth: int = 10  # RLEdit: batches in the decayed loss
    time_decay: float = 0.95
    kl_reference: Literal["pre_batch", "original"] = "pre_batch"
    kl_positions: Literal["answer", "all"] = "answer"
    loss_reduction: Literal["sum_of_microbatch_means", "mean"] = "sum_of_microbatch_means"
    meta_lr: float = 1e-5
    scalar_lr_scale: float = 1.0  # multiplies the learning rate of eta and log-ridge
    max_grad_norm: float = 1.0
    seq_optimizer_step: Literal["every_batch", "once_at_end"] = "every_batch"
    batch_step_chaining: Literal["reset", "chain"] = "reset"
    n_batches: int = 20  # training batches (sequential) or steps (batch mode)
    micro_batch: int = 4
    eval_every: int = 0  # 0 = only at the end

    def __post_init__(self):
        _check(self.meta_lr > 0, "train.meta_lr", "must be > 0")
        _check(self.n_batches >= 1, "train.n_batches", "must be >= 1")
        _check(self.micro_batch >= 1, "train.micro_batch", "must be >= 1")
        _check(self.back_depth >= 1, "train.back_depth", "must be >= 1")
        _check(0 < self.time_decay <= 1, "train.time_decay", "must be in (0, 1]")
        _check(self.max_grad_norm > 0, "train.max_grad_norm", "must be > 0")


@dataclass(frozen=True)
class DataConfig:
    train: str = "bundled"  # "bundled" (the package's own facts) or a records file
    eval: str = "bundled"
    format: str = "auto"
    n_edits: int = 10  # edits per batch
    eval_batches: int = 5  # T evaluation batches (sequential); batch mode edits one batch of n_edits
    zsre_split_seed: int = 0

    def __post_init__(self):
        _check(self.n_edits >= 1, "data.n_edits", "must be >= 1")
        _check(self.eval_batches >= 1, "data.eval_batches", "must be >= 1")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    editor: EditorConfig = field(default_factory=EditorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    profile: Literal["default", "reference"] = "default"
    seed: int = 0
    output: str = "runs/emsedit"


# METHOD.md 14.4: the small-model profile (SmolLM2-135M and similar on a CPU or a small GPU). Rank 256; the step size
# starts at 1e-3 rather than the 7B-scale 1e-6 (with 1e-6 an untrained editor's edits round away on a 576-wide model,
# so short training budgets could not move it); Adam at 1e-4 for the hypernetworks. Adam moves every parameter by
# about its learning rate per step whatever the parameter's scale, so eta (1e-3) and log-ridge get 1e-4 * 0.01: at
# the full rate eta crossed zero within 16 batches and every edit pointed the wrong way. The drift penalty
# c * sum_l ||W_l - W_l^0||^2 grows with eta^2, so c shrinks from the 7B-scale 0.5 to 0.005 here (16 training batches
# of 8 bundled edits, 3 x 8 held-out, K = 2: c = 0.5 / 0.05 / 0.005 / 0 gave ES 22 / 48 / 70 / 85 and LS 85 / 62 /
# 52 / 40). Starting points to tune; every run records them.
SMALL_MODEL_PROFILE = {"editor": {"rank": 256, "eta_init": 1e-3},
                       "train": {"meta_lr": 1e-4, "scalar_lr_scale": 0.01, "reg_coef": 0.005}}


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


# ----------------------------------------------------------------------------------------------------------------------
# strict loading


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = typing.get_args(tp)[0]
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build(tp, value, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.lstrip("-")
                                                                       .isdigit())):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def build(cls: type, values: dict, prefix: str = "") -> Any:
    """cls(**values) with unknown keys rejected and every value coerced to its declared type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}; valid keys: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as err:
        raise ConfigError(f"{prefix or cls.__name__}: {err}") from None


def to_dict(cfg: Any) -> dict:
    """A plain, YAML-safe dict of a (nested) config."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, tuple) else v)
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def preset(group: str, name: str) -> dict:
    """The YAML preset emsedit_fast/configs/<group>/<name>.yaml as a dict."""
    path = resources.files("emsedit_fast") / "configs" / group / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.name[:-5] for p in (resources.files("emsedit_fast") / "configs" / group).iterdir()
                           if p.name.endswith(".yaml"))
        raise ConfigError(f"no {group} preset {name!r}; available: {', '.join(available)}")
    return yaml.safe_load(path.read_text()) or {}


def parse_override(text: str) -> tuple[list[str], Any]:
    """'editor.rank=128' -> (['editor', 'rank'], 128) with YAML typing of the value (coerced later)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({_one_line(err)})") from None


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def load(editor: str = "emsedit", mode: str | None = None, files: list[str] = (), overrides: list[str] = (),
         extra: dict | None = None, defaults: dict | None = None) -> RunConfig:
    """Resolve a run config, later sources winning: the editor preset, `defaults` (a command's own), YAML `files`,
    `extra` (explicit flags), then dotted `overrides`. `mode` picks the regime (default: the preset's)."""
    values = preset("editor", editor)
    values.setdefault("editor", {})["name"] = values.get("editor", {}).get("name", editor)
    chosen_mode = mode or values.get("train", {}).get("mode", "sequential")
    values = _merge(values, {"train": {"mode": chosen_mode}})
    if defaults:
        values = _merge(values, defaults)
    for path in files:
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({_one_line(err)})") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not a text file ({err})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config file must hold a mapping")
        values = _merge(values, loaded)
    if extra:
        values = _merge(values, extra)
    for text in overrides:
        path, value = parse_override(text)
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    cfg = build(RunConfig, values)
    if cfg.profile == "reference":
        cfg = apply_reference_profile(cfg)
    return cfg


def apply_reference_profile(cfg: RunConfig) -> RunConfig:
    """METHOD.md 14.5: reproduce the published code's legitimate choices (once-at-end sequential Adam step,
    sequential c_reg 0.25, reset chaining)."""
    train = dataclasses.replace(cfg.train, batch_step_chaining="reset",
                                seq_optimizer_step="once_at_end" if cfg.train.mode == "sequential"
                                else cfg.train.seq_optimizer_step,
                                reg_coef=0.25 if cfg.train.mode == "sequential" else cfg.train.reg_coef)
    return dataclasses.replace(cfg, train=train)
