"""python -m emsedit_fast.edit: apply facts to a model with a trained editor, keep an edit journal, undo, export.

Edit (needs a trained editor checkpoint; the run config comes from its config.yaml, overridable with --config, --set
and the flags below):

    python -m emsedit_fast.edit --editor-checkpoint runs/emsedit-sequential/checkpoint --facts my_facts.jsonl \\
        [--n-edits 8] [--steps K] [--save-model OUT] [--save-edit edit.safetensors]

  --facts takes the plain JSONL facts format or any dataset file load_records reads (CounterFact, zsRE; --format),
  or 'bundled' (the package's held-out facts). --n-edits N edits batches of N facts one after another (lifelong
  editing), 0 all facts as one batch; the default is the checkpoint's data.n_edits for a sequential-mode editor and one
  batch for a batch-mode editor. Every batch is recorded in the journal (--journal, default <output>/journal, with
  --output defaulting to the folder holding the checkpoint). A journal with earlier edits is replayed onto the base
  model first, so new edits continue from it.

Journal (--journal DIR; the model comes from the journal's base snapshot header unless --model is given):

    --list                      print the journal: id, time, facts, apply backend, efficacy, status
    --revert ID                 remove edit ID: its "revert" line is appended (nothing is deleted) and the weights are
                                rebuilt from the base snapshot + the remaining edits' factors, in order
    --compact ID                fold every active edit up to ID into a new base snapshot (they stay applied but can
                                no longer be reverted one by one; bounds the journal's size and replay time)
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
import logging
import os
import sys

from emsedit_fast.cli import run_command
from emsedit_fast.config import add_run_arguments

log = logging.getLogger("emsedit_fast.edit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m emsedit_fast.edit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, mode=False)
    parser.set_defaults(editor=None)
    actions = {a.dest: a for a in parser._actions}
    actions["editor"].help = "must match the checkpoint's editor (default: taken from the checkpoint)"
    actions["steps"].help = "K, MSBP steps per edit batch (default: the editor's n_steps)"
    parser.add_argument("--editor-checkpoint", metavar="DIR", help="a trained editor checkpoint (train's output)")
    parser.add_argument("--facts", metavar="FILE", help="records to edit in: JSONL facts, CounterFact, zsRE, or "
                                                        "'bundled'")
    parser.add_argument("--format", default="auto", help="records format of --facts (default: detected)")
    parser.add_argument("--n-edits", type=int, help="facts per edit batch, edited one after another; 0: one batch "
                                                    "(default: the checkpoint's mode decides)")
    parser.add_argument("--output", help="run folder (default: the folder holding --editor-checkpoint)")
    parser.add_argument("--journal", metavar="DIR", help="edit journal folder (default: <output>/journal)")
    parser.add_argument("--list", action="store_true", help="print the journal and exit")
    parser.add_argument("--revert", type=int, metavar="ID", action="append", default=[],
                        help="remove journal edit ID (repeatable); see the exactness notes above")
    parser.add_argument("--compact", type=int, metavar="ID", help="fold the active edits up to ID into the base")
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
    return run_command(build_parser().parse_args(argv), _run)


def _journal_dir(args) -> str | None:
    if args.journal:
        return args.journal
    output = args.output or (os.path.dirname(os.path.abspath(args.editor_checkpoint)) if args.editor_checkpoint
                             else None)
    return os.path.join(output, "journal") if output else None


def _check_args(args, journal_dir) -> None:
    if args.apply_edit and (args.facts or args.revert or args.compact):
        raise ValueError("--apply-edit applies a saved edit onto the base model; it cannot be combined with --facts, "
                         "--revert or --compact")
    if args.facts and not args.editor_checkpoint:
        raise ValueError("--facts needs --editor-checkpoint DIR (a trained editor)")
    if args.lora_rank is not None and not args.export_lora:
        raise ValueError("--lora-rank needs --export-lora DIR")
    if args.n_edits is not None and args.n_edits < 0:
        raise ValueError(f"--n-edits must be >= 0 (0: one batch), got {args.n_edits}")
    if not (args.facts or args.revert or args.compact or args.apply_edit or args.save_model or args.save_edit
            or args.export_lora):
        raise ValueError("nothing to do: give --facts, --revert, --compact, --list, --apply-edit or an output "
                         "(--save-model, --save-edit, --export-lora); see --help")


def _run(args) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from emsedit_fast.journal import Journal

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
    _check_args(args, journal_dir)
    with logging_redirect_tqdm():
        if args.editor_checkpoint:
            return _with_editor(args, journal_dir, progress)
        return _without_editor(args, journal_dir)


def _with_editor(args, journal_dir, progress) -> int:
    from emsedit_fast import api
    from emsedit_fast.checkpoint import checkpoint_hash
    from emsedit_fast.checkpoint import load_config
    from emsedit_fast.checkpoint import read_meta
    from emsedit_fast.config import config_from_args
    from emsedit_fast.config import to_dict

    meta = read_meta(args.editor_checkpoint)
    if args.editor and args.editor != meta["editor"]:
        raise ValueError(f"--editor {args.editor} but the checkpoint holds a {meta['editor']} editor")
    cfg = config_from_args(argparse.Namespace(**{**vars(args), "steps": None, "n_edits": None,
                                                  "mode": meta["mode"]}),
                           defaults=to_dict(load_config(args.editor_checkpoint)), editor=meta["editor"])
    if not journal_dir:
        raise ValueError("no journal folder: pass --journal DIR or --output DIR")
    session = api.open_session(cfg, checkpoint=args.editor_checkpoint, editor_device=args.editor_device,
                               journal=journal_dir, allow_backend_change=args.allow_backend_change)
    journal = session.journal
    log.info("model %s on %s; editor %s (%s, K=%d) on %s; %d edited modules", cfg.model.name, session.device,
             meta["editor"], meta["mode"], cfg.editor.n_steps, session.editor.device, len(session.modules))
    _revert_and_compact(args, journal, session.model, session.device)
    if args.facts:
        records = _load_facts(args, cfg)
        n_edits = args.n_edits
        if n_edits is None:  # a sequential-mode editor edits in its batches, a batch-mode one all at once
            n_edits = cfg.data.n_edits if cfg.train.mode == "sequential" else 0
        results, refused = api.edit(session, records, n_edits=n_edits or None, n_steps=args.steps,
                                    checkpoint={"path": os.path.abspath(args.editor_checkpoint),
                                                "hash": checkpoint_hash(meta)},
                                    measure=not args.no_efficacy, progress=progress)
        for r in results:
            eff = r.line.get("efficacy")
            print(f"edit {r.line['id']}: {r.line['n_facts']} facts, K={r.line['editor']['n_steps']}, "
                  f"apply backend {r.line['backend']['apply']}, efficacy {'-' if eff is None else f'{eff:.1f}%'}")
        for ids, reason in refused:
            print(f"refused (model unchanged): {ids}: {reason}", file=sys.stderr)
        print(f"journal: {journal.path} ({len(journal.active_ids())} active edits)")
    edits = journal.active_factors() if (args.save_edit or args.export_lora) else []
    _outputs(args, session.model, session.tokenizer, cfg.model.name, session.header, journal, edits)
    return 0


def _without_editor(args, journal_dir) -> int:
    from emsedit_fast import api
    from emsedit_fast.config import config_from_args
    from emsedit_fast.editfiles import apply_edit_file
    from emsedit_fast.editfiles import load_edit_file
    from emsedit_fast.editfiles import prepare_base
    from emsedit_fast.journal import Journal
    from emsedit_fast.journal import open_journal

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
    dtype = header.get("model_dtype") or header.get("dtype")
    model_section = {"name": name, **({"dtype": dtype} if dtype else {})}
    cfg = config_from_args(argparse.Namespace(**{**vars(args), "mode": None}), defaults={"model": model_section},
                           editor="emsedit")
    model, tokenizer, device = api.load_model(cfg)
    if args.apply_edit:
        edits, header = apply_edit_file(model, args.apply_edit, allow_backend_change=args.allow_backend_change)
        log.info("applied %d edit(s) from %s", len(edits), args.apply_edit)
        _outputs(args, model, tokenizer, cfg.model.name, header, None, edits)
        return 0
    if not header.get("modules"):
        raise ValueError(f"{journal_dir}: the journal has no base snapshot yet (no edits recorded)")
    modules = prepare_base(header, model)
    journal, header = open_journal(journal_dir, model, modules, model_name=cfg.model.name, model_dtype=cfg.model.dtype,
                                   allow_backend_change=args.allow_backend_change)
    _revert_and_compact(args, journal, model, device)
    edits = journal.active_factors() if (args.save_edit or args.export_lora) else []
    _outputs(args, model, tokenizer, cfg.model.name, header, journal, edits)
    return 0


def _revert_and_compact(args, journal, model, device) -> None:
    from emsedit_fast.editfiles import weights_by_name

    weights = weights_by_name(model, [m["name"] for m in journal.header()["modules"]])
    for edit_id in args.revert:
        line = journal.revert(edit_id, weights, allow_backend_change=args.allow_backend_change)
        kind = "the last edit: bit-exact undo" if line["was_last"] else \
            "an earlier edit: rebuilt from base + remaining factors"
        print(f"reverted edit {edit_id} ({kind}); active edits: {line['remaining']}")
    if args.compact:
        line = journal.compact(args.compact, device=device, allow_backend_change=args.allow_backend_change)
        print(f"compacted: edits {line['folded']} folded into {line['base']}; active edits: {journal.active_ids()}; "
              f"journal size {journal.disk_bytes() / 2**20:.1f} MiB")


def _outputs(args, model, tokenizer, model_name, header, journal, edits) -> None:
    from emsedit_fast.editfiles import save_edit_file
    from emsedit_fast.export import export_lora
    from emsedit_fast.export import save_model

    if args.save_model:
        extra = {"base_model": model_name, "base_fingerprint": header.get("base_fingerprint"),
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
        result = export_lora(edits, header["modules"], args.export_lora, rank=args.lora_rank,
                             base_model=header.get("model"))
        ranks = sorted({x.rank for x in result.layers})
        print(f"LoRA adapter: {args.export_lora} (rank {ranks}, relative Frobenius error {result.rel_error:.3g})")


def _load_facts(args, cfg):
    if args.facts == "bundled":
        from emsedit_fast.data.facts import bundled_facts

        return bundled_facts("eval", seed=cfg.data.split_seed)
    from emsedit_fast.data.schemas import DataError
    from emsedit_fast.data.schemas import load_records

    result = load_records(args.facts, args.format)
    if result.dropped:  # every fact given here is meant to be edited in: an empty target is an error, not a drop
        raise DataError(result.dropped[0][1].split("; dropped by the cleaning rule")[0]
                        + (f" (and {len(result.dropped) - 1} more)" if len(result.dropped) > 1 else ""))
    return list(result.records)


if __name__ == "__main__":
    sys.exit(main())
