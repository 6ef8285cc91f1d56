"""python -m emsedit_fast.train: meta-train an editor, evaluate it on held-out edits, save a checkpoint.

With no arguments: EMSEdit (K = 2, sequential regime, step-specific hypernetworks) on SmolLM2-135M-Instruct, trained
on the package's bundled counterfactual facts and evaluated on held-out subjects against the unedited model and
against the same editor at K = 1. Prints a results table, writes results.json, results.md and a checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from emsedit_fast.cli import run_command
from emsedit_fast.config import SMALL_MODEL_PROFILE
from emsedit_fast.config import RunConfig
from emsedit_fast.config import load

log = logging.getLogger("emsedit_fast.train")

# The defaults of the main job: a budget that fits in a few minutes on 2 CPU cores (METHOD.md 14.4 small profile).
MAIN_JOB = {
    **SMALL_MODEL_PROFILE,
    "model": {"name": "smollm2-135m"},
    "train": {**SMALL_MODEL_PROFILE["train"], "n_batches": 40},
    "data": {"n_edits": 8, "eval_batches": 5},
}


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by train, edit and evaluate: what to load and how."""
    parser.add_argument("--editor", default="emsedit", choices=["emsedit", "malmen", "rledit", "mend"])
    parser.add_argument("--mode", choices=["sequential", "batch"], help="regime (default: the editor's own)")
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


def resolve_config(args: argparse.Namespace, defaults: dict | None = None) -> RunConfig:
    """Preset -> main-job defaults -> --config files -> explicit flags -> --set overrides."""
    flags = {"editor": {}, "model": {}, "train": {}, "data": {}}
    if args.steps is not None:
        flags["editor"]["n_steps"] = args.steps
    if args.backend:
        flags["editor"]["backend"] = args.backend
    for key in ("model", "device", "dtype"):
        value = getattr(args, key, None)
        if value:
            flags["model"]["name" if key == "model" else key] = value
    for key, section, name in (("n_edits", "data", "n_edits"), ("n_batches", "train", "n_batches"),
                               ("eval_batches", "data", "eval_batches"), ("train_data", "data", "train"),
                               ("eval_data", "data", "eval"), ("output", None, "output")):
        value = getattr(args, key, None)
        if value is not None:
            (flags if section is None else flags[section])[name] = value
    if getattr(args, "seed", None) is not None:
        flags["seed"] = args.seed
    return load(args.editor, mode=args.mode, files=args.config, overrides=args.set, extra=flags, defaults=defaults)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emsedit_fast.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--train-data", help="'bundled' or a records file (CounterFact, zsRE, JSONL facts)")
    parser.add_argument("--eval-data", help="'bundled' or a records file")
    parser.add_argument("--n-edits", type=int, help="edits per batch")
    parser.add_argument("--n-batches", type=int, help="training batches (sequential) or steps (batch)")
    parser.add_argument("--eval-batches", type=int, help="T evaluation batches (sequential protocol)")
    parser.add_argument("--output", help="run folder (checkpoint, results); default runs/<editor>-<mode>")
    parser.add_argument("--resume", help="a checkpoint folder to resume training from")
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N training batches")
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    args = parser.parse_args(argv)
    return run_command(args, _run)


def _run(args) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from emsedit_fast import api
    from emsedit_fast.checkpoint import load_editor_state
    from emsedit_fast.checkpoint import save_checkpoint
    from emsedit_fast.report import results_table
    from emsedit_fast.report import write_json
    from emsedit_fast.training import MetaTrainer

    cfg = resolve_config(args, MAIN_JOB)
    if args.output is None:
        import dataclasses

        cfg = dataclasses.replace(cfg, output=os.path.join("runs", f"{cfg.editor.name}-{cfg.train.mode}"))
    progress = False if args.no_progress else None
    os.makedirs(cfg.output, exist_ok=True)
    with logging_redirect_tqdm():
        start = time.perf_counter()
        session = api.open_session(cfg)
        log.info("model %s on %s; editing %d modules in %d shape group(s); editor %s (%s, K=%d)", cfg.model.name,
                 session.device, len(session.modules), len(session.editor.groups), cfg.editor.name, cfg.train.mode,
                 cfg.editor.n_steps)
        trainer = MetaTrainer(session.editor, cfg.train)
        if args.resume:
            meta = load_editor_state(args.resume, session.editor, trainer)
            log.info("resumed from %s at training batch %d", args.resume, meta["training_step"])

        callbacks = []
        if args.save_every:
            from emsedit_fast.callbacks import Callback

            class Periodic(Callback):
                def on_train_step(self, trainer_, metrics):
                    if metrics["step"] % args.save_every == 0:
                        save_checkpoint(os.path.join(cfg.output, "checkpoint"), session.editor, cfg, trainer_)

            callbacks.append(Periodic())
        trainer.callbacks.extend(callbacks)
        api.train(session, cfg, trainer=trainer, progress=progress)
        ckpt = save_checkpoint(os.path.join(cfg.output, "checkpoint"), session.editor, cfg, trainer)
        log.info("meta-training: %d batches, %.1f s (%.3f s per edit), %d skipped; checkpoint %s",
                 trainer.report.steps, trainer.report.seconds, trainer.report.seconds_per_edit, trainer.report.skipped,
                 ckpt)
        results = {"output": cfg.output, "train": {"batches": trainer.report.steps, "seconds": trainer.report.seconds,
                                                    "seconds_per_edit": trainer.report.seconds_per_edit,
                                                    "skipped": trainer.report.skipped,
                                                    "final_loss": trainer.report.losses[-1]
                                                    if trainer.report.losses else None}}
        if not args.no_eval:
            records = api.load_split(cfg.data.eval, "eval", cfg)
            mode, n_edits, t = cfg.train.mode, cfg.data.n_edits, cfg.data.eval_batches
            rows = [("unedited", api.evaluate_protocol(session, records, mode, n_edits, t, edit=False,
                                                      progress=progress))]
            if cfg.editor.n_steps > 1:
                rows.append((f"{cfg.editor.name} K=1", api.evaluate_protocol(session, records, mode, n_edits, t, 1,
                                                                             progress=progress)))
            rows.append((f"{cfg.editor.name} K={cfg.editor.n_steps}",
                         api.evaluate_protocol(session, records, mode, n_edits, t, progress=progress)))
            for _, m in rows[1:]:
                m["train_seconds_per_edit"] = trainer.report.seconds_per_edit
            title = (f"{cfg.model.name}, {cfg.data.eval} eval split, {mode} {t if mode == 'sequential' else 1} x "
                     f"{n_edits} edits, trained {trainer.report.steps} batches, seed {cfg.seed}, device "
                     f"{session.device}")
            table = results_table(rows, title)
            print("\n" + table + "\n")
            results["eval"] = {name: m for name, m in rows}
            with open(os.path.join(cfg.output, "results.md"), "w") as f:
                f.write(table + "\n")
        results["total_seconds"] = time.perf_counter() - start
        write_json(os.path.join(cfg.output, "results.json"), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
