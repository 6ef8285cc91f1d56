"""Ratios between the providers of one benchmark case (pure Python: used by conftest.py and report.py).

Every ratio names its denominator; speedups are denominator / this provider (higher is better):

    vs_reference      median(reference) / median(x)            the published path
    vs_competent      median(competent) / median(x)            the same algorithm in plain PyTorch
    vs_compiled       median(competent_compiled) / median(x)
    vs_best_competent min(median(competent), median(competent_compiled)) / median(x)
    *_best            the same with the best (least disturbed) round of each
    mem_vs_reference, mem_vs_competent   peak(x) / peak(denominator)   (lower is better)
    x_floor           median(x) / median(floor)                the end-to-end multiple of the bare forward+backward
    vs_competent_paired  median(competent) / median(x), both from rounds timed side by side (the two take turns
                      within every round; _harness.paired_rounds): load drift falls on both alike

A ratio exists only when its denominator ran in the same process on the same device; otherwise it is None (n/a).
Runs that were not timed for real (Triton under the CPU interpreter) get no ratios.
"""

from __future__ import annotations

ORDER = ("floor", "floor_all_logits", "reference", "competent", "competent_compiled", "cpp", "triton")


def provider_rank(provider: str) -> int:
    return ORDER.index(provider) if provider in ORDER else len(ORDER)


def base_name(name: str) -> str:
    """'bench_apply_deltas_grouped[smollm2-...-cpp]' -> 'bench_apply_deltas_grouped'."""
    return name.split("[", 1)[0]


def record_of(bench: dict) -> dict | None:
    """One flat record from a pytest-benchmark JSON entry (None when it carries no case/provider params)."""
    params = bench.get("params") or {}
    info = bench.get("extra_info") or {}
    stats = bench.get("stats") or bench
    if "case" not in params or "provider" not in params or "median" not in stats:
        return None
    return {"name": base_name(bench["name"]), "case": params["case"], "provider": params["provider"],
            "median": stats["median"], "min": stats.get("min", stats["median"]), "peak": info.get("peak_bytes"),
            "device": info.get("device"), "pid": info.get("pid"), "timed": not info.get("interpreted", False),
            "paired": info.get("paired_s")}


def median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def _ratio(num, den):
    if num is None or den is None or den == 0:
        return None
    return num / den


def _paired(r: dict) -> float | None:
    p = r.get("paired") if r.get("timed") else None
    if not p or not p.get("self") or not p.get("competent"):
        return None
    return _ratio(median(p["competent"]), median(p["self"]))


def compute(records: list[dict]) -> dict[tuple[str, str], dict[str, dict[str, float | None]]]:
    """{(name, case): {provider: {ratio name: value or None}}} for every record."""
    by_case: dict[tuple[str, str], dict[str, dict]] = {}
    for r in records:
        by_case.setdefault((r["name"], r["case"]), {})[r["provider"]] = r
    out: dict[tuple[str, str], dict[str, dict[str, float | None]]] = {}
    for key, providers in by_case.items():
        for name, r in providers.items():

            def den(provider, r=r):
                base = providers.get(provider)
                ok = (base is not None and r["timed"] and base["timed"] and base["device"] == r["device"]
                      and base["pid"] == r["pid"])
                return base if ok else None

            ref, comp, compiled, floor = den("reference"), den("competent"), den("competent_compiled"), den("floor")
            best = min((b for b in (comp, compiled) if b), key=lambda b: b["median"], default=None)
            out.setdefault(key, {})[name] = {
                "vs_reference": _ratio(ref and ref["median"], r["median"]),
                "vs_reference_best": _ratio(ref and ref["min"], r["min"]),
                "vs_competent": _ratio(comp and comp["median"], r["median"]),
                "vs_competent_best": _ratio(comp and comp["min"], r["min"]),
                "vs_compiled": _ratio(compiled and compiled["median"], r["median"]),
                "vs_best_competent": _ratio(best and best["median"], r["median"]),
                "best_competent": best and best["provider"],
                "mem_vs_reference": _ratio(r["peak"], ref and ref["peak"]),
                "mem_vs_competent": _ratio(r["peak"], comp and comp["peak"]),
                "x_floor": _ratio(r["median"], floor and floor["median"]),
                "vs_competent_paired": _paired(r),
            }
    return out


def fmt(x: float | None, suffix: str = "x", digits: int = 2) -> str:
    """'12.3x', or 'n/a' for a missing ratio."""
    if x is None:
        return "n/a"
    if x >= 100:
        return f"{x:.0f}{suffix}"
    return f"{x:.{digits}f}{suffix}"
