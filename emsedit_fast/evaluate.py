"""python -m emsedit_fast.evaluate: score the unedited model, or an editor checkpoint, under an editing protocol.

    sequential N x M   N batches of M edits applied one after another, everything scored at the end
    batch N            one batch of N edits applied at once

Writes <output>/results.json, <output>/report.md and PNG plots (metrics against the number of edits, editing time
per edit), and prints the table. The unedited model is always scored on the same records, next to the editor;
--untrained adds the checkpoint's editor as it was before meta-training (same configuration and seed, networks as
initialised), so the table says what training added on these records.
--split valid scores the validation split (carved from the training data; what tuning reads); the default is the
evaluation split, which is only reported.

    python -m emsedit_fast.evaluate --unedited --data ../shared/data/counterfact/counterfact-val.json
    python -m emsedit_fast.evaluate --checkpoint runs/emsedit-sequential/checkpoint --mode sequential \\
        --n-edits 10 --batches 5
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from emsedit_fast.cli import run_command
from emsedit_fast.config import add_run_arguments

log = logging.getLogger("emsedit_fast.evaluate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emsedit_fast.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="an editor checkpoint folder (from python -m emsedit_fast.train)")
    which.add_argument("--unedited", action="store_true", help="score the unedited model only")
    parser.add_argument("--data", default=None, help="'bundled' or a records file (default: the run's eval data)")
    parser.add_argument("--split", choices=["eval", "valid"], default="eval",
                        help="eval: the evaluation split (reported); valid: the validation split (tuning)")
    parser.add_argument("--n-edits", type=int, help="edits per batch (batch protocol: the batch size)")
    parser.add_argument("--batches", type=int, help="N batches for the sequential protocol")
    parser.add_argument("--slices", type=int, default=1, help="disjoint protocol slices to average over")
    parser.add_argument("--offset", type=int, default=0, metavar="I",
                        help="score the split's records from the I-th on (0-based), e.g. a second slice of a split "
                             "too small for two disjoint ones")
    parser.add_argument("--untrained", action="store_true",
                        help="also score the checkpoint's editor untrained (its config and seed, no meta-training)")
    parser.add_argument("--curve", default="", help="also score after these batch counts, e.g. 1,2,5 (sequential)")
    parser.add_argument("--batch-size", type=int, default=16, help="evaluation forward batch size")
    parser.add_argument("--fluency-tokens", type=int, default=0, metavar="N",
                        help="also measure fluency: n-gram entropy of N greedy tokens per generation prompt (0: off)")
    parser.add_argument("--output", default="runs/evaluate")
    args = parser.parse_args(argv)
    return run_command(args, _run)


def _run(args) -> int:
    import dataclasses

    from emsedit_fast import api
    from emsedit_fast.checkpoint import load_config
    from emsedit_fast.config import load
    from emsedit_fast.config import to_dict
    from emsedit_fast.profiles import resolve_run
    from emsedit_fast.report import plot_curves
    from emsedit_fast.report import results_table
    from emsedit_fast.report import write_json

    for flag, value in (("--n-edits (data.n_edits)", args.n_edits), ("--batches (data.eval_batches)", args.batches),
                        ("--batch-size", args.batch_size), ("--slices", args.slices)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.untrained and not args.checkpoint:
        raise ValueError("--untrained needs --checkpoint (the untrained editor is built from its configuration)")
    if args.fluency_tokens < 0:
        raise ValueError(f"--fluency-tokens must be >= 0, got {args.fluency_tokens}")
    try:
        curve_at = tuple(int(x) for x in args.curve.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--curve: expected comma-separated batch counts such as 1,2,5, got {args.curve!r}") from None
    if args.checkpoint:
        saved = load_config(args.checkpoint)
        # the checkpoint's config, with the mode, model location, device, dtype and backend flags over it; --steps
        # applies per evaluation (fewer MSBP steps than trained), never to the editor's shape
        flags = {"model": {k: v for k, v in (("name", args.model), ("device", args.device), ("dtype", args.dtype))
                           if v},
                 "editor": {"backend": args.backend} if args.backend else {}}
        cfg = load(saved.editor.name, mode=args.mode or saved.train.mode, extra=_merged(to_dict(saved), flags),
                   overrides=args.set)
        session = api.open_session(cfg, checkpoint=args.checkpoint)
        meta = session.checkpoint
    else:
        cfg, _ = resolve_run(argparse.Namespace(**{**vars(args), "train_data": None}))
        session = api.open_session(cfg)
        meta = None
    mode = cfg.train.mode
    n_edits = args.n_edits if args.n_edits is not None else cfg.data.n_edits
    t = args.batches if args.batches is not None else cfg.data.eval_batches
    cfg = dataclasses.replace(cfg, output=args.output)
    os.makedirs(args.output, exist_ok=True)
    progress = False if args.no_progress else None
    records = api.load_split(session, args.split, source=args.data)
    if not 0 <= args.offset < len(records):
        raise ValueError(f"--offset {args.offset}: the {args.split} split has {len(records)} records (0-based index)")
    records = records[args.offset:]
    data = args.data or api.split_source(cfg, args.split)
    rows = [("unedited", api.evaluate_slices(session, records, mode, n_edits, t, args.slices, edit=False,
                                             progress=progress))]
    if meta is not None:
        k = args.steps or cfg.editor.n_steps

        def score(s):
            if args.slices == 1:
                return api.evaluate_protocol(s, records, mode, n_edits, t, k, progress=progress,
                                             batch_size=args.batch_size, curve_at=curve_at,
                                             fluency_tokens=args.fluency_tokens)
            return api.evaluate_slices(s, records, mode, n_edits, t, args.slices, k, progress=progress)

        if args.untrained:
            # the same editor built from the same config and seed on the same (unedited) model, without the
            # checkpoint's networks: what `train` scores as its "untrained" row before meta-training starts. Its key
            # statistics are the checkpoint's (estimated once, before training), not estimated again.
            fresh = api.open_session(cfg, model=session.model, tokenizer=session.tokenizer,
                                     key_statistics=session.editor.prior)
            rows.append((f"{cfg.editor.name} K={k} untrained", score(fresh)))
        rows.append((f"{cfg.editor.name} K={k}", score(session)))
    shown = t if mode == "sequential" else 1
    title = (f"{cfg.model.name}, {data} ({args.split} split"
             + (f", records from {args.offset} on" if args.offset else "")
             + f"): {mode} {shown} x {n_edits} edits, {args.slices} slice(s), seed {cfg.seed}, device {session.device}"
             + (f", checkpoint {args.checkpoint} (trained {meta['training_step']} batches)" if meta else ""))
    table = results_table(rows, title)
    print("\n" + table + "\n")
    plots = plot_curves({name: m.get("curve", []) for name, m in rows}, args.output)
    with open(os.path.join(args.output, "report.md"), "w") as f:
        f.write("# Evaluation report\n\n" + table + "\n")
        for path in plots:
            f.write(f"\n![{os.path.basename(path)}]({os.path.basename(path)})\n")
    write_json(os.path.join(args.output, "results.json"),
               {"title": title, "rows": {name: m for name, m in rows}, "checkpoint": args.checkpoint, "data": data,
                "split": args.split, "offset": args.offset})
    log.info("wrote %s", ", ".join([os.path.join(args.output, n) for n in ("results.json", "report.md")] + plots))
    return 0


def _merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


if __name__ == "__main__":
    sys.exit(main())
