"""Which loss does each MSBP step's meta-gradient follow? For validation batches of a run, print per step the
derivative of the meta-loss along that step's step size as each `train.step_credit` computes it, beside central
differences of the loss after all K steps and of the loss after that step (MetaTrainer.credit_check).

    python scripts/credit_check.py --train-data ../shared/data/counterfact/counterfact-train.json --n-edits 20

The editor is the run's untrained one (its profile's settings), or --checkpoint's. --pre N edits the first N
validation batches first, so that the checked batch meets drifted weights as a later batch of a sequence does.
"""

from __future__ import annotations

import argparse


def main() -> None:
    from emsedit_fast.config import add_run_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--train-data", help="'bundled' or a records file; its validation split is used")
    parser.add_argument("--n-edits", type=int)
    parser.add_argument("--checkpoint", help="check this trained editor instead of the untrained one")
    parser.add_argument("--batches", type=int, default=1, help="validation batches to check (default 1)")
    parser.add_argument("--pre", type=int, default=0, help="validation batches edited before the checked one")
    parser.add_argument("--h", type=float, default=0.05, help="finite-difference step in log step size")
    args = parser.parse_args()

    from emsedit_fast import api
    from emsedit_fast.profiles import resolve_run
    from emsedit_fast.trainer import MetaTrainer

    cfg, _ = resolve_run(args)
    session = api.open_session(checkpoint=args.checkpoint) if args.checkpoint else api.open_session(cfg)
    cfg = session.cfg
    valid = api.load_split(session, "valid")
    n = cfg.data.n_edits
    need = args.pre + args.batches
    if need * n > len(valid):
        raise SystemExit(f"--pre {args.pre} + --batches {args.batches} batches of {n} need {need * n} validation "
                         f"records; the split has {len(valid)}")
    batches = api.make_batches(session.tokenizer, valid, n, need, cfg.train.micro_batch, cfg.model.max_length,
                               session.device, need_unrel=cfg.train.loss != "l2")
    trainer = MetaTrainer(session.editor, cfg.train)
    editor = session.editor
    for tuples in batches[:args.pre]:  # as a training sequence applies them, the key prior's edit term included
        records = trainer._apply_steps(tuples, range(editor.cfg.n_steps))
        if editor.prior is not None:
            editor.prior.add_edit_keys(records[0].layer_keys())
    cols = ("final", "last", "per_step", "fd_final", "fd_own")
    print("| batch | step | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for b, tuples in enumerate(batches[args.pre:], args.pre + 1):
        for row in trainer.credit_check(tuples, args.h):
            cells = ["-" if row[c] is None else f"{row[c]:+.4g}" for c in cols]
            print(f"| {b} | {row['step']} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
