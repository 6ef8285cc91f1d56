"""python -m emsedit_fast.compare: one results table for several editors under one protocol and training budget.

Each method is meta-trained from scratch with the same data, budget and seed, then evaluated under the regime's
protocol (sequential: T batches edited one after another, scored at the end; batch: one batch) on the same held-out
records, next to the unedited model. Rows report ES / GS / LS (and LS-agree, portability where defined), meta-training
seconds per edit and editing seconds per edit.

    python -m emsedit_fast.compare --mode sequential --methods mend,mend2,malmen,malmen2,rledit,rledit2,emsedit \\
        --train-data ../shared/data/counterfact/counterfact-train.json \\
        --eval-data ../shared/data/counterfact/counterfact-val.json --n-edits 20 --eval-batches 10 --n-batches 50
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from emsedit_fast.cli import run_command
from emsedit_fast.config import SMALL_MODEL_PROFILE
from emsedit_fast.config import load

log = logging.getLogger("emsedit_fast.compare")

METHOD_NAMES = {"mend": ("mend", 1), "mend2": ("mend", 2), "malmen": ("malmen", 1), "malmen2": ("malmen", 2),
                "rledit": ("rledit", 1), "rledit2": ("rledit", 2), "emsedit": ("emsedit", 2),
                "emsedit1": ("emsedit", 1)}


def label(method: str) -> str:
    name, k = METHOD_NAMES[method]
    pretty = {"mend": "MEND", "malmen": "MALMEN", "rledit": "RLEdit", "emsedit": "EMSEdit"}[name]
    return pretty + ("²" if k == 2 and name != "emsedit" else "") + (" (K=1)" if name == "emsedit" and k == 1 else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emsedit_fast.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["sequential", "batch"], required=True)
    parser.add_argument("--methods", default="malmen,malmen2,emsedit",
                        help=f"comma-separated, from {', '.join(METHOD_NAMES)}")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--train-data", default="bundled")
    parser.add_argument("--eval-data", default="bundled")
    parser.add_argument("--n-edits", type=int, default=20)
    parser.add_argument("--eval-batches", type=int, default=10)
    parser.add_argument("--n-batches", type=int, default=50, help="training batches (sequential) / steps (batch)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every method")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="runs/compare")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    args = parser.parse_args(argv)
    return run_command(args, _run)


def _run(args) -> int:
    import torch

    from emsedit_fast import api
    from emsedit_fast.report import results_table
    from emsedit_fast.report import write_json

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHOD_NAMES)}")
    os.makedirs(args.output, exist_ok=True)
    progress = False if args.no_progress else None
    common = {"model": {"name": args.model}, "train": {"n_batches": args.n_batches},
              "data": {"train": args.train_data, "eval": args.eval_data, "n_edits": args.n_edits,
                       "eval_batches": args.eval_batches}, "seed": args.seed}
    base_cfg = load("emsedit", mode=args.mode, defaults=SMALL_MODEL_PROFILE, extra=common, overrides=args.set)
    model, tokenizer, device = api.load_model(base_cfg)
    train_records = api.load_split(args.train_data, "train", base_cfg)
    eval_records = api.load_split(args.eval_data, "eval", base_cfg)
    t = args.eval_batches if args.mode == "sequential" else 1
    rows = []
    results = {}
    session = None
    for method in methods:
        name, k = METHOD_NAMES[method]
        cfg = load(name, mode=args.mode, defaults=SMALL_MODEL_PROFILE, extra={**common, "editor": {"n_steps": k}},
                   overrides=args.set)
        cfg = dataclasses.replace(cfg, output=os.path.join(args.output, method))
        torch.manual_seed(cfg.seed)
        session = api.open_session(cfg, model, tokenizer)
        if not rows:  # the unedited model on the same records; its predictions serve every method's LS-agree
            pre_edit = api.protocol_pre_edit(session, eval_records, args.mode, args.n_edits, t)
            rows.append(("unedited", api.evaluate_protocol(session, eval_records, args.mode, args.n_edits, t,
                                                           edit=False, progress=progress, pre_edit=pre_edit)))
        trainer = api.train(session, cfg, train_records, progress=progress)
        metrics = api.evaluate_protocol(session, eval_records, args.mode, args.n_edits, t, progress=progress,
                                        pre_edit=pre_edit)
        metrics["train_seconds_per_edit"] = trainer.report.seconds_per_edit
        metrics["train_skipped"] = trainer.report.skipped
        rows.append((label(method), metrics))
        results[method] = metrics
        log.info("%s: %s", method, {k2: v for k2, v in metrics.items() if isinstance(v, float)})
        write_json(os.path.join(args.output, "results.json"), {"rows": rows, "args": vars(args)})
    unit = "batches" if args.mode == "sequential" else "steps"
    title = (f"{args.model}, train {args.train_data} ({args.n_batches} {unit} x {args.n_edits} edits), eval "
             f"{args.eval_data}: {args.mode} {t} x {args.n_edits} edits, seed {args.seed}, "
             f"device {device} ({torch.get_num_threads()} threads)")
    table = results_table(rows, title)
    print("\n" + table + "\n")
    with open(os.path.join(args.output, "results.md"), "w") as f:
        f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
