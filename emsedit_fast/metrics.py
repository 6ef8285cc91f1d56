"""Evaluation metrics: ES / GS / LS / portability, teacher-forced on fp32 logits, in percent (docs/method.md,
"Evaluation").

Metric functions work on padded batches from `emsedit_fast.data.collate`: logits (B, T, V) of any float dtype and
pre-shifted labels (B, T) int64 with -100 off the answer positions, so logits[b, t] scores labels[b, t]. They are
vectorised over rows and positions.

- `token_accuracy`: zsRE-style top-1 accuracy per row.
- `token_agreement` (+ `answer_argmax` to store the pre-edit argmax): LS-agree, agreement with the unedited model.
- `margin_success`: CounterFact new-vs-old token margin, per-row successes and scored counts.
- `sequence_logprob` / `seq_logprob_success`: the ROME/MEMIT criterion (option cf_score = seq_prob).
Fluency of free generations lives in emsedit_fast.fluency.

`evaluate(model, tokenizer, records, ...)` runs the model over every probe of the records and reduces the scores per
the record kind's metric family (`evaluate_records` returns the same as a flat dict); `pre_edit_predictions` runs the
unedited model once for LS-agree. None of them knows about editors: the caller edits the model in between.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from typing import Sequence

import torch
from tqdm.auto import tqdm

from emsedit_fast.data.collate import IGNORE_INDEX
from emsedit_fast.data.collate import TokenBatch
from emsedit_fast.data.collate import collate
from emsedit_fast.data.collate import record_tuples
from emsedit_fast.data.schemas import EditRecord
from emsedit_fast.models.hooks import answer_positions
from emsedit_fast.models.hooks import logits_at

logger = logging.getLogger(__name__)

CF_REDUCTIONS = ("pooled", "per_example")
CF_SCORES = ("margin", "seq_prob")


# ---------------------------------------------------------------------------------------------------------------------
# Metric functions on padded batches


def answer_argmax(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 token at every answer position: (B, T, V) float, (B, T) int64 -> (B, T) int64, -100 off the answers.

    Ties resolve to the lowest token id (torch.argmax returns the first maximal index).
    """
    pred = logits.argmax(dim=-1)
    return torch.where(labels != IGNORE_INDEX, pred, torch.full_like(pred, IGNORE_INDEX))


def _mean_over_answers(hits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean of bool `hits` over `mask` (B, T) -> (B,) float32; NaN for rows without answer positions."""
    n = mask.sum(dim=1)
    return (hits & mask).sum(dim=1).float() / n.float()


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """acc_b = (1/L_b) sum_i [argmax_v logits[b, t_i, v] == labels[b, t_i]] over the answer positions t_i of row b.

    logits: (B, T, V) any float dtype. labels: (B, T) int64, pre-shifted, -100 off the answers.
    Returns (B,) float32 in [0, 1]; NaN for a row with no answer position. Ties go to the lowest token id.
    """
    mask = labels != IGNORE_INDEX
    return _mean_over_answers(logits.argmax(dim=-1) == labels, mask)


def token_agreement(logits: torch.Tensor, ref_argmax: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """LS-agree: agree_b = (1/L_b) sum_i [argmax logits[b, t_i] == ref_argmax[b, t_i]].

    ref_argmax: (B, T) int64, the pre-edit model's argmax at the same teacher-forced positions (`answer_argmax`);
    only its values on the answer positions of `labels` are read. Returns (B,) float32, NaN for rows without answers.
    """
    mask = labels != IGNORE_INDEX
    return _mean_over_answers(logits.argmax(dim=-1) == ref_argmax, mask)


def margin_success(logits: torch.Tensor, labels: torch.Tensor, foil_labels: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """CounterFact new-vs-old margin, per row.

    The target a is teacher-forced; the foil f lies on the same positions (`foil_labels`, -100 beyond min(L, L_f)).
    Scored positions: i = 1..min(L, L_f) with a_i != f_i (a shared token cannot be won). Position i succeeds if
    logits[t_i, a_i] > logits[t_i, f_i] strictly.

    logits: (B, T, V) float. labels, foil_labels: (B, T) int64. Returns (successes, scored), both (B,) int64:
    pooled score = successes.sum() / scored.sum(); per-example score = successes / scored per row.
    """
    scored = (labels != IGNORE_INDEX) & (foil_labels != IGNORE_INDEX) & (labels != foil_labels)
    # clamp: gather needs valid ids on the ignored positions too; they are masked out below.
    target = logits.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1).float()
    foil = logits.gather(-1, foil_labels.clamp_min(0).unsqueeze(-1)).squeeze(-1).float()
    wins = (target > foil) & scored
    return wins.sum(dim=1), scored.sum(dim=1)


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean log-probability of the answer tokens: (1/L_b) sum_i log softmax(logits[b, t_i])[labels[b, t_i]].

    logits: (B, T, V) float; labels (B, T) int64. Returns (B,) float32 (NaN for rows without answers). The
    log-softmax is taken in fp32 over the answer positions only, so no (B, T, V) fp32 copy is made.
    """
    mask = labels != IGNORE_INDEX
    rows = mask.nonzero(as_tuple=True)[0]  # (N,) row of each answer position, row-major
    logp = torch.log_softmax(logits[mask].float(), dim=-1)  # (N, V)
    picked = logp.gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)  # (N,)
    total = torch.zeros(labels.shape[0], dtype=torch.float32, device=logits.device).index_add_(0, rows, picked)
    return total / mask.sum(dim=1).float()


