"""Crashes never corrupt a model or lose work: real SIGKILLs of real processes on tiny models (issue 7).

(a) A training run (`python -m emsedit_fast.train --save-every 1`) killed mid-run and restarted with `--resume` ends
    with the checkpoint an uninterrupted run writes: the same hypernetwork tensors, bit for bit, and the same step
    (sequential and batch regimes).
(b) A kill at any point of a checkpoint save (files half written, written but not renamed, between the two renames,
    renamed but the old one not yet deleted) leaves a checkpoint at the path that reads, verifies and loads, holding
    exactly the previous or exactly the new editor.
(c) A kill during `python -m emsedit_fast.edit --journal J --save-model M` leaves J and M consistent. The invariant:
    J reads cleanly and every committed edit verifies (an edit killed before its line was appended is absent; its
    factors file is an ignored orphan); M is absent or a complete save whose emsedit_edits.json lists committed
    journal edits, and base + exactly those edits' factors equals M's weights bit for bit; rerunning the command
    continues the journal.

The children get a pause hook at the chosen point (a marker file, then a long sleep) so the kill lands there; they run
side by side to keep the wall time down.
"""

import json
import os
import shutil
import signal
import time

import torch
from safetensors.torch import load_file

from emsedit_fast import edit
from emsedit_fast import train
from emsedit_fast.checkpoint import load_editor_state
from emsedit_fast.checkpoint import read_meta
from emsedit_fast.checkpoint import save_checkpoint
from emsedit_fast.journal import Journal
from emsedit_fast.updates import apply_edit_

PAUSE = r'''
import os, sys, time
def pause(tag):
    with open(os.environ["PAUSE_MARKER"] + ".tmp", "w") as f:
        f.write(tag)
    os.replace(os.environ["PAUSE_MARKER"] + ".tmp", os.environ["PAUSE_MARKER"])
    time.sleep(300)
'''


