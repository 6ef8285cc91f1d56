"""python -m emsedit_fast.edit: apply facts to a model with a trained editor, keep an edit journal, undo, export.

Edit (needs a trained editor checkpoint; the run config comes from its config.yaml, overridable with --config, --set
and the flags below):

    python -m emsedit_fast.edit --editor-checkpoint runs/emsedit-sequential/checkpoint --facts my_facts.jsonl \\
        [--mode sequential --n-edits 8 | --mode batch] [--steps K] [--save-model OUT] [--save-edit edit.safetensors]

  --facts takes the plain JSONL facts format or any dataset file load_records reads (CounterFact, zsRE; --format),
  or 'bundled' (the package's held-out facts). --mode sequential edits batches of --n-edits facts one after another
  (lifelong editing); --mode batch edits all facts as one batch (default: the checkpoint's regime). Every batch is
  recorded in the journal (--journal, default <output>/journal, with --output defaulting to the folder holding the
  checkpoint). A journal with earlier edits is replayed onto the base model first, so new edits continue from it.

Journal (--journal DIR; the model comes from the journal's base snapshot header unless --model is given):

    --list                      print the journal: id, time, facts, apply backend, efficacy, status
    --revert ID                 remove edit ID: its "revert" line is appended (nothing is deleted) and the weights are
                                rebuilt from the base snapshot + the remaining edits' factors, in order
    --save-model OUT            with no facts: write the journal's current state of the model

Re-apply and export:

    --apply-edit FILE           apply an edit file (--save-edit) onto the unedited base model, bit-exactly
    --export-lora DIR           write the edits (journal's active edits, or --apply-edit's) as a PEFT LoRA adapter;
    --lora-rank R               truncate to rank R by SVD (the relative Frobenius error is printed)

Exactness (same backend and device type: both are recorded with each edit and replay uses them; a different one is
refused unless --allow-backend-change): replaying the journal reproduces the live session's weights bit for bit;
reverting the LAST edit restores the weights before it bit-exactly; reverting an EARLIER edit rebuilds base + the
remaining edits' stored factors in order (bit-identical to applying those factors in order; the later edits are not
recomputed without the removed one). --apply-edit onto the base model equals the edited model bit for bit.
The editor's normaliser statistics are saved with each edit and restored from the latest active one when the same
checkpoint continues a journal, so editing across several invocations equals one continuous session.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
import sys

import torch

from emsedit_fast.journal import EditFactors
from emsedit_fast.journal import Journal
from emsedit_fast.journal import JournalError
from emsedit_fast.journal import apply_edit_
from emsedit_fast.journal import check_base
from emsedit_fast.journal import factors_from_applied
from emsedit_fast.journal import load_edit_file
from emsedit_fast.journal import normaliser_state
from emsedit_fast.journal import save_edit_file
from emsedit_fast.journal import weights_by_name

log = logging.getLogger("emsedit_fast.edit")


# ----------------------------------------------------------------------------------------------------------------------
# Python API


@dataclasses.dataclass
class EditResult:
    """One edited batch: the journal line (or the same fields without a journal), the editor's AppliedEdit and
    the factors that were recorded."""

    line: dict
    applied: object
    factors: EditFactors


def checkpoint_hash(meta: dict) -> str:
    """A short identity of an editor checkpoint: sha256 over its files' recorded hashes."""
    return hashlib.sha256(json.dumps(meta.get("files", {}), sort_keys=True).encode()).hexdigest()


