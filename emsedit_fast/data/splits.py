"""Seeded train/evaluation splits and edit batches (docs/method.md, Evaluation).

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

ZSRE_N_TRAIN = 600  # first 600 of the seeded permutation train, the rest (198) evaluate


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
    dropped. Raises ValueError if T x n_edits exceeds the number of records.
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


# Validation records carved from a training source when data.valid_size is 0: enough for several sequential slices
# (zsRE 10 x 10; CounterFact four slices of 10 x 20). Other record files hold out a tenth.
DEFAULT_VALID = {"zsre": 100, "counterfact": 800}
SPLITS = ("train", "valid", "eval")


def carve_valid(records: Sequence[EditRecord], valid_size: int = 0, seed: int = 0) -> RecordSplit:
    """Split a training source into (train, valid): `valid_size` records (0: the kind's default) of a seeded
    permutation are held out for validation, the rest train. RecordSplit.eval holds the validation records."""
    kind = records[0].kind if records else ""
    n_valid = valid_size or DEFAULT_VALID.get(kind, max(1, len(records) // 10))
    if n_valid >= len(records):
        raise ValueError(f"validation split of {n_valid} records leaves nothing to train on ({len(records)} records); "
                         "lower data.valid_size")
    return split_records(records, len(records) - n_valid, seed)


def load_split(source: str, split: str, *, fmt: str = "auto", seed: int = 0, valid_size: int = 0,
               train_source: str | None = None) -> list[EditRecord]:
    """The records of `split` ("train", "valid" or "eval") from `source`: "bundled" or a records file.

    Tuning reads "valid", never "eval": the validation split is always carved from the TRAINING source, so that
    hyperparameters are chosen on records the reported numbers never see.
      bundled        the package's facts, split by subject group (emsedit_fast.data.facts)
      zsRE file      seeded permutation: the first 600 records are the training part, the rest evaluate; the last
                     `valid_size` (default 100) of the training part validate and the others train
      other files    as a training source: `valid_size` records (CounterFact default 800, else a tenth) of a seeded
                     permutation validate, the rest train; as an evaluation source (split "eval", a file other than
                     the training source): the whole file
    train_source: the run's training source, to refuse an "eval" split that is the (non-zsRE) training file itself.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if source == "bundled":
        from emsedit_fast.data.facts import bundled_facts

        return bundled_facts(split, seed=seed)
    from emsedit_fast.data.schemas import load_records

    records = list(load_records(source, fmt).records)
    if records and records[0].kind == "zsre":
        parts = zsre_split(records, seed=seed)
        if split == "eval":
            return list(parts.eval)
        train = carve_valid(parts.train, valid_size or DEFAULT_VALID["zsre"], seed)
        return list(train.train if split == "train" else train.eval)
    if split == "eval":
        if train_source is not None and _same_file(source, train_source):
            raise ValueError(f"{source}: the evaluation data is the training data; pass a separate evaluation file "
                             "(zsRE files are split into training and evaluation parts automatically)")
        return records
    parts = carve_valid(records, valid_size, seed)
    return list(parts.train if split == "train" else parts.eval)


def _same_file(a: str, b: str) -> bool:
    import os

    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def locality_overlap(records: Sequence[EditRecord], edited: Sequence[EditRecord]) -> list[tuple[str, str]]:
    """(case_id, locality prompt) of `records` whose locality prompt is the edit prompt or a paraphrase of some
    record in `edited`: such a prompt is meant to change, so it cannot measure locality (protocol hygiene)."""
    changed = {p.strip() for r in edited for p in (r.prompt, *r.rephrase_prompts)}
    return [(r.case_id, p) for r in records for p in r.locality_prompts if p.strip() in changed]
