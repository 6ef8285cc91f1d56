"""Python API behind the commands: load a model, build an editor, train it, edit with it, evaluate it.

    session = open_session(cfg)                       # model, tokenizer, edited modules, editor
    report = train(session, cfg)                      # meta-training on cfg.data.train
    results = evaluate_protocol(session, records, cfg.train.mode, n_edits, n_batches)
    entry = edit(session, records)                    # K MSBP steps, recorded (session.editor.revert(entry.edit_id))
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import torch

from emsedit_fast.config import RunConfig
from emsedit_fast.data.edit_batch import EditBatch
from emsedit_fast.data.edit_batch import tokenize_batch
from emsedit_fast.data.schemas import EditRecord
from emsedit_fast.editors import Editor
from emsedit_fast.editors import build_editor
from emsedit_fast.models.adapter import EditedModule
from emsedit_fast.models.adapter import default_module_patterns
from emsedit_fast.models.adapter import resolve_modules

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as given (validated)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"model.device: {name!r} is not a device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device: {name!r} requested but no CUDA device is available")
    return device


@dataclass
class Session:
    """A loaded model with its tokenizer, edited modules and editor."""

    cfg: RunConfig
    model: torch.nn.Module
    tokenizer: object
    modules: list[EditedModule]
    editor: Editor
    device: torch.device


def load_model(cfg: RunConfig):
    """(model, tokenizer) for cfg.model, in eval mode, on its device, with no parameter requiring grad."""
    from emsedit_fast.models.smollm2 import load_model as _load

    device = resolve_device(cfg.model.device)
    model, tokenizer = _load(cfg.model.name, dtype=DTYPES[cfg.model.dtype], device=device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer, device


def open_session(cfg: RunConfig, model=None, tokenizer=None) -> Session:
    """Load (or take) the model, resolve the edited modules and build the configured editor."""
    if model is None:
        model, tokenizer, device = load_model(cfg)
    else:
        device = next(model.parameters()).device
        model.eval()
        model.requires_grad_(False)
    patterns = list(cfg.model.modules) or default_module_patterns(model, cfg.train.mode)
    modules = resolve_modules(model, patterns)
    editor = build_editor(model, modules, cfg.editor, cfg.train.mode, seed=cfg.seed, device=device)
    return Session(cfg, model, tokenizer, modules, editor, device)


# ----------------------------------------------------------------------------------------------------------------------
# data


def load_split(source: str, split: str, cfg: RunConfig) -> list[EditRecord]:
    """Records for `split` ('train' or 'eval') from 'bundled' or a records file.

    A zsRE file (one file for both) is split by a seeded permutation (METHOD.md 3.2); any other file is used whole.
    """
    if source == "bundled":
        from emsedit_fast.data.facts import bundled_facts

        return bundled_facts(split, seed=cfg.seed)
    from emsedit_fast.data.schemas import load_records
    from emsedit_fast.data.splits import zsre_split

    result = load_records(source, cfg.data.format)
    records = list(result.records)
    if records and records[0].kind == "zsre":
        parts = zsre_split(records, seed=cfg.data.zsre_split_seed)
        return list(parts.train if split == "train" else parts.eval)
    return records


def make_batches(tokenizer, records: list[EditRecord], n_edits: int, n_batches: int, cfg: RunConfig, device,
                 *, shuffle_seed: int | None = None, need_equiv: bool = True, need_unrel: bool = False
                 ) -> list[EditBatch]:
    """n_batches batches of n_edits records without replacement (the last incomplete batch is dropped); with
    shuffle_seed the records are permuted first. Raises when the protocol does not fit the records."""
    from emsedit_fast.data.splits import batches as cut

    records = list(records)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(records)
    groups = cut(records, n_edits, n_batches)
    return [tokenize_batch(tokenizer, g, cfg.train.micro_batch, cfg.model.max_length, device, need_equiv, need_unrel)
            for g in groups]


# ----------------------------------------------------------------------------------------------------------------------
# training, editing, evaluation


def train(session: Session, cfg: RunConfig, records: list[EditRecord] | None = None, trainer=None,
          progress: bool | None = None, callbacks=()):
    """Meta-train session.editor on cfg.data.train for cfg.train.n_batches batches; returns the trainer."""
    from emsedit_fast.training import MetaTrainer

    records = records if records is not None else load_split(cfg.data.train, "train", cfg)
    per_epoch = len(records) // cfg.data.n_edits
    if per_epoch == 0:
        raise ValueError(f"data.train has {len(records)} records, fewer than data.n_edits={cfg.data.n_edits}")
    batches = []
    epoch = 0
    while len(batches) < cfg.train.n_batches:  # more batches than one pass allows: reshuffle and go again
        take = min(per_epoch, cfg.train.n_batches - len(batches))
        batches += make_batches(session.tokenizer, records, cfg.data.n_edits, take, cfg, session.device,
                                shuffle_seed=cfg.seed + epoch, need_unrel=cfg.train.loss != "l2")
        epoch += 1
    trainer = trainer or MetaTrainer(session.editor, cfg.train, list(callbacks))
    trainer.train(batches, progress=progress)
    return trainer


def edit(session: Session, records: list[EditRecord], n_steps: int | None = None):
    """Apply K MSBP steps of session.editor to `records` as one batch; returns the recorded AppliedEdit."""
    cfg = session.cfg
    batch = tokenize_batch(session.tokenizer, records, cfg.train.micro_batch, cfg.model.max_length, session.device,
                           need_equiv=False)
    return session.editor.edit(batch.edit, n_steps=n_steps, request_ids=batch.request_ids)


def protocol_pre_edit(session: Session, records: list[EditRecord], mode: str, n_edits: int, n_batches: int,
                      batch_size: int = 16):
    """The unedited model's predictions on the records a protocol uses (for LS-agree), computed once."""
    from emsedit_fast.evaluation import pre_edit_predictions

    used = [r for b in _protocol_batches(session, records, mode, n_edits, n_batches) for r in b.records]
    return pre_edit_predictions(session.model, session.tokenizer, used, batch_size=batch_size,
                                max_length=session.cfg.model.max_length)


