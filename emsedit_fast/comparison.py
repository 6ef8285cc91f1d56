"""Several editors under one protocol and one training budget, in one results table (train's and compare's table).

Every method is meta-trained from scratch with the same data, budget and seed, then evaluated on the same records
under the mode's protocol, next to the unedited model and the untrained editor. Methods by name:

    emsedit (K = 2), emsedit1 (EMSEdit trained at K = 1), emsedit3 ... emsedit8 (K = 3 ... 8), malmen, malmen2,
    rledit, rledit2, mend, mend2, ultraedit, ultraedit2 (training-free: their "trained" row is the same editor)
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch

from emsedit_fast.config import RunConfig
from emsedit_fast.config import load

log = logging.getLogger(__name__)

METHOD_NAMES = {"mend": ("mend", 1), "mend2": ("mend", 2), "malmen": ("malmen", 1), "malmen2": ("malmen", 2),
                "rledit": ("rledit", 1), "rledit2": ("rledit", 2), "emsedit": ("emsedit", 2),
                "emsedit1": ("emsedit", 1), "ultraedit": ("ultraedit", 1), "ultraedit2": ("ultraedit", 2),
                **{f"emsedit{k}": ("emsedit", k) for k in range(3, 9)}}
PRETTY = {"mend": "MEND", "malmen": "MALMEN", "rledit": "RLEdit", "emsedit": "EMSEdit", "ultraedit": "UltraEdit"}


def method_of(editor: str, n_steps: int) -> str:
    """The method name of an editor preset at K = n_steps (inverse of METHOD_NAMES)."""
    for method, (name, k) in METHOD_NAMES.items():
        if (name, k) == (editor, n_steps):
            return method
    known = sorted(k for name, k in METHOD_NAMES.values() if name == editor)
    raise ValueError(f"no comparison method runs {editor} at K = {n_steps} (K in {known})")


def label(method: str) -> str:
    """Row label: MALMEN, MALMEN², EMSEdit (K=2), EMSEdit (K=1), ..."""
    name, k = METHOD_NAMES[method]
    if name == "emsedit":
        return f"EMSEdit (K={k})"
    return PRETTY[name] + ("²" if k == 2 else "")


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHOD_NAMES)}")
    return methods


def method_config(base: RunConfig, method: str, overrides: list[str] = (), defaults: dict | None = None
                  ) -> RunConfig:
    """`base`'s model, data, budget, mode and seed with `method`'s preset (and K); `defaults` (a profile) and
    `overrides` apply to every method alike."""
    name, k = METHOD_NAMES[method]
    common = {"model": dataclasses.asdict(base.model), "data": dataclasses.asdict(base.data),
              "train": {"n_batches": base.train.n_batches, "epochs": base.train.epochs,
                        "micro_batch": base.train.micro_batch, "prior_records": base.train.prior_records,
                        "prior_positions": base.train.prior_positions},
              "seed": base.seed}
    common["model"]["modules"] = list(base.model.modules)
    cfg = load(name, mode=base.train.mode, defaults=defaults, extra={**common, "editor": {"n_steps": k}},
               overrides=list(overrides))
    return dataclasses.replace(cfg, output=os.path.join(base.output, method))


def compare_methods(base: RunConfig, methods: list[str], *, train_records, eval_records, n_slices: int = 1,
                    overrides: list[str] = (), defaults: dict | None = None, model=None, tokenizer=None,
                    progress: bool | None = None, on_row=None) -> list[tuple[str, dict]]:
    """Rows (label, metrics) for: the unedited model, the untrained editor (the first method, no training), then each
    method trained from scratch at the same budget. Metrics are means over `n_slices` slices of the protocol (with
    their spread). on_row(label, metrics, session, trainer) is called after each row (e.g. to save a checkpoint)."""
    from emsedit_fast import api

    if model is None:
        model, tokenizer, _ = api.load_model(base)
    n_edits, t = base.data.n_edits, base.data.eval_batches
    rows: list[tuple[str, dict]] = []

    def score(session, edit=True):
        return api.evaluate_slices(session, eval_records, base.train.mode, n_edits, t, n_slices, edit=edit,
                                   progress=progress)

    for i, method in enumerate(methods):
        cfg = method_config(base, method, overrides, defaults)
        torch.manual_seed(cfg.seed)
        session = api.open_session(cfg, model=model, tokenizer=tokenizer)
        if i == 0:
            rows.append(("unedited", score(session, edit=False)))
            if on_row:
                on_row("unedited", rows[-1][1], session, None)
            untrained = score(session)
            rows.append((f"{label(method)} untrained", untrained))
            if on_row:
                on_row(rows[-1][0], untrained, session, None)
        trainer = api.train(session, train_records, progress=progress)
        metrics = score(session)
        metrics["train_seconds_per_edit"] = trainer.report.seconds_per_edit
        metrics["train_skipped"] = trainer.report.skipped
        metrics["train_batches"] = trainer.report.steps
        metrics["train_kept_step"] = trainer.report.kept_step
        # a run that validates and keeps the best editor says which one it kept (it may be the untrained one)
        name = label(method) if trainer.report.kept_step is None else f"{label(method)} ({trainer.report.outcome})"
        rows.append((name, metrics))
        log.info("%s: %s", method, {k: round(v, 2) for k, v in metrics.items() if isinstance(v, float)})
        if on_row:
            on_row(name, metrics, session, trainer)
    return rows
