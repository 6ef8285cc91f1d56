"""Editors: one method per file on one engine (editors/base.py). EDITORS maps a config name to its class."""

from __future__ import annotations

from emsedit_fast.config import EditorConfig
from emsedit_fast.editors.base import AppliedEdit
from emsedit_fast.editors.base import Editor
from emsedit_fast.editors.base import EditRefused
from emsedit_fast.editors.emsedit import EMSEdit
from emsedit_fast.editors.malmen import MALMEN
from emsedit_fast.editors.mend import MEND
from emsedit_fast.editors.rledit import RLEdit

EDITORS: dict[str, type[Editor]] = {"mend": MEND, "malmen": MALMEN, "rledit": RLEdit, "emsedit": EMSEdit}


def build_editor(model, modules, cfg: EditorConfig, regime: str, *, seed: int = 0, device=None) -> Editor:
    """The editor class named by cfg.name, checked against the method's aggregation."""
    cls = EDITORS[cfg.name]
    if cfg.aggregation != cls.aggregation:
        raise ValueError(f"editor {cfg.name!r} aggregates by {cls.aggregation!r}, but editor.aggregation is "
                         f"{cfg.aggregation!r}")
    return cls(model, modules, cfg, regime, seed=seed, device=device)


__all__ = ["EDITORS", "AppliedEdit", "EMSEdit", "EditRefused", "Editor", "MALMEN", "MEND", "RLEdit", "build_editor"]
