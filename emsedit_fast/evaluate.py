"""python -m emsedit_fast.evaluate: score the unedited model, or an editor checkpoint, under an editing protocol.

    sequential N x M   N batches of M edits applied one after another, everything scored at the end
    batch N            one batch of N edits applied at once

Writes <output>/results.json, <output>/report.md and PNG plots (metrics against the number of edits, editing time
per edit), and prints the table. The unedited model is always scored on the same records, next to the editor.

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

log = logging.getLogger("emsedit_fast.evaluate")

PLOTTED = (("es", "ES"), ("gs", "GS"), ("ls", "LS"), ("ls_gold", "LS-gold"), ("ls_agree", "LS-agree"), ("ps", "Port."))


def plot_curves(curves: dict[str, list[dict]], output: str) -> list[str]:
    """metrics_vs_edits.png and time_per_edit.png from {row name: curve points}; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    curves = {name: pts for name, pts in curves.items() if pts}
    if not curves:
        return files
    keys = [(k, h) for k, h in PLOTTED if any(k in p for pts in curves.values() for p in pts)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.0), squeeze=False)
    for ax, (key, header) in zip(axes[0], keys):
        for name, pts in curves.items():
            xs = [p["edits"] for p in pts if key in p]
            ax.plot(xs, [p[key] for p in pts if key in p], marker="o", label=name)
        ax.set_title(header)
        ax.set_xlabel("edits")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("%")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(output, "metrics_vs_edits.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(path)
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    for name, pts in curves.items():
        ax.plot([p["edits"] for p in pts], [p["edit_seconds_per_edit"] for p in pts], marker="o", label=name)
    ax.set_xlabel("edits")
    ax.set_ylabel("editing seconds per edit")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(output, "time_per_edit.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(path)
    return files


def main(argv: list[str] | None = None) -> int:
    from emsedit_fast.train import add_run_arguments

    parser = argparse.ArgumentParser(prog="python -m emsedit_fast.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="an editor checkpoint folder (from python -m emsedit_fast.train)")
    which.add_argument("--unedited", action="store_true", help="score the unedited model only")
    parser.add_argument("--data", default=None, help="'bundled' or a records file (default: the run's eval data)")
    parser.add_argument("--n-edits", type=int, help="edits per batch (batch protocol: the batch size)")
    parser.add_argument("--batches", type=int, help="N batches for the sequential protocol")
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
    from emsedit_fast.checkpoint import load_editor_state
    from emsedit_fast.checkpoint import read_meta
    from emsedit_fast.config import load
    from emsedit_fast.report import results_table
    from emsedit_fast.report import write_json
    from emsedit_fast.train import resolve_config

    if args.checkpoint:
        meta = read_meta(args.checkpoint)
        saved = load_config(args.checkpoint)
        cfg = load(saved.editor.name, mode=saved.train.mode, extra=_as_dict(saved), overrides=args.set)
        cfg = _apply_flags(cfg, args)
    else:
        meta = None
        cfg = resolve_config(args)
    data = args.data or cfg.data.eval
    mode = cfg.train.mode
    n_edits = args.n_edits if args.n_edits is not None else cfg.data.n_edits
    t = args.batches if args.batches is not None else cfg.data.eval_batches
    for flag, value in (("--n-edits", n_edits), ("--batches", t), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    cfg = dataclasses.replace(cfg, output=args.output)
    os.makedirs(args.output, exist_ok=True)
    progress = False if args.no_progress else None
    session = api.open_session(cfg)
    if meta is not None:
        load_editor_state(args.checkpoint, session.editor)
    records = api.load_split(data, "eval", cfg)
    try:
        curve_at = tuple(int(x) for x in args.curve.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--curve: expected comma-separated batch counts such as 1,2,5, got {args.curve!r}") from None
    if args.fluency_tokens < 0:
        raise ValueError(f"--fluency-tokens must be >= 0, got {args.fluency_tokens}")
    rows = [("unedited", api.evaluate_protocol(session, records, mode, n_edits, t, edit=False, progress=progress,
                                               batch_size=args.batch_size, fluency_tokens=args.fluency_tokens))]
    if meta is not None:
        k = args.steps or cfg.editor.n_steps
        rows.append((f"{cfg.editor.name} K={k}",
                     api.evaluate_protocol(session, records, mode, n_edits, t, k, progress=progress,
                                           batch_size=args.batch_size, curve_at=curve_at,
                                           fluency_tokens=args.fluency_tokens)))
    shown = t if mode == "sequential" else 1
    title = (f"{cfg.model.name}, {data}: {mode} {shown} x {n_edits} edits, seed {cfg.seed}, device {session.device}"
             + (f", checkpoint {args.checkpoint} (trained {meta['training_step']} batches)" if meta else ""))
    table = results_table(rows, title)
    print("\n" + table + "\n")
    plots = plot_curves({name: m.get("curve", []) for name, m in rows}, args.output)
    with open(os.path.join(args.output, "report.md"), "w") as f:
        f.write("# Evaluation report\n\n" + table + "\n")
        for path in plots:
            f.write(f"\n![{os.path.basename(path)}]({os.path.basename(path)})\n")
    write_json(os.path.join(args.output, "results.json"),
               {"title": title, "rows": {name: m for name, m in rows}, "checkpoint": args.checkpoint, "data": data})
    log.info("wrote %s", ", ".join([os.path.join(args.output, n) for n in ("results.json", "report.md")] + plots))
    return 0


def _as_dict(cfg) -> dict:
    from emsedit_fast.config import to_dict

    return to_dict(cfg)


def _apply_flags(cfg, args):
    """Command-line flags over a checkpoint's config (model location, device, dtype, backend). --steps is applied
    per evaluation (fewer MSBP steps than trained), never to the editor's shape."""
    import dataclasses

    model = dataclasses.replace(cfg.model, **{k: v for k, v in (("name", args.model), ("device", args.device),
                                                               ("dtype", args.dtype)) if v})
    editor = dataclasses.replace(cfg.editor, **{k: v for k, v in (("backend", args.backend),) if v})
    return dataclasses.replace(cfg, model=model, editor=editor)


if __name__ == "__main__":
    sys.exit(main())
