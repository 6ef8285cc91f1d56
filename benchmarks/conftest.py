"""Benchmark options, case/provider parametrisation, JSON metadata and the ratio summary.

    pytest benchmarks/ --benchmark-only                 the full grid for this device
    pytest benchmarks/ --benchmark-only --smoke         tiny shapes, 1 round, correctness gates still on (CI)

Each benchmark names its spec with `@pytest.mark.bench(SPEC)` (an `_harness.OpSpec`, or an engine workload with
`cases()` and `providers`); `pytest_generate_tests` turns it into (case, provider) pairs, the reference first, so the
other providers of a case reuse its inputs. Both params are plain strings and survive into the JSON.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from typing import Any

# Before anything imports transformers: a hub look-up without network costs close to a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _harness, _cases, ... (import-mode=importlib)

import _cases  # noqa: E402
import _harness  # noqa: E402
import _memory  # noqa: E402
import _ratios  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from emsedit_fast import ops  # noqa: E402
from emsedit_fast.ops._dispatch import interpreting  # noqa: E402
from emsedit_fast.ops._dispatch import triton_unavailable  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("emsedit_fast benchmarks")
    group.addoption("--smoke", action="store_true", default=False,
                    help="tiny shapes and tiny models, 1 round each; correctness gates still run (CI)")
    group.addoption("--bench-device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="device to benchmark on (auto: cuda when available)")
    group.addoption("--time-budget", type=float, default=None,
                    help="target timed seconds per benchmark (default 1.0; rounds follow from the first call)")
    group.addoption("--threads", type=int, default=None,
                    help="torch.set_num_threads for the run (default: torch's own choice, one per core)")
    group.addoption("--compiled", default="auto", choices=("auto", "all", "primary", "none"),
                    help="which cases get a competent_compiled provider (auto: all on CUDA, the primary case of each "
                         "op on the CPU, none with --smoke)")
    group.addoption("--zsre-data", default=os.environ.get("EMSEDIT_ZSRE", "../shared/data/zsre/zsre-train-800.json"),
                    help="zsRE records for the end-to-end benchmarks on SmolLM2 (read at run time; relative paths "
                         "from the repository root; env EMSEDIT_ZSRE)")


def pytest_configure(config):
    global START
    START = _usage()
    config.addinivalue_line("markers", "bench(spec, providers=...): the spec a benchmark runs (benchmarks/)")
    threads = config.getoption("--threads", default=None)
    if threads:
        torch.set_num_threads(threads)
    device = config.getoption("--bench-device", default="auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    _harness.configure(smoke=config.getoption("--smoke", default=False), device=device,
                       compiled=config.getoption("--compiled", default="auto"))
    budget = config.getoption("--time-budget", default=None)
    if budget:
        _harness.SETTINGS.time_budget_s = budget
    data = config.getoption("--zsre-data", default=None)
    if data and not os.path.isabs(data):
        data = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), data)
    _harness.SETTINGS.zsre_data = data


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("bench")
    if marker is None or "case" not in metafunc.fixturenames:
        return
    spec = marker.args[0]
    providers = marker.kwargs.get("providers", spec.providers)
    s = _harness.SETTINGS
    pairs, ids = [], []
    for case in _cases.register(spec.cases(s.smoke, s.device)):
        for provider in providers:
            pairs.append((str(case), provider))
            ids.append(f"{case}-{provider}")
    metafunc.parametrize("case,provider", pairs, ids=ids)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """The gate tests (test_*.py here) run with --benchmark-only too, which pytest-benchmark would skip as
    non-benchmarks: they are how CI knows the gates can fail."""
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if os.path.basename(str(item.fspath)).startswith("test_") and str(item.fspath).startswith(here):
            item.own_markers = [m for m in item.own_markers
                                if not (m.name == "skip" and "--benchmark-only" in str(m.kwargs.get("reason", "")))]


@pytest.fixture(scope="session")
def device() -> str:
    return _harness.SETTINGS.device


@pytest.fixture(scope="session", autouse=True)
def _warm_up(device):
    """Start the thread pools and lazy initialisations once, so the first benchmark does not pay for them."""
    a = torch.randn(256, 256, device=device)
    (a @ a).sum().item()
    torch.linalg.cholesky(a @ a.T + 256 * torch.eye(256, device=device))
    import gc

    gc.collect()
    gc.freeze()  # the imported modules never die: later collections (between cases) skip them
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# ----------------------------------------------------------------------------------------------------------------------
# JSON metadata and ratios

# pytest-benchmark writes the machine (machine_info: CPU, cores, Python) and the commit (commit_info); the
# `emsedit_fast` block adds only what they lack: torch threads, niceness, library versions, the extension's kernels
# and how loaded the cores were while the run went on.

START: dict | None = None  # _usage() when the session started


def _usage() -> dict[str, Any]:
    """Load averages, the machine's busy CPU seconds (/proc/stat) and this process's own CPU seconds."""
    out: dict[str, Any] = {"wall": time.time(), "loadavg": None, "busy_s": None}
    try:
        out["loadavg"] = [round(x, 2) for x in os.getloadavg()]
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
        out["busy_s"] = (sum(fields[:8]) - fields[3] - fields[4]) / tick  # all but idle and iowait
    except (OSError, ValueError, IndexError):
        pass
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # torch.compile's worker processes
    out["own_s"] = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    return out


def core_usage() -> dict[str, Any]:
    """How loaded the cores were from configure() to now: load averages at both ends, and the share of all cores'
    time that other processes used (machine busy time minus this process's own CPU time)."""
    start, end = START or _usage(), _usage()
    out = {"loadavg_start": start["loadavg"], "loadavg_end": end["loadavg"], "wall_s": end["wall"] - start["wall"]}
    if start["busy_s"] is not None and end["busy_s"] is not None and out["wall_s"] > 0:
        capacity = out["wall_s"] * (os.cpu_count() or 1)
        own = end["own_s"] - start["own_s"]
        out["own_core_share"] = own / capacity
        out["other_core_share"] = max(0.0, (end["busy_s"] - start["busy_s"] - own) / capacity)
    return out


def environment(device: str) -> dict[str, Any]:
    """What BENCHMARKS.md needs beyond pytest-benchmark's machine_info and commit_info."""
    import importlib.metadata as md

    from emsedit_fast import _ext

    versions = {}
    for dist in ("torch", "triton", "transformers", "numpy", "emsedit_fast"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = "not installed"
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "niceness": os.nice(0),
        "versions": versions,
        "cpp_extension": _ext.load_error() or "loaded",
        "cpp_kernels": sorted(op for names in ops.OPS_BY_STEM.values() for op in names
                              if not _harness.skip_provider(op, "cpp", device)),
        "triton": triton_unavailable() or ("interpreter" if interpreting() else "cuda"),
        "smoke": _harness.SETTINGS.smoke,
        "compiled": _harness.SETTINGS.compiled,
        "memory_probe": _memory.MALLOC.method if device == "cpu" else "cuda_allocator",
        "time_budget_s": _harness.SETTINGS.time_budget_s,
        **core_usage(),
    }



SKIPPED: list[dict] = []  # benchmarks that did not run, with the reason (written into the JSON for report.py)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    params = getattr(getattr(item, "callspec", None), "params", {})
    if report.skipped and "case" in params and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        SKIPPED.append({"name": item.originalname, "case": params["case"], "provider": params.get("provider"),
                        "reason": reason.removeprefix("Skipped: ")})


def _records(benchmarks) -> list[dict]:
    out = []
    for bench in benchmarks:
        if not bench:
            continue
        r = _ratios.record_of({"name": bench.name, "params": bench.params, "extra_info": bench.extra_info,
                               "stats": {"median": bench.stats.median, "min": bench.stats.min}})
        if r is not None:
            out.append(r)
    return out


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """What pytest-benchmark's machine_info and commit_info lack (threads, versions, kernels, core load), the
    command line, the skipped benchmarks with their reasons, and the ratios in every benchmark's extra_info."""
    output_json["emsedit_fast"] = environment(_harness.SETTINGS.device)
    output_json["emsedit_fast_skipped"] = SKIPPED
    output_json["emsedit_fast_command"] = " ".join(config.invocation_params.args)
    ratios = _ratios.compute(_records(benchmarks))
    for entry in output_json.get("benchmarks", []):
        params = entry.get("params") or {}
        got = ratios.get((_ratios.base_name(entry["name"]), params.get("case")), {}).get(params.get("provider"))
        if got is not None:
            entry.setdefault("extra_info", {}).update(got)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bs = getattr(config, "_benchmarksession", None)
    records = _records(bs.benchmarks) if bs is not None else []
    if not records:
        return
    ratios = _ratios.compute(records)
    tr = terminalreporter
    env = environment(_harness.SETTINGS.device)
    tr.section("emsedit_fast: x = median of the named provider / median of this one (same process)")
    tr.write_line(f"device {env['device']}, {env['torch_threads']} torch threads, torch {env['versions']['torch']}, "
                  f"load average {env['loadavg_start']} -> {env['loadavg_end']}"
                  + (f", other processes used {100 * env['other_core_share']:.0f}% of the cores"
                     if env.get("other_core_share") is not None else "") + (", SMOKE" if env["smoke"] else ""))
    by_key: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        by_key.setdefault((r["name"], r["case"]), []).append(r)
    width = max(len(f"{n}[{c}]") for n, c in by_key)
    tr.write_line(f"{'benchmark[case]':<{width}}  {'provider':<18} {'median':>10}  {'vs ref':>8} {'vs comp':>8} "
                  f"{'mem/comp':>8}")
    for (name, case), rows in sorted(by_key.items()):
        for r in sorted(rows, key=lambda r: _ratios.provider_rank(r["provider"])):
            q = ratios[(name, case)][r["provider"]]
            tr.write_line(f"{name + '[' + case + ']':<{width}}  {r['provider']:<18} {_fmt_s(r['median']):>10}  "
                          f"{_ratios.fmt(q['vs_reference']):>8} {_ratios.fmt(q['vs_competent']):>8} "
                          f"{_ratios.fmt(q['mem_vs_competent']):>8}")


def _fmt_s(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"
