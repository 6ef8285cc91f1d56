"""An EasyEdit-style editing API, for people migrating from EasyEdit (docs/easyedit.md).

    from emsedit_fast.easyedit import EasyEditor, load_hparams, summarize

    editor = EasyEditor(model, tokenizer, checkpoint="runs/x/checkpoint")   # any loaded causal LM + its tokenizer
    metrics, edited_model, weights_copy = editor.edit(
        prompts=[...], target_new=[...], ground_truth=None, rephrase_prompts=[...],
        locality_inputs={"neighborhood": {"prompt": [...], "ground_truth": [...]}}, sequential_edit=False)
    editor = EasyEditor.from_hparams("hparams/MALMEN/my-model.yaml")       # model_name and archive from the file
    cfg = load_hparams("hparams/MALMEN/my-model.yaml")                     # the file as this engine's RunConfig
                                                                           # (emsedit_fast.easyedit_hparams)

Per request i, `metrics[i]` has EasyEdit's layout, every value in [0, 1] and one per prompt:

    {"pre":  {"rewrite_acc": [a], "rephrase_acc": [a, ...], "portability": {"<key>_acc": [a, ...]}},
     "case_id": i, "requested_rewrite": {...}, "time": seconds of the edit,
     "post": {"rewrite_acc": [a], "rephrase_acc": [...], "locality": {"<key>_acc": [a, ...]}, "portability": {...}}}

rewrite, rephrase and portability: teacher-forced top-1 accuracy of the answer tokens after the prompt (the zsRE
token accuracy); locality: agreement of the top-1 tokens with the unedited model's at the locality answer's
positions, teacher-forced (LS-agree; docs/method.md, "Evaluation"), which is what EasyEdit reports as `<key>_acc`.
A request the editor refuses (docs/method.md, "Applying and undoing an update") leaves the model unchanged and
carries "refused": the reason.

sequential_edit=False (EasyEdit's default): each request is edited alone, scored, and taken back out exactly (the
editor's revert plus its normaliser statistics), so every request starts from the same model and, as in EasyEdit,
the model returned holds none of the edits. sequential_edit=True: the requests are edited one after another and all
are scored at the end; the edits stay in the model (`EasyEditor.reset()` removes them).
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

from emsedit_fast import api
from emsedit_fast import checkpoint as ckpt
from emsedit_fast.config import ConfigError
from emsedit_fast.config import RunConfig
from emsedit_fast.config import to_dict
from emsedit_fast.data.schemas import EditRecord
from emsedit_fast.easyedit_hparams import config_from_hparams
from emsedit_fast.easyedit_hparams import load_hparams  # noqa: F401  (part of this API)
from emsedit_fast.easyedit_hparams import read_hparams
from emsedit_fast.metrics import evaluate
from emsedit_fast.metrics import pre_edit_predictions

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------------
# requests and their probes


def _listify(value: Any, n: int, what: str) -> list:
    """EasyEdit accepts a bare string for one request; otherwise one entry per request."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise ValueError(f"{what}: expected {n} entr{'y' if n == 1 else 'ies'} (one per request), got {value!r}")
    return list(value)


