"""Meta-training improves held-out edits over the untrained editor at equal locality: SmolLM2-135M, the zsRE profile
(slow tier: about 6 minutes on two CPU cores; needs the zsRE records, EMSEDIT_ZSRE or
../shared/data/zsre/zsre-train-800.json beside the repository, and skips without them).

The sweep command scores, on the zsRE validation part (records no editor trains on), the untrained profile editor
at its step size (eta 1e-3) and at the step size with the highest ES of the untrained frontier (1.5e-3, README "How
the defaults were chosen"), and the editor the profile trains for one epoch (cosine rate schedule). Measured on the
development machine: ES / GS / LS-agree 88.49 / 78.91 / 76.86 and 90.98 / 80.40 / 74.31 untrained, 92.84 / 80.68 /
79.24 trained. The test asks for the trained editor to sit above both untrained points on the trade-off: ES and
LS-agree higher than each, GS not lower, and the mean of the three at least 2 points above each point's mean (an
editor that training left unchanged is the first point and fails; a larger step alone buys ES with LS-agree and
fails against the first point's LS-agree).
On the tiny random LLaMA (test_meta_training_frontier.py) there is nothing to learn beyond the step size.
"""

import json
import os
from pathlib import Path

import pytest

from emsedit_fast import sweep

ZSRE = os.environ.get("EMSEDIT_ZSRE",
                      str(Path(__file__).resolve().parents[3] / "shared" / "data" / "zsre" / "zsre-train-800.json"))


def _points(tmp_path, name, *args):
    out = tmp_path / name
    assert sweep.main(["--train-data", ZSRE, "--no-progress", "--output", str(out), *args]) == 0
    return [p["scores"] for p in json.loads((out / "sweep.json").read_text())["points"]]


@pytest.mark.slow
def test_trained_zsre_editor_beats_the_untrained_editor_on_validation(tmp_path):
    if not os.path.exists(ZSRE):
        pytest.skip(f"zsRE records not found at {ZSRE} (set EMSEDIT_ZSRE)")
    start, widest = _points(tmp_path, "untrained", "--grid", "editor.eta_init=1e-3,1.5e-3")
    (trained,) = _points(tmp_path, "trained", "--train")

    def mean(p):
        return (p["es"] + p["gs"] + p["ls_agree"]) / 3

    for untrained in (start, widest):
        assert trained["es"] > untrained["es"] and trained["ls_agree"] > untrained["ls_agree"], (trained, untrained)
        assert trained["gs"] >= untrained["gs"], (trained, untrained)
        assert mean(trained) >= mean(untrained) + 2, (trained, untrained)
