"""Undo that is exact and bounded: a base snapshot plus the recorded updates of the edits after it.

The edited weights after edits e_1..e_t are, bit for bit, what `apply_updates_` gives when it replays the recorded
updates of e_1..e_t onto the base snapshot (same backend, same device type: the apply is deterministic). So

    undo the last edit      restore the weights from before it: from a snapshot kept at edit time (policy
                            "snapshot": one copy of the edited weights per edit, instant) or by replaying the
                            remaining edits onto the base (policy "replay": no copy, the default)
    undo an earlier edit    replay the remaining edits onto the base: bit-identical to applying their recorded
                            updates in order (the later edits were computed on a model that contained the removed
                            one; they are not recomputed)
    fold (compaction)       replay the oldest edits onto the base and make the result the new base: they stay
                            applied but can no longer be undone one by one, and replay never grows beyond
                            `max_edits` edits

Subtracting an update is never used: round(round(W + d) - d) != W in low precision. The on-disk journal
(`emsedit_fast.journal`) keeps the same design in files: a base snapshot, one factors file per edit, and compaction
that writes a new base snapshot.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from emsedit_fast import ops
from emsedit_fast.updates import AppliedEdit
from emsedit_fast.updates import apply_updates_

UNDO_POLICIES = ("replay", "snapshot")


class History:
    """The undoable edits of one editor session over the weights `names` (storage layout).

    base: the weights before the first recorded edit; None means `origin` (the editor's unedited W0, not copied; it
    may be a compact snapshot in a narrower dtype, see ops.snapshot). dtypes: the live weights' dtypes, which a base
    built by folding takes (edits are applied to it); default: the origin's.
    policy "snapshot" keeps the pre-edit weights of the latest edit; "replay" keeps nothing extra.
    max_edits > 0 folds the oldest edits into the base when more are recorded; 0 keeps every edit undoable.
    """

    def __init__(self, names: list[str], origin: list[torch.Tensor], policy: str = "replay", max_edits: int = 0,
                 dtypes: list[torch.dtype] | None = None):
        if policy not in UNDO_POLICIES:
            raise ValueError(f"undo policy must be one of {UNDO_POLICIES}, got {policy!r}")
        if max_edits < 0:
            raise ValueError(f"max_edits must be >= 0, got {max_edits}")
        self.names = list(names)
        self.origin = origin
        self.dtypes = list(dtypes) if dtypes is not None else [o.dtype for o in origin]
        self.policy = policy
        self.max_edits = max_edits
        self.base: list[torch.Tensor] | None = None
        self.edits: list[AppliedEdit] = []
        self.folded = 0  # edits folded into the base so far
        self.folded_moments: dict[str, torch.Tensor] = {}  # sum of U^T U of the folded edits' keys (key prior)
        self._before: list[torch.Tensor] | None = None  # weights before edits[-1] (policy "snapshot")

    # -- container protocol ------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.edits)

    def __iter__(self) -> Iterator[AppliedEdit]:
        return iter(self.edits)

    def __getitem__(self, i: int) -> AppliedEdit:
        return self.edits[i]

    def ids(self) -> list[int]:
        return [e.edit_id for e in self.edits]

    # -- state -------------------------------------------------------------------------------------------------------

    def base_weights(self) -> list[torch.Tensor]:
        return self.origin if self.base is None else self.base

    def state(self) -> tuple:
        """Everything needed to put this history back later (evaluation edits, then restores it)."""
        base = None if self.base is None else [b.clone() for b in self.base]
        moments = {k: v.clone() for k, v in self.folded_moments.items()}
        return (base, list(self.edits), self.folded, self._before, moments)

    def load_state(self, state: tuple) -> None:
        self.base, edits, self.folded, self._before, self.folded_moments = state
        self.edits = list(edits)

    def clear(self) -> None:
        """Forget every edit and fold: the base is the origin again (the caller restores the weights)."""
        self.base, self.edits, self.folded, self._before, self.folded_moments = None, [], 0, None, {}

    # -- recording ---------------------------------------------------------------------------------------------------

    def wants_snapshot(self) -> bool:
        """Whether `record` should be given the pre-edit weights."""
        return self.policy == "snapshot"

    def record(self, edit: AppliedEdit, before: list[torch.Tensor] | None = None) -> None:
        """Append an applied edit (`before`: its pre-edit weights, kept under the snapshot policy), then fold the
        oldest edits while more than max_edits are recorded."""
        self.edits.append(edit)
        self._before = before if self.policy == "snapshot" else None
        while self.max_edits and len(self.edits) > self.max_edits:
            self.fold(1)

    @torch.no_grad()
    def fold(self, count: int) -> None:
        """Make the weights after the oldest `count` edits the new base (computed by replay on a copy, so the live
        weights are not touched)."""
        count = min(count, len(self.edits))
        if count <= 0:
            return
        if self.base is None:
            self.base = [o.to(dtype=d, copy=True) for o, d in zip(self.origin, self.dtypes)]  # widening: exact
        base = dict(zip(self.names, self.base))
        for edit in self.edits[:count]:
            apply_updates_(base, edit.steps, edit.backend)
            for name, u in edit.keys.items():  # the folded edits stay in the key prior's edit term
                u = u.double()
                self.folded_moments[name] = self.folded_moments.get(name, 0) + u.t() @ u
        del self.edits[:count]
        self.folded += count
        if not self.edits:
            self._before = None

    # -- undo --------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def rebuild_(self, weights: list[torch.Tensor], backend: str | None = None) -> None:
        """weights <- base, then every recorded edit's updates in order, each on its recorded apply backend."""
        ops.restore_(weights, self.base_weights(), backend=backend)
        named = dict(zip(self.names, weights))
        for edit in self.edits:
            apply_updates_(named, edit.steps, edit.backend)

    @torch.no_grad()
    def undo_(self, edit_id: int, weights: list[torch.Tensor], backend: str | None = None) -> AppliedEdit:
        """Remove edit `edit_id` and bring `weights` to the state without it (see the module docstring for what
        "without it" means for an earlier edit). Returns the removed edit. KeyError for an unknown or folded id."""
        pos = next((i for i, e in enumerate(self.edits) if e.edit_id == edit_id), None)
        if pos is None:
            folded = f" ({self.folded} older edit(s) were folded into the base and can no longer be undone)" \
                if self.folded else ""
            raise KeyError(f"no undoable edit with id {edit_id}; recorded: {self.ids()}{folded}")
        removed = self.edits.pop(pos)
        last = pos == len(self.edits)
        if last and self._before is not None:
            ops.restore_(weights, self._before, backend=backend)
        else:
            self.rebuild_(weights, backend)
        self._before = None  # a snapshot belongs to the edit it was taken before; that edit is gone or not last
        return removed
