"""Shared fixtures of the reliability tests (issue 7): one small trained editor checkpoint, a facts file, and a helper
that runs the package's commands in real subprocesses.

Subprocesses get OMP_NUM_THREADS=1 (like the in-process tests' torch.set_num_threads(1)): on a loaded 2-core machine
OpenMP spinning makes tiny-model training 50x slower.
"""

import os
import subprocess
import sys

import pytest

MODEL_OVERRIDES = ["model.name=tiny-llama", "model.device=cpu", "editor.rank=8", "train.n_batches=2",
                   "data.n_edits=4", "train.micro_batch=4", "train.meta_lr=1e-3"]


def child_env() -> dict:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    return env


@pytest.fixture(scope="session")
def spawn():
    """spawn(args, cwd=None, log=None, env=None) -> Popen of `python <args>` with the test environment (plus `env`);
    stdout and stderr go to the file `log`, or to pipes (read them with communicate())."""
    def _spawn(args, cwd=None, log=None, env=None):
        out = open(log, "w") if log is not None else subprocess.PIPE
        try:
            return subprocess.Popen([sys.executable, *args], cwd=cwd, env={**child_env(), **(env or {})}, text=True,
                                    stdout=out, stderr=subprocess.STDOUT if log is not None else subprocess.PIPE)
        finally:
            if log is not None:
                out.close()  # the child holds its own descriptor
    return _spawn


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny-llama EMSEdit checkpoint (sequential, K = 2, rank 8, 2 training batches) and four held-out facts."""
    from emsedit_fast import api
    from emsedit_fast.checkpoint import save_checkpoint
    from emsedit_fast.config import load
    from emsedit_fast.data.facts import bundled_facts
    from emsedit_fast.data.schemas import save_records

    root = tmp_path_factory.mktemp("reliability")
    cfg = load("emsedit", mode="sequential", overrides=MODEL_OVERRIDES + [f"output={root / 'run'}"])
    session = api.open_session(cfg)
    trainer = api.train(session, progress=False)
    ckpt = save_checkpoint(str(root / "run" / "checkpoint"), session.editor, cfg, trainer)
    records = bundled_facts("eval")[:4]
    save_records(records, root / "facts.jsonl")
    return {"root": root, "ckpt": ckpt, "facts": str(root / "facts.jsonl"), "records": records, "cfg": cfg}