def load_editor_session(checkpoint: str, cfg=None, *, editor_device: str | torch.device | None = None, model=None,
                        tokenizer=None):
    """(Session, checkpoint meta): the model (cfg.model, or the given one), its edited modules and the checkpoint's
    editor with trained hypernetworks. cfg defaults to the checkpoint's config.yaml. The editor's hypernetworks live on
    `editor_device` (default: the model's device); the model stays where it is."""
    from emsedit_fast import api
    from emsedit_fast.checkpoint import load_config
    from emsedit_fast.checkpoint import load_editor_state
    from emsedit_fast.checkpoint import read_meta
    from emsedit_fast.editors import build_editor
    from emsedit_fast.models.adapter import default_module_patterns
    from emsedit_fast.models.adapter import resolve_modules

    meta = read_meta(checkpoint)
    cfg = cfg if cfg is not None else load_config(checkpoint)
    if model is None:
        model, tokenizer, device = api.load_model(cfg)
    else:
        device = next(model.parameters()).device
        model.eval()
        model.requires_grad_(False)
    regime = meta["regime"]
    modules = resolve_modules(model, list(cfg.model.modules) or default_module_patterns(model, regime))
    editor = build_editor(model, modules, cfg.editor, regime, seed=cfg.seed,
                          device=api.resolve_device(str(editor_device)) if editor_device is not None else device)
    load_editor_state(checkpoint, editor)
    return api.Session(cfg, model, tokenizer, modules, editor, device), meta


def journal_header(model, modules, model_name: str | None = None) -> dict:
    """What a journal's base snapshot and every edit file record about the base model."""
    from emsedit_fast.models.adapter import fingerprint

    return {"model": model_name, "dtype": str(modules[0].weight.dtype).removeprefix("torch."),
            "base_fingerprint": fingerprint(model, modules),
            "modules": [{"name": m.name, "d_in": m.d_in, "d_out": m.d_out, "transposed": m.transposed}
                        for m in modules]}


def open_journal(path: str, model, modules, *, model_name: str | None = None, checkpoint_id: str | None = None,
                 editor=None, allow_backend_change: bool = False) -> tuple[Journal, dict]:
    """Open (or start) the journal at `path` for the UNEDITED `model` and bring the model to the journal's state.

    Checks that the journal edits these modules of this base model (refusing anything else), writes the base snapshot
    when the journal is new, replays the active edits, and, when `editor` is given and the latest active edit came
    from the same checkpoint (`checkpoint_id`), restores the editor's normaliser statistics saved with it.
    Returns (journal, header).
    """
    journal = Journal(path)
    header = journal_header(model, modules, model_name)
    if journal.has_base():
        saved = journal.header()
        names = [m["name"] for m in saved["modules"]]
        if names != [m.name for m in modules]:
            raise JournalError(f"{path}: the journal edits {names}, but this run edits {[m.name for m in modules]}")
        if saved.get("base_fingerprint") != header["base_fingerprint"]:
            raise JournalError(f"{path}: the model is not the journal's base model (fingerprint differs: other "
                               "weights, dtype or architecture, or an already edited model)")
        header["model"] = saved.get("model") or header["model"]
    weights = weights_by_name(model, [m.name for m in modules])
    journal.write_base({n: w.detach().cpu() for n, w in weights.items()}, header)
    if journal.orphans():
        log.warning("%s: ignoring factors file(s) of interrupted edits: %s", path, journal.orphans())
    ids = journal.rebuild_(weights, allow_backend_change=allow_backend_change)
    if ids:
        log.info("journal %s: replayed %d active edit(s) %s", path, len(ids), ids)
    if editor is not None and ids:
        last = journal.entry(ids[-1])
        if checkpoint_id is not None and last.get("editor_checkpoint", {}).get("hash") == checkpoint_id:
            state = journal.load_factors(ids[-1]).normaliser
            if state:
                editor.load_state_dict({k: v.to(editor.device) for k, v in state.items()}, strict=False)
                log.info("restored the editor's normaliser statistics saved with edit %d", ids[-1])
        else:
            log.warning("the latest journal edit came from another editor checkpoint; keeping this checkpoint's "
                        "normaliser statistics")
    return journal, header


def efficacy(model, tokenizer, records, *, max_length: int = 128, batch_size: int = 16) -> float:
    """ES (percent) of `model` on the records' own edit prompts (METHOD.md 16: accuracy or margin by kind)."""
    from emsedit_fast.evaluation import evaluate

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


