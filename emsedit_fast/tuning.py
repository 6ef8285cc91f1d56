"""Choosing hyperparameters on the validation split: grids, runs, and the efficacy / locality trade-off.

A sweep runs every point of a grid of config overrides (each point: an editor built from the run's profile plus the
point's overrides, optionally meta-trained, then scored on the VALIDATION split under the run's protocol) and reports
the Pareto front of (ES, GS) against LS-agree: the points no other point beats on all three. Evaluation splits are never
read here; the chosen point becomes a profile default (emsedit_fast.profiles) and is only then reported on evaluation
data.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from dataclasses import field

import torch

from emsedit_fast.config import RunConfig
from emsedit_fast.config import parse_override

log = logging.getLogger(__name__)

SCORES = ("es", "gs", "ls", "ls_gold", "ls_agree")


def _split_top(text: str, sep: str) -> list[str]:
    """Split on `sep` outside [...] brackets and quotes, so a YAML list value ("['a|b', c]") stays one value."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
            continue
        if ch in "'\"":
            quote = ch
        depth += (ch == "[") - (ch == "]")
        if ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def expand_grid(axes: list[str]) -> list[list[str]]:
    """['editor.eta_init=1e-3,3e-3', 'train.reg_coef=0,0.01'] -> every combination as override lists (axes varied
    jointly: the cartesian product, in the order given). An axis `a=1|b=2,a=3|b=4` varies keys together. Commas and
    bars inside [...] or quotes belong to one YAML value: `model.modules=[a,b],[c]` has two values."""
    options = []
    for axis in axes:
        if "=" not in axis:
            raise ValueError(f"grid axis {axis!r} must look like key=value1,value2 (or k1=v|k2=w,...)")
        if len(_split_top(axis, "|")) > 1:  # joint values: a=1|b=2,a=3|b=4
            options.append([_split_top(part, "|") for part in _split_top(axis, ",")])
        else:
            key, values = axis.split("=", 1)
            options.append([[f"{key}={v}"] for v in _split_top(values, ",") if v != ""])
    for overrides in (o for opt in options for group in opt for o in group):
        parse_override(overrides)  # validate syntax early, with the config loader's message
    return [[o for group in combo for o in group] for combo in itertools.product(*options)] if options else [[]]


# Keys an untrained editor does not read: the hypernetwork blocks start at the identity whatever their rank, and
# these training settings act only through training. (train.mode, micro_batch, loss_reduction, prior_records and
# prior_positions also shape the evaluation or the key prior, so they are not listed.)
_TRAINED_ONLY = frozenset({
    "editor.rank", "editor.step_rank", "train.loss", "train.edit_coef", "train.loc_coef", "train.reg_coef",
    "train.shift_reg", "train.back_depth", "train.time_decay", "train.kl_reference", "train.kl_positions",
    "train.meta_lr", "train.scalar_lr_scale", "train.max_grad_norm", "train.lr_schedule", "train.seq_optimizer_step",
    "train.batch_step_chaining", "train.n_batches", "train.sequence_length", "train.epochs", "train.retain_batches",
    "train.retain_coef", "train.edit_prompt_coef", "train.eval_every", "train.step_credit"})


def untrained_blind_keys(grid: list[list[str]]) -> list[str]:
    """The keys a grid varies that cannot change an untrained editor's scores (sweep without --train)."""
    return sorted({o.split("=", 1)[0] for point in grid for o in point} & _TRAINED_ONLY)


@dataclass
class SweepPoint:
    """One grid point: its overrides, the validation scores (means over slices, with spread) and the cost."""

    overrides: list[str]
    scores: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    train_batches: int = 0
    pareto: bool = False

    def label(self) -> str:
        return " ".join(self.overrides) or "(profile defaults)"


def pareto_front(points: list[SweepPoint], keys: tuple[str, ...] = ("es", "gs", "ls_agree")) -> None:
    """Mark the points that no other point matches or beats on every key and beats on one (ties kept)."""
    for p in points:
        values = [p.scores.get(k, float("-inf")) for k in keys]
        p.pareto = not any(
            all(q.scores.get(k, float("-inf")) >= v for k, v in zip(keys, values))
            and any(q.scores.get(k, float("-inf")) > v for k, v in zip(keys, values))
            for q in points if q is not p)


def run_point(base: RunConfig, overrides: list[str], defaults: dict, *, train: bool, valid, n_slices: int,
              models: dict, train_records=None, progress: bool | None = False) -> SweepPoint:
    """Build (and optionally meta-train) one editor and score it on the validation records.

    models: {ModelConfig: (model, tokenizer)}, shared by the points of a sweep; a point whose overrides change the
    model section (its dtype, edited modules, edited_dtype, ...) gets its own freshly loaded model, so no point runs
    on a model another point's settings shaped."""
    from emsedit_fast import api

    cfg = point_config(base, overrides, defaults)
    if cfg.model not in models:
        model, tokenizer, _ = api.load_model(cfg)
        models[cfg.model] = (model, tokenizer)
    model, tokenizer = models[cfg.model]
    torch.manual_seed(cfg.seed)
    session = api.open_session(cfg, model=model, tokenizer=tokenizer)
    point = SweepPoint(list(overrides))
    if train and cfg.editor.trainable:
        start = time.perf_counter()
        trainer = api.train(session, train_records, progress=progress)
        point.train_seconds = time.perf_counter() - start
        point.train_batches = trainer.report.steps
    metrics = api.evaluate_slices(session, valid, cfg.train.mode, cfg.data.n_edits, cfg.data.eval_batches, n_slices,
                                  progress=progress)
    point.scores = {k: metrics[k] for k in SCORES if k in metrics}
    point.scores.update({k + "_spread": metrics[k + "_spread"] for k in SCORES if k + "_spread" in metrics})
    point.scores["edit_seconds_per_edit"] = metrics["edit_seconds_per_edit"]
    log.info("%s: %s", point.label(), {k: round(v, 2) for k, v in point.scores.items() if isinstance(v, float)})
    return point


def point_config(base: RunConfig, overrides: list[str], defaults: dict) -> RunConfig:
    """A sweep point's config: `base`'s editor at `base`'s K (the profile's, or the command's), the profile
    `defaults`, then the point's `overrides` (which may change K themselves)."""
    from emsedit_fast.comparison import method_config
    from emsedit_fast.comparison import method_of

    return method_config(base, method_of(base.editor.name, base.editor.n_steps), overrides, defaults)


def pareto_table(points: list[SweepPoint], title: str) -> str:
    """Markdown: every point with its validation scores, Pareto-optimal ones marked, sorted by LS-agree."""
    keys = [k for k in SCORES if any(k in p.scores for p in points)]
    head = {"es": "ES", "gs": "GS", "ls": "LS", "ls_gold": "LS-gold", "ls_agree": "LS-agree"}
    lines = [f"**{title}**", "", "| point | " + " | ".join(head[k] for k in keys) + " | train s | Pareto |",
             "|" + "---|" * (len(keys) + 3)]
    for p in sorted(points, key=lambda q: -q.scores.get("ls_agree", 0.0)):
        cells = [f"{p.scores[k]:.2f}" if isinstance(p.scores.get(k), float) else "-" for k in keys]
        lines.append(f"| `{p.label()}` | " + " | ".join(cells) + f" | {p.train_seconds:.0f} | "
                     f"{'yes' if p.pareto else ''} |")
    return "\n".join(lines)
