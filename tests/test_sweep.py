"""The validation sweep: grid expansion, the Pareto front, and one sweep end to end on the tiny model in which a
point that changes the model section runs on its own model (never silently on the base one)."""

import json

import pytest

from emsedit_fast import api
from emsedit_fast import sweep
from emsedit_fast.config import load
from emsedit_fast.tuning import SweepPoint
from emsedit_fast.tuning import expand_grid
from emsedit_fast.tuning import pareto_front
from emsedit_fast.tuning import point_config
from emsedit_fast.tuning import untrained_blind_keys


def test_expand_grid_is_the_cartesian_product_with_joint_axes():
    assert expand_grid(["a.x=1,2", "b.y=3"]) == [["a.x=1", "b.y=3"], ["a.x=2", "b.y=3"]]
    assert expand_grid(["a.x=1|b.y=2,a.x=3|b.y=4"]) == [["a.x=1", "b.y=2"], ["a.x=3", "b.y=4"]]
    assert expand_grid([]) == [[]]
    # a YAML list is one value: its commas and regex bars do not split the axis
    assert expand_grid(["m.modules=[a|b,c],[d]", "e.r=1,2"]) == [
        ["m.modules=[a|b,c]", "e.r=1"], ["m.modules=[a|b,c]", "e.r=2"],
        ["m.modules=[d]", "e.r=1"], ["m.modules=[d]", "e.r=2"]]
    assert expand_grid(["m.modules=['x.(1|2)', 'y.[3-4]'],[d]"]) == [["m.modules=['x.(1|2)', 'y.[3-4]']"],
                                                                    ["m.modules=[d]"]]
    assert expand_grid(["m.modules=[a,b]|e.r=1,m.modules=[c]|e.r=2"]) == [
        ["m.modules=[a,b]", "e.r=1"], ["m.modules=[c]", "e.r=2"]]
    with pytest.raises(ValueError, match="must look like key=value1,value2"):
        expand_grid(["novalues"])


def test_untrained_sweeps_name_the_keys_they_cannot_tell_apart():
    grid = expand_grid(["editor.rank=128,256", "train.reg_coef=0,0.01", "train.prior_records=100,300",
                        "train.mode=batch",
                        "editor.eta_init=1e-3"])
    assert untrained_blind_keys(grid) == ["editor.rank", "train.reg_coef"]
    assert untrained_blind_keys(expand_grid(["editor.key_prior=0,1000"])) == []


def test_sweep_points_keep_the_profiles_k():
    """A profile at K = 3 (CounterFact's) sweeps K = 3 editors: the point's config once fell back to K = 1 for every
    K but 2; a grid over K still sets it."""
    for k in (1, 2, 3, 5):
        profile = {"editor": {"n_steps": k, "rank": 64}}
        base = load("emsedit", defaults=profile)
        assert point_config(base, [], profile).editor.n_steps == k
        assert point_config(base, ["train.reg_coef=0.1"], profile).editor.n_steps == k
    assert point_config(base, ["editor.n_steps=2"], profile).editor.n_steps == 2
    with pytest.raises(ValueError, match="no comparison method runs malmen at K = 3"):
        point_config(load("malmen", extra={"editor": {"n_steps": 3}}), [], {})


def test_pareto_front_by_hand():
    pts = [SweepPoint(["p"], {"es": 90, "gs": 60, "ls_agree": 30}),
           SweepPoint(["q"], {"es": 80, "gs": 60, "ls_agree": 70}),
           SweepPoint(["r"], {"es": 80, "gs": 50, "ls_agree": 70}),   # dominated by q
           SweepPoint(["s"], {"es": 90, "gs": 60, "ls_agree": 30})]   # ties with p: both kept
    pareto_front(pts)
    assert [p.pareto for p in pts] == [True, True, False, True]


def test_sweep_loads_a_model_per_model_config(tmp_path, monkeypatch):
    loaded = []
    real = api.load_model

    def counting(cfg):
        loaded.append(cfg.model.dtype)
        return real(cfg)

    monkeypatch.setattr(api, "load_model", counting)
    out = tmp_path / "sweep"
    code = sweep.main(["--model", "tiny-llama", "--device", "cpu", "--no-progress", "--n-edits", "2",
                       "--eval-batches", "1", "--set", "editor.rank=8", "--set", "editor.key_prior=0",
                       "--set", "editor.edit_prior=0", "--grid", "model.dtype=float32,bfloat16",
                       "--grid", "editor.eta_init=1e-3,1e-2", "--output", str(out)])
    assert code == 0
    assert loaded == ["float32", "bfloat16"]  # one load per distinct model config, reused by its two points
    points = json.loads((out / "sweep.json").read_text())["points"]
    assert [p["overrides"] for p in points] == [["model.dtype=float32", "editor.eta_init=1e-3"],
                                                ["model.dtype=float32", "editor.eta_init=1e-2"],
                                                ["model.dtype=bfloat16", "editor.eta_init=1e-3"],
                                                ["model.dtype=bfloat16", "editor.eta_init=1e-2"]]
    assert all(0 <= p["scores"]["es"] <= 100 for p in points)
    assert (out / "sweep.md").read_text().count("\n| `") == 4