def wait_for(path, proc, log, timeout=120.0):
    """Poll for `path` while the child runs; fail with the child's log if it exits or times out first."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"child exited (rc {proc.returncode}) before {path} appeared:\n{open(log).read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}:\n{open(log).read()}")
        time.sleep(0.005)


def kill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def finish(proc, log, timeout=180):
    proc.wait(timeout=timeout)
    assert proc.returncode == 0, open(log).read()


def tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------------------------------
# (a) training killed mid-run, resumed


N_BATCHES = 12


def _train_args(regime, output):
    return ["--model", "tiny-llama", "--device", "cpu", "--mode", regime, "--set", "editor.rank=8", "--set",
            "train.meta_lr=1e-3", "--n-batches", str(N_BATCHES), "--n-edits", "4", "--no-eval", "--no-progress",
            "--save-every", "1", "--output", str(output)]


def test_killed_training_resumes_to_the_uninterrupted_checkpoint(tmp_path, spawn):
    regimes = ("sequential", "batch")
    procs, killed_at = {}, {}
    for regime in regimes:  # one run at a time, killed as soon as its first checkpoint is complete (two runs started
        # together let the second finish all its batches on a loaded machine while the first was being waited for)
        log = tmp_path / f"{regime}-killed.log"
        proc = spawn(["-m", "emsedit_fast.train", *_train_args(regime, tmp_path / f"{regime}-killed")], log=log)
        ckpt = tmp_path / f"{regime}-killed" / "checkpoint"
        wait_for(ckpt / "meta.json", proc, log)
        kill(proc)
        killed_at[regime] = read_meta(str(ckpt))["training_step"]  # intact (or recovered) after the kill
        assert 1 <= killed_at[regime] < N_BATCHES, f"{regime}: not killed mid-run ({killed_at[regime]})"

    for regime in regimes:  # resume both side by side
        log = tmp_path / f"{regime}-resumed.log"
        args = _train_args(regime, tmp_path / f"{regime}-killed") + ["--resume",
                                                                     str(tmp_path / f"{regime}-killed" / "checkpoint")]
        procs[regime] = (spawn(["-m", "emsedit_fast.train", *args], log=log), log)
    for regime in regimes:  # meanwhile, the uninterrupted runs (same code path, in this process)
        assert train.main(_train_args(regime, tmp_path / f"{regime}-reference")) == 0
    for regime in regimes:
        finish(*procs[regime])
        resumed, reference = (tmp_path / f"{regime}-{kind}" / "checkpoint" for kind in ("killed", "reference"))
        assert f"resumed from {resumed} at training batch {killed_at[regime]}" in open(procs[regime][1]).read()
        assert read_meta(str(resumed))["training_step"] == read_meta(str(reference))["training_step"] == N_BATCHES
        assert tensors_equal(load_file(resumed / "hypernets.safetensors"),
                             load_file(reference / "hypernets.safetensors"))
        a, b = (torch.load(c / "trainer_state.pt", weights_only=False) for c in (resumed, reference))
        assert a["step"] == b["step"] == N_BATCHES and a["report"]["steps"] == N_BATCHES
        assert a["report"]["losses"] == b["report"]["losses"]


# ----------------------------------------------------------------------------------------------------------------------
# (b) killed while saving a checkpoint

BUILD = r'''
import torch
from torch import nn
from emsedit_fast.config import load
from emsedit_fast.editors import build_editor
from emsedit_fast.models.adapter import resolve_modules

def build(version):
    """A small editor over a two-layer MLP; `version` fills its parameters with its own values."""
    cfg = load("emsedit", mode="sequential", overrides=["editor.rank=4"])
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.linspace(-1, 1, p.numel()).view_as(p) * (i + 1))
    editor = build_editor(model, resolve_modules(model, ["0", "2"]), cfg.editor, "sequential", seed=0, device="cpu")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(version)
        for p in editor.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return cfg, editor
'''

SAVE_CHILD = PAUSE + BUILD + r'''
import emsedit_fast.checkpoint as C
point, path = sys.argv[1], sys.argv[2]
cfg, editor = build(1)
C.save_checkpoint(path, editor, cfg)  # version 1, complete
cfg, editor = build(2)
if point == "writing":  # the tensors are written into the temporary folder, meta.json is not
    real_save = C.save_file
    def save_file(*a, **k):
        real_save(*a, **k)
        pause(point)
    C.save_file = save_file
elif point == "written":  # everything written and fsynced, nothing renamed yet
    real_fsync = C._fsync_dir
    def fsync(p):
        real_fsync(p)
        pause(point)
    C._fsync_dir = fsync
elif point == "between-renames":  # the old checkpoint renamed aside, the new one not yet renamed in
    real_replace = os.replace
    def replace(a, b):
        real_replace(a, b)
        if ".old-" in os.path.basename(b):
            pause(point)
    C.os.replace = replace
elif point == "before-cleanup":  # the new checkpoint in place, the old one not yet deleted
    def rmtree(p, ignore_errors=False):
        pause(point)
    C.shutil.rmtree = rmtree
C.save_checkpoint(path, editor, cfg)
'''

SAVE_POINTS = {"writing": 1, "written": 1, "between-renames": 1, "before-cleanup": 2}  # the version left at the path


def test_killed_checkpoint_save_leaves_a_loadable_checkpoint(tmp_path, spawn):
    env = {}
    exec(BUILD, env)
    versions = {v: {k: t.clone() for k, t in env["build"](v)[1].state_dict().items()} for v in (1, 2)}
    assert not tensors_equal(versions[1], versions[2])
    procs = {}
    for point in SAVE_POINTS:
        folder = tmp_path / point
        folder.mkdir()
        script = folder / "child.py"
        script.write_text(SAVE_CHILD)
        log = folder / "child.log"
        procs[point] = (spawn([str(script), point, str(folder / "checkpoint")], log=log,
                              env={"PAUSE_MARKER": str(folder / "paused")}), log)
    for point, (proc, log) in procs.items():
        wait_for(tmp_path / point / "paused", proc, log)
        kill(proc)
    for point, version in SAVE_POINTS.items():
        path = str(tmp_path / point / "checkpoint")
        if point == "between-renames":
            assert not os.path.exists(path)  # the window the next read recovers from
        meta = read_meta(path)  # reads, verifies every file's hash (and recovers the previous checkpoint)
        assert os.path.isdir(path) and meta["editor"] == "emsedit"
        cfg, editor = env["build"](3)
        load_editor_state(path, editor)
        assert tensors_equal(editor.state_dict(), versions[version]), point
        # and the next save to the same path works and is the one that is read back
        save_checkpoint(path, editor, cfg, extra_meta={"after": point})
        assert read_meta(path)["after"] == point
        assert not [n for n in os.listdir(tmp_path / point) if ".old-" in n]


# ----------------------------------------------------------------------------------------------------------------------
# (c) killed while editing with a journal and saving the model

EDIT_CHILD = PAUSE + r'''
import shutil
import emsedit_fast.journal as J
from emsedit_fast.edit import main
point, argv = sys.argv[1], sys.argv[2:]
if point in ("factors-written", "line-committed"):
    real_append = J.Journal._append
    def _append(self, line):
        if point == "line-committed":
            real_append(self, line)
        if line.get("type") == "edit" and line["id"] == 2:
            pause(point)  # factors-written: edit 2's factors file is in place, its line is not
        if point == "factors-written":
            real_append(self, line)
    J.Journal._append = _append
elif point == "saving-model":  # the model written into the temporary folder, not renamed into place
    from transformers.modeling_utils import PreTrainedModel
    real_save = PreTrainedModel.save_pretrained
    def save_pretrained(self, *a, **k):
        real_save(self, *a, **k)
        pause(point)
    PreTrainedModel.save_pretrained = save_pretrained
elif point == "model-renamed":  # the new model in place, the previous save not yet deleted
    def rmtree(p, ignore_errors=False, **k):
        pause(point)
    shutil.rmtree = rmtree
sys.exit(main(argv))
'''

# point -> (journal's active edits after the kill, edits the saved model holds)
EDIT_POINTS = {"factors-written": ([1], [1]), "line-committed": ([1, 2], [1]), "saving-model": ([1, 2, 3], [1]),
               "model-renamed": ([1, 2, 3], [1, 2, 3])}
EDITED = ("model.layers.0.mlp.gate_proj", "model.layers.1.mlp.up_proj")


def _check_consistent(journal_dir, model_dir, base_model):
    """The invariant of (c); returns (journal's active ids, ids the saved model holds or None)."""
    journal = Journal(journal_dir, create=False)
    active = journal.active_ids()
    journal.active_factors()  # every committed edit verifies (sha256) and loads
    if not os.path.exists(model_dir):
        return active, None
    held = json.load(open(os.path.join(model_dir, "emsedit_edits.json")))["edits"]
    assert set(held) <= set(active)
    saved = load_file(os.path.join(model_dir, "model.safetensors"))
    base, _ = journal.base()
    weights = {n: base[n].clone() for n in base}
    for edit_id in held:
        apply_edit_(weights, journal.load_factors(edit_id))
    expected = {name: p for name, p in base_model.state_dict().items()}
    for name in weights:
        expected[f"{name}.weight"] = weights[name]
    assert all(torch.equal(saved[k], expected[k]) for k in saved), "saved model != base + its journal edits"
    return active, held


def test_killed_edit_keeps_journal_and_saved_model_consistent(trained, tmp_path, spawn):
    from emsedit_fast.data.facts import bundled_facts
    from emsedit_fast.data.schemas import save_records
    from emsedit_fast.models.smollm2 import load_model

    more = bundled_facts("eval")[4:8]
    save_records(more, tmp_path / "more.jsonl")
    common = ["--editor-checkpoint", trained["ckpt"], "--no-efficacy", "--no-progress", "--n-edits", "2"]
    first = tmp_path / "first"
    assert edit.main(common + ["--facts", trained["facts"], "--n-edits", "4", "--journal", str(first / "journal"),
                               "--save-model", str(first / "model")]) == 0  # edit 1, saved
    procs = {}
    for point in EDIT_POINTS:
        folder = tmp_path / point
        shutil.copytree(first, folder)
        script = folder / "child.py"
        script.write_text(EDIT_CHILD)
        log = folder / "child.log"
        argv = common + ["--facts", str(tmp_path / "more.jsonl"), "--journal", str(folder / "journal"),
                         "--save-model", str(folder / "model")]  # edits 2 and 3, then the save
        procs[point] = (spawn([str(script), point, *argv], log=log, env={"PAUSE_MARKER": str(folder / "paused")}),
                        log)
    for point, (proc, log) in procs.items():
        wait_for(tmp_path / point / "paused", proc, log)
        kill(proc)

    base_model, _ = load_model("tiny-llama")
    for point, (active, held) in EDIT_POINTS.items():
        folder = tmp_path / point
        got = _check_consistent(str(folder / "journal"), str(folder / "model"), base_model)
        assert got == (active, held), (point, got)
        if point == "factors-written":
            assert [os.path.basename(p) for p in Journal(str(folder / "journal")).orphans()] == ["2.safetensors"]

    # rerunning after the crash continues the journal (the orphan is ignored, then overwritten) and saves consistently
    folder = tmp_path / "factors-written"
    assert edit.main(common + ["--facts", str(tmp_path / "more.jsonl"), "--journal", str(folder / "journal"),
                               "--save-model", str(folder / "model")]) == 0
    assert _check_consistent(str(folder / "journal"), str(folder / "model"), base_model) == ([1, 2, 3], [1, 2, 3])
    assert not Journal(str(folder / "journal")).orphans()
