"""Benchmark options, case/provider parametrisation, JSON metadata and the ratio summary (DESIGN.md section 7).

    pytest benchmarks/ --benchmark-only                 full grid for this device
    pytest benchmarks/ --benchmark-only --smoke         tiny shapes, 1 round, correctness still checked (CI)

Each benchmark declares its family and providers with `@pytest.mark.bench("apply_deltas", providers=...)`;
`pytest_generate_tests` turns that into (case, provider) pairs, the reference first so the others can reuse its
result in their correctness gate. Both params are plain strings, so they survive into the JSON.
"""

from __future__ import annotations

import os
import sys

# Before anything imports transformers: a hub look-up without network costs close to a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _harness and _ratios (import-mode=importlib)

import _harness  # noqa: E402
import _ratios  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


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
                    help="which cases get a reference_compiled provider (auto: all on CUDA, the primary case of each "
                         "op on the CPU, none with --smoke)")


def pytest_configure(config):
    config.addinivalue_line("markers", "bench(family, providers=...): benchmark family and providers (benchmarks/)")
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


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("bench")
    if marker is None or "case" not in metafunc.fixturenames:
        return
    family = marker.args[0]
    providers = marker.kwargs.get("providers", _harness.PROVIDERS)
    s = _harness.SETTINGS
    pairs, ids = [], []
    for case in _harness.cases(family, smoke=s.smoke, device=s.device):
        for provider in providers:
            pairs.append((str(case), provider))
            ids.append(f"{case}-{provider}")
    metafunc.parametrize("case,provider", pairs, ids=ids)


@pytest.fixture(scope="session")
def device() -> str:
    return _harness.SETTINGS.device


@pytest.fixture(scope="session")
def smoke() -> bool:
    return _harness.SETTINGS.smoke


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


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["emsedit_fast"] = _harness.environment(_harness.SETTINGS.device)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Add device, versions and git revision at the top, and the ratios to every benchmark's extra_info."""
    env = _harness.environment(_harness.SETTINGS.device)
    output_json["emsedit_fast"] = env
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
    if bs is None:
        return
    records = _records(bs.benchmarks)
    if not records:
        return
    ratios = _ratios.compute(records)
    tr = terminalreporter
    env = _harness.environment(_harness.SETTINGS.device)
    tr.section("emsedit_fast: speedup and memory vs reference (same process, same device)")
    tr.write_line(f"device {env['device']} ({env['device_name']}), {env['cpu_count']} CPUs, "
                  f"{env['torch_threads']} torch threads, torch {env['versions']['torch']}, "
                  f"git {env['git']['sha'][:10]}{'+dirty' if env['git']['dirty'] else ''}, "
                  f"memory probe {env['memory_probe']}{', SMOKE' if env['smoke'] else ''}")
    by_key: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        by_key.setdefault((r["name"], r["case"]), []).append(r)
    width = max(len(f"{n}[{c}]") for n, c in by_key)
    tr.write_line(f"{'benchmark[case]':<{width}}  {'provider':<18} {'median':>10}  {'vs ref':>8} {'vs comp':>8} "
                  f"{'mem':>7}")
    for (name, case), rows in sorted(by_key.items()):
        for r in sorted(rows, key=lambda r: _harness.PROVIDERS.index(r["provider"])
                        if r["provider"] in _harness.PROVIDERS else 99):
            q = ratios[(name, case)][r["provider"]]
            tr.write_line(f"{name + '[' + case + ']':<{width}}  {r['provider']:<18} {_fmt_s(r['median']):>10}  "
                          f"{_ratios.fmt(q['speedup_vs_reference']):>8} {_ratios.fmt(q['speedup_vs_compiled']):>8} "
                          f"{_ratios.fmt(q['mem_ratio']):>7}")


def _fmt_s(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"