def _texts(value: Any, what: str, answer: bool = False) -> list[str]:
    """One request's prompt(s) or answer(s): a string or a list of strings. Answers are stripped: EasyEdit puts the
    space before an answer itself, and so does this engine's tokenisation."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(t, str) and t.strip() for t in items):
        raise ValueError(f"{what}: expected a non-empty string or a list of them, got {value!r}")
    return [t.strip() for t in items] if answer else list(items)


def _one(value: Any, what: str, answer: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what}: expected a string, got {value!r}")
    return _texts(value, what, answer)[0]


def prepare_requests(prompts, target_new, ground_truth=None, rephrase_prompts=None, locality_inputs=None,
                     portability_inputs=None, subject=None) -> list[dict]:
    """EasyEdit's request dicts (the `requested_rewrite` of the metrics), validated: every list has one entry per
    request; locality and portability inputs are {name: {"prompt": [...], "ground_truth": [...]}} with, per
    request, a string, a list of strings or None (no probe of that name). ValueError names the bad argument."""
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts: expected a string or a non-empty list of strings, got {prompts!r}")
    n = len(prompts)
    targets = _listify(target_new, n, "target_new")
    truths = _listify(ground_truth, n, "ground_truth") if ground_truth is not None else [None] * n
    subjects = _listify(subject, n, "subject") if subject is not None else [None] * n
    rephrases = _listify(rephrase_prompts, n, "rephrase_prompts") if rephrase_prompts is not None else [None] * n
    requests = []
    for i in range(n):
        req = {"prompt": _one(prompts[i], f"prompts[{i}]"),
               "target_new": _one(targets[i], f"target_new[{i}]", answer=True),
               # EasyEdit's placeholder when no ground truth is given
               "ground_truth": "<|endoftext|>" if truths[i] is None else _one(truths[i], f"ground_truth[{i}]", True),
               "portability": {}, "locality": {}}
        if subjects[i] is not None:
            req["subject"] = _one(subjects[i], f"subject[{i}]")
        if rephrases[i] is not None:
            _texts(rephrases[i], f"rephrase_prompts[{i}]")
            req["rephrase_prompt"] = rephrases[i]
        requests.append(req)
    for arg, section, inputs in (("locality_inputs", "locality", locality_inputs),
                                 ("portability_inputs", "portability", portability_inputs)):
        if inputs is None:
            continue
        if not isinstance(inputs, dict):
            raise ValueError(f"{arg}: expected {{name: {{'prompt': [...], 'ground_truth': [...]}}}}, got {inputs!r}")
        for name, probe in inputs.items():
            where = f"{arg}[{name!r}]"
            if not isinstance(probe, dict) or set(probe) != {"prompt", "ground_truth"}:
                raise ValueError(f"{where}: expected a dict with exactly the keys 'prompt' and 'ground_truth'")
            ps = _listify(probe["prompt"], n, f"{where}['prompt']")
            gs = _listify(probe["ground_truth"], n, f"{where}['ground_truth']")
            for i, (p, g) in enumerate(zip(ps, gs)):
                if p is None:
                    continue
                p_list = _texts(p, f"{where}['prompt'][{i}]")
                g_list = _texts(g, f"{where}['ground_truth'][{i}]", answer=True)
                if len(p_list) != len(g_list):
                    raise ValueError(f"{where}: request {i} has {len(p_list)} prompt(s) but {len(g_list)} answer(s)")
                requests[i][section][name] = {"prompt": p, "ground_truth": g_list[0] if isinstance(g, str) else g_list}
    return requests


def _edit_record(i: int, req: dict) -> EditRecord:
    truth = req["ground_truth"]
    return EditRecord(case_id=str(i), prompt=req["prompt"], target_new=req["target_new"], kind="facts",
                      ground_truth=None if truth == "<|endoftext|>" else truth, subject=req.get("subject"))


def _probes(i: int, req: dict) -> tuple[list[EditRecord], list[tuple[str, str | None]]]:
    """One scoring record per prompt of the request, and what each one is ((section, probe name)): the record's own
    prompt/answer is the probe (token accuracy); a locality record also carries it as its locality prompt, for the
    agreement with the unedited model."""
    records, layout = [], []

    def add(section, name, prompt, answer, locality=False):
        extra = {"locality_prompts": (prompt,), "locality_answers": (answer,)} if locality else {}
        records.append(EditRecord(case_id=f"{i}/{section}/{name}/{len(records)}", prompt=prompt, target_new=answer,
                                  kind="facts", **extra))
        layout.append((section, name))

    add("rewrite", None, req["prompt"], req["target_new"])
    for p in _texts(req["rephrase_prompt"], "rephrase_prompt") if "rephrase_prompt" in req else []:
        add("rephrase", None, p, req["target_new"])
    for section in ("locality", "portability"):
        for name, probe in req[section].items():
            for p, a in zip(_texts(probe["prompt"], name), _texts(probe["ground_truth"], name, answer=True)):
                add(section, name, p, a, locality=section == "locality")
    return records, layout


# ----------------------------------------------------------------------------------------------------------------------
# the editor


class EasyEditor:
    """EasyEdit's BaseEditor surface over an emsedit_fast session (`self.session`: model, tokenizer, editor).

    model, tokenizer: any loaded causal LM and its tokenizer (left where they are; the editor follows the model's
    device unless editor_device says otherwise). checkpoint: an editor checkpoint folder (train's output); without
    one the hypernetworks are untrained and `hparams` (a RunConfig) is required.
    """

    def __init__(self, model, tokenizer, checkpoint: str | None = None, *, hparams: RunConfig | None = None,
                 editor_device: str | None = None):
        if checkpoint is None and hparams is None:
            raise ValueError("EasyEditor needs an editor checkpoint (or hparams, for an untrained editor)")
        if tokenizer is None:
            raise ValueError("EasyEditor needs the model's tokenizer")
        self.session = api.open_session(hparams, checkpoint=checkpoint, model=model, tokenizer=tokenizer,
                                        editor_device=editor_device)
        if checkpoint is None and hparams.editor.trainable:
            log.warning("EasyEditor without a checkpoint: the %s hypernetworks are untrained", hparams.editor.name)
        self._initial_stats = self.session.editor.normaliser_state()

    @property
    def model(self):
        return self.session.model

    @property
    def tok(self):
        return self.session.tokenizer

    @property
    def hparams(self) -> RunConfig:
        return self.session.cfg

    @classmethod
    def from_hparams(cls, hparams: str | os.PathLike | RunConfig, *, model=None, tokenizer=None,
                     checkpoint: str | None = None, overrides=(), editor_device: str | None = None) -> EasyEditor:
        """An editor from an EasyEdit-style hyperparameter file (or a RunConfig). The model is loaded from
        model_name unless given; the checkpoint defaults to the file's `archive`. With a checkpoint, its config is the
        base and the file's keys are laid over it (the hypernetwork shape must still match the checkpoint)."""
        if isinstance(hparams, RunConfig):
            cfg = hparams
        else:
            hp = read_hparams(hparams)
            checkpoint = checkpoint if checkpoint is not None else hp.archive
            base = None
            if checkpoint is not None:
                try:
                    ckpt.read_meta(checkpoint)
                except ckpt.CheckpointError as err:
                    raise ConfigError(f"{hp.path}: archive/checkpoint {checkpoint!r} is not an emsedit_fast editor "
                                      f"checkpoint ({err}); EasyEdit's trained .pt archives cannot be loaded here: "
                                      f"train one with `python -m emsedit_fast.train --editor {hp.alg}` and point "
                                      f"archive at its checkpoint folder") from None
                base = to_dict(ckpt.load_config(checkpoint))
                if base["editor"]["name"] != hp.alg:
                    raise ConfigError(f"{hp.path}: alg_name asks for {hp.alg}, but {checkpoint} holds a "
                                      f"{base['editor']['name']} editor")
            cfg = config_from_hparams(hp, base, overrides)
        if model is None:
            model, tokenizer, _ = api.load_model(cfg)
        return cls(model, tokenizer, checkpoint, hparams=cfg, editor_device=editor_device)

    def edit(self, prompts, target_new, ground_truth=None, rephrase_prompts=None, locality_inputs=None,
             portability_inputs=None, sequential_edit: bool = False, verbose: bool = True, subject=None
             ) -> tuple[list[dict], Any, dict]:
        """Edit the requests and score them before and after (module docstring). Returns (metrics, the edited model
        (the same object as self.model), weights_copy: {"<module>.weight": its weight before this call})."""
        requests = prepare_requests(prompts, target_new, ground_truth, rephrase_prompts, locality_inputs,
                                    portability_inputs, subject)
        records = [_edit_record(i, r) for i, r in enumerate(requests)]  # validated before anything changes
        probes = [_probes(i, r) for i, r in enumerate(requests)]
        editor = self.session.editor
        weights_copy = {f"{name}.weight": w.detach().clone() for name, w in editor.named_weights().items()}
        refs = [self._reference(recs) for recs, _ in probes]
        all_metrics = []
        for i, (req, (recs, layout), ref) in enumerate(zip(requests, probes, refs)):
            pre = self._score(recs, layout, ref)
            pre.pop("locality")  # agreement of the unedited model with itself; EasyEdit drops it too
            all_metrics.append({"pre": pre, "case_id": i, "requested_rewrite": req})
        if sequential_edit:
            for record, metrics in zip(records, all_metrics):
                self._apply(record, metrics)
            for metrics, (recs, layout), ref in zip(all_metrics, probes, refs):
                metrics["post"] = self._score(recs, layout, ref)
        else:
            for record, metrics, (recs, layout), ref in zip(records, all_metrics, probes, refs):
                stats = editor.normaliser_state()
                applied = self._apply(record, metrics)
                metrics["post"] = self._score(recs, layout, ref)
                if applied is not None:  # exact undo: replay without it, statistics as they were
                    editor.revert(applied.edit_id)
                    editor.load_normaliser_state(stats)
        if verbose:
            for req, metrics in zip(requests, all_metrics):
                log.info("%d editing: %s -> %s: %s", metrics["case_id"], req["prompt"], req["target_new"],
                         {k: metrics[k] for k in ("pre", "post", "time")})
        return all_metrics, self.session.model, weights_copy

    def reset(self) -> None:
        """Remove every edit made since this editor was built (exact) and restore its normaliser statistics."""
        self.session.editor.reset()
        self.session.editor.load_normaliser_state(self._initial_stats)

    def _apply(self, record: EditRecord, metrics: dict):
        start = time.perf_counter()
        results, refused = api.edit(self.session, [record], measure=False, progress=False)
        metrics["time"] = time.perf_counter() - start
        if refused:
            metrics["refused"] = refused[0][1]
            return None
        return results[0].applied

    def _reference(self, records: list[EditRecord]):
        if not any(r.locality_prompts for r in records):
            return None
        return pre_edit_predictions(self.model, self.tok, records, max_length=self.hparams.model.max_length,
                                    progress=False)

    def _score(self, records, layout, ref) -> dict:
        result = evaluate(self.model, self.tok, records, pre_edit=ref, max_length=self.hparams.model.max_length,
                          progress=False)
        acc, agree = result.per_record["es"], result.per_record.get("ls_agree")
        out: dict = {"rewrite_acc": []}
        if any(section == "rephrase" for section, _ in layout):
            out["rephrase_acc"] = []
        out.update(locality={}, portability={})
        for j, (section, name) in enumerate(layout):
            if section in ("rewrite", "rephrase"):
                out[f"{section}_acc"].append(acc[j])
            else:
                out[section].setdefault(f"{name}_acc", []).append(agree[j] if section == "locality" else acc[j])
        return out


def summarize(all_metrics: list[dict]) -> dict:
    """Means over requests of each request's mean, per metric, as EasyEdit's summary prints them:
    {"pre": {"rewrite_acc": m, ...}, "post": {"rewrite_acc": m, "locality": {"<key>_acc": m}, ...}}."""
    out: dict = {}
    for when in ("pre", "post"):
        sums: dict = {}
        for metrics in all_metrics:
            part = metrics.get(when, {})
            for key, value in part.items():
                groups = value.items() if isinstance(value, dict) else [(None, value)]
                for name, values in groups:
                    finite = [v for v in values if not math.isnan(v)]
                    if finite:
                        sums.setdefault((key, name), []).append(sum(finite) / len(finite))
        summary: dict = {}
        for (key, name), means in sums.items():
            value = sum(means) / len(means)
            if name is None:
                summary[key] = value
            else:
                summary.setdefault(key, {})[name] = value
        out[when] = summary
    return out
