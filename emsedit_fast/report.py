"""Markdown result tables shared by the train, compare and evaluate commands."""

from __future__ import annotations

# (column, metric key of emsedit_fast.evaluation): LS is the CounterFact margin, LS-gold the zsRE/facts accuracy
# against the gold answer, LS-agree the agreement with the unedited model's predictions, Port. two-hop portability.
METRIC_COLUMNS = (("ES", "es"), ("GS", "gs"), ("LS", "ls"), ("LS-gold", "ls_gold"), ("LS-agree", "ls_agree"),
                  ("Port.", "ps"))


def results_table(rows: list[tuple[str, dict]], title: str) -> str:
    """| method | ES | GS | LS | ... | train s/edit | edit s/edit | for rows of (name, metrics in percent)."""
    present = [(h, k) for h, k in METRIC_COLUMNS if any(isinstance(m.get(k), (int, float)) for _, m in rows)]
    lines = [f"**{title}**", "", "| method | " + " | ".join(h for h, _ in present) + " | train s/edit | edit s/edit |",
             "|" + "---|" * (len(present) + 3)]
    for name, m in rows:
        cells = [f"{m[k]:.2f}" if isinstance(m.get(k), (int, float)) else "-" for _, k in present]
        train = m.get("train_seconds_per_edit")
        edit = m.get("edit_seconds_per_edit") if m.get("protocol", {}).get("edited", True) else None
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'-' if train is None else f'{train:.3f}'} | "
                     f"{'-' if edit is None else f'{edit:.3f}'} |")
    return "\n".join(lines)