def seq_logprob_success(logits: torch.Tensor, labels: torch.Tensor, foil_logits: torch.Tensor,
                        foil_labels: torch.Tensor) -> torch.Tensor:
    """cf_score = seq_prob: success_b = mean log p(target_b) > mean log p(foil_b), each teacher-forced on its own
    tokens (two separate passes; row b of both batches must be the same prompt). Returns (B,) bool."""
    return sequence_logprob(logits, labels) > sequence_logprob(foil_logits, foil_labels)


def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _forward_logits(model: torch.nn.Module, batch: TokenBatch, keep: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 logits (B, T', V) at sequence positions `keep` (all when None): every metric reads answer positions
    only, so the language-model head runs there alone (`models.hooks.logits_at`). Metrics are defined on fp32."""
    with logits_at(model, keep) as cut:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        logits = cut(out.logits if hasattr(out, "logits") else out[0])
    return logits.float()


@dataclass
class _Pass:
    """Per-tuple outputs of one pass, in the order of the input tuples."""

    accuracy: torch.Tensor | None = None  # (n,) float32
    wins: torch.Tensor | None = None  # (n,) int64
    scored: torch.Tensor | None = None  # (n,) int64
    logprob: torch.Tensor | None = None  # (n,) float32
    agreement: torch.Tensor | None = None  # (n,) float32
    argmax: list[torch.Tensor] | None = None  # n tensors (L_j,) int64, on CPU


def _ref_tensor(ref: Sequence[torch.Tensor | None], batch: TokenBatch) -> torch.Tensor:
    """Lay the stored pre-edit argmax of each tuple onto the answer positions of `batch` -> (B, T) int64."""
    mask = batch.answer_mask
    lengths = mask.sum(dim=1).tolist()
    # rows without stored predictions (other probe sets in the same batch) get -100: they never match an argmax
    stored = [ref[i] if ref[i] is not None else torch.full((n,), IGNORE_INDEX, dtype=torch.long)
              for i, n in zip(batch.order.tolist(), lengths)]
    for j, (s, n) in enumerate(zip(stored, lengths)):
        if s.numel() != n:
            raise ValueError(f"pre-edit predictions hold {s.numel()} answer tokens for tuple {batch.order[j].item()}, "
                             f"but it now tokenises to {n}: was another tokenizer or max_length used?")
    out = torch.full_like(batch.labels, IGNORE_INDEX)
    out[mask] = torch.cat(stored).to(out.device)  # boolean-mask assignment fills row-major, matching `stored`
    return out


def _run_pass(model: torch.nn.Module, batch: TokenBatch, device: torch.device, want: set[str],
              ref: Sequence[torch.Tensor | None] | None, bar: Any) -> _Pass:
    """One teacher-forced pass over `batch`, micro-batch by micro-batch, keeping only per-row results."""
    acc, wins, scored, logprob, agree, argmax = [], [], [], [], [], []
    for mb in batch.micro_batches():
        mb = mb.to(device)
        keep = answer_positions(mb.labels)  # every metric reads the answer positions only
        logits = _forward_logits(model, mb, keep)
        labels = mb.labels.index_select(1, keep)
        if "accuracy" in want:
            acc.append(token_accuracy(logits, labels).cpu())
        if "margin" in want:
            foil = (mb.foil_labels.index_select(1, keep) if mb.foil_labels is not None
                    else torch.full_like(labels, IGNORE_INDEX))
            w, s = margin_success(logits, labels, foil)
            wins.append(w.cpu())
            scored.append(s.cpu())
        if "logprob" in want:
            logprob.append(sequence_logprob(logits, labels).cpu())
        if "agreement" in want:
            agree.append(token_agreement(logits, _ref_tensor(ref, mb).index_select(1, keep), labels).cpu())
        if "argmax" in want:
            pred = answer_argmax(logits, labels).cpu()
            mask = (labels != IGNORE_INDEX).cpu()
            argmax.extend(pred[r][mask[r]] for r in range(pred.shape[0]))
        bar.update(1)

    def ordered(parts: list[torch.Tensor]) -> torch.Tensor | None:
        return batch.in_input_order(torch.cat(parts)) if parts else None

    result = _Pass(ordered(acc), ordered(wins), ordered(scored), ordered(logprob), ordered(agree))
    if argmax:
        result.argmax = [None] * len(argmax)
        for row, index in enumerate(batch.order.tolist()):
            result.argmax[index] = argmax[row]
    return result


def _progress(total: int, progress: bool | None, desc: str) -> Any:
    # progress None -> disable=None: tqdm switches the bar off when output is not a terminal.
    return tqdm(total=total, desc=desc, disable=None if progress is None else not progress, leave=False)


@dataclass
class PreEditPredictions:
    """The unedited model's argmax on every locality tuple, for LS-agree.

    tuples: the locality tuples of `record_tuples(records, "unrel")`, in that order. argmax: for each tuple, (L,) int64
    (CPU) top-1 tokens at its teacher-forced answer positions. case_ids: the records they came from, in order.
    """

    tuples: list[tuple[str, ...]]
    argmax: list[torch.Tensor]
    case_ids: tuple[str, ...]


@torch.no_grad()
def pre_edit_predictions(model: torch.nn.Module, tokenizer: Any, records: Sequence[EditRecord], *,
                         batch_size: int = 32, max_length: int = 128, progress: bool | None = None,
                         device: torch.device | str | None = None) -> PreEditPredictions:
    """Run the unedited model once over the locality tuples of `records` and keep its argmax (store before editing)."""
    tuples, _ = record_tuples(records, "unrel")
    argmax: list[torch.Tensor] = []
    if tuples:
        device = torch.device(device) if device is not None else _model_device(model)
        batch = collate(tokenizer, tuples, micro_batch=batch_size, max_length=max_length)
        was_training = model.training
        model.eval()
        try:
            with _progress(batch.n_micro_batches, progress, "pre-edit") as bar:
                argmax = _run_pass(model, batch, device, {"argmax"}, None, bar).argmax
        finally:
            model.train(was_training)
    return PreEditPredictions(tuples=tuples, argmax=argmax, case_ids=tuple(r.case_id for r in records))


# ---------------------------------------------------------------------------------------------------------------------
# Reductions and the evaluator


@dataclass
class EvalResult:
    """Scores of one evaluation.

    metrics: percent, by name: es, gs, ls (margin family) or ls_gold (accuracy family), ls_agree (when pre-edit
    predictions were given), ps (portability, when the records have probes). A metric with no probe is absent.
    counts: number of records, and per metric the number of prompts scored (and "<m>_positions", the scored answer
    positions of margin metrics). per_record: per metric, each record's score in [0, 1] (NaN where undefined).
    protocol: how the numbers were computed; store it with the numbers.
    """

    metrics: dict[str, float]
    counts: dict[str, int]
    protocol: dict[str, Any]
    per_record: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self, per_record: bool = False) -> dict[str, Any]:
        out = {"metrics": dict(self.metrics), "counts": dict(self.counts), "protocol": dict(self.protocol)}
        if per_record:
            out["per_record"] = {k: list(v) for k, v in self.per_record.items()}
        return out


def _per_record(values: torch.Tensor, owners: Sequence[int], n_records: int) -> torch.Tensor:
    """Mean of the per-tuple `values` (NaN entries ignored) over each record's tuples -> (n_records,) float64,
    NaN for a record without a defined value."""
    values = values.double()
    owner = torch.as_tensor(owners, dtype=torch.long)
    ok = ~torch.isnan(values)
    total = torch.zeros(n_records, dtype=torch.float64).index_add_(0, owner[ok], values[ok])
    count = torch.zeros(n_records, dtype=torch.float64).index_add_(0, owner[ok], torch.ones_like(values[ok]))
    return total / count


def _nanmean(values: torch.Tensor) -> float:
    ok = ~torch.isnan(values)
    return float(values[ok].mean()) if ok.any() else float("nan")


def evaluate(model: torch.nn.Module, tokenizer: Any, records: Sequence[EditRecord], *,
             pre_edit: PreEditPredictions | None = None, batch_size: int = 32, max_length: int = 128,
             cf_reduction: str = "pooled", cf_score: str = "margin", progress: bool | None = None,
             device: torch.device | str | None = None) -> EvalResult:
    """ES / GS / LS (and LS-agree, portability) of `model` on `records`, in percent (docs/method.md, Evaluation).

    All records must share one metric family (`EditRecord.metric_family`):

    - accuracy (kinds zsre, facts): ES = mean over records of acc(prompt, target_new); GS = mean over records of
      the mean acc over their rephrases; LS-gold = the same over locality prompts against their gold answers.
    - margin (kind counterfact): ES on the edit prompt and GS on every rephrase, target = target_new and foil =
      ground_truth; LS on every locality prompt with roles swapped (target = its true answer, foil = target_new).
      cf_reduction "pooled" (reference): successful scored positions / scored positions over all prompts of the set;
      "per_example": per prompt, then per record, then over records (prompts without a scored position are left
      out). cf_score "seq_prob": a prompt succeeds if the mean token log-probability of the target exceeds that of
      the foil, each teacher-forced on its own tokens (pooled = fraction of prompts).
    - LS-agree (any family, needs `pre_edit` from `pre_edit_predictions` on the same records): agreement of the
      argmax with the unedited model's on the locality tuples.
    - PS (portability): token accuracy on the two-hop probes, per record then over records.

    Teacher-forced, fp32 logits, model in eval mode under torch.no_grad (its training flag is restored).
    batch_size: rows per forward pass; the probes of all sets are collated together and sorted by length, so the
    model runs ceil(n_probes / batch_size) times with little padding. progress: tqdm bar; None shows it only on a
    terminal, False never. device: where the inputs go (default: the device of the model's first parameter).
    """
    if not records:
        raise ValueError("evaluate: no records")
    families = {r.metric_family for r in records}
    if len(families) != 1:
        raise ValueError(f"evaluate: records mix metric families {sorted(families)}; evaluate each kind separately")
    family = families.pop()
    if cf_reduction not in CF_REDUCTIONS:
        raise ValueError(f"evaluate: cf_reduction must be one of {CF_REDUCTIONS}, got {cf_reduction!r}")
    if cf_score not in CF_SCORES:
        raise ValueError(f"evaluate: cf_score must be one of {CF_SCORES}, got {cf_score!r}")
    device = torch.device(device) if device is not None else _model_device(model)
    n = len(records)

    sets = {which: record_tuples(records, which) for which in ("edit", "equiv", "unrel", "portability")}
    if pre_edit is not None and pre_edit.tuples != sets["unrel"][0]:
        raise ValueError("evaluate: pre_edit predictions were computed on other records (their locality tuples differ)")

    # Every probe set goes into one list of tuples, collated once: rows of all sets share micro-batches (sorted by
    # length, so little padding), and the model runs ceil(N / batch_size) times in total. Each segment names a set.
    segments: dict[str, tuple[int, int, str]] = {}  # name -> (start, stop, which)
    all_tuples: list[tuple[str, ...]] = []

    def add(name: str, which: str, tuples: list[tuple[str, ...]]) -> None:
        segments[name] = (len(all_tuples), len(all_tuples) + len(tuples), which)
        all_tuples.extend(tuples)

    for name, which in (("es", "edit"), ("gs", "equiv"), ("ls", "unrel"), ("ps", "portability")):
        tuples = sets[which][0]
        if not tuples:
            continue
        if family == "margin" and cf_score == "seq_prob" and which != "portability":
            # each side teacher-forced on its own tokens: the foil gets its own rows
            add(name, which, [(p, a) for p, a, _ in tuples])
            add(name + "#foil", which, [(p, f) for p, _, f in tuples])
        else:
            add(name, which, tuples)
    want = {"accuracy"}
    if family == "margin":
        want.add("margin" if cf_score == "margin" else "logprob")
    ref: list[torch.Tensor | None] | None = None
    if pre_edit is not None and "ls" in segments:
        want.add("agreement")
        ref = [None] * len(all_tuples)
        start, stop, _ = segments["ls"]
        ref[start:stop] = pre_edit.argmax

    batch = collate(tokenizer, all_tuples, micro_batch=batch_size, max_length=max_length)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _progress(batch.n_micro_batches, progress, "evaluate") as bar:
            out = _run_pass(model, batch, device, want, ref, bar)
    finally:
        model.train(was_training)

    metrics: dict[str, float] = {}
    counts: dict[str, int] = {"records": n}
    per_record: dict[str, list[float]] = {}

    def put(key: str, rec: torch.Tensor, score: float, n_prompts: int) -> None:
        metrics[key] = 100.0 * score
        per_record[key] = rec.tolist()
        counts[key] = n_prompts

    for name, (start, stop, which) in segments.items():
        if name.endswith("#foil"):
            continue
        owners = sets[which][1]
        if family == "accuracy" or which == "portability":
            rec = _per_record(out.accuracy[start:stop], owners, n)
            put("ls_gold" if name == "ls" else name, rec, _nanmean(rec), stop - start)
        elif cf_score == "margin":
            wins, scored = out.wins[start:stop], out.scored[start:stop]
            rec = _per_record(wins.double() / scored.double(), owners, n)  # NaN where nothing is scored
            total = int(scored.sum())
            pooled = int(wins.sum()) / total if total else float("nan")
            put(name, rec, pooled if cf_reduction == "pooled" else _nanmean(rec), stop - start)
            counts[name + "_positions"] = total
        else:
            f_start, f_stop, _ = segments[name + "#foil"]
            success = (out.logprob[start:stop] > out.logprob[f_start:f_stop]).double()
            rec = _per_record(success, owners, n)
            put(name, rec, float(success.mean()) if cf_reduction == "pooled" else _nanmean(rec), stop - start)
        if name == "ls" and ref is not None:
            rec = _per_record(out.agreement[start:stop], owners, n)
            put("ls_agree", rec, _nanmean(rec), stop - start)

    protocol = {
        "metric_family": family,
        "kinds": sorted({r.kind for r in records}),
        "teacher_forced": True,
        "logits": "fp32",
        "ties": "lowest token id",
        "n_records": n,
    }
    if family == "margin":
        protocol.update(cf_reduction=cf_reduction, cf_score=cf_score,
                        ls="roles swapped: neighbourhood answer vs target_new")
    else:
        protocol.update(reduction="per example: mean over a record's prompts, then over records",
                        ls_gold="accuracy against the gold locality answer")
    if "ls_agree" in metrics:
        protocol["ls_agree"] = "agreement with the pre-edit model's argmax on the locality prompts"
    if "ps" in metrics:
        protocol["ps"] = "token accuracy on two-hop probes, per record then over records"
    logger.info("evaluation of %d %s records: %s", n, family,
                ", ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
    return EvalResult(metrics=metrics, counts=counts, protocol=protocol, per_record=per_record)


def evaluate_records(model: torch.nn.Module, tokenizer: Any, records: Sequence[EditRecord], **kwargs: Any
                     ) -> dict[str, Any]:
    """`evaluate` as one flat, JSON-ready dict: the metrics (percent) at the top level ("es", "gs", ...), plus
    "counts" and "metric_protocol" (see EvalResult). Keyword arguments are those of `evaluate`."""
    result = evaluate(model, tokenizer, records, **kwargs)
    out: dict[str, Any] = dict(result.metrics)
    out["counts"] = dict(result.counts)
    out["metric_protocol"] = dict(result.protocol)
    return out