def edit_facts(session, records, *, journal: Journal | None = None, header: dict | None = None,
               mode: str = "batch", n_edits: int | None = None, n_steps: int | None = None,
               checkpoint: dict | None = None, measure: bool = True, progress: bool | None = None
               ) -> tuple[list[EditResult], list[tuple[list[str], str]]]:
    """Edit `records` into session.model with session.editor and record every batch in `journal`.

    mode "batch": all records as one edit batch; "sequential": batches of n_edits records (the last one may be
    smaller), each edited on the model the previous ones produced. n_steps: K MSBP steps (default: the editor's).
    checkpoint: {"path", "hash"} of the editor checkpoint, stored in each line. measure: efficacy on the batch's facts
    right after its edit. A batch whose journal write fails is taken back out of the model (bit-exact) before the error
    propagates, so the model never holds an unrecorded edit. Returns (one EditResult per applied batch,
    [(case ids, reason)] of refused batches; a refused batch leaves the model unchanged).
    """
    from tqdm.auto import tqdm

    from emsedit_fast.data.edit_batch import tokenize_batch
    from emsedit_fast.editors import EditRefused

    cfg, editor = session.cfg, session.editor
    records = list(records)
    if not records:
        raise ValueError("edit_facts: no records")
    if mode not in ("batch", "sequential"):
        raise ValueError(f"mode must be 'batch' or 'sequential', got {mode!r}")
    size = len(records) if mode == "batch" else (n_edits or cfg.data.n_edits)
    chunks = [records[i:i + size] for i in range(0, len(records), size)]
    if journal is not None and header is None:
        header = journal.header()
    results, refused = [], []
    for chunk in tqdm(chunks, desc=f"edit ({mode}, K={n_steps or editor.cfg.n_steps})", unit="batch",
                      disable=(not progress) if progress is not None else None):
        batch = tokenize_batch(session.tokenizer, chunk, cfg.train.micro_batch, cfg.model.max_length, session.device,
                               need_equiv=False)
        stats_before = normaliser_state(editor)
        try:
            applied = editor.edit(batch.edit, n_steps=n_steps, request_ids=batch.request_ids)
        except EditRefused as err:
            refused.append(([r.case_id for r in chunk], str(err)))
            log.warning("edit batch %s refused (model unchanged): %s", [r.case_id for r in chunk], err)
            continue
        factors = factors_from_applied(editor, applied)
        factors.normaliser = normaliser_state(editor)
        line = {
            "n_facts": len(chunk),
            "request_ids": list(applied.request_ids),
            "facts": [{"case_id": r.case_id, "prompt": r.prompt, "target_new": r.target_new} for r in chunk],
            "editor": {"name": editor.cfg.name, "regime": editor.regime, "n_steps": len(applied.steps)},
            "editor_checkpoint": checkpoint or {},
            "base_fingerprint": (header or {}).get("base_fingerprint"),
            "backend": {"ops": {op: sorted(b) for op, b in applied.backend.items()}},
            "device": {"model": str(session.device), "editor": str(editor.device)},
            "seconds": applied.seconds,
        }
        if measure:
            line["efficacy"] = efficacy(session.model, session.tokenizer, chunk, max_length=cfg.model.max_length)
        if journal is not None:
            try:
                line = journal.record(factors, line, header)
            except BaseException:  # not committed: take the edit back out (bit-exact) so model and journal agree
                editor.revert(applied.edit_id)
                editor.load_state_dict({k: v.to(editor.device) for k, v in stats_before.items()}, strict=False)
                raise
        else:
            line = {**line, "delta_norms": factors.delta_norms(), "backend": {"apply": factors.backend,
                                                                              **line["backend"]}}
            factors.info = dict(line)
        results.append(EditResult(line, applied, factors))
    return results, refused


def revert_edit(journal: Journal, edit_id: int, model, *, allow_backend_change: bool = False) -> dict:
    """Remove edit `edit_id` from `journal` (a revert line is appended) and rebuild `model`'s edited layers from the
    base snapshot and the remaining active edits. Returns the revert line."""
    names = [m["name"] for m in journal.header()["modules"]]
    return journal.revert(edit_id, weights_by_name(model, names), allow_backend_change=allow_backend_change)


def materialize(journal: Journal, model, *, allow_backend_change: bool = False) -> list[int]:
    """Bring `model`'s edited layers to the journal's current state (base snapshot + active edits); returns the ids."""
    names = [m["name"] for m in journal.header()["modules"]]
    return journal.rebuild_(weights_by_name(model, names), allow_backend_change=allow_backend_change)


