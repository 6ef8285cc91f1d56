"""Result files shared by the train, compare, evaluate and distributed commands: Markdown tables and JSON."""

from __future__ import annotations

import json
import math
import os
from typing import Any

# (column, metric key of emsedit_fast.evaluation): LS is the CounterFact margin, LS-gold the zsRE/facts accuracy
# against the gold answer, LS-agree the agreement with the unedited model's predictions, Port. two-hop portability,
# Fluency the n-gram entropy of greedy generations (bits, not percent).
METRIC_COLUMNS = (("ES", "es"), ("GS", "gs"), ("LS", "ls"), ("LS-gold", "ls_gold"), ("LS-agree", "ls_agree"),
                  ("Port.", "ps"), ("Fluency", "fluency"))


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
