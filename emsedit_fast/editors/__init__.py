"""Editors: one engine (editors/editor.py) configured per method.

A method is its preset, emsedit_fast/configs/editor/<name>.yaml, and nothing else: the aggregation (ridge least
squares or MEND's outer-product sum), the hypernetwork shape, K, the mode and the training loss. The table:

    method   aggregation  blocks  K  mode      training loss
    mend     outer        2       1  batch       KL locality (MEND's affine-then-ReLU block order)
    malmen   ridge        4       1  batch       KL locality            (K = 2: MALMEN^2, the MSBP plug-in)
    rledit   ridge        4       1  sequential  time-decayed multi-batch loss (K = 2: RLEdit^2)
    emsedit  ridge        4       2  sequential  l2 drift penalty c ||W - W0||^2 (or KL, train.loss=kl)
    ultraedit ridge       0       1  sequential  none: training-free, lifelong-normalised targets (K = 2: UltraEdit^2)

See docs/method.md, "Editors".
"""

from __future__ import annotations

from emsedit_fast.config import EditorConfig
from emsedit_fast.editors.editor import Editor
from emsedit_fast.editors.editor import EditRefused
from emsedit_fast.editors.editor import GroupStep
from emsedit_fast.editors.editor import StepRecord
from emsedit_fast.editors.weight_grad import WeightGrad
from emsedit_fast.updates import AppliedEdit

METHODS = ("mend", "malmen", "rledit", "emsedit", "ultraedit")


def build_editor(model, modules, cfg: EditorConfig, mode: str, *, seed: int = 0, device=None) -> Editor:
    """The editor for `modules` of `model` as configured (method, hypernetwork shape, K) in `mode`."""
    return Editor(model, modules, cfg, mode, seed=seed, device=device)


__all__ = ["METHODS", "AppliedEdit", "Editor", "EditRefused", "GroupStep", "StepRecord", "WeightGrad",
           "build_editor"]
