"""Editing protocols: edit a set of records with a session's editor, score them, put everything back.

    sequential T x n   T batches of n edits applied one after another (lifelong); every record is scored with the
                       final weights, so the scores include forgetting of early edits
    batch n            one batch of n edits applied at once

`evaluate_protocol` restores the model's edited weights, the editor's state (hypernetworks, normaliser statistics)
and its undo history afterwards, so evaluating twice gives the same numbers and training can continue after a
validation run. Scores are in percent (emsedit_fast.metrics; docs/method.md, "Evaluation").
"""

from __future__ import annotations

import dataclasses
import logging
import time

from emsedit_fast.data.edit_batch import EditBatch
from emsedit_fast.data.edit_batch import make_batches
from emsedit_fast.data.schemas import EditRecord

log = logging.getLogger(__name__)


def protocol_batches(session, records: list[EditRecord], mode: str, n_edits: int, n_batches: int
                     ) -> list[EditBatch]:
    """The edit batches of a protocol: n_batches x n_edits (sequential) or one batch of n_edits, in record order."""
    t_batches = n_batches if mode == "sequential" else 1
    cfg = session.cfg
    return make_batches(session.tokenizer, records, n_edits, t_batches, cfg.train.micro_batch, cfg.model.max_length,
                        session.device, need_equiv=False)


def protocol_pre_edit(session, records: list[EditRecord], mode: str, n_edits: int, n_batches: int,
                      batch_size: int = 16):
    """The unedited model's predictions on the records a protocol uses (for LS-agree), computed once."""
    from emsedit_fast.metrics import pre_edit_predictions

    used = [r for b in protocol_batches(session, records, mode, n_edits, n_batches) for r in b.records]
    return pre_edit_predictions(session.model, session.tokenizer, used, batch_size=batch_size,
                                max_length=session.cfg.model.max_length)


def evaluate_protocol(session, records: list[EditRecord], mode: str, n_edits: int, n_batches: int,
                      n_steps: int | None = None, *, edit: bool = True, progress: bool | None = None,
                      batch_size: int = 16, curve_at: tuple[int, ...] = (), pre_edit=None,
                      fluency_tokens: int = 0) -> dict:
    """Edit, then measure, then put model and editor back exactly as they were.

    sequential: n_batches batches of n_edits, edited one after another; metrics on all of their records at the end.
    batch: one batch of n_edits edited at once. edit=False measures the unedited model on the same records.
    curve_at: in the sequential protocol, also score the records edited so far after these batch counts (the
    "metrics against the number of edits" curve). pre_edit: the unedited model's predictions on these records
    (computed here when None; `protocol_pre_edit` computes them once for several editors). fluency_tokens > 0: also
    generate that many tokens greedily from the records' generation prompts on the edited model and report their
    n-gram entropy as "fluency". Returns the metrics (percent) plus timing and the protocol.
    """
    from emsedit_fast.fluency import fluency
    from emsedit_fast.metrics import evaluate_records
    from emsedit_fast.metrics import pre_edit_predictions

    editor = session.editor
    cfg = session.cfg
    t_batches = n_batches if mode == "sequential" else 1
    batches = protocol_batches(session, records, mode, n_edits, n_batches)
    used = [r for b in batches for r in b.records]
    saved = editor.session_state()
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
        editor.load_session_state(saved)
    metrics = dict(metrics)
    metrics.update({
        "edit_seconds_per_edit": seconds / max(len(used), 1) if edit else 0.0,
        "refused_batches": refused,
        "curve": curve + ([{"edits": len(used), "edit_seconds_per_edit": seconds / max(len(used), 1),
                            **{k: v for k, v in metrics.items() if isinstance(v, float)}}] if curve_at else []),
        "protocol": {"mode": mode, "batches": t_batches, "n_edits": n_edits,
                     "n_steps": n_steps or editor.cfg.n_steps, "edited": edit, "records": len(used)},
    })
    return metrics


def evaluate_slices(session, records: list[EditRecord], mode: str, n_edits: int, n_batches: int, n_slices: int,
                    n_steps: int | None = None, *, edit: bool = True, progress: bool | None = None) -> dict:
    """`evaluate_protocol` on `n_slices` disjoint consecutive slices of T x n records; returns the per-slice metrics
    and, per metric, the mean and the spread (min, max, standard deviation): one slice can mislead."""
    per = (n_batches if mode == "sequential" else 1) * n_edits
    if n_slices < 1 or n_slices * per > len(records):
        raise ValueError(f"{n_slices} slices of {per} records do not fit the {len(records)} records")
    slices = [evaluate_protocol(session, records[i * per:(i + 1) * per], mode, n_edits, n_batches, n_steps,
                                edit=edit, progress=progress) for i in range(n_slices)]
    summary = {}
    for key in ("es", "gs", "ls", "ls_gold", "ls_agree", "ps"):
        values = [s[key] for s in slices if isinstance(s.get(key), float)]
        if values:
            mean = sum(values) / len(values)
            std = (sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5
            summary[key] = mean
            summary[key + "_spread"] = {"min": min(values), "max": max(values), "std": std}
    summary["edit_seconds_per_edit"] = sum(s["edit_seconds_per_edit"] for s in slices) / len(slices)
    summary["slices"] = slices
    summary["protocol"] = dict(slices[0]["protocol"], slices=n_slices)
    return summary


def efficacy(model, tokenizer, records, *, max_length: int = 128, batch_size: int = 16) -> float:
    """ES (percent) of `model` on the records' own edit prompts (accuracy or margin by record kind)."""
    from emsedit_fast.metrics import evaluate

    stripped = [dataclasses.replace(r, rephrase_prompts=(), locality_prompts=(), locality_answers=(),
                                    portability_prompts=(), portability_answers=(), generation_prompts=())
                for r in records]
    families: dict[str, list] = {}
    for r in stripped:
        families.setdefault(r.metric_family, []).append(r)
    total = 0.0
    for recs in families.values():
        res = evaluate(model, tokenizer, recs, batch_size=batch_size, max_length=max_length, progress=False)
        total += res.metrics["es"] * len(recs)
    return total / len(stripped)
