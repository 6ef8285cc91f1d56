"""python -m emsedit_fast.compare: one results table for several editors under one protocol and training budget.

Each method is meta-trained from scratch with the same data, budget and seed, then evaluated under the mode's
protocol (sequential: T batches edited one after another, scored at the end; batch: one batch) on the same
evaluation records, next to the unedited model and the untrained editor. Scores are means over --eval-slices
disjoint slices of the evaluation records, with their spread. Defaults come from the training data's profile
(emsedit_fast.profiles), chosen on its validation split.

    python -m emsedit_fast.compare --methods emsedit,emsedit1,malmen,rledit \\
        --train-data ../shared/data/counterfact/counterfact-train.json \\
        --eval-data ../shared/data/counterfact/counterfact-val.json --n-edits 20 --eval-batches 10
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from emsedit_fast.cli import run_command
from emsedit_fast.config import add_run_arguments

log = logging.getLogger("emsedit_fast.compare")


def main(argv: list[str] | None = None) -> int:
    from emsedit_fast.comparison import METHOD_NAMES

    parser = argparse.ArgumentParser(prog="python -m emsedit_fast.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--methods", default="emsedit,emsedit1,malmen,rledit",
                        help=f"comma-separated, from {', '.join(METHOD_NAMES)}; the first also gives the untrained row")
    parser.add_argument("--train-data")
    parser.add_argument("--eval-data")
    parser.add_argument("--n-edits", type=int)
    parser.add_argument("--eval-batches", type=int)
    parser.add_argument("--eval-slices", type=int, help="disjoint protocol slices (default: the profile's)")
    parser.add_argument("--n-batches", type=int, help="training batches (sequential) / steps (batch); --epochs wins")
    parser.add_argument("--epochs", type=float, help="passes over the training split")
    parser.add_argument("--output", default="runs/compare")
    args = parser.parse_args(argv)
    return run_command(args, _run)


def _run(args) -> int:
    import torch

    from emsedit_fast import api
    from emsedit_fast.comparison import compare_methods
    from emsedit_fast.comparison import parse_methods
    from emsedit_fast.profiles import resolve_run
    from emsedit_fast.report import results_table
    from emsedit_fast.report import show_table
    from emsedit_fast.report import write_json

    methods = parse_methods(args.methods)
    base, plan = resolve_run(args)
    base = dataclasses.replace(base, output=args.output)
    os.makedirs(args.output, exist_ok=True)
    progress = False if args.no_progress else None
    model, tokenizer, device = api.load_model(base)
    train_records = api.load_split(base, "train")
    eval_records = api.load_split(base, "eval")
    slices = args.eval_slices or plan.eval_slices
    per = (base.data.eval_batches if base.train.mode == "sequential" else 1) * base.data.n_edits
    slices = min(slices, max(1, len(eval_records) // per))

    def save(label, metrics, session, trainer):
        write_json(os.path.join(args.output, "results.json"), {"rows": rows_so_far + [(label, metrics)],
                                                                "args": vars(args), "profile": plan.name})
        rows_so_far.append((label, metrics))

    rows_so_far: list = []
    rows = compare_methods(base, methods, train_records=train_records, eval_records=eval_records, n_slices=slices,
                           overrides=args.set, defaults=plan.defaults, model=model, tokenizer=tokenizer,
                           progress=progress, on_row=save)
    unit = "batches" if base.train.mode == "sequential" else "steps"
    budget = f"{base.train.epochs:g} epoch(s)" if base.train.epochs else f"{base.train.n_batches} {unit}"
    title = (f"{base.model.name}, train {plan.train_label} ({budget} x {base.data.n_edits} edits, profile {plan.name} "
             f"chosen on {plan.valid_label}), eval {plan.eval_label}: {base.train.mode} "
             f"{base.data.eval_batches if base.train.mode == 'sequential' else 1} x {base.data.n_edits} edits, "
             f"{slices} slice(s), seed {base.seed}, device {device} ({torch.get_num_threads()} threads)")
    show_table(results_table(rows, title), os.path.join(args.output, "results.md"))
    write_json(os.path.join(args.output, "results.json"), {"rows": rows, "args": vars(args), "profile": plan.name,
                                                            "title": title})
    return 0


if __name__ == "__main__":
    sys.exit(main())
