"""The strict config loader: unknown keys, type coercion, Literal checks, ranges, presets, overrides, profiles."""

import pytest
import yaml

from emsedit_fast.config import ConfigError
from emsedit_fast.config import RunConfig
from emsedit_fast.config import build
from emsedit_fast.config import load
from emsedit_fast.config import to_dict


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'editor.rnak' \(did you mean 'rank'\?\)"):
        load("emsedit", overrides=["editor.rnak=3"])


def test_yaml_strings_and_ints_are_coerced_to_the_declared_type():
    cfg = load("emsedit", overrides=["editor.eta_init=1e-6", "train.meta_lr=1", "editor.rank=64"])
    assert cfg.editor.eta_init == 1e-6 and isinstance(cfg.train.meta_lr, float) and cfg.editor.rank == 64
    cfg = build(RunConfig, {"editor": {"eta_init": "1e-6"}})  # PyYAML reads 1e-6 as a string
    assert cfg.editor.eta_init == 1e-6


def test_literal_and_range_violations_are_clear():
    with pytest.raises(ConfigError, match="train.mode: 'online' is not one of"):
        load("emsedit", overrides=["train.mode=online"])
    with pytest.raises(ConfigError, match="train.prior_positions: 'last' is not one of"):
        load("emsedit", overrides=["train.prior_positions=last"])
    with pytest.raises(ConfigError, match="editor.n_steps: must be in 1..8"):
        load("emsedit", overrides=["editor.n_steps=0"])
    with pytest.raises(ConfigError, match="editor.rank: expected an integer"):
        load("emsedit", overrides=["editor.rank=big"])


def test_presets_set_each_method_and_mode_choice():
    assert load("malmen").train.mode == "batch" and load("malmen").train.loss == "kl"
    assert load("rledit").train.loss == "rledit_decay"
    assert load("mend").editor.aggregation == "outer" and load("mend").editor.n_blocks == 2
    ems = load("emsedit", mode="batch")
    assert ems.editor.n_steps == 2 and ems.train.mode == "batch" and ems.train.loss == "l2"
    with pytest.raises(ConfigError, match="no editor preset 'romE'"):
        load("romE")


def test_reference_profile_applies_the_published_choices():
    seq = load("emsedit", overrides=["profile=reference"])
    assert seq.train.seq_optimizer_step == "once_at_end" and seq.train.reg_coef == 0.25
    batch = load("emsedit", mode="batch", overrides=["profile=reference"])
    assert batch.train.reg_coef == 0.5 and batch.train.batch_step_chaining == "reset"


def test_config_files_and_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("editor: {rank: 32}\ntrain: {n_batches: 7}\n")
    cfg = load("emsedit", files=[str(path)], defaults={"editor": {"rank": 16}}, overrides=["train.n_batches=9"])
    assert cfg.editor.rank == 32 and cfg.train.n_batches == 9
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load("emsedit", files=[str(bad)])


def test_round_trip_through_a_plain_dict():
    cfg = load("rledit", overrides=["model.modules=a.*,b.*"])
    assert cfg.model.modules == ("a.*", "b.*")
    assert build(RunConfig, to_dict(cfg)) == cfg


def test_dataset_profile_edits_its_module_list_only_on_its_model(tmp_path):
    """The zsRE profile's SmolLM2 module list applies to SmolLM2 runs that name no modules; another model keeps its
    architecture's list, and the command line wins."""
    import argparse
    import json

    from emsedit_fast.config import add_run_arguments
    from emsedit_fast.profiles import SMOLLM2_LATE_DOWN_MLP
    from emsedit_fast.profiles import resolve_run

    path = tmp_path / "zsre.json"
    path.write_text(json.dumps([{"subject": f"s{i}", "src": f"What is q{i}?", "pred": "p", "rephrase": f"Say q{i}?",
                                 "alt": f"a{i}", "answers": [f"g{i}"], "loc": f"nq question: where {i}",
                                 "loc_ans": "l", "cond": "c"} for i in range(20)]))
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    parser.add_argument("--train-data")

    def modules(*argv):
        cfg, plan = resolve_run(parser.parse_args(["--train-data", str(path), *argv]))
        assert plan.name == "small-zsre"
        return cfg.model.modules

    assert modules() == SMOLLM2_LATE_DOWN_MLP and "smollm2-135m" in resolve_run(
        parser.parse_args(["--train-data", str(path)]))[1].modules
    assert modules("--model", "tiny-llama") == ()                     # another model: its architecture's list
    assert modules("--set", "model.modules=[x\\.y]") == ("x\\.y",)     # the command line wins
    assert modules("--set", "model.modules=[]") == ()                 # ... also asking for the architecture's list
    # zsRE's EMSEdit on that list: K = 4 from eta 4e-4 with the KL weight 30 (the bundled facts: from 3e-4)
    cfg = resolve_run(parser.parse_args(["--train-data", str(path)]))[0]
    assert (cfg.editor.n_steps, cfg.editor.eta_init, cfg.train.loss, cfg.train.loc_coef) == (4, 4e-4, "kl", 30.0)
    assert any("down_proj" in m for m in SMOLLM2_LATE_DOWN_MLP)
    # the profile's rate schedule, and the command line over it
    assert resolve_run(parser.parse_args(["--train-data", str(path)]))[0].train.lr_schedule == "cosine"
    assert resolve_run(parser.parse_args(["--train-data", str(path), "--set", "train.lr_schedule=constant"]))[
        0].train.lr_schedule == "constant"


