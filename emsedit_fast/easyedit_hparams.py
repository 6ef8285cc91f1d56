"""EasyEdit-style hyperparameter files (hparams/MEND/*.yaml, hparams/MALMEN/*.yaml) read into this engine's RunConfig.

    cfg = load_hparams("hparams/MALMEN/my-model.yaml", overrides=["editor.rank=64"])

A key that means the same thing here is mapped (MAPPED); a key for which this engine has one fixed behaviour is
accepted at that value only (FIXED); a key that only steers EasyEdit's own trainer loop, logging or output is
accepted and not used (IGNORED); every other key, and a mapped key with an unusable value, is refused: one ConfigError
names the file and each such key with the reason. docs/easyedit.md has the table. `emsedit_fast.easyedit` builds an
editor from such a file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import yaml

from emsedit_fast.config import ConfigError
from emsedit_fast.config import RunConfig
from emsedit_fast.config import load

# alg_name -> editor preset. EasyEdit ships MEND, MALMEN and UltraEdit; RLEdit and EMSEdit files use the same
# vocabulary with MALMEN's meaning of `lr` (their published code descends from MALMEN's). UltraEdit's `lr` is its
# target scale eta (v = -lr ||u^||^2 delta^), the same key as MALMEN's initial step size; it needs no archive.
ALGORITHMS = {"MEND": "mend", "MALMEN": "malmen", "RLEDIT": "rledit", "EMSEDIT": "emsedit", "ULTRAEDIT": "ultraedit"}

# Keys that mean the same thing here: key -> (RunConfig key, what it is). `lr` and `batch_size` depend on alg_name.
MAPPED = {
    "model_name": ("model.name", "the model to load (a name or a local Hugging Face folder)"),
    "device": ("model.device", "GPU index n -> cuda:n; cpu, cuda, cuda:n, auto as given"),
    "inner_params": ("model.modules", "edited weights; each name (less .weight) becomes an exact-match regex"),
    "layers": ("model.modules", "with rewrite_module_tmp: the modules rewrite_module_tmp.format(layer)"),
    "max_length": ("model.max_length", "tokens of prompt + answer"),
    "half": ("model.dtype", "true -> bfloat16 (EasyEdit casts the model with .bfloat16())"),
    "fp16": ("model.dtype", "true -> float16"),
    "seed": ("seed", "random seed"),
    "rank": ("editor.rank", "hypernetwork rank"),
    "n_blocks": ("editor.n_blocks", "hypernetwork blocks"),
    "n_hidden": ("editor.n_blocks", "MEND's hidden layers; its network has n_hidden + 1 blocks"),
    "edit_lr": ("editor.eta_init", "MEND: initial per-layer edit step size (learned)"),
    "lr": ("train.meta_lr | editor.eta_init", "MEND: the meta-optimiser's learning rate; MALMEN, RLEdit, EMSEdit: "
           "the initial per-layer step size eta"),
    "meta_lr": ("train.meta_lr", "MALMEN: the meta-optimiser's (Adam) learning rate"),
    "lr_lr": ("train.scalar_lr_scale", "MEND: learning rate of the step sizes; scalar_lr_scale = lr_lr / meta_lr"),
    "cedit": ("train.edit_coef", "MEND: weight of the edit loss"),
    "cloc": ("train.loc_coef", "MEND: weight of the KL locality loss"),
    "loc_coef": ("train.loc_coef", "MALMEN: weight of the KL locality loss"),
    "grad_clip": ("train.max_grad_norm", "MEND: global gradient-norm clip"),
    "max_grad_norm": ("train.max_grad_norm", "MALMEN: global gradient-norm clip"),
    "n_edits": ("data.n_edits", "MALMEN: edits per batch"),
    "batch_size": ("data.n_edits | train.micro_batch", "MEND: edits per training batch; MALMEN, RLEdit, EMSEdit: "
                   "edits per forward pass of the cache (micro-batch)"),
    "editor_batch_size": ("editor.hypernet_chunk", "MALMEN: rows per hypernetwork chunk"),
    "max_iters": ("train.n_batches", "training batches (steps)"),
    "max_epochs": ("train.epochs", "passes over the training data"),
    "val_interval": ("train.eval_every", "validate every N training batches"),
}

# Keys this engine has one fixed behaviour for: accepted at that value, refused otherwise. key -> (value, why).
FIXED = {
    "dropout": (0, "the hypernetwork has no dropout"),
    "train_base": (False, "the base model is never trained"),
    "no_grad_layers": (None, "no layers are frozen"),
    "one_sided": (False, "both keys and gradients are transformed"),
    "x_only": (False, "both keys and gradients are transformed"),
    "delta_only": (False, "both keys and gradients are transformed"),
    "norm": (True, "inputs are always normalised with running statistics"),
    "combine": (True, "one network reads the concatenated [key; gradient]"),
    "act": ("relu", "the blocks use ReLU"),
    "init": ("id", "the network starts as the identity"),
    "mlp_class": ("IDMLP", "the blocks are identity-initialised residual low-rank MLPs"),
    "shared": (True, "one network per weight shape, with per-module scale and shift"),
    "hidden_dim": (None, "the blocks are low-rank (rank), with no hidden width"),
    "token": ("ans", "keys and gradients are cached at the answer tokens only"),
    "model_parallel": (False, "the model is edited on the device it lives on"),
    "opt": ("Adam", "the meta-optimiser is Adam"),
    "accumulate_bs": (1, "the optimiser steps after every batch, with no gradient accumulation"),
    "lr_scale": (1.0, "edits are applied at the learned step size, unscaled"),
}

# Keys that only steer EasyEdit's own trainer loop, logging, output and class loading: accepted and not used.
IGNORED = {
    "model_class": "the model is loaded by name or passed in", "tokenizer_class": "the tokenizer comes with the model",
    "tokenizer_name": "the tokenizer comes with the model", "results_dir": "runs write to the run's output folder",
    "silent": "logging", "verbose": "logging", "debug": "logging", "log_interval": "logging",
    "eval_log_interval": "logging", "final_eval": "the train command always evaluates at the end",
    "early_stop_patience": "no early stopping", "early_stop_key": "no early stopping",
    "eval_only": "training is its own command", "save": "checkpoints are always saved",
    "model_save_pt": "checkpoints are always saved", "val_batch_size": "validation uses data.n_edits",
    "val_steps": "validation uses data.eval_batches", "max_output_length": "no generation during editing",
    "cbase": "only used with train_base, which is false",
    "archive": "from_hparams loads it as the editor checkpoint", "alg": "must agree with alg_name",
    "batch_size_once": "UltraEdit: rows per cache chunk (every row of a step is cached in one pass here)",
}

# Read outside the key-by-key loop: they combine with each other or with the result.
SPECIAL = ("alg_name", "alg", "archive", "lr_lr", "layers", "rewrite_module_tmp")


@dataclass
class Hparams:
    """An EasyEdit-style file read into this engine's terms."""

    path: str
    alg: str  # editor preset
    flat: dict[str, Any]  # RunConfig key -> value
    sources: dict[str, str]  # RunConfig key -> the EasyEdit key it came from
    archive: str | None
    lr_lr: float | None

    def values(self, extra: dict[str, Any] = ()) -> dict:
        nested: dict = {}
        for key, value in {**self.flat, **dict(extra)}.items():
            *sections, name = key.split(".")
            node = nested
            for s in sections:
                node = node.setdefault(s, {})
            node[name] = value
        return nested


