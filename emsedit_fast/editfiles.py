"""Edit files: recorded edits (`AppliedEdit`) as safetensors, written atomically and checked on read.

Layout of one file (the CLI's --save-edit, and every factors file of a journal):

    tensors   edit<e>/step<k>/<layer>/M  (n, d_out) and .../K (n, d_in)   dual / outer steps: dW = M^T K
              edit<e>/step<k>/<layer>/S  (d_in, d_out)                     primal steps: dW = S^T
              edit<e>/normaliser/<state key>                              optional: the editor's statistics after it
              edit<e>/keys/<layer>       (n, d_in)                        the first step's raw keys, when the
                                                                          editor's key prior keeps earlier edits
    metadata  key "emsedit_fast": JSON with format, version, the base model's fingerprint, model name and dtype,
              the edited modules (name, d_in, d_out, transposed) and, per edit, its description, the apply
              backends that ran, the device type, and per step the layers of each shape group with the form

Every file is written to a temporary name in the same folder, fsynced, then renamed into place. Applying an edit
file onto the base model it was made on (same backend and device type) reproduces the edited weights bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from emsedit_fast.checkpoint import sha256_file
from emsedit_fast.updates import AppliedEdit
from emsedit_fast.updates import GroupUpdate
from emsedit_fast.updates import JournalError
from emsedit_fast.updates import apply_edit_

EDIT_FORMAT = "emsedit_fast.edit"
FORMAT_VERSION = 1
META_KEY = "emsedit_fast"


def fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened for fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> str:
    """save_file to a temporary file in the same folder, fsync, rename onto `path`; returns the file's sha256."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        os.replace(tmp, path)
        fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return digest


def read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, the JSON metadata under META_KEY) of a file written here; JournalError naming the file else."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise JournalError(f"{path}: missing") from None
    except Exception as err:
        raise JournalError(f"{path}: cannot read ({type(err).__name__}: {err})") from None
    if META_KEY not in meta:
        raise JournalError(f"{path}: not an emsedit_fast file (no {META_KEY!r} metadata)")
    try:
        return tensors, json.loads(meta[META_KEY])
    except json.JSONDecodeError as err:
        raise JournalError(f"{path}: corrupt metadata ({err})") from None


def _edit_tensors(edit: AppliedEdit, prefix: str) -> tuple[dict[str, torch.Tensor], list]:
    """Tensors `<prefix>step<k>/<layer>/M|K|S` and the per-step group layout for the header."""
    tensors, layout = {}, []
    for k, step in enumerate(edit.steps):
        groups = []
        for g in step:
            for i, name in enumerate(g.names):
                if g.low_rank:
                    tensors[f"{prefix}step{k}/{name}/M"] = g.solution[i]
                    tensors[f"{prefix}step{k}/{name}/K"] = g.factor_keys[i]
                else:
                    tensors[f"{prefix}step{k}/{name}/S"] = g.solution[i]
            groups.append({"names": list(g.names), "transposed": g.transposed, "form": g.form, "n_rows": g.n_rows})
        layout.append(groups)
    return tensors, layout


def _edit_from_tensors(tensors: dict[str, torch.Tensor], prefix: str, entry: dict) -> AppliedEdit:
    steps = []
    for k, groups in enumerate(entry["steps"]):
        step = []
        for g in groups:
            names = tuple(g["names"])
            try:
                if g["form"] == "primal":
                    sol = torch.stack([tensors[f"{prefix}step{k}/{n}/S"] for n in names])
                    keys = None
                else:
                    sol = torch.stack([tensors[f"{prefix}step{k}/{n}/M"] for n in names])
                    keys = torch.stack([tensors[f"{prefix}step{k}/{n}/K"] for n in names])
            except KeyError as err:
                raise JournalError(f"edit file lacks tensor {err}") from None
            step.append(GroupUpdate(names, bool(g["transposed"]), g["form"], sol, keys, int(g.get("n_rows", 0))))
        steps.append(step)
    normaliser = {k[len(prefix) + len("normaliser/"):]: v for k, v in tensors.items()
                  if k.startswith(prefix + "normaliser/")}
    keys = {k[len(prefix) + len("keys/"):]: v for k, v in tensors.items() if k.startswith(prefix + "keys/")}
    info = dict(entry.get("info", {}))
    return AppliedEdit(steps, dict(entry.get("backend", {})), entry.get("device_type", ""),
                       edit_id=int(info.get("id", 0) or 0), info=info, normaliser=normaliser, keys=keys)


