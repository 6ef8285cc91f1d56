"""Seeded train/evaluation splits and edit batches (METHOD.md 3.2).

The permutation comes from `random.Random(seed)`, whose shuffle is stable across Python versions and independent
of torch, numpy and PYTHONHASHSEED, so a recorded (seed, n_train) reproduces a split anywhere.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any
from typing import Sequence

from emsedit_fast.data.schemas import EditRecord

logger = logging.getLogger(__name__)

ZSRE_N_TRAIN = 600  # METHOD.md 3.2: first 600 of the seeded permutation train, the rest (198) evaluate


@dataclass(frozen=True)
class RecordSplit:
    """A train/eval split. train_ids / eval_ids are case_ids in split order; store `to_dict()` with every run."""

    train: list[EditRecord]
    eval: list[EditRecord]
    seed: int
    train_ids: tuple[str, ...]
    eval_ids: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "n_train": len(self.train),
            "n_eval": len(self.eval),
            "train_ids": list(self.train_ids),
            "eval_ids": list(self.eval_ids),
        }


def permutation(n: int, seed: int) -> list[int]:
    """A seeded permutation of range(n) (Fisher-Yates via random.Random(seed).shuffle)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def split_records(records: Sequence[EditRecord], n_train: int, seed: int = 0) -> RecordSplit:
    """Permute `records` with `seed`; the first `n_train` train and the rest evaluate.

    Raises ValueError unless 0 <= n_train <= len(records).
    """
    if not 0 <= n_train <= len(records):
        raise ValueError(f"split_records: n_train={n_train} must lie in [0, {len(records)}] (number of records)")
    order = permutation(len(records), seed)
    train = [records[i] for i in order[:n_train]]
    held_out = [records[i] for i in order[n_train:]]
    split = RecordSplit(train=train, eval=held_out, seed=seed, train_ids=tuple(r.case_id for r in train),
                        eval_ids=tuple(r.case_id for r in held_out))
    logger.info("split %d records with seed %d: %d train, %d eval", len(records), seed, len(train), len(held_out))
    return split


def zsre_split(records: Sequence[EditRecord], n_train: int = ZSRE_N_TRAIN, seed: int = 0) -> RecordSplit:
    """The zsRE protocol split: after cleaning, a seeded permutation (seed 0); first 600 train, the rest evaluate."""
    return split_records(records, n_train, seed)


def batches(records: Sequence[EditRecord], n_edits: int, n_batches: int | None = None) -> list[list[EditRecord]]:
    """Consecutive batches of `n_edits` records, without replacement, in the given order (shuffle with the split).

    n_batches: T, the number of batches; None takes as many full batches as fit. The last incomplete batch is
    dropped (METHOD.md 3.2). Raises ValueError if T x n_edits exceeds the number of records.
    """
    if n_edits < 1:
        raise ValueError(f"batches: n_edits must be >= 1, got {n_edits}")
    available = len(records) // n_edits
    if n_batches is None:
        n_batches = available
        if n_batches == 0:
            raise ValueError(f"batches: n_edits={n_edits} exceeds the {len(records)} records available")
    elif n_batches < 1:
        raise ValueError(f"batches: n_batches must be >= 1 or None, got {n_batches}")
    elif n_batches > available:
        raise ValueError(f"batches: T x n_edits = {n_batches} x {n_edits} = {n_batches * n_edits} does not fit the "
                         f"{len(records)} records available (at most {available} batches of {n_edits})")
    unused = len(records) - n_batches * n_edits
    if unused:
        logger.info("batches: %d x %d edits use %d of %d records; %d left out", n_batches, n_edits,
                    n_batches * n_edits, len(records), unused)
    return [list(records[b * n_edits:(b + 1) * n_edits]) for b in range(n_batches)]
