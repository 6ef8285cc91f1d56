"""python -m emsedit_fast.sweep: choose hyperparameters on the validation split (never on the evaluation split).

Every point of the grid (--grid KEY=V1,V2 ..., the cartesian product; KEY=V|KEY2=W,... varies keys jointly) gets an
editor built from the training data's profile plus the point's overrides, meta-trained with --train (else scored
untrained), and scored on the validation split carved from the training data under the profile's protocol
(--slices disjoint slices). Prints and writes the table with the Pareto front of (ES, GS) against LS-agree.

    python -m emsedit_fast.sweep --train-data ../shared/data/zsre/zsre-train-800.json \\
        --grid editor.eta_init=3e-4,1e-3,3e-3 --grid editor.key_prior=0,100,1000
    python -m emsedit_fast.sweep --train-data ../shared/data/zsre/zsre-train-800.json --train \\
        --grid train.reg_coef=0,0.001,0.01 --set train.epochs=2
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from emsedit_fast.cli import run_command
from emsedit_fast.config import add_run_arguments

log = logging.getLogger("emsedit_fast.sweep")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emsedit_fast.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--train-data", help="'bundled' or a records file; its validation split is scored")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="one axis of the grid (repeatable)")
    parser.add_argument("--train", action="store_true", help="meta-train every point (default: score it untrained)")
    parser.add_argument("--n-edits", type=int)
    parser.add_argument("--eval-batches", type=int)
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--n-batches", type=int)
    parser.add_argument("--slices", type=int, default=1, help="disjoint validation slices to average over")
    parser.add_argument("--output", default="runs/sweep")
    args = parser.parse_args(argv)
    return run_command(args, _run)


def _run(args) -> int:
    import dataclasses

    import torch

    from emsedit_fast import api
    from emsedit_fast.profiles import resolve_run
    from emsedit_fast.report import show_table
    from emsedit_fast.report import write_json
    from emsedit_fast.tuning import expand_grid
    from emsedit_fast.tuning import pareto_front
    from emsedit_fast.tuning import pareto_table
    from emsedit_fast.tuning import run_point
    from emsedit_fast.tuning import untrained_blind_keys

    base, plan = resolve_run(args)
    base = dataclasses.replace(base, output=args.output)
    os.makedirs(args.output, exist_ok=True)
    progress = False if args.no_progress else None
    grid = expand_grid(args.grid)
    blind = [] if args.train else untrained_blind_keys(grid)
    if blind:
        log.warning("untrained editors do not read %s: points that differ only there score the same (add --train)",
                    ", ".join(blind))
    device = api.resolve_device(base.model.device)
    models: dict = {}  # one loaded model per distinct model config of the grid (tuning.run_point)
    valid = api.load_split(base, "valid")
    train_records = api.load_split(base, "train") if args.train else None
    per = (base.data.eval_batches if base.train.mode == "sequential" else 1) * base.data.n_edits
    if args.slices * per > len(valid):
        raise ValueError(f"--slices {args.slices} x {per} records do not fit the {len(valid)} validation records")
    points = []
    title = (f"{base.model.name}, {plan.valid_label}: {base.train.mode} {base.data.eval_batches} x {base.data.n_edits} "
             f"edits, {args.slices} slice(s), {'trained' if args.train else 'untrained'} editors, profile "
             f"{plan.name}, seed {base.seed}, device {device} ({torch.get_num_threads()} threads)")
    for i, overrides in enumerate(grid, 1):
        log.info("point %d/%d: %s", i, len(grid), " ".join(overrides) or "(profile defaults)")
        points.append(run_point(base, list(args.set) + overrides, plan.defaults, train=args.train, valid=valid,
                                n_slices=args.slices, models=models,
                                train_records=train_records, progress=progress))
        points[-1].overrides = overrides
        pareto_front(points)
        write_json(os.path.join(args.output, "sweep.json"),
                   {"title": title, "args": vars(args), "points": [dataclasses.asdict(p) for p in points]})
    show_table(pareto_table(points, title), os.path.join(args.output, "sweep.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