def save_edit_file(path: str, edits: list[AppliedEdit], header: dict | None = None,
                   include_normaliser: bool = False) -> str:
    """Write `edits` (applied in this order) to one safetensors file with a JSON header; atomic; returns sha256.

    header: extra JSON fields (model name, base fingerprint, modules, ...). Tensors are fp32.
    """
    tensors, entries = {}, []
    for e, edit in enumerate(edits):
        t, layout = _edit_tensors(edit, f"edit{e}/")
        if include_normaliser:
            t.update({f"edit{e}/normaliser/{k}": v for k, v in edit.normaliser.items()})
        t.update({f"edit{e}/keys/{k}": v for k, v in edit.keys.items()})
        tensors.update(t)
        entries.append({"info": edit.info, "backend": edit.backend, "device_type": edit.device_type, "steps": layout})
    meta = {"format": EDIT_FORMAT, "version": FORMAT_VERSION, **(header or {}), "edits": entries}
    return atomic_save_safetensors(tensors, path, {META_KEY: json.dumps(meta)})


def load_edit_file(path: str) -> tuple[list[AppliedEdit], dict]:
    """(edits in order, header) of a file written by `save_edit_file`."""
    tensors, meta = read_safetensors(path)
    if meta.get("format") != EDIT_FORMAT:
        raise JournalError(f"{path}: format {meta.get('format')!r} is not {EDIT_FORMAT!r}")
    if meta.get("version") != FORMAT_VERSION:
        raise JournalError(f"{path}: edit-file version {meta.get('version')!r} is not supported "
                           f"(supports {FORMAT_VERSION})")
    edits = [_edit_from_tensors(tensors, f"edit{e}/", entry) for e, entry in enumerate(meta["edits"])]
    header = {k: v for k, v in meta.items() if k != "edits"}
    return edits, header


def weights_by_name(model: torch.nn.Module, names) -> dict[str, torch.Tensor]:
    """{module name: its weight tensor (storage layout)} for the named modules of `model`."""
    mods = dict(model.named_modules())
    missing = [n for n in names if n not in mods or not hasattr(mods[n], "weight")]
    if missing:
        raise JournalError(f"the model has no weight module(s) {missing}")
    return {n: mods[n].weight.data for n in names}


def base_header(model, modules, model_name: str | None = None, model_dtype: str | None = None) -> dict:
    """What a journal's base snapshot and every edit file record about the base model: its name, the model's dtype
    and the edited weights' dtype (float32 in a bf16 model whose edited layers are promoted), the fingerprint of the
    edited weights, and the edited modules."""
    from emsedit_fast.models.adapter import fingerprint

    dtype = str(modules[0].weight.dtype).removeprefix("torch.")
    return {"model": model_name, "model_dtype": model_dtype or dtype, "dtype": dtype,
            "base_fingerprint": fingerprint(model, modules),
            "modules": [{"name": m.name, "d_in": m.d_in, "d_out": m.d_out, "transposed": m.transposed}
                        for m in modules]}


def prepare_base(header: dict, model: torch.nn.Module):
    """The edited modules a header names, resolved on `model` and promoted to the recorded edited dtype when the
    edits were made on promoted (fp32) layers of a lower-precision model: the state the edits' base had."""
    from emsedit_fast.models.adapter import promote_edited_modules
    from emsedit_fast.models.adapter import resolve_modules

    modules = resolve_modules(model, [re.escape(m["name"]) for m in header["modules"]])
    if header.get("dtype") == "float32" and header.get("model_dtype", "float32") != "float32":
        promote_edited_modules(modules, torch.float32)
    return modules


def check_base(header: dict, model: torch.nn.Module, modules=None) -> None:
    """Refuse (JournalError) a model whose edited layers are not the base the edits were made on.

    Compares the current weights' fingerprint with the recorded base fingerprint (call on the UNEDITED model)."""
    from emsedit_fast.models.adapter import fingerprint

    want = header.get("base_fingerprint")
    if want is None:
        return
    if modules is None:
        modules = prepare_base(header, model)
    got = fingerprint(model, modules)
    if got != want:
        raise JournalError(f"the model is not the base these edits were made on (fingerprint {got[:12]} != recorded "
                           f"{want[:12]}: other weights, dtype or architecture, or the model is already edited)")


def apply_edit_file(model, path: str, *, check: bool = True, allow_backend_change: bool = False
                    ) -> tuple[list[AppliedEdit], dict]:
    """Apply the edits of an edit file to the unedited `model`, in order, on their recorded backends: bit-identical
    to the model they were made on. check: refuse another base model. Returns (edits, header)."""
    edits, header = load_edit_file(path)
    modules = prepare_base(header, model)
    if check:
        check_base(header, model, modules)
    weights = weights_by_name(model, [m["name"] for m in header["modules"]])
    for edit in edits:
        apply_edit_(weights, edit, allow_backend_change=allow_backend_change)
    return edits, header
