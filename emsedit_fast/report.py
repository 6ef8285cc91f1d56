"""Result files shared by the commands: Markdown tables, JSON, and the plots (metrics against the number of edits,
editing time per edit, the validation learning curve)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

# (column, metric key of emsedit_fast.metrics): LS is the CounterFact margin, LS-gold the zsRE/facts accuracy
# against the gold answer, LS-agree the agreement with the unedited model's predictions, Port. two-hop portability,
# Fluency the n-gram entropy of greedy generations (bits, not percent).
METRIC_COLUMNS = (("ES", "es"), ("GS", "gs"), ("LS", "ls"), ("LS-gold", "ls_gold"), ("LS-agree", "ls_agree"),
                  ("Port.", "ps"), ("Fluency", "fluency"))


def _cell(m: dict, key: str) -> str:
    value = m.get(key)
    if not isinstance(value, (int, float)):
        return "-"
    spread = m.get(key + "_spread")
    if spread and spread["max"] > spread["min"]:  # several slices: mean (min-max)
        return f"{value:.2f} ({spread['min']:.1f}-{spread['max']:.1f})"
    return f"{value:.2f}"


def results_table(rows: list[tuple[str, dict]], title: str) -> str:
    """| method | ES | GS | LS | ... | train s/edit | edit s/edit | for rows of (name, metrics in percent); a metric
    averaged over several protocol slices shows its range in parentheses."""
    present = [(h, k) for h, k in METRIC_COLUMNS if any(isinstance(m.get(k), (int, float)) for _, m in rows)]
    lines = [f"**{title}**", "", "| method | " + " | ".join(h for h, _ in present) + " | train s/edit | edit s/edit |",
             "|" + "---|" * (len(present) + 3)]
    for name, m in rows:
        cells = [_cell(m, k) for _, k in present]
        train = m.get("train_seconds_per_edit")
        edit = m.get("edit_seconds_per_edit") if m.get("protocol", {}).get("edited", True) else None
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'-' if train is None else f'{train:.3f}'} | "
                     f"{'-' if edit is None else f'{edit:.3f}'} |")
    return "\n".join(lines)


def show_table(table: str, path: str) -> str:
    """Print a results table between blank lines and write it, newline-terminated, to `path` (results.md,
    sweep.md); returns the table."""
    print("\n" + table + "\n")
    with open(path, "w") as f:
        f.write(table + "\n")
    return table


def _json_ready(value: Any) -> Any:
    """NaN and infinities become null (a metric with nothing to score is NaN; bare NaN is not JSON), other
    non-JSON values their str()."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def write_json(path: str, payload: Any) -> None:
    """Write strict JSON atomically: a temporary file in the same folder, then os.replace, so a reader never sees
    half a file and an interrupted run leaves the previous results in place."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(_json_ready(payload), f, indent=2, allow_nan=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


PLOTTED = (("es", "ES"), ("gs", "GS"), ("ls", "LS"), ("ls_gold", "LS-gold"), ("ls_agree", "LS-agree"), ("ps", "Port."))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(curves: dict[str, list[dict]], output: str) -> list[str]:
    """metrics_vs_edits.png and time_per_edit.png from {row name: curve points}; returns the files written."""
    files = []
    curves = {name: pts for name, pts in curves.items() if pts}
    if not curves:
        return files
    plt = _pyplot()
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


def plot_learning_curve(curve: list[dict], output: str, name: str) -> str:
    """learning_curve.png: validation ES / GS / LS / LS-agree against the fraction of training done."""
    plt = _pyplot()
    keys = [(k, h) for k, h in PLOTTED if any(k in p for p in curve)]
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    for key, header in keys:
        ax.plot([p["fraction"] for p in curve], [p[key] for p in curve], marker="o", label=header)
    ax.set_xlabel("fraction of meta-training")
    ax.set_ylabel("% on the validation split")
    ax.set_title(name)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(output, "learning_curve.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
