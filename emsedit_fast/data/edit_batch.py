"""An edit batch tokenised into the three views the editors and the trainer use.

    edit   (prompt, target_new), subject marked    caching passes (what the editor edits)
    equiv  (first rephrase, target_new)            the meta-training edit loss
    unrel  (first locality prompt, its answer)     the KL locality loss (absent when records carry no locality)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from emsedit_fast.data.collate import TokenBatch
from emsedit_fast.data.collate import collate
from emsedit_fast.data.collate import record_tuples
from emsedit_fast.data.schemas import EditRecord


@dataclass
class EditBatch:
    records: list[EditRecord]
    edit: TokenBatch
    equiv: TokenBatch | None
    unrel: TokenBatch | None

    @property
    def request_ids(self) -> list[str]:
        return [str(r.case_id) for r in self.records]


def _pairs(records, which):
    tuples, _ = record_tuples(records, which, first_only=True)
    return [t[:2] for t in tuples]  # the foil only matters for scoring


def tokenize_batch(tokenizer, records: Sequence[EditRecord], micro_batch: int = 4, max_length: int = 128,
                   device: torch.device | str = "cpu", need_equiv: bool = True, need_unrel: bool = False) -> EditBatch:
    """Tokenise `records` into an EditBatch on `device`. need_equiv / need_unrel ask for the training views; a record
    without a rephrase (or locality prompt) is then an error that names it."""
    records = list(records)
    if not records:
        raise ValueError("an edit batch needs at least one record")

    def view(which):
        # the edit prompts carry their subject's position (editor.key_positions "subject" reads keys there)
        def subjects(rs):
            return [r.subject for r in rs] if which == "edit" else None

        try:
            return collate(tokenizer, _pairs(records, which), micro_batch, max_length, subjects(records)).to(device)
        except ValueError:  # name the record: redo each alone (only on this error path)
            for r in records:
                try:
                    collate(tokenizer, _pairs([r], which), micro_batch, max_length, subjects([r]))
                except ValueError as err:
                    raise ValueError(f"record {r.case_id!r} ({which} tuple): {err}") from None
            raise

    edit = view("edit")
    equiv = view("equiv") if need_equiv else None
    unrel = view("unrel") if need_unrel else None
    return EditBatch(records, edit, equiv, unrel)


def make_batches(tokenizer, records: Sequence[EditRecord], n_edits: int, n_batches: int | None, micro_batch: int = 4,
                 max_length: int = 128, device: torch.device | str = "cpu", need_equiv: bool = True,
                 need_unrel: bool = False, *, shuffle_seed: int | None = None) -> list[EditBatch]:
    """n_batches tokenised batches of n_edits records without replacement (None: as many as fit; the last incomplete
    batch is dropped); with shuffle_seed the records are permuted first (random.Random(seed)). Raises when the
    protocol does not fit the records."""
    import random

    from emsedit_fast.data.splits import batches as cut

    records = list(records)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(records)
    return [tokenize_batch(tokenizer, group, micro_batch, max_length, device, need_equiv, need_unrel)
            for group in cut(records, n_edits, n_batches)]