def test_main_job_profile_validates_and_keeps_the_best_editor():
    """`python -m emsedit_fast.train` with no flag (the bundled facts): SmolLM2's later MLP layers, EMSEdit at K = 4
    with the KL meta-loss, validation during training and keep-best; its K = 1 baseline keeps everything but K."""
    import argparse

    from emsedit_fast.comparison import method_config
    from emsedit_fast.config import add_run_arguments
    from emsedit_fast.profiles import SMOLLM2_LATE_DOWN_MLP
    from emsedit_fast.profiles import resolve_run

    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    parser.add_argument("--train-data")
    cfg, plan = resolve_run(parser.parse_args([]))
    assert (plan.name, cfg.data.train, cfg.model.modules) == ("small-bundled", "bundled", SMOLLM2_LATE_DOWN_MLP)
    assert (cfg.editor.n_steps, cfg.editor.eta_init, cfg.train.loss, cfg.train.kl_reference, cfg.train.loc_coef,
            cfg.train.edit_prompt_coef) == (4, 3e-4, "kl", "original", 30.0, 1.0)
    assert (cfg.train.eval_every, cfg.train.keep, cfg.train.lr_schedule, cfg.train.n_batches) == (
        0.5, "best", "cosine", 40)
    k1 = method_config(cfg, "emsedit1", [], plan.defaults)
    assert (k1.editor.n_steps, k1.editor.eta_init, k1.train.loss, k1.train.keep, k1.model.modules) == (
        1, cfg.editor.eta_init, "kl", "best", SMOLLM2_LATE_DOWN_MLP)
    # MALMEN keeps its loss and step size with the KL weight chosen for it on that list; RLEdit keeps its preset's loss
    malmen = method_config(cfg, "malmen", [], plan.defaults)
    assert (malmen.editor.eta_init, malmen.train.loss, malmen.train.loc_coef, malmen.train.keep) == (
        1e-3, "kl", 30.0, "best")
    assert method_config(cfg, "rledit", [], plan.defaults).train.loss == "rledit_decay"


def test_batch_mode_run_drops_the_profiles_sequential_only_settings():
    """A profile chosen under a sequential protocol still serves `--mode batch`: its exact credit for the last step
    (sequential only) falls back to the default, while the same setting given by the user is refused."""
    from emsedit_fast.profiles import PLANS

    defaults = PLANS["small-bundled"].defaults
    assert load("emsedit", defaults=defaults).train.step_credit == "last"
    batch = load("emsedit", mode="batch", defaults=defaults)
    assert (batch.train.mode, batch.train.step_credit, batch.train.loss, batch.editor.n_steps) == (
        "batch", "final", "kl", 4)                                     # the rest of the profile still applies
    assert load("emsedit", defaults=defaults, overrides=["train.mode=batch"]).train.step_credit == "final"
    with pytest.raises(ConfigError, match="train.step_credit"):
        load("emsedit", mode="batch", defaults=defaults, overrides=["train.step_credit=last"])
    with pytest.raises(ConfigError, match="train.step_credit"):
        load("emsedit", mode="batch", defaults=defaults, extra={"train": {"step_credit": "per_step"}})


