"""Data-parallel meta-training: a 2-process torchrun (gloo, CPU, tiny-llama) matches one process at the same global
batch, and the normaliser merge equals one normaliser that saw every row.

The single-process reference is gradient accumulation over the W = 2 batches of each optimiser step, with the
normaliser statistics reset to the synchronised ones before each batch and merged afterwards (the semantics
emsedit_fast.distributed documents), written here from the editor and trainer primitives, independent of the
distributed code path.
"""

import json
import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from emsedit_fast import api
from emsedit_fast import ops
from emsedit_fast.checkpoint import load_config
from emsedit_fast.editors import EditRefused
from emsedit_fast.nn import RunningStats
from emsedit_fast.nn import merge_running_stats
from emsedit_fast.parallel import DataParallelTrainer
from emsedit_fast.parallel import load_stats_
from emsedit_fast.parallel import stats_state
from emsedit_fast.trainer import MetaTrainer

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Recorder:
    """Stands in for a trainer in api.train to capture its deterministic batch list."""

    def train(self, batches, progress=None):
        self.batches = batches
        return self

    def use_average(self):  # api.train ends every run with it (train.ema)
        pass


def _batches(session, cfg):
    recorder = _Recorder()
    api.train(session, trainer=recorder)
    return recorder.batches


def _accumulated_reference(cfg, world):
    """One process, global batch = `world` local batches per optimiser step (batch regime, reset chaining)."""
    session = api.open_session(cfg)
    editor = session.editor
    batches = _batches(session, cfg)
    trainer = MetaTrainer(editor, cfg.train)
    for t in range(len(batches) // world):
        group = batches[t * world:(t + 1) * world]
        for k in range(editor.cfg.n_steps):
            synced = stats_state(editor)
            grads, states = [], []
            for tuples in group:
                load_stats_(editor, synced)
                trainer.optimizer.zero_grad(set_to_none=True)
                before = ops.snapshot(editor.weights())
                records = trainer._apply_steps(tuples, range(k, k + 1))
                _, weight_grads = trainer.weight_grads([(1.0, tuples, None)], records)
                ops.restore_(editor.weights(), before)
                editor.meta_backward(records, weight_grads)
                grads.append({n: p.grad.clone() for n, p in editor.named_parameters() if p.grad is not None})
                states.append(stats_state(editor))
            load_stats_(editor, [merge_running_stats(b, [s[i] for s in states]) for i, b in enumerate(synced)])
            for name, p in editor.named_parameters():
                parts = [g[name] for g in grads if name in g]
                p.grad = (parts[0] + parts[1]) / world if parts else None
            torch.nn.utils.clip_grad_norm_(editor.parameters(), cfg.train.max_grad_norm)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
        editor.reset()
    return editor.state_dict(), session, batches


def test_merge_running_stats_equals_one_normaliser_over_all_rows():
    torch.manual_seed(0)
    d_in, d_out = 6, 5
    base = RunningStats(d_in + d_out)
    base.update_(torch.randn(7, d_in) * 3 + 1, torch.randn(7, d_out), backend="reference")
    rows = [(torch.randn(n, d_in) * 2, torch.randn(n, d_out) - 4) for n in (5, 9, 1)]
    start = {f: getattr(base, f).clone() for f in ("count", "mean", "var", "std")}
    states = []
    for keys, grads in rows:  # each "rank" updates its own copy from the synchronised start
        s = RunningStats(d_in + d_out)
        s.load_state_dict(start)
        s.update_(keys, grads, backend="reference")
        states.append(dict(s.state_dict()))
    merged = merge_running_stats(start, states)
    for keys, grads in rows:  # one normaliser that saw every row
        base.update_(keys, grads, backend="reference")
    assert merged["count"].dtype == torch.float64 and float(merged["count"]) == 7 + 15
    for f in ("mean", "var", "std"):
        torch.testing.assert_close(merged[f], getattr(base, f), rtol=1e-5, atol=1e-6)
    unchanged = merge_running_stats(start, [start, start])
    assert all(torch.equal(unchanged[f], start[f]) for f in start)


def test_two_processes_match_one_process_at_the_same_global_batch(tmp_path):
    out = tmp_path / "dp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(WORLD),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "emsedit_fast.distributed", "--editor", "emsedit", "--mode", "batch", "--model", "tiny-llama",
           "--device", "cpu", "--editor-device", "cpu", "--set", "editor.rank=8", "--set", "train.meta_lr=1e-3",
           "--n-edits", "4", "--n-batches", "4", "--output", str(out), "--no-progress", "--dist-backend", "gloo"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=repo)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.load(open(out / "results.json"))
    assert results["world_size"] == WORLD and results["global_batch_edits"] == WORLD * 4
    assert results["optimizer_batches_per_rank"] == 2 and results["skipped"] == 0
    assert results["state_sha256"][0] == results["state_sha256"][1]  # identical editors on every rank
    assert not os.path.exists(out / "checkpoint" / "rank1")  # only rank 0 wrote
    distributed = load_file(out / "checkpoint" / "hypernets.safetensors")

    cfg = load_config(str(out / "checkpoint"))  # the exact resolved config the ranks ran
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks ran with OMP_NUM_THREADS=1
    try:
        reference, session, batches = _accumulated_reference(cfg, WORLD)
    finally:
        torch.set_num_threads(threads)
    assert len(batches) == 4
    assert set(reference) == set(distributed)
    for name, value in reference.items():
        # not bit-exact: BLAS results differ in the last bits between processes (~1e-6 here)
        torch.testing.assert_close(distributed[name], value.cpu(), rtol=1e-5, atol=1e-5, msg=name)

    # the match is not trivial: training moved the parameters, and rank 0's batches alone give another result
    init = api.open_session(cfg).editor.state_dict()
    moved = max(float((reference[n].double() - init[n].double()).abs().max()) for n in reference)
    assert moved > 1e-4
    local = api.open_session(cfg)
    MetaTrainer(local.editor, cfg.train).train(batches[0::WORLD], progress=False)
    gap = max(float((local.editor.state_dict()[n].double() - reference[n].double()).abs().max()) for n in reference)
    assert gap > 1e-3  # (~6e-3): far outside the tolerance above