def _protocol_batches(session: Session, records, mode: str, n_edits: int, n_batches: int) -> list[EditBatch]:
    t_batches = n_batches if mode == "sequential" else 1
    return make_batches(session.tokenizer, records, n_edits, t_batches, session.cfg, session.device, need_equiv=False)


def evaluate_protocol(session: Session, records: list[EditRecord], mode: str, n_edits: int, n_batches: int,
                      n_steps: int | None = None, *, edit: bool = True, progress: bool | None = None,
                      batch_size: int = 16, curve_at: tuple[int, ...] = (), pre_edit=None,
                      fluency_tokens: int = 0) -> dict:
    """Edit, then measure (METHOD.md 16.3), then put model and editor back exactly as they were.

    sequential: n_batches batches of n_edits, edited one after another; metrics on all of their records at the end.
    batch: one batch of n_edits edited at once. edit=False measures the unedited model on the same records.
    curve_at: in the sequential protocol, also score the records edited so far after these batch counts (the
    "metrics against the number of edits" curve). pre_edit: the unedited model's predictions on these records
    (computed here when None; `protocol_pre_edit` computes them once for several editors). fluency_tokens > 0: also
    generate that many tokens greedily from the records' generation prompts on the edited model and report their
    n-gram entropy as "fluency" (METHOD.md 16.4). Returns the metrics (percent) plus timing and the protocol.
    """
    from emsedit_fast import ops
    from emsedit_fast.evaluation import evaluate_records
    from emsedit_fast.evaluation import fluency
    from emsedit_fast.evaluation import pre_edit_predictions

    editor = session.editor
    cfg = session.cfg
    t_batches = n_batches if mode == "sequential" else 1
    batches = _protocol_batches(session, records, mode, n_edits, n_batches)
    used = [r for b in batches for r in b.records]
    state = editor.editor_state()
    history = list(editor.history)
    weights_before = ops.snapshot(editor.weights())
    reference = pre_edit if pre_edit is not None else pre_edit_predictions(
        session.model, session.tokenizer, used, batch_size=batch_size, max_length=cfg.model.max_length)
    prefixes = {t: [r for b in batches[:t] for r in b.records] for t in curve_at if t < len(batches)}
    prefix_refs = {t: pre_edit_predictions(session.model, session.tokenizer, recs, batch_size=batch_size,
                                           max_length=cfg.model.max_length) for t, recs in prefixes.items()}
    seconds = 0.0
    refused = 0
    curve = []
    try:
        editor.reset()
        if edit:
            from tqdm.auto import tqdm

            from emsedit_fast.editors import EditRefused

            bar = tqdm(batches, desc=f"edit ({mode}, K={n_steps or editor.cfg.n_steps})", unit="batch",
                       disable=(not progress) if progress is not None else None)
            for t, batch in enumerate(bar, start=1):
                start = time.perf_counter()
                try:
                    editor.edit(batch.edit, n_steps=n_steps, request_ids=batch.request_ids)
                except EditRefused as err:  # counted and reported, never silently applied
                    refused += 1
                    log.warning("evaluation edit refused: %s", err)
                seconds += time.perf_counter() - start
                if t in prefixes:
                    point = evaluate_records(session.model, session.tokenizer, prefixes[t], pre_edit=prefix_refs[t],
                                             batch_size=batch_size, max_length=cfg.model.max_length, progress=False)
                    curve.append({"edits": len(prefixes[t]), "edit_seconds_per_edit": seconds / len(prefixes[t]),
                                  **point})
        metrics = evaluate_records(session.model, session.tokenizer, used, pre_edit=reference,
                                   batch_size=batch_size, max_length=cfg.model.max_length, progress=progress)
        if fluency_tokens > 0:
            metrics["fluency"], metrics["counts"]["fluency"] = fluency(
                session.model, session.tokenizer, used, max_new_tokens=fluency_tokens, batch_size=batch_size,
                progress=progress)
            metrics["metric_protocol"]["fluency"] = (f"ROME n-gram entropy (2/3 H2 + 4/3 H3) / 2 of prompt + "
                                                     f"{fluency_tokens} greedy tokens, mean over texts")
    finally:
        editor.reset()
        ops.restore_(editor.weights(), weights_before, backend=editor.backend)
        editor.load_state_dict(state)
        editor.history.extend(history)
    metrics = dict(metrics)
    metrics.update({
        "edit_seconds_per_edit": seconds / max(len(used), 1) if edit else 0.0,
        "refused_batches": refused,
        "curve": curve + ([{"edits": len(used), "edit_seconds_per_edit": seconds / max(len(used), 1),
                            **{k: v for k, v in metrics.items() if isinstance(v, float)}}] if curve_at else []),
        "protocol": {"mode": mode, "batches": t_batches, "n_edits": n_edits, "n_steps": n_steps or editor.cfg.n_steps,
                     "edited": edit, "records": len(used)},
    })
    return metrics
