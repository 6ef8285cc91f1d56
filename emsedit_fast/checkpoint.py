"""Versioned editor checkpoints: a directory written atomically.

    <dir>/config.yaml               the fully resolved RunConfig
    <dir>/hypernets.safetensors     editor parameters and normaliser buffers (fp32 / fp64)
    <dir>/trainer_state.pt          optimiser state, training step, report (present when saved from a trainer)
    <dir>/meta.json                 format version, package version, git sha, editor kind, mode, base-model id and
                                    fingerprint, edited modules with shapes and layouts, training step, file hashes

Saving writes everything into a sibling temporary directory, fsyncs it, then renames it into place (a previous
checkpoint at the same path is renamed aside first and deleted last), so a crash never leaves a half-written
checkpoint under the final name; a save killed between the two renames is undone by the next read or save of that
path, which renames the previous checkpoint back (`recover_interrupted_save`). Loading checks the format version, the
file hashes and the model fingerprint, and refuses a mismatch with a message that shows the difference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time

import torch
import yaml
from safetensors.torch import load_file
from safetensors.torch import save_file

from emsedit_fast.config import RunConfig
from emsedit_fast.config import build
from emsedit_fast.config import to_dict
from emsedit_fast.models.adapter import fingerprint_details
from emsedit_fast.version import __version__

FORMAT_VERSION = 1
FILES = ("config.yaml", "hypernets.safetensors", "meta.json")
_META_KEYS = ("editor", "mode", "files", "fingerprint_details", "training_step")

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, of an unknown version, or does not fit the model."""


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    except Exception:
        return None


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_hash(meta: dict) -> str:
    """A short identity of an editor checkpoint: sha256 over its files' recorded hashes."""
    return hashlib.sha256(json.dumps(meta.get("files", {}), sort_keys=True).encode()).hexdigest()


def _fsync_dir(path: str) -> None:
    for name in os.listdir(path):
        with open(os.path.join(path, name), "rb") as f:
            os.fsync(f.fileno())


def base_fingerprint(editor) -> dict:
    """Fingerprint details of the UNEDITED model: the editor's W0 snapshot stands in for the current weights."""
    from emsedit_fast import ops

    current = ops.snapshot(editor.weights())
    ops.restore_(editor.weights(), editor.base, backend="reference")
    try:
        return fingerprint_details(editor.model, editor.modules_)
    finally:
        ops.restore_(editor.weights(), current, backend="reference")


def _saving_elsewhere(aside: str) -> bool:
    """Whether `<path>.old-<pid>` belongs to a save still running in another live process (its rename comes next)."""
    try:
        pid = int(aside.rsplit(".old-", 1)[1])
    except ValueError:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but not ours to signal
        return True
    return True


def recover_interrupted_save(path: str, wait_s: float = 2.0) -> bool:
    """Put back the previous checkpoint when a save was killed between its two renames (`path` renamed aside to
    `<path>.old-<pid>`, the new one not yet renamed in). A save still running in a live process gets `wait_s` seconds
    to finish its rename first. Returns True when it recovered one."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        return False
    parent, name = os.path.dirname(path), os.path.basename(path)
    try:
        aside = [os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(name + ".old-")]
    except FileNotFoundError:
        return False
    if any(_saving_elsewhere(d) for d in aside):
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            time.sleep(0.02)
            if os.path.exists(path):
                return False
    intact = []
    for d in aside:  # a leftover that was being deleted when a later save was killed is incomplete: skip it
        try:
            read_meta(d)
        except CheckpointError:
            continue
        intact.append(d)
    if not intact or os.path.exists(path):
        return False
    newest = max(intact, key=os.path.getmtime)
    os.replace(newest, path)
    log.warning("%s: recovered the previous checkpoint from %s (a save was interrupted)", path, newest)
    return True


def save_checkpoint(path: str, editor, cfg: RunConfig, trainer=None, extra_meta: dict | None = None) -> str:
    """Write editor (+ trainer state) to directory `path` atomically; returns the path."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    recover_interrupted_save(path)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
        tensors = {k: v.detach().cpu().contiguous() for k, v in editor.state_dict().items()}
        save_file(tensors, os.path.join(tmp, "hypernets.safetensors"))
        files = list(FILES[:2])
        if trainer is not None:
            torch.save(trainer.state_dict(), os.path.join(tmp, "trainer_state.pt"))
            files.append("trainer_state.pt")
        details = base_fingerprint(editor)
        meta = {
            "format_version": FORMAT_VERSION,
            "package_version": __version__,
            "git_sha": _git_sha(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "editor": editor.cfg.name,
            "mode": editor.mode,
            "n_steps": editor.cfg.n_steps,
            "base_model": cfg.model.name,
            "fingerprint": hashlib.sha256(json.dumps(details, sort_keys=True).encode()).hexdigest(),
            "fingerprint_details": details,
            "modules": [{"name": m.name, "d_in": m.d_in, "d_out": m.d_out, "transposed": m.transposed}
                        for m in editor.modules_],
            "training_step": trainer.step if trainer is not None else None,
            "files": {name: sha256_file(os.path.join(tmp, name)) for name in files},
            **(extra_meta or {}),
        }
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        _fsync_dir(tmp)
        old = None
        if os.path.exists(path):
            old = path + ".old-" + str(os.getpid())
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        for name in os.listdir(parent):  # previous checkpoints left aside by saves killed before their cleanup
            stale = os.path.join(parent, name)
            if name.startswith(os.path.basename(path) + ".old-") and not _saving_elsewhere(stale):
                shutil.rmtree(stale, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_meta(path: str) -> dict:
    """meta.json of a checkpoint, validated (version, files present and intact)."""
    meta_path = os.path.join(path, "meta.json")
    recover_interrupted_save(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no checkpoint directory")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: meta.json missing: not a checkpoint, or an interrupted save") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{meta_path}: corrupt JSON ({err})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: corrupt (a JSON {type(meta).__name__}, not an object)")
    if "regime" in meta and "mode" not in meta:  # the key's name in checkpoints of earlier versions
        meta["mode"] = meta.pop("regime")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version!r} is not supported by emsedit_fast "
                              f"{__version__} (supports {FORMAT_VERSION})")
    missing = [k for k in _META_KEYS if k not in meta]
    if missing or not isinstance(meta.get("files"), dict):
        raise CheckpointError(f"{meta_path}: corrupt (missing {', '.join(missing) or 'files'})")
    for name, digest in meta.get("files", {}).items():
        file = os.path.join(path, name)
        if not os.path.exists(file):
            raise CheckpointError(f"{path}: {name} missing")
        if sha256_file(file) != digest:
            raise CheckpointError(f"{file}: contents do not match the hash in meta.json (corrupt or truncated)")
    return meta


