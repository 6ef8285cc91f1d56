"""Shared builder of the editor tests: a meta-trainer on the tiny LLaMA (training batches: tests/conftest.py)."""

import pytest
import torch

from emsedit_fast.config import load
from emsedit_fast.editors import build_editor
from emsedit_fast.models.adapter import default_module_patterns
from emsedit_fast.models.adapter import resolve_modules
from emsedit_fast.models.tiny import tiny_llama
from emsedit_fast.trainer import MetaTrainer


@pytest.fixture
def tiny_trainer():
    """make(*overrides): a MetaTrainer of a sequential EMSEdit editor (rank 8, reference backend) on a fresh tiny
    LLaMA, seed 0; overrides are config KEY=VALUE strings applied after those."""

    def make(*overrides) -> MetaTrainer:
        torch.manual_seed(0)
        model = tiny_llama()
        cfg = load("emsedit", mode="sequential", overrides=["editor.rank=8", "editor.backend=reference", *overrides])
        editor = build_editor(model, resolve_modules(model, default_module_patterns(model, "sequential")),
                              cfg.editor, "sequential", seed=0)
        return MetaTrainer(editor, cfg.train)

    return make
