"""Typed, frozen configuration with a strict YAML loader and dotted command-line overrides.

    RunConfig
      model:   ModelConfig    which causal LM, dtype, device, edited modules
      editor:  EditorConfig   method, MSBP steps K, hypernetwork shape, solve form, key prior, undo, backend
      train:   TrainConfig    mode (sequential: lifelong, many small batches, step-specific networks | batch: one
                              large batch, one shared network), losses, optimiser, budgets
      data:    DataConfig     records for training, validation and evaluation, edits per batch, batches
      profile, seed, output

The commands share their flags through `add_run_arguments` and turn them into a RunConfig with `config_from_args`.

The loader rejects unknown keys (naming the valid ones and the closest match), coerces values to the declared field
type (PyYAML reads `1e-6` as a string; an int where a float is declared becomes a float), checks Literal choices and
ranges, and builds nested dataclasses. `--set editor.rank=128` style overrides go through the same coercion.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
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
    # the edited layers' weights in a bf16 / fp16 model: kept in float32 (auto: when the model is not fp32), so
    # that edits are not rounded away, or left in the model's dtype ("model")
    edited_dtype: Literal["auto", "float32", "model"] = "auto"
    # the attention implementation of the model's forward: auto = eager for a bf16 / fp16 model on the CPU (its
    # backward is several times faster there than PyTorch's fused SDPA kernel), else the model's own; or forced
    # (emsedit_fast.models.adapter.set_attention)
    attention: Literal["auto", "eager", "sdpa"] = "auto"

    def __post_init__(self):
        _check(self.max_length >= 8, "model.max_length", "must be >= 8")


@dataclass(frozen=True)
class EditorConfig:
    name: Literal["mend", "malmen", "rledit", "emsedit", "ultraedit"] = "emsedit"
    n_steps: int = 2  # K: backpropagation steps per edit batch (MSBP); 1 = the single-step editors
    rank: int = 256  # hypernetwork rank r (sequential step k uses floor(r / k) when rank_schedule = divide)
    step_rank: int = 0  # rank of the sequential networks of steps k >= 2 (0: the rank schedule decides)
    n_blocks: int = 4
    # the hypernetwork blocks' first matrix A (D x r) at initialisation: "normal" N(0, 1), as published, or "fan_in"
    # N(0, 1 / D), so that p = z0 A has unit-scale entries for normalised rows. B starts at 0 either way (the untrained
    # network is the identity), but Adam moves each entry of B by about its rate per step, and that moves the block's
    # output by about rate * r * |p|: sqrt(D) (46 at SmolLM2's D = 2112) times more with "normal"
    a_init: Literal["normal", "fan_in"] = "normal"
    block_order: Literal["relu_affine", "affine_relu"] = "relu_affine"
    aggregation: Literal["ridge", "outer"] = "ridge"  # MALMEN/RLEdit/EMSEdit least squares, or MEND's sum
    eta_init: float = 1e-6
    eta_param: Literal["linear", "log"] = "linear"  # learn eta (may change sign, as published) or log eta
    # the keys in the target coefficient c_j = -eta <k_j, u~_j>: the raw keys u_j (MALMEN, RLEdit, EMSEdit) or the
    # normalised keys u^_j (UltraEdit, whose identity network makes c_j = -eta ||u^_j||^2)
    coeff_keys: Literal["raw", "normalised"] = "raw"
    trainable: bool = True  # False: a training-free editor (UltraEdit); train only evaluates
    lambda_init: float = 0.0
    rank_schedule: Literal["divide", "constant"] = "divide"
    solve_form: Literal["auto", "dual", "primal"] = "auto"
    key_prior: float = 0.0  # gamma of the key prior beta gamma E||S^T x||^2 over generic keys x (0: plain ridge)
    edit_prior: float = 0.0  # gamma_e: the prior's term beta gamma_e sum ||S^T u||^2 over earlier edits' keys u
    # where an edit reads its keys and value-gradients (its targets): the answer positions, the last token of the
    # record's subject in the edit prompt ("subject"; the answer positions where the prompt does not name it), both
    # ("answer_subject"), or every token of the edit prompt and answer ("all"); data.collate.Positions
    key_positions: Literal["answer", "subject", "answer_subject", "all"] = "answer"
    freeze_normaliser_at_eval: bool = False  # MEND behaviour: statistics only move while training
    std_floor: float = 0.0  # clamp the normaliser's std from below (0 = reference)
    hypernet_chunk: int = 128  # rows per recomputation chunk in the meta-gradient
    max_delta_norm: float = 0.0  # refuse an edit whose per-layer ||dW||_F exceeds this (0 = no bound)
    undo: Literal["replay", "snapshot"] = "replay"  # how an edit is undone: replay onto a base, or a per-edit copy
    max_undo: int = 64  # edits kept undoable one by one; older ones are folded into the base (0: all)
    backend: Literal["auto", "fast", "reference", "cpp", "triton"] = "auto"
    # the K caching passes of one edit batch run the decoder layers below the lowest edited module once and reuse
    # their output (exact; models.hooks.PrefixReuse). False: every pass runs the whole model
    reuse_prefix: bool = True

    def __post_init__(self):
        _check(1 <= self.n_steps <= 8, "editor.n_steps", "must be in 1..8")
        _check(self.rank >= 1, "editor.rank", "must be >= 1")
        _check(self.step_rank >= 0, "editor.step_rank", "must be >= 0")
        _check(self.n_blocks >= 0, "editor.n_blocks", "must be >= 0 (0: the identity network, no parameters)")
        _check(self.hypernet_chunk >= 1, "editor.hypernet_chunk", "must be >= 1")
        _check(self.std_floor >= 0 and self.max_delta_norm >= 0, "editor.std_floor/max_delta_norm", "must be >= 0")
        _check(self.key_prior >= 0 and self.edit_prior >= 0, "editor.key_prior/edit_prior", "must be >= 0")
        _check(self.max_undo >= 0, "editor.max_undo", "must be >= 0")
        _check(self.eta_param == "linear" or self.eta_init > 0, "editor.eta_init", "must be > 0 with eta_param log")


@dataclass(frozen=True)
class TrainConfig:
    mode: Literal["sequential", "batch"] = "sequential"  # lifelong (many small batches) or one large batch
    loss: Literal["l2", "kl", "rledit_decay"] = "l2"  # EMSEdit drift penalty, KL locality, RLEdit decayed loss
    edit_coef: float = 1.0
    loc_coef: float = 0.6  # KL weight
    reg_coef: float = 0.5  # c in c * sum_l ||W_l - W_l^0||_F^2 (applied once in every mode)
    # sequential mode: what the drift penalty measures from. "original": W0, so the penalty (and its gradient, which
    # every step's networks receive) carries every earlier edit of the sequence, as published; "pre_batch": the
    # weights before this batch, so it is the norm of this batch's own K steps (kept factored).
    drift_reference: Literal["original", "pre_batch"] = "original"
    # the drift penalty's metric: "identity" (c ||D||_F^2, as published) or "keys", c tr(D Sigma D^T) = c E_x ||D x||^2
    # with Sigma the key prior's second moment of the layer's ordinary inputs (needs editor.key_prior > 0): the
    # expected squared change of the layer's output on ordinary prompts rather than the size of the change
    drift_metric: Literal["identity", "keys"] = "identity"
    # sequential mode: which loss each MSBP step's networks learn from. "final": the loss after all K steps, whose
    # gradient G reaches every step's networks as if the later steps' inputs did not depend on it (the published
    # first-order truncation: exact for step K only); "last": only step K's networks learn (exact, the earlier steps
    # stay as they are); "per_step": step k's networks learn from the loss after step k (exact for that loss, one
    # meta-loss pass per step, as the batch mode's chained steps do)
    step_credit: Literal["final", "last", "per_step"] = "final"
    shift_reg: float = 1e-4  # RLEdit's r_S on ||S_k||_F^2 (rledit_decay only)
    back_depth: int = 10  # RLEdit: batches in the decayed loss
    time_decay: float = 0.95
    kl_reference: Literal["pre_batch", "original"] = "pre_batch"
    kl_positions: Literal["answer", "all"] = "answer"
    loss_reduction: Literal["sum_of_microbatch_means", "mean"] = "sum_of_microbatch_means"
    meta_lr: float = 1e-5
    scalar_lr_scale: float = 1.0  # multiplies the learning rate of eta and log-ridge
    max_grad_norm: float = 1.0
    # Adam's rate over the run, as a factor of meta_lr (and of the scalars' rate) at training batch s of S:
    # "constant" 1; "cosine" (1 + cos(pi s / S)) / 2; "linear" 1 - s / S. A decaying rate lets the late batches
    # settle the networks instead of moving them as far as the first ones did
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    # the first fraction of the run over which that rate also rises linearly from 1 / w of it (w batches) to all
    # of it (0: no warmup)
    warmup: float = 0.0
    # the editor the run validates and ends with: an exponential moving average of its parameters over the optimiser
    # steps, a <- ema a + (1 - ema) theta after each step, starting from the untrained values (0: the last iterate).
    # An average over the last ~1 / (1 - ema) steps damps the back-and-forth that single steps of Adam leave in the
    # networks; the raw parameters keep training
    ema: float = 0.0
    seq_optimizer_step: Literal["every_batch", "once_at_end"] = "every_batch"
    batch_step_chaining: Literal["reset", "chain"] = "reset"
    n_batches: int = 20  # training batches (sequential) or steps (batch mode); `epochs` overrides it
    # sequential mode: reset the model to W0 every this many training batches, so that training sees sequences as
    # long as the evaluation protocol's (0: one sequence over all batches, as published)
    sequence_length: int = 0
    epochs: float = 0.0  # passes over the training split (0: train n_batches batches)
    # sequential mode: also score this many earlier batches of the current sequence (drawn at random) at the current
    # weights, with total weight retain_coef, so that a step learns not to overwrite the edits before it (the
    # evaluation scores every edit after the last batch); 0: the current batch only, as published. Losses l2 and
    # kl only (rledit_decay scores the last back_depth batches itself); the batch mode has no earlier edits in W.
    retain_batches: int = 0
    retain_coef: float = 1.0
    # also score the edit prompt itself (CE of the new answer, weight edit_prompt_coef) beside its paraphrases; 0: the
    # paraphrases only, as published. The evaluation's efficacy (ES) is measured on the edit prompt, which the
    # paraphrase-only loss never reads.
    edit_prompt_coef: float = 0.0
    micro_batch: int = 4
    eval_every: float = 0.0  # validation during training: every N batches (N >= 1) or fraction of the run (< 1)
    # which editor the run ends with: the "last" one, or the validation point (eval_every, the untrained editor
    # included) with the highest mean of ES, GS and LS-agree ("best": early stopping on the validation split)
    keep: Literal["last", "best"] = "last"
    prior_records: int = 300  # training records whose prompts estimate the key statistics (editor.key_prior)
    # which positions of those prompts: "all" tokens, only the "answer" positions, or those and the last token of the
    # record's subject in its edit and paraphrase prompts ("answer_subject")
    prior_positions: Literal["all", "answer", "answer_subject"] = "all"

    def __post_init__(self):
        _check(self.meta_lr > 0, "train.meta_lr", "must be > 0")
        _check(self.n_batches >= 1, "train.n_batches", "must be >= 1")
        _check(self.epochs >= 0, "train.epochs", "must be >= 0")
        _check(0 <= self.warmup <= 1, "train.warmup", "must be a fraction of the run in [0, 1]")
        _check(0 <= self.ema < 1, "train.ema", "must be a decay in [0, 1) (0: no average)")
        _check(self.retain_batches >= 0, "train.retain_batches", "must be >= 0")
        _check(self.retain_coef >= 0, "train.retain_coef", "must be >= 0")
        _check(self.edit_prompt_coef >= 0, "train.edit_prompt_coef", "must be >= 0")
        _check(self.sequence_length >= 0, "train.sequence_length", "must be >= 0")
        _check(self.eval_every >= 0, "train.eval_every", "must be >= 0")
        _check(self.keep == "last" or self.eval_every > 0, "train.keep",
               "'best' picks among validation points: set train.eval_every (--eval-every) too")
        _check(self.prior_records >= 1, "train.prior_records", "must be >= 1")
        _check(self.micro_batch >= 1, "train.micro_batch", "must be >= 1")
        _check(self.back_depth >= 1, "train.back_depth", "must be >= 1")
        _check(0 < self.time_decay <= 1, "train.time_decay", "must be in (0, 1]")
        _check(self.max_grad_norm > 0, "train.max_grad_norm", "must be > 0")
        _check(self.step_credit == "final" or self.mode == "sequential", "train.step_credit",
               "'last' and 'per_step' apply to the sequential mode (the batch mode's steps are scored one by one)")


@dataclass(frozen=True)
class DataConfig:
    train: str = "bundled"  # "bundled" (the package's own facts) or a records file; the validation split is carved
    eval: str = ""  # from it. eval: the records that are only reported on ("": the training source's evaluation part)
    format: str = "auto"
    n_edits: int = 10  # edits per batch
    eval_batches: int = 5  # T evaluation batches (sequential); batch mode edits one batch of n_edits
    valid_size: int = 0  # records held out of the training source for validation (0: the dataset's default)
    # the seed of every split of the data (the zsRE and records-file permutations, the bundled facts' subject groups),
    # apart from the run's seed: runs at other seeds train differently but validate and evaluate on the same records,
    # so tuning at any seed never reads an evaluation record (a checkpoint's zsre_split_seed is read as this)
    split_seed: int = 0

    def __post_init__(self):
        _check(self.n_edits >= 1, "data.n_edits", "must be >= 1")
        _check(self.eval_batches >= 1, "data.eval_batches", "must be >= 1")
        _check(self.valid_size >= 0, "data.valid_size", "must be >= 0")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    editor: EditorConfig = field(default_factory=EditorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    profile: Literal["default", "reference"] = "default"
    seed: int = 0
    output: str = "runs/emsedit"


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


# train settings that only the sequential mode reads (TrainConfig validates them against the mode)
SEQUENTIAL_ONLY = ("step_credit",)


def _train_keys(values: dict) -> set[str]:
    train = values.get("train")
    return set(train) if isinstance(train, dict) else set()


@functools.cache
def editor_names() -> tuple[str, ...]:
    """The editors a config can name (EditorConfig.name's choices)."""
    return typing.get_args(typing.get_type_hints(EditorConfig)["name"])


def load(editor: str = "emsedit", mode: str | None = None, files: list[str] = (), overrides: list[str] = (),
         extra: dict | None = None, defaults: dict | None = None) -> RunConfig:
    """Resolve a run config, later sources winning: the editor preset, `mode` (default: the preset's),
    `defaults` (a command's own), YAML `files`, `extra` (explicit flags), then dotted `overrides`.

    `defaults` may hold an "editors" section, {editor name: settings}, merged over the rest of `defaults` only when
    loading that editor: a profile's choices for one method (the CounterFact profile's KL locality loss for EMSEdit,
    the small-model profiles' KL weight for MALMEN) then leave the others' presets alone (RLEdit's decayed
    loss). The profiles are chosen under sequential protocols: a batch-mode run drops their sequential-only settings
    (SEQUENTIAL_ONLY) unless a later source sets them too, which then fails validation with the reason."""
    from_defaults: set[str] = set()  # sequential-only train keys that `defaults` set
    user_train: set[str] = set()  # train keys that files, flags or overrides set
    values = preset("editor", editor)
    values.setdefault("editor", {})["name"] = values.get("editor", {}).get("name", editor)
    if mode is not None:
        values = _merge(values, {"train": {"mode": mode}})
    if defaults:
        defaults = dict(defaults)
        per_editor = defaults.pop("editors", {})
        unknown = sorted(set(per_editor) - set(editor_names()))
        if unknown:
            raise ConfigError(f"defaults: 'editors' names unknown editor(s) {unknown}; choose from "
                              f"{', '.join(editor_names())}")
        mine = per_editor.get(values["editor"]["name"], {})
        values = _merge(_merge(values, defaults), mine)
        from_defaults = (_train_keys(defaults) | _train_keys(mine)) & set(SEQUENTIAL_ONLY)
    for path in files:
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({_one_line(err)})") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not a text file ({err})") from None
        except OSError as err:
            raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config file must hold a mapping")
        values = _merge(values, loaded)
        user_train |= _train_keys(loaded)
    if extra:
        values = _merge(values, extra)
        user_train |= _train_keys(extra)
    for text in overrides:
        path, value = parse_override(text)
        if path[0] == "train" and len(path) == 2:
            user_train.add(path[1])
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    if values.get("train", {}).get("mode") == "batch":
        for key in from_defaults - user_train:
            del values["train"][key]
    cfg = build(RunConfig, values)
    if cfg.profile == "reference":
        cfg = apply_reference_profile(cfg)
    return cfg