def load_config(path: str) -> RunConfig:
    """The resolved RunConfig a checkpoint was trained with."""
    with open(os.path.join(path, "config.yaml")) as f:
        values = yaml.safe_load(f) or {}
    data = values.get("data")
    if isinstance(data, dict) and "zsre_split_seed" in data:  # the key's name in checkpoints of earlier versions
        data["split_seed"] = data.pop("zsre_split_seed")
    return build(RunConfig, values)


def _diff(saved: dict, current: dict) -> list[str]:
    lines = []
    for key in sorted(set(saved["config"]) | set(current["config"])):
        a, b = saved["config"].get(key), current["config"].get(key)
        if a != b:
            lines.append(f"  config.{key}: checkpoint {a!r}, model {b!r}")
    saved_mods = {m["name"]: m for m in saved["modules"]}
    current_mods = {m["name"]: m for m in current["modules"]}
    for name in sorted(set(saved_mods) | set(current_mods)):
        a, b = saved_mods.get(name), current_mods.get(name)
        if a is None or b is None:
            lines.append(f"  module {name}: {'missing in the model' if b is None else 'not in the checkpoint'}")
            continue
        for field in ("d_in", "d_out", "transposed", "dtype", "weight_sha256"):
            if a.get(field) != b.get(field):
                what = "weights differ" if field == "weight_sha256" else f"{field} {a.get(field)!r} vs {b.get(field)!r}"
                lines.append(f"  module {name}: {what}")
    return lines


def check_compatible(meta: dict, editor, strict_weights: bool = True) -> None:
    """Refuse (CheckpointError) a checkpoint whose model fingerprint differs from the editor's base model."""
    current = base_fingerprint(editor)
    saved = meta["fingerprint_details"]
    if not strict_weights:
        saved = {**saved, "modules": [{k: v for k, v in m.items() if k != "weight_sha256"} for m in saved["modules"]]}
        current = {**current, "modules": [{k: v for k, v in m.items() if k != "weight_sha256"}
                                          for m in current["modules"]]}
    lines = _diff(saved, current)
    if lines:
        raise CheckpointError("the checkpoint was trained for a different model (base model "
                              f"{meta.get('base_model')!r}); {len(lines)} difference(s): "
                              + "; ".join(line.strip() for line in lines))


def load_editor_state(path: str, editor, trainer=None, strict_weights: bool = True) -> dict:
    """Load parameters and normaliser state (and the trainer state when given) into `editor`; returns meta."""
    meta = read_meta(path)
    if meta["editor"] != editor.cfg.name or meta["mode"] != editor.mode:
        raise CheckpointError(f"{path}: holds a {meta['editor']} editor ({meta['mode']} mode), not "
                              f"{editor.cfg.name} ({editor.mode} mode)")
    check_compatible(meta, editor, strict_weights)
    try:
        state = load_file(os.path.join(path, "hypernets.safetensors"))
    except Exception as err:
        raise CheckpointError(f"{path}/hypernets.safetensors: cannot read ({type(err).__name__}: {err})") from None
    own = editor.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        odd = sorted(set(state) ^ set(own))
        what = [f"tensor {k!r} is only in the {'checkpoint' if k in state else 'editor'}" for k in odd[:1]]
        what += [f"{k}: checkpoint ({', '.join(map(str, state[k].shape))}), editor "
                 f"({', '.join(map(str, own[k].shape))})" for k in own
                 if k in state and state[k].shape != own[k].shape][:1]
        raise CheckpointError(f"{path}: hypernetwork shapes do not match this editor configuration (editor.rank, "
                              f"n_blocks, eta_param, n_steps or edited modules differ; {'; '.join(what)})")
    editor.load_state_dict({k: v.to(own[k].device) for k, v in state.items()})
    if trainer is not None:
        file = os.path.join(path, "trainer_state.pt")
        if not os.path.exists(file):
            raise CheckpointError(f"{path}: no trainer_state.pt to resume from")
        try:
            state = torch.load(file, map_location="cpu", weights_only=False)
        except Exception as err:
            raise CheckpointError(f"{file}: cannot read ({type(err).__name__}: {err})") from None
        trainer.load_state_dict(state)
    return meta
