"""Ratios between providers of one benchmark case (pure Python: used by conftest.py and by report.py).

For every (benchmark function, case) the reference provider is the denominator:

    speedup_vs_reference = median_reference / median_x        (higher is better)
    speedup_vs_compiled  = median_reference_compiled / median_x
    mem_ratio            = peak_x / peak_reference            (lower is better)

A ratio exists only when its denominator ran in the same process on the same device (DESIGN.md 7.2); otherwise it
is None and printed as n/a. Runs that were not timed for real (Triton under the CPU interpreter) get no ratios.
"""

from __future__ import annotations

REFERENCE = "reference"
COMPILED = "reference_compiled"


def base_name(name: str) -> str:
    """'bench_apply_deltas_grouped[smollm2-...-cpp]' -> 'bench_apply_deltas_grouped'."""
    return name.split("[", 1)[0]


def record_of(bench: dict) -> dict | None:
    """One flat record from a pytest-benchmark JSON entry (or None when it carries no case/provider params)."""
    params = bench.get("params") or {}
    info = bench.get("extra_info") or {}
    stats = bench.get("stats") or bench
    if "case" not in params or "provider" not in params or "median" not in stats:
        return None
    return {
        "name": base_name(bench["name"]),
        "case": params["case"],
        "provider": params["provider"],
        "median": stats["median"],
        "min": stats.get("min", stats["median"]),
        "peak": info.get("peak_bytes"),
        "device": info.get("device"),
        "pid": info.get("pid"),
        "timed": not info.get("interpreted", False),
    }


def _ratio(num, den):
    if num is None or den is None or den == 0:
        return None
    return num / den


def compute(records: list[dict]) -> dict[tuple[str, str], dict[str, dict[str, float | None]]]:
    """{(name, case): {provider: {speedup_vs_reference, speedup_vs_compiled, mem_ratio}}} for every record."""
    by_case: dict[tuple[str, str], dict[str, dict]] = {}
    for r in records:
        by_case.setdefault((r["name"], r["case"]), {})[r["provider"]] = r
    out: dict[tuple[str, str], dict[str, dict[str, float | None]]] = {}
    for key, providers in by_case.items():
        ref = providers.get(REFERENCE)
        comp = providers.get(COMPILED)
        for name, r in providers.items():

            def same_run(base):
                return (base is not None and r["timed"] and base["timed"] and base["device"] == r["device"]
                        and base["pid"] == r["pid"])

            out.setdefault(key, {})[name] = {
                "speedup_vs_reference": _ratio(ref["median"], r["median"]) if same_run(ref) else None,
                # best-of-rounds ratio: on a shared machine the least-disturbed round of each provider
                "speedup_vs_reference_min": _ratio(ref["min"], r["min"]) if same_run(ref) else None,
                "speedup_vs_compiled": _ratio(comp["median"], r["median"]) if same_run(comp) else None,
                "mem_ratio": _ratio(r["peak"], ref["peak"]) if same_run(ref) else None,
            }
    return out


def fmt(x: float | None, suffix: str = "x", digits: int = 2) -> str:
    """'12.3x', or 'n/a' for a missing ratio."""
    if x is None:
        return "n/a"
    if x >= 100:
        return f"{x:.0f}{suffix}"
    return f"{x:.{digits}f}{suffix}"
