"""Python API behind the commands: open a session, train its editor, edit with it, evaluate it.

    session = open_session(cfg)                            # model, tokenizer, edited modules, a new editor
    session = open_session(checkpoint="runs/x/checkpoint", journal="runs/x/journal")   # a trained editor
    trainer = train(session)                               # meta-training on cfg.data.train (+ validation curve)
    results, refused = edit(session, records)              # K MSBP steps per batch, recorded (and journaled)
    metrics = evaluate_protocol(session, records, "sequential", n_edits, n_batches)   # edit, score, restore
    session.editor.revert(results[-1].applied.edit_id)     # exact undo
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch

from emsedit_fast.config import RunConfig
from emsedit_fast.data.edit_batch import make_batches  # noqa: F401  (part of the API)
from emsedit_fast.data.edit_batch import tokenize_batch
from emsedit_fast.data.schemas import EditRecord
from emsedit_fast.editors import Editor
from emsedit_fast.editors import build_editor
from emsedit_fast.models.adapter import EditedModule
from emsedit_fast.models.adapter import default_module_patterns
from emsedit_fast.models.adapter import promote_edited_modules
from emsedit_fast.models.adapter import resolve_modules
from emsedit_fast.models.adapter import set_attention
from emsedit_fast.protocol import evaluate_protocol  # noqa: F401  (part of the API)
from emsedit_fast.protocol import evaluate_slices  # noqa: F401  (part of the API)
from emsedit_fast.protocol import protocol_pre_edit  # noqa: F401  (part of the API)
from emsedit_fast.updates import AppliedEdit

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


@dataclasses.dataclass
class Session:
    """A loaded model with its tokenizer, edited modules and editor; optionally the checkpoint the editor came from
    (its meta.json) and the journal that records every edit (with the header of its base model)."""

    cfg: RunConfig
    model: torch.nn.Module
    tokenizer: object
    modules: list[EditedModule]
    editor: Editor
    device: torch.device
    checkpoint: dict | None = None
    journal: object | None = None
    header: dict | None = None


def load_model(cfg: RunConfig):
    """(model, tokenizer, device) for cfg.model, in eval mode, with no parameter requiring grad."""
    from emsedit_fast.models.smollm2 import load_model as _load

    device = resolve_device(cfg.model.device)
    model, tokenizer = _load(cfg.model.name, dtype=DTYPES[cfg.model.dtype], device=device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer, device


def open_session(cfg: RunConfig | None = None, *, checkpoint: str | None = None, model=None, tokenizer=None,
                 editor_device: str | torch.device | None = None, journal: str | None = None,
                 allow_backend_change: bool = False, key_statistics=None) -> Session:
    """The one way to get a session: load (or take) the model, resolve the edited modules, build the editor.

    checkpoint: a trained editor (train's output); cfg then defaults to its config.yaml, the mode is the
    checkpoint's, and its hypernetworks, normaliser and key statistics are loaded (after checking that it was trained
    for this model). editor_device: where the hypernetworks live (default: the model's device). journal: a journal
    folder; the model is brought to the journal's state (its active edits replayed) and `edit` records every edit
    there. An editor with a key prior and no checkpoint estimates its key statistics from the training split, or takes
    them from `key_statistics` (an estimated KeyPrior over the same layers, e.g. another session's editor.prior).
    """
    from emsedit_fast import checkpoint as ckpt

    meta = None
    if checkpoint is not None:
        meta = ckpt.read_meta(checkpoint)
        cfg = cfg if cfg is not None else ckpt.load_config(checkpoint)
        if cfg.train.mode != meta["mode"]:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mode=meta["mode"]))
    if cfg is None:
        raise ValueError("open_session needs a config or a checkpoint")
    if model is None:
        model, tokenizer, device = load_model(cfg)
    else:
        device = next(model.parameters()).device
        model.eval()
        model.requires_grad_(False)
    set_attention(model, cfg.model.attention)
    patterns = list(cfg.model.modules) or default_module_patterns(model, cfg.train.mode)
    modules = resolve_modules(model, patterns)
    if cfg.model.edited_dtype != "model":
        promote_edited_modules(modules, torch.float32)
    editor = build_editor(model, modules, cfg.editor, cfg.train.mode, seed=cfg.seed,
                          device=resolve_device(str(editor_device)) if editor_device is not None else device)
    session = Session(cfg, model, tokenizer, modules, editor, device, checkpoint=meta)
    if checkpoint is not None:
        ckpt.load_editor_state(checkpoint, editor)
    elif cfg.editor.key_prior > 0:
        if key_statistics is not None:
            editor.prior.take_key_statistics(key_statistics)
        else:
            fit_key_prior(session)
    if journal is not None:
        from emsedit_fast.journal import open_journal

        session.journal, session.header = open_journal(
            journal, model, modules, model_name=cfg.model.name, model_dtype=cfg.model.dtype,
            checkpoint_id=ckpt.checkpoint_hash(meta) if meta is not None else None, editor=editor,
            allow_backend_change=allow_backend_change)
    return session


def split_source(cfg: RunConfig, split: str) -> str:
    """The records file (or 'bundled') a split of the run is read from: train and valid come from cfg.data.train (the
    validation split is carved from the training source), eval from cfg.data.eval (else the training source)."""
    return (cfg.data.eval or cfg.data.train) if split == "eval" else cfg.data.train


def load_split(session_or_cfg, split: str, source: str | None = None) -> list[EditRecord]:
    """Records of `split` ("train", "valid" or "eval") of the run, from `split_source`; `source` overrides the
    file."""
    from emsedit_fast.data.splits import load_split as _load

    cfg = session_or_cfg.cfg if isinstance(session_or_cfg, Session) else session_or_cfg
    if source is None:
        source = split_source(cfg, split)
    return _load(source, split, fmt=cfg.data.format, seed=cfg.data.split_seed, valid_size=cfg.data.valid_size,
                 train_source=cfg.data.train if split == "eval" else None)


def fit_key_prior(session: Session, records: list[EditRecord] | None = None) -> int:
    """Estimate the editor's key statistics (editor.key_prior) from every prompt of `records` (default: the first
    train.prior_records training records): their edit, paraphrase and locality prompts, at the positions
    train.prior_positions names: every token, the answer positions (the inputs that unrelated predictions are made
    from), or those and the last token of the record's subject in its edit and paraphrase prompts."""
    from emsedit_fast.data.collate import collate
    from emsedit_fast.data.collate import record_tuples

    cfg = session.cfg
    records = list(records if records is not None else load_split(session, "train")[:cfg.train.prior_records])
    tuples, subjects = [], []
    for which in ("edit", "equiv", "unrel"):
        found, owners = record_tuples(records, which, first_only=True)
        tuples += [t[:2] for t in found]
        # edit and paraphrase prompts name the record's subject; a locality prompt is about another one
        subjects += [records[o].subject if which != "unrel" else None for o in owners]
    where = cfg.train.prior_positions
    batch = collate(session.tokenizer, tuples, micro_batch=16, max_length=cfg.model.max_length,
                    subjects=subjects if "subject" in where else None).to(session.device)
    return session.editor.fit_key_prior(batch.micro_batches(), positions=where)


# ----------------------------------------------------------------------------------------------------------------------
# training


def training_batches(session: Session, records: list[EditRecord]) -> list:
    """The run's training batches: `train.epochs` passes over `records` (each reshuffled with seed + epoch), or
    train.n_batches batches when epochs is 0; the last incomplete batch of a pass is dropped."""
    cfg = session.cfg
    per_epoch = len(records) // cfg.data.n_edits
    if per_epoch == 0:
        raise ValueError(f"data.train has {len(records)} records, fewer than data.n_edits={cfg.data.n_edits}")
    total = math.ceil(cfg.train.epochs * per_epoch) if cfg.train.epochs > 0 else cfg.train.n_batches
    batches, epoch = [], 0
    while len(batches) < total:  # more batches than one pass allows: reshuffle and go again
        take = min(per_epoch, total - len(batches))
        batches += make_batches(session.tokenizer, records, cfg.data.n_edits, take, cfg.train.micro_batch,
                                cfg.model.max_length, session.device, need_unrel=cfg.train.loss != "l2",
                                shuffle_seed=cfg.seed + epoch)
        epoch += 1
    return batches


def eval_points(total: int, every: float) -> list[int]:
    """Training steps after which to validate: every `every` batches (>= 1) or every fraction `every` of the run
    (< 1), ending at `total`; [] when every is 0."""
    if every <= 0 or total <= 0:
        return []
    step = every * total if every < 1 else every
    points = sorted({min(total, max(1, round(step * i))) for i in range(1, math.ceil(total / step) + 1)})
    return points


def train(session: Session, records: list[EditRecord] | None = None, *, trainer=None, valid=None,
          progress: bool | None = None, callbacks=()):
    """Meta-train session.editor on `records` (default: the run's training split) for train.epochs passes (or
    train.n_batches batches). With train.eval_every, the editor is validated on `valid` (default: the validation
    split) under the sequential/batch protocol of the run before training and at those points; the learning curve
    lands in trainer.report.curve. Returns the trainer."""
    from emsedit_fast.callbacks import Callback
    from emsedit_fast.trainer import MetaTrainer

    cfg = session.cfg
    if not cfg.editor.trainable:
        log.info("%s is training-free: nothing to train", cfg.editor.name)
        return trainer or MetaTrainer(session.editor, cfg.train, list(callbacks))
    records = records if records is not None else load_split(session, "train")
    batches = training_batches(session, records)
    trainer = trainer or MetaTrainer(session.editor, cfg.train, list(callbacks))
    points = eval_points(len(batches), cfg.train.eval_every)
    if points:
        valid = valid if valid is not None else load_split(session, "valid")
        n_edits, t = cfg.data.n_edits, cfg.data.eval_batches
        if cfg.train.mode == "sequential":
            t = min(t, len(valid) // n_edits)
        pre = protocol_pre_edit(session, valid, cfg.train.mode, n_edits, t)

        def validate(step):
            with trainer.averaged():  # train.ema: the average is the editor the run validates and keeps
                m = evaluate_protocol(session, valid, cfg.train.mode, n_edits, t, pre_edit=pre, progress=False)
                point = {"step": step, "fraction": step / len(batches),
                         **{k: m[k] for k in ("es", "gs", "ls", "ls_gold", "ls_agree", "ps") if k in m}}
                trainer.report.curve.append(point)
                if cfg.train.keep == "best":
                    score = selection_score(point)
                    if trainer.best is None or score > trainer.best["score"]:
                        trainer.best = {"step": step, "score": score, "state": session.editor.editor_state()}
            log.info("validation after %d/%d batches: %s", step, len(batches),
                     ", ".join(f"{k}={v:.2f}" for k, v in point.items() if isinstance(v, float)))

        class Validate(Callback):
            def on_train_step(self, trainer_, metrics):
                if metrics["step"] in points:
                    validate(metrics["step"])

        if trainer.step == 0 and not trainer.report.curve:
            validate(0)
        trainer.callbacks.append(Validate())
    try:
        trainer.train(batches, progress=progress)
    finally:
        if points:
            trainer.callbacks.pop()
    trainer.use_average()
    if cfg.train.keep == "best" and trainer.best is not None:
        # the kept point's buffers hold the edit term of its training sequence: reset clears it (and restores W0)
        own = session.editor.state_dict()
        session.editor.load_state_dict({k: v.to(own[k].device) for k, v in trainer.best["state"].items()})
        session.editor.reset()
        trainer.report.kept_step = trainer.best["step"]
        log.info("train.keep best: kept the editor after %d of %d batches (validation mean of ES, GS, LS-agree "
                 "%.2f)", trainer.best["step"], len(batches), trainer.best["score"])
    return trainer


SELECTION_SCORES = ("es", "gs", "ls_agree")


def selection_score(point: dict) -> float:
    """What train.keep best maximises over the validation points: the mean of ES, GS and LS-agree (the three
    columns every protocol reports; one point of each counts the same)."""
    return sum(point[k] for k in SELECTION_SCORES) / len(SELECTION_SCORES)


# ----------------------------------------------------------------------------------------------------------------------
# editing


@dataclasses.dataclass
class EditResult:
    """One edited batch: its journal line (or the same fields without a journal) and the editor's AppliedEdit."""

    line: dict
    applied: AppliedEdit


def edit(session: Session, records: list[EditRecord], *, n_edits: int | None = None, n_steps: int | None = None,
         checkpoint: dict | None = None, measure: bool = True, progress: bool | None = None
         ) -> tuple[list[EditResult], list[tuple[list[str], str]]]:
    """Edit `records` into session.model with session.editor, recording every batch in session.journal if any.

    n_edits: records per batch, edited one after another on the model the previous ones produced (None: all records
    as one batch). n_steps: K MSBP steps (default: the editor's). checkpoint: {"path", "hash"} of the editor
    checkpoint, stored in each journal line. measure: efficacy on the batch's facts right after its edit. A batch
    whose journal write fails is taken back out of the model (exactly) before the error propagates, so the model
    never holds an unrecorded edit. Returns (one EditResult per applied batch, [(case ids, reason)] of refused
    batches; a refused batch leaves the model unchanged).
    """
    from tqdm.auto import tqdm

    from emsedit_fast.editors import EditRefused
    from emsedit_fast.protocol import efficacy

    cfg, editor, journal = session.cfg, session.editor, session.journal
    records = list(records)
    if not records:
        raise ValueError("edit: needs at least one record")
    if n_edits is not None and n_edits < 1:
        raise ValueError(f"n_edits must be >= 1 (or None for one batch), got {n_edits}")
    size = n_edits or len(records)
    chunks = [records[i:i + size] for i in range(0, len(records), size)]
    results, refused = [], []
    for chunk in tqdm(chunks, desc=f"edit (K={n_steps or editor.cfg.n_steps})", unit="batch",
                      disable=(not progress) if progress is not None else None):
        batch = tokenize_batch(session.tokenizer, chunk, cfg.train.micro_batch, cfg.model.max_length, session.device,
                               need_equiv=False)
        stats_before = editor.normaliser_state()
        try:
            applied = editor.edit(batch.edit, n_steps=n_steps, request_ids=batch.request_ids)
        except EditRefused as err:
            refused.append(([r.case_id for r in chunk], str(err)))
            log.warning("edit batch %s refused (model unchanged): %s", [r.case_id for r in chunk], err)
            continue
        applied.normaliser = {k: v.cpu() for k, v in editor.normaliser_state().items()}
        line = {
            "n_facts": len(chunk),
            "request_ids": list(applied.request_ids),
            "facts": [{"case_id": r.case_id, "prompt": r.prompt, "target_new": r.target_new} for r in chunk],
            "editor": {"name": editor.cfg.name, "mode": editor.mode, "n_steps": len(applied.steps)},
            "editor_checkpoint": checkpoint or {},
            "base_fingerprint": (session.header or {}).get("base_fingerprint"),
            "backend": {"ops": dict(applied.ops_ran)},
            "device": {"model": str(session.device), "editor": str(editor.device)},
            "seconds": applied.seconds,
        }
        if measure:
            line["efficacy"] = efficacy(session.model, session.tokenizer, chunk, max_length=cfg.model.max_length)
        if journal is not None:
            try:
                line = journal.record(applied.cpu(), line, session.header)
            except BaseException:  # not committed: take the edit back out (exactly) so model and journal agree
                editor.revert(applied.edit_id)
                editor.load_normaliser_state(stats_before)
                raise
        else:
            line = {**line, "delta_norms": applied.delta_norms(),
                    "backend": {"apply": dict(applied.backend), **line["backend"]}}
        applied.info = dict(line)
        results.append(EditResult(line, applied))
    return results, refused