def _device(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) or (isinstance(value, str) and value.isdigit()):
        return f"cuda:{int(value)}"
    if isinstance(value, str) and re.fullmatch(r"cpu|auto|cuda(:\d+)?", value):
        return value
    raise ValueError("expected a GPU index or one of cpu, cuda, cuda:N, auto")


def _module_regex(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError("expected parameter or module names")
    if name.endswith(".bias"):
        raise ValueError(f"{name!r} is a bias; only weights are edited")
    return re.escape(name[:-len(".weight")] if name.endswith(".weight") else name)


def _positive(value: Any) -> float | None:
    """float(value) when it is a finite number > 0 (or such a string), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if 0 < number < float("inf") else None


def _convert(alg: str, key: str, value: Any) -> tuple[str, Any]:
    """(RunConfig key, value) for one mapped EasyEdit key; types are checked by the config loader afterwards."""
    if key == "lr":
        return ("train.meta_lr" if alg == "mend" else "editor.eta_init"), value
    if key == "batch_size":
        return ("data.n_edits" if alg == "mend" else "train.micro_batch"), value
    target = MAPPED[key][0]
    if key == "device":
        return target, _device(value)
    if key == "inner_params":
        if isinstance(value, str) or not isinstance(value, list) or not value:
            raise ValueError("expected a non-empty list of parameter names")
        return target, [_module_regex(v) for v in value]
    if key in ("half", "fp16"):
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return target, ("bfloat16" if key == "half" else "float16") if value else "float32"
    if key == "n_hidden":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError("expected an integer >= 0")
        return target, value + 1
    return target, value


def read_hparams(path: str | os.PathLike) -> Hparams:
    """Read an EasyEdit-style file; ConfigError names every key without an equivalent, the file and what is
    supported."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: an EasyEdit hparams file must hold a mapping of keys")
    name = str(raw.get("alg_name", ""))
    alg = ALGORITHMS.get(name.upper())
    if alg is None:
        raise ConfigError(f"{path}: alg_name {name or None!r} has no equivalent in emsedit_fast, which runs "
                          f"{', '.join(ALGORITHMS)} (see docs/easyedit.md)")
    flat: dict[str, Any] = {}
    sources: dict[str, str] = {}
    refused: list[str] = []

    def put(target: str, value: Any, key: str) -> None:
        if target in flat and flat[target] != value:
            refused.append(f"{key}={raw[key]!r} contradicts {sources[target]}={raw[sources[target]]!r} "
                           f"(both set {target})")
            return
        flat[target], sources[target] = value, key

    for key, value in raw.items():
        if key in SPECIAL:
            continue
        if key in FIXED:
            want, why = FIXED[key]
            same = (value.lower() == want.lower() if isinstance(value, str) and isinstance(want, str)
                    else value == want and isinstance(value, bool) == isinstance(want, bool))
            if not same:
                refused.append(f"{key}={value!r}: {why} (only {want!r} is accepted)")
        elif key in MAPPED:
            if value is None:  # EasyEdit's "not set"
                continue
            try:
                put(*_convert(alg, key, value), key)
            except ValueError as err:
                refused.append(f"{key}={value!r}: {err}")
        elif key not in IGNORED:
            refused.append(f"{key}: no equivalent in emsedit_fast")
    if "alg" in raw and str(raw["alg"]).upper() != name.upper():
        refused.append(f"alg={raw['alg']!r} disagrees with alg_name={name!r}")
    layers, template = raw.get("layers"), raw.get("rewrite_module_tmp")
    if layers is not None or template is not None:
        if not isinstance(layers, list) or not isinstance(template, str) or "{}" not in template:
            refused.append("layers / rewrite_module_tmp: give both, a list of layer indices and a module name "
                           "template with {} (or list the weights in inner_params)")
        else:
            put("model.modules", [_module_regex(template.format(n)) for n in layers], "layers")
    lr_lr = _positive(raw.get("lr_lr"))  # PyYAML reads 1e-4 (no dot) as a string
    if raw.get("lr_lr") is not None and lr_lr is None:
        refused.append(f"lr_lr={raw['lr_lr']!r}: expected a number > 0")
    if refused:
        raise ConfigError(f"{path}: {len(refused)} key(s) refused (alg_name {name}, this engine's {alg} preset): "
                          + "; ".join(refused) + ". Mapped keys: " + ", ".join(MAPPED)
                          + "; fixed-value keys: " + ", ".join(FIXED) + " (see docs/easyedit.md)")
    archive = raw.get("archive")
    return Hparams(path, alg, flat, sources, str(archive) if archive is not None else None, lr_lr)