def apply_edit_file(model, path: str, *, check: bool = True, allow_backend_change: bool = False
                    ) -> tuple[list[EditFactors], dict]:
    """Apply the edits of an edit file (`save_edit_file`, --save-edit) to the unedited `model`, in order, on their
    recorded backends: bit-identical to the model they were made on. check: refuse another base model."""
    edits, header = load_edit_file(path)
    if check:
        check_base(header, model)
    weights = weights_by_name(model, [m["name"] for m in header["modules"]])
    for edit in edits:
        apply_edit_(weights, edit, allow_backend_change=allow_backend_change)
    return edits, header


def save_model(model, tokenizer, path: str, extra: dict | None = None) -> str:
    """save_pretrained (safetensors) of the model and its tokenizer into `path`, plus emsedit_edits.json.

    Atomic: everything is written into a temporary sibling folder, fsynced, then renamed into place (a previous save at
    `path` is renamed aside first and deleted last), so a crash leaves `path` as it was or complete, never a new model
    next to an old emsedit_edits.json. An existing `path` must be an earlier save (or empty): it is replaced whole.
    """
    import shutil
    import tempfile

    path = os.path.abspath(path)
    ours = os.path.isdir(path) and (not os.listdir(path) or os.path.exists(os.path.join(path, "emsedit_edits.json")))
    if os.path.exists(path) and not ours:
        raise ValueError(f"--save-model {path}: exists and is not a model saved by this command; choose a new folder")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "emsedit_edits.json"), "w") as f:
            json.dump(extra or {}, f, indent=2)
        for name in os.listdir(tmp):
            file = os.path.join(tmp, name)
            if os.path.isfile(file):
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if os.path.exists(path):
            old = f"{path}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def export_edits_lora(edits: list[EditFactors], header: dict, path: str, rank: int | None = None):
    """export.export_lora with the layouts and model name taken from a journal / edit-file header."""
    from emsedit_fast.export import export_lora

    return export_lora(edits, header["modules"], path, rank=rank, base_model=header.get("model"))