def apply_reference_profile(cfg: RunConfig) -> RunConfig:
    """Reproduce the published code's legitimate choices: one Adam step at the end of sequential training with the
    sequential drift coefficient 0.25 it effectively used, and reset chaining in the batch mode."""
    sequential = cfg.train.mode == "sequential"
    train = dataclasses.replace(cfg.train, batch_step_chaining="reset",
                                seq_optimizer_step="once_at_end" if sequential else cfg.train.seq_optimizer_step,
                                reg_coef=0.25 if sequential else cfg.train.reg_coef)
    return dataclasses.replace(cfg, train=train)


# ----------------------------------------------------------------------------------------------------------------------
# the commands' shared flags


def add_run_arguments(parser, mode: bool = True) -> None:
    """Options shared by the commands (train, evaluate, edit, compare, distributed, sweep): what to load and how.
    mode=False leaves out --mode (edit: the checkpoint's mode is fixed)."""
    parser.add_argument("--editor", default="emsedit", choices=editor_names())
    if mode:
        parser.add_argument("--mode", choices=["sequential", "batch"],
                            help="sequential (lifelong: many small batches) or batch editing (default: the editor's)")
    parser.add_argument("--steps", type=int, help="K, MSBP steps per edit batch (editor.n_steps)")
    parser.add_argument("--model", help="smollm2-135m | tiny-llama | tiny-gpt2 | a local Hugging Face model folder")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--backend", choices=["auto", "fast", "reference", "cpp", "triton"])
    parser.add_argument("--config", action="append", default=[], help="YAML file(s) merged over the preset")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set editor.rank=128 (repeatable)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")


# flag name -> (section or None for top level, config key)
_FLAG_KEYS = {"steps": ("editor", "n_steps"), "backend": ("editor", "backend"), "model": ("model", "name"),
              "device": ("model", "device"), "dtype": ("model", "dtype"), "n_edits": ("data", "n_edits"),
              "n_batches": ("train", "n_batches"), "epochs": ("train", "epochs"),
              "eval_every": ("train", "eval_every"), "keep": ("train", "keep"),
              "eval_batches": ("data", "eval_batches"),
              "train_data": ("data", "train"), "eval_data": ("data", "eval"), "output": (None, "output"),
              "seed": (None, "seed")}


def config_from_args(args, defaults: dict | None = None, editor: str | None = None) -> RunConfig:
    """Preset -> `defaults` -> --config files -> explicit flags -> --set overrides (later wins).

    Flags the command did not define, or that were not given, are skipped."""
    flags: dict = {}
    for flag, (section, key) in _FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is None or value == "":
            continue
        (flags.setdefault(section, {}) if section else flags)[key] = value
    return load(editor or args.editor, mode=getattr(args, "mode", None), files=getattr(args, "config", []),
                overrides=getattr(args, "set", []), extra=flags, defaults=defaults)