def config_from_hparams(hp: Hparams, base: dict | None = None, overrides=()) -> RunConfig:
    """config.load(preset, defaults=base, extra=the file's values, overrides); lr_lr becomes scalar_lr_scale once
    the meta learning rate is known. Errors name the EasyEdit key a bad value came from."""
    try:
        cfg = load(hp.alg, defaults=base, extra=hp.values(), overrides=list(overrides))
        if hp.lr_lr is not None:
            scale = {"train.scalar_lr_scale": hp.lr_lr / cfg.train.meta_lr}
            cfg = load(hp.alg, defaults=base, extra=hp.values(scale), overrides=list(overrides))
    except (ConfigError, ValueError) as err:
        named = [f"{src} (-> {dst})" for dst, src in hp.sources.items() if dst in str(err)]
        raise ConfigError(f"{hp.path}: {', '.join(named) + ': ' if named else ''}{err}") from None
    return cfg


def load_hparams(path: str | os.PathLike, overrides=()) -> RunConfig:
    """The RunConfig an EasyEdit-style hyperparameter file describes: the alg_name's preset with every key that means
    the same thing here mapped onto it (docs/easyedit.md has the table), then dotted `overrides`
    ("editor.rank=64"). Raises ConfigError naming the file and every key that has no equivalent."""
    return config_from_hparams(read_hparams(path), overrides=overrides)
