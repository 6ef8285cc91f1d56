"""Side-by-side timing in the benchmarks: the providers take turns, and the report judges a fused op by the ratio
that names its denominator."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import _harness  # noqa: E402
import _ratios  # noqa: E402
import report  # noqa: E402


def test_paired_rounds_alternate_and_reverse_the_order():
    log = []
    calls = {name: (lambda name=name: log.append(name), lambda name=name: log.append(f"setup {name}"))
             for name in ("self", "competent")}
    times = _harness.paired_rounds(calls, 3, "cpu")
    assert log == ["setup self", "self", "setup competent", "competent",
                   "setup competent", "competent", "setup self", "self",
                   "setup self", "self", "setup competent", "competent"]
    assert {k: len(v) for k, v in times.items()} == {"self": 3, "competent": 3}
    assert all(t >= 0 for v in times.values() for t in v)


def _bench(provider, median, paired=None, case="c"):
    info = {"device": "cpu", "pid": 1}
    if paired is not None:
        info["paired_s"] = paired
    return {"name": "bench_x[c-" + provider + "]", "params": {"case": case, "provider": provider},
            "stats": {"median": median, "min": median}, "extra_info": info}


def test_paired_ratio_is_the_ratio_of_the_side_by_side_medians():
    recs = [_ratios.record_of(b) for b in (
        _bench("competent", 2.0),
        _bench("cpp", 4.0, {"self": [1.0, 3.0, 2.0], "competent": [2.0, 2.5, 3.5, 3.0]}))]
    out = _ratios.compute(recs)[("bench_x", "c")]
    assert out["cpp"]["vs_competent"] == pytest.approx(0.5)  # medians of the two separate runs
    assert out["cpp"]["vs_competent_paired"] == pytest.approx(2.75 / 2.0)  # medians of the paired rounds
    assert out["competent"]["vs_competent_paired"] is None


def test_the_report_judges_by_the_side_by_side_ratio_unless_compile_is_the_best_baseline():
    e = {"vs_best_competent": 0.8, "best_competent": "competent", "vs_competent_paired": 1.1}
    assert report.decisive(e) == (1.1, "competent, side by side")
    assert report.decisive({**e, "vs_competent_paired": None}) == (0.8, "competent")
    # torch.compile was faster: it cannot be timed side by side, its own ratio decides
    assert report.decisive({**e, "best_competent": "competent_compiled"}) == (0.8, "competent_compiled")
    assert report.decisive({**e, "vs_best_competent": None}) == (None, None)


def test_the_editor_tables_state_the_step_peak_as_a_multiple_of_the_edited_weights():
    # one LLaMA-3 gate/up layer in fp32: 4096 x 14336 x 4 B = 224 MiB; a 35.84 MiB peak is 0.16 of it
    info = {"layers": 1, "d_in": 4096, "d_out": 14336, "dtype": "fp32", "peak_bytes": 0.16 * 4096 * 14336 * 4}
    assert abs(report._peak_per_weights(info) - 0.16) < 1e-12
    # bf16 halves the weights' bytes, so the same peak is twice the multiple; eleven layers divide it by eleven
    assert abs(report._peak_per_weights({**info, "dtype": "bf16"}) - 0.32) < 1e-12
    assert abs(report._peak_per_weights({**info, "layers": 11}) - 0.16 / 11) < 1e-12
    # nothing measured or an unknown dtype: no ratio rather than a made-up one
    assert report._peak_per_weights({**info, "peak_bytes": None}) is None
    assert report._peak_per_weights({**info, "dtype": "int8"}) is None