def test_profile_settings_for_one_editor_leave_the_other_presets_alone():
    """defaults["editors"][name] applies only when loading that editor, over the rest of the defaults and under the
    command line; the CounterFact profile's KL meta-loss is EMSEdit's, while RLEdit and MALMEN keep their losses."""
    from emsedit_fast.comparison import method_config
    from emsedit_fast.profiles import PLANS

    defaults = {"train": {"loc_coef": 2.0}, "editors": {"emsedit": {"train": {"loss": "kl", "loc_coef": 10.0}}}}
    assert (load("emsedit", defaults=defaults).train.loss, load("emsedit", defaults=defaults).train.loc_coef) == (
        "kl", 10.0)
    assert load("rledit", defaults=defaults).train.loss == "rledit_decay"
    assert load("rledit", defaults=defaults).train.loc_coef == 2.0         # the shared part still applies
    assert load("emsedit", defaults=defaults, overrides=["train.loss=l2"]).train.loss == "l2"
    with pytest.raises(ConfigError, match="'editors' names unknown editor"):
        load("emsedit", defaults={"editors": {"emsedt": {}}})

    cf = PLANS["small-counterfact"].defaults
    base = load("emsedit", defaults=cf)
    assert (base.train.loss, base.train.loc_coef, base.train.step_credit) == ("kl", 10.0, "last")
    got = {m: method_config(base, m, [], cf).train for m in ("emsedit1", "rledit", "malmen")}
    assert (got["emsedit1"].loss, got["emsedit1"].step_credit) == ("kl", "last")
    assert (got["rledit"].loss, got["rledit"].step_credit) == ("rledit_decay", "final")
    assert (got["malmen"].loss, got["malmen"].loc_coef, got["malmen"].step_credit) == ("kl", 10.0, "final")

    zs = PLANS["small-zsre"].defaults      # zsRE: EMSEdit's K, step size and meta-loss; the others keep theirs
    base = load("emsedit", defaults=zs)
    assert (base.editor.n_steps, base.editor.eta_init, base.editor.edit_prior, base.train.loss,
            base.train.loc_coef, base.train.edit_prompt_coef) == (4, 4e-4, 1.0, "kl", 30.0, 1.0)
    got = {m: method_config(base, m, [], zs) for m in ("emsedit1", "emsedit", "rledit", "malmen")}
    assert (got["emsedit1"].editor.n_steps, got["emsedit1"].editor.eta_init, got["emsedit1"].train.loss,
            got["emsedit1"].train.loc_coef) == (1, 4e-4, "kl", 30.0)
    assert got["emsedit"].editor.n_steps == 2
    assert (got["rledit"].editor.n_steps, got["rledit"].editor.eta_init, got["rledit"].editor.edit_prior) == (
        1, 1e-3, 1.0)
    assert (got["rledit"].train.loss, got["rledit"].train.edit_prompt_coef) == ("rledit_decay", 0.0)
    # MALMEN keeps its own loss and step size, with the KL weight chosen for it on the zsRE validation part
    assert (got["malmen"].editor.n_steps, got["malmen"].editor.eta_init, got["malmen"].train.loss,
            got["malmen"].train.loc_coef, got["malmen"].train.edit_prompt_coef) == (1, 1e-3, "kl", 30.0, 0.0)


def test_run_seed_leaves_the_splits_alone():
    """Every split (the bundled facts' subject groups included) follows data.split_seed, not the run's seed: runs at
    other seeds validate and evaluate on the same records, so tuning at any seed never reads an evaluation record."""
    from emsedit_fast import api

    def ids(split, seed=0, split_seed=0):
        cfg = load("emsedit", overrides=[f"seed={seed}", f"data.split_seed={split_seed}"])
        return [r.case_id for r in api.load_split(cfg, split)]

    for split in ("train", "valid", "eval"):
        assert ids(split) == ids(split, seed=1) == ids(split, seed=7)
    assert ids("eval") != ids("eval", split_seed=1)                 # the split seed does move them
    assert not set(ids("eval")) & set(ids("valid", seed=1))         # no other run seed validates on them


def test_checkpoint_config_of_earlier_versions_reads_zsre_split_seed(tmp_path):
    """Checkpoints written before data.split_seed name it data.zsre_split_seed; they load with the same value."""
    from emsedit_fast.checkpoint import load_config

    values = to_dict(load("emsedit"))
    values["data"]["zsre_split_seed"] = values["data"].pop("split_seed") + 3
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(values))
    assert load_config(str(tmp_path)).data.split_seed == 3
    with pytest.raises(ConfigError, match="did you mean 'split_seed'"):
        load("emsedit", overrides=["data.zsre_split_seed=3"])