# ----------------------------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    from emsedit_fast.train import add_run_arguments

    parser = argparse.ArgumentParser(prog="python -m emsedit_fast.edit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.set_defaults(editor=None)
    actions = {a.dest: a for a in parser._actions}
    actions["editor"].help = "must match the checkpoint's editor (default: taken from the checkpoint)"
    actions["mode"].help = ("sequential: batches of --n-edits facts one after another; batch: all facts in one batch "
                            "(default: the checkpoint's regime)")
    actions["steps"].help = "K, MSBP steps per edit batch (default: the editor's n_steps)"
    parser.add_argument("--editor-checkpoint", metavar="DIR", help="a trained editor checkpoint (train's output)")
    parser.add_argument("--facts", metavar="FILE", help="records to edit in: JSONL facts, CounterFact, zsRE, or "
                                                        "'bundled'")
    parser.add_argument("--format", default="auto", help="records format of --facts (default: detected)")
    parser.add_argument("--n-edits", type=int, help="facts per batch in --mode sequential (default: data.n_edits)")
    parser.add_argument("--output", help="run folder (default: the folder holding --editor-checkpoint)")
    parser.add_argument("--journal", metavar="DIR", help="edit journal folder (default: <output>/journal)")
    parser.add_argument("--list", action="store_true", help="print the journal and exit")
    parser.add_argument("--revert", type=int, metavar="ID", action="append", default=[],
                        help="remove journal edit ID (repeatable); see the exactness notes above")
    parser.add_argument("--apply-edit", metavar="FILE", help="apply an edit file onto the base model")
    parser.add_argument("--save-model", metavar="DIR", help="write the edited model (safetensors) and tokenizer")
    parser.add_argument("--save-edit", metavar="FILE", help="write only the edits (low-rank factors, safetensors)")
    parser.add_argument("--export-lora", metavar="DIR", help="write the edits as a PEFT LoRA adapter")
    parser.add_argument("--lora-rank", type=int, metavar="R", help="truncate the LoRA export to rank R (SVD)")
    parser.add_argument("--editor-device", help="device of the editor's hypernetworks (default: the model's)")
    parser.add_argument("--no-efficacy", action="store_true", help="skip the efficacy check after each edit")
    parser.add_argument("--allow-backend-change", action="store_true",
                        help="replay edits on another backend than recorded (not bit-exact)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from emsedit_fast.checkpoint import CheckpointError
    from emsedit_fast.config import ConfigError

    try:
        return _run(args)
    except (ConfigError, ValueError, FileNotFoundError, ImportError, JournalError, CheckpointError, KeyError) as err:
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


def _resolve(args, defaults: dict, editor: str, regime: str | None):
    """The run config: `defaults` (a checkpoint's config, or a model section) -> --config -> flags -> --set."""
    from emsedit_fast.train import resolve_config

    ns = argparse.Namespace(**vars(args))
    ns.editor, ns.mode, ns.steps = editor, regime, None  # --mode/--steps are edit-time choices here, not the regime
    return resolve_config(ns, defaults)


def _journal_dir(args) -> str | None:
    if args.journal:
        return args.journal
    output = args.output or (os.path.dirname(os.path.abspath(args.editor_checkpoint)) if args.editor_checkpoint
                             else None)
    return os.path.join(output, "journal") if output else None


def _run(args) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from emsedit_fast import api
    from emsedit_fast.config import to_dict

    progress = False if args.no_progress else None
    journal_dir = _journal_dir(args)
    if args.list:
        if not journal_dir:
            raise ValueError("--list needs --journal DIR (or --output / --editor-checkpoint)")
        journal = Journal(journal_dir, create=False)
        print(journal.format_table())
        for path in journal.orphans():
            print(f"note: {path} belongs to an interrupted edit and is ignored", file=sys.stderr)
        return 0
    if args.apply_edit and (args.facts or args.revert):
        raise ValueError("--apply-edit applies a saved edit onto the base model; it cannot be combined with --facts "
                         "or --revert")
    if args.facts and not args.editor_checkpoint:
        raise ValueError("--facts needs --editor-checkpoint DIR (a trained editor)")
    if args.lora_rank is not None and not args.export_lora:
        raise ValueError("--lora-rank needs --export-lora DIR")
    if not (args.facts or args.revert or args.apply_edit or args.save_model or args.save_edit or args.export_lora):
        raise ValueError("nothing to do: give --facts, --revert, --list, --apply-edit or an output "
                         "(--save-model, --save-edit, --export-lora); see --help")

    with logging_redirect_tqdm():
        session = meta = None
        if args.editor_checkpoint:
            from emsedit_fast.checkpoint import load_config
            from emsedit_fast.checkpoint import read_meta

            meta = read_meta(args.editor_checkpoint)
            if args.editor and args.editor != meta["editor"]:
                raise ValueError(f"--editor {args.editor} but the checkpoint holds a {meta['editor']} editor")
            cfg = _resolve(args, to_dict(load_config(args.editor_checkpoint)), meta["editor"], meta["regime"])
            session, meta = load_editor_session(args.editor_checkpoint, cfg, editor_device=args.editor_device)
            model, tokenizer, modules = session.model, session.tokenizer, session.modules
            log.info("model %s on %s; editor %s (%s, K=%d) on %s; %d edited modules", cfg.model.name, session.device,
                     meta["editor"], meta["regime"], cfg.editor.n_steps, session.editor.device, len(modules))
        else:
            header = {}
            if args.apply_edit:
                header = load_edit_file(args.apply_edit)[1]
            elif journal_dir and os.path.exists(os.path.join(journal_dir, Journal.BASE)):
                header = Journal(journal_dir, create=False).header()
            elif journal_dir is None or not os.path.isdir(journal_dir):
                raise ValueError("no editor checkpoint, journal or edit file to work from (see --help)")
            name = args.model or header.get("model")
            if not name:
                raise ValueError("which model? pass --model (the journal / edit file does not name one)")
            model_section = {"name": name, **({"dtype": header["dtype"]} if header.get("dtype") else {})}
            cfg = _resolve(args, {"model": model_section}, "emsedit", None)
            model, tokenizer, _ = api.load_model(cfg)
            from emsedit_fast.models.adapter import resolve_modules

            modules = resolve_modules(model, [re.escape(m["name"]) for m in header.get("modules", [])]) \
                if header.get("modules") else []

        edits, header, journal = [], None, None
        if args.apply_edit:
            edits, header = apply_edit_file(model, args.apply_edit, allow_backend_change=args.allow_backend_change)
            log.info("applied %d edit(s) from %s", len(edits), args.apply_edit)
        else:
            if not journal_dir:
                raise ValueError("no journal folder: pass --journal DIR or --output DIR")
            if not modules:
                raise ValueError(f"{journal_dir}: the journal has no base snapshot yet (no edits recorded)")
            ckpt_id = checkpoint_hash(meta) if meta is not None else None
            journal, header = open_journal(journal_dir, model, modules, model_name=cfg.model.name,
                                           checkpoint_id=ckpt_id, editor=session.editor if session else None,
                                           allow_backend_change=args.allow_backend_change)
            for edit_id in args.revert:
                line = revert_edit(journal, edit_id, model, allow_backend_change=args.allow_backend_change)
                kind = "the last edit: bit-exact undo" if line["was_last"] else \
                    "an earlier edit: rebuilt from base + remaining factors"
                print(f"reverted edit {edit_id} ({kind}); active edits: {line['remaining']}")
            if args.facts:
                records = _load_facts(args, cfg)
                mode = args.mode or meta["regime"]
                results, refused = edit_facts(
                    session, records, journal=journal, header=header, mode=mode, n_edits=args.n_edits,
                    n_steps=args.steps, checkpoint={"path": os.path.abspath(args.editor_checkpoint), "hash": ckpt_id},
                    measure=not args.no_efficacy, progress=progress)
                for r in results:
                    eff = r.line.get("efficacy")
                    print(f"edit {r.line['id']}: {r.line['n_facts']} facts, K={r.line['editor']['n_steps']}, "
                          f"apply backend {r.line['backend']['apply']}, "
                          f"efficacy {'-' if eff is None else f'{eff:.1f}%'}")
                for ids, reason in refused:
                    print(f"refused (model unchanged): {ids}: {reason}", file=sys.stderr)
                print(f"journal: {journal.path} ({len(journal.active_ids())} active edits)")
            edits = journal.active_factors() if (args.save_edit or args.export_lora) else []

        if args.save_model:
            extra = {"base_model": cfg.model.name, "base_fingerprint": header.get("base_fingerprint"),
                     "journal": journal.path if journal else None,
                     "edits": journal.active_ids() if journal else [e.info.get("id") for e in edits],
                     "edit_file": os.path.abspath(args.apply_edit) if args.apply_edit else None}
            save_model(model, tokenizer, args.save_model, extra)
            print(f"model: {args.save_model}")
        if args.save_edit:
            if not edits:
                raise ValueError("--save-edit: there are no active edits to save")
            save_edit_file(args.save_edit, edits, {k: v for k, v in header.items() if k != "created"})
            print(f"edit: {args.save_edit} ({len(edits)} edit batch(es))")
        if args.export_lora:
            if not edits:
                raise ValueError("--export-lora: there are no active edits to export")
            result = export_edits_lora(edits, header, args.export_lora, args.lora_rank)
            ranks = sorted({x.rank for x in result.layers})
            print(f"LoRA adapter: {args.export_lora} (rank {ranks}, relative Frobenius error {result.rel_error:.3g})")
    return 0


def _load_facts(args, cfg):
    if args.facts == "bundled":
        from emsedit_fast.data.facts import bundled_facts

        return bundled_facts("eval", seed=cfg.seed)
    from emsedit_fast.data.schemas import DataError
    from emsedit_fast.data.schemas import load_records

    result = load_records(args.facts, args.format)
    if result.dropped:  # every fact given here is meant to be edited in: an empty target is an error, not a drop
        raise DataError(result.dropped[0][1].replace("; dropped by the cleaning rule of METHOD.md 3.2", "")
                        + (f" (and {len(result.dropped) - 1} more)" if len(result.dropped) > 1 else ""))
    return list(result.records)


if __name__ == "__main__":
    sys.exit(main())
