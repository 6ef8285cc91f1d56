"""python -m emsedit_fast.train: meta-train an editor, score it on the evaluation split, save a checkpoint.

    python -m emsedit_fast.train                                    # the main job (bundled facts, see below)
    python -m emsedit_fast.train --train-data ../shared/data/zsre/zsre-train-800.json --n-edits 10
    python -m emsedit_fast.train --train-data ../shared/data/counterfact/counterfact-train.json \\
        --eval-data ../shared/data/counterfact/counterfact-val.json --n-edits 20

The defaults for a dataset (profile, budget, protocol) come from emsedit_fast.profiles, chosen on the validation
split carved from the training data; the evaluation split is only reported. With no argument, the main job trains
EMSEdit (K = 4, sequential) on SmolLM2-135M-Instruct with the package's bundled facts and, at the same budget,
EMSEdit trained at K = 1, MALMEN and RLEdit (--baselines), and prints one table on the held-out subjects: the unedited
model, the untrained editor, then every trained editor, each saying which validation point it kept (the profiles
validate during training and keep the best editor, the untrained one included). Writes results.json, results.md, a
learning-curve plot (--eval-every) and the checkpoint of the first editor under --output.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from emsedit_fast.cli import run_command
from emsedit_fast.config import add_run_arguments

log = logging.getLogger("emsedit_fast.train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m emsedit_fast.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--train-data", help="'bundled' or a records file (CounterFact, zsRE, JSONL facts)")
    parser.add_argument("--eval-data", help="'bundled' or a records file (default: the dataset's evaluation part)")
    parser.add_argument("--n-edits", type=int, help="edits per batch")
    parser.add_argument("--n-batches", type=int, help="training batches (sequential) or steps (batch); --epochs wins")
    parser.add_argument("--epochs", type=float, help="passes over the training split")
    parser.add_argument("--eval-every", type=float,
                        help="validate every N batches (N >= 1) or fraction of training (< 1): the learning curve")
    parser.add_argument("--keep", choices=["last", "best"],
                        help="end with the last editor or the best validation point of --eval-every (train.keep)")
    parser.add_argument("--eval-batches", type=int, help="T evaluation batches (sequential protocol)")
    parser.add_argument("--eval-slices", type=int, help="disjoint protocol slices to average the scores over")
    parser.add_argument("--baselines", help="also train these at the same budget, e.g. emsedit1,malmen,rledit "
                                            "(default: those three for the bundled main job, none otherwise)")
    parser.add_argument("--output", help="run folder (checkpoint, results); default runs/<editor>-<mode>")
    parser.add_argument("--resume", help="a checkpoint folder to resume training from")
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N training batches")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation on the evaluation split")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv), _run)


def _run(args) -> int:
    import dataclasses

    from tqdm.contrib.logging import logging_redirect_tqdm

    from emsedit_fast import api
    from emsedit_fast.callbacks import Callback
    from emsedit_fast.checkpoint import load_editor_state
    from emsedit_fast.checkpoint import save_checkpoint
    from emsedit_fast.comparison import parse_methods
    from emsedit_fast.profiles import resolve_run
    from emsedit_fast.report import plot_learning_curve
    from emsedit_fast.report import results_table
    from emsedit_fast.report import show_table
    from emsedit_fast.report import write_json
    from emsedit_fast.trainer import MetaTrainer

    cfg, plan = resolve_run(args)
    if args.output is None:
        cfg = dataclasses.replace(cfg, output=os.path.join("runs", f"{cfg.editor.name}-{cfg.train.mode}"))
    progress = False if args.no_progress else None
    os.makedirs(cfg.output, exist_ok=True)
    baselines = parse_methods(args.baselines if args.baselines is not None else plan.baselines)
    with logging_redirect_tqdm():
        start = time.perf_counter()
        session = api.open_session(cfg)
        log.info("model %s on %s; editing %d modules in %d shape group(s); editor %s (%s, K=%d); profile %s",
                 cfg.model.name, session.device, len(session.modules), len(session.editor.groups), cfg.editor.name,
                 cfg.train.mode, cfg.editor.n_steps, plan.name)
        train_records = api.load_split(session, "train")
        eval_records = api.load_split(session, "eval") if not args.no_eval else []
        n_edits, t, slices = cfg.data.n_edits, cfg.data.eval_batches, plan.eval_slices
        rows = []
        if not args.no_eval:
            slices = min(slices, max(1, len(eval_records) // ((t if cfg.train.mode == "sequential" else 1) * n_edits)))
            rows.append(("unedited", api.evaluate_slices(session, eval_records, cfg.train.mode, n_edits, t, slices,
                                                         edit=False, progress=progress)))
            rows.append(("untrained", api.evaluate_slices(session, eval_records, cfg.train.mode, n_edits, t, slices,
                                                          progress=progress)))
        trainer = MetaTrainer(session.editor, cfg.train)
        if args.resume:
            meta = load_editor_state(args.resume, session.editor, trainer)
            log.info("resumed from %s at training batch %d", args.resume, meta["training_step"])
        if args.save_every:
            class Periodic(Callback):
                def on_train_step(self, trainer_, metrics):
                    if metrics["step"] % args.save_every == 0:
                        save_checkpoint(os.path.join(cfg.output, "checkpoint"), session.editor, cfg, trainer_)

            trainer.callbacks.append(Periodic())
        api.train(session, train_records, trainer=trainer, progress=progress)
        ckpt = save_checkpoint(os.path.join(cfg.output, "checkpoint"), session.editor, cfg, trainer)
        log.info("meta-training: %d batches, %.1f s (%.3f s per edit), %d skipped; checkpoint %s",
                 trainer.report.steps, trainer.report.seconds, trainer.report.seconds_per_edit, trainer.report.skipped,
                 ckpt)
        results = {"output": cfg.output, "profile": plan.name, "splits": plan.splits,
                   "train": {"batches": trainer.report.steps, "seconds": trainer.report.seconds,
                             "seconds_per_edit": trainer.report.seconds_per_edit, "skipped": trainer.report.skipped,
                             "final_loss": trainer.report.losses[-1] if trainer.report.losses else None,
                             # the meta-loss of every training batch, in order: where a run's networks went astray
                             "losses": list(trainer.report.losses),
                             # and per MSBP step after every batch: eta and the norm of the blocks' B matrices
                             "scales": list(trainer.report.scales),
                             "validation_curve": trainer.report.curve, "kept_step": trainer.report.kept_step}}
        if trainer.report.curve:
            results["learning_curve_plot"] = plot_learning_curve(trainer.report.curve, cfg.output,
                                                                 f"{cfg.editor.name} K={cfg.editor.n_steps}")
        if not args.no_eval:
            trained = api.evaluate_slices(session, eval_records, cfg.train.mode, n_edits, t, slices, progress=progress)
            trained["train_seconds_per_edit"] = trainer.report.seconds_per_edit
            rows.append((f"{cfg.editor.name} K={cfg.editor.n_steps} ({trainer.report.outcome})", trained))
            if baselines:
                from emsedit_fast.comparison import compare_methods
                from emsedit_fast.profiles import profile_defaults

                more = compare_methods(cfg, baselines, train_records=train_records, eval_records=eval_records,
                                       n_slices=slices, overrides=args.set, defaults=profile_defaults(plan),
                                       model=session.model, tokenizer=session.tokenizer, progress=progress)
                rows += [r for r in more if r[0] not in ("unedited",) and not r[0].endswith("untrained")]
            per = (t if cfg.train.mode == "sequential" else 1) * n_edits
            title = (f"{cfg.model.name}, {plan.eval_label} ({slices} slice(s) of {per} records; "
                     f"{cfg.train.mode} {t if cfg.train.mode == 'sequential' else 1} x {n_edits} edits), every editor "
                     f"trained on {plan.train_label} for {trainer.report.steps} batches, profile {plan.name} "
                     f"(chosen on {plan.valid_label}), seed {cfg.seed}, device {session.device}")
            show_table(results_table(rows, title), os.path.join(cfg.output, "results.md"))
            results["eval"] = {name: m for name, m in rows}
        results["total_seconds"] = time.perf_counter() - start
        write_json(os.path.join(cfg.output, "results.json"), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