def _refusing(editor, monkeypatch, at):
    """Make the editor's `at`-th step check raise EditRefused (a non-finite step)."""
    calls = {"n": 0}
    original = editor.check_record

    def check(record):
        calls["n"] += 1
        if calls["n"] == at:
            raise EditRefused("simulated non-finite step")
        return original(record)

    monkeypatch.setattr(editor, "check_record", check)


def test_refused_batch_keeps_the_ranks_in_step(monkeypatch):
    """World of one (gloo): a refused step still joins the remaining synchronisations of its batch (so the other
    ranks never block) with zero weight, and nobody contributing means no optimiser step, as in one process."""
    from emsedit_fast.config import load
    from emsedit_fast.parallel import GradientSync

    cfg = load("emsedit", mode="batch", overrides=["model.name=tiny-llama", "model.device=cpu", "editor.rank=8",
                                                   "train.n_batches=2", "data.n_edits=4", "train.meta_lr=1e-3"])
    weights = []
    original_call = GradientSync.__call__

    def spy(self, editor, weight=1.0):
        weights.append(weight)
        return original_call(self, editor, weight)

    monkeypatch.setattr(GradientSync, "__call__", spy)
    store = dist.TCPStore("127.0.0.1", _free_port(), 1, True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        session = api.open_session(cfg)
        batches = _batches(session, cfg)
        trainer = DataParallelTrainer(session.editor, cfg.train)
        trainer.sync.broadcast_()
        _refusing(session.editor, monkeypatch, at=3)  # batch 2, step 1 of 2
        report = trainer.train(batches, progress=False)
    finally:
        dist.destroy_process_group()
    assert report.skipped == 1 and report.steps == 2
    assert weights == [1.0, 1.0, 0.0, 0.0]  # batch 1: two steps; batch 2: refused at step 1, then two idle syncs

    plain = api.open_session(cfg)
    _refusing(plain.editor, monkeypatch, at=3)
    assert MetaTrainer(plain.editor, cfg.train).train(batches, progress=False).skipped == 1
    expected = plain.editor.state_dict()
    for name, value in session.editor.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-6, msg=name)
