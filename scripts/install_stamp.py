"""Is the editable install of this checkout up to date? (lets `bash scripts/dev.sh train|test` skip pip and the C++
rebuild, about 2 minutes on two cores, when nothing they depend on changed)

    python scripts/install_stamp.py check    exit 0 when up to date; else exit 1 and say why
    python scripts/install_stamp.py write    record the current inputs (after a successful install)

The stamp is a SHA-256 over what the install depends on: setup.py, pyproject.toml, scripts/dev.sh (the extras and
pins it installs), every file under csrc/, the installed torch's version, the interpreter, and the build switches
(EMSEDIT_FAST_BUILD_EXT, EMSEDIT_FAST_CUDA, TORCH_CUDA_ARCH_LIST, CUDA_HOME, CUDA_PATH, DEBUG). `check` also asks
whether `import emsedit_fast` resolves to this checkout and whether the last build of _C succeeded and its file is
still there, so another checkout's install or a lost extension is never taken for "up to date". It imports neither
torch nor the package (the torch version comes from its installed metadata), so it answers in well under a second.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAMP = os.path.join(ROOT, "build", "dev-install.stamp")  # build/ is git-ignored
INPUT_FILES = ("setup.py", "pyproject.toml", "scripts/dev.sh")
INPUT_TREES = ("csrc",)
ENV_KEYS = ("EMSEDIT_FAST_BUILD_EXT", "EMSEDIT_FAST_CUDA", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CUDA_PATH", "DEBUG")


def input_paths(root: str) -> list[str]:
    """The files the install depends on, relative to `root`, sorted."""
    paths = [p for p in INPUT_FILES if os.path.isfile(os.path.join(root, p))]
    for tree in INPUT_TREES:
        for path in glob.glob(os.path.join(root, tree, "**", "*"), recursive=True):
            if os.path.isfile(path) and "__pycache__" not in path:
                paths.append(os.path.relpath(path, root))
    return sorted(paths)


def digest(root: str, torch_version: str | None, environ: dict) -> str:
    """SHA-256 over the input files (names and contents), the torch version, the interpreter and the build switches."""
    h = hashlib.sha256()
    for rel in input_paths(root):
        h.update(rel.encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    h.update(f"torch={torch_version}\0python={sys.executable} {sys.version}\0".encode())
    for key in ENV_KEYS:
        h.update(f"{key}={environ.get(key, '')}\0".encode())
    return h.hexdigest()


def _torch_version() -> str | None:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def problems(root: str = ROOT, stamp: str = STAMP, environ: dict | None = None) -> list[str]:
    """Why the install is not up to date ([] when it is)."""
    environ = os.environ if environ is None else environ
    torch_version = _torch_version()
    if torch_version is None:
        return ["torch is not installed"]
    spec = importlib.util.find_spec("emsedit_fast")
    if spec is None or spec.origin is None:
        return ["emsedit_fast is not installed"]
    pkg = os.path.dirname(os.path.realpath(spec.origin))
    if pkg != os.path.realpath(os.path.join(root, "emsedit_fast")):
        return [f"emsedit_fast is installed from {pkg}, not from this checkout"]
    try:
        with open(stamp) as f:
            recorded = f.read().strip()
    except OSError:
        return ["no install stamp yet"]
    out = []
    if recorded != digest(root, torch_version, environ):
        out.append("setup.py, pyproject.toml, scripts/dev.sh, csrc/, torch or the build switches changed")
    if environ.get("EMSEDIT_FAST_BUILD_EXT", "auto") != "0":
        record_path = os.path.join(root, "emsedit_fast", "_build.json")
        try:
            with open(record_path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            record = {}
        if not record.get("built"):
            out.append("no record of a successful build of emsedit_fast._C (emsedit_fast/_build.json)")
        elif not glob.glob(os.path.join(root, "emsedit_fast", "_C.*.so")):
            out.append("emsedit_fast/_C*.so is missing")
    return out


def main(argv: list[str]) -> int:
    if argv == ["check"]:
        why = problems()
        if why:
            print("install needed: " + "; ".join(why))
            return 1
        print("install up to date (scripts/install_stamp.py): skipping pip and the extension build")
        return 0
    if argv == ["write"]:
        os.makedirs(os.path.dirname(STAMP), exist_ok=True)
        with open(STAMP, "w") as f:
            f.write(digest(ROOT, _torch_version(), os.environ) + "\n")
        return 0
    print("usage: python scripts/install_stamp.py check|write", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
