"""Check a CUDA build of emsedit_fast._C: it imports, says it was built with CUDA, and every op that csrc/cuda/*.cu
registers for the CUDA dispatch key has its CUDA kernel (and every CPU op its CPU kernel) in the dispatcher.

    python scripts/check_cuda_ext.py TREE      TREE: a source tree where `setup.py build_ext --inplace` ran

Runs with no GPU (importing _C only registers the kernels; nothing runs on a device) and imports only torch and _C
itself (not the emsedit_fast package), so the interpreter of a bare CUDA-torch virtual environment will do. The ops
expected come from the sources' own `TORCH_LIBRARY_IMPL(emsedit_fast, CUDA|CPU, m) { m.impl("name", ...); }` blocks:
a .cu file left out of the build, or a registration lost, fails here.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import sys

_BLOCK = re.compile(r"TORCH_LIBRARY_IMPL\(\s*emsedit_fast\s*,\s*(\w+)\s*,\s*\w+\s*\)\s*\{(.*?)\}", re.S)
_IMPL = re.compile(r"\.impl\(\s*\"(\w+)\"")


def registered_ops(sources: dict[str, str]) -> dict[str, set[str]]:
    """{dispatch key: op names} from the TORCH_LIBRARY_IMPL blocks of the given {path: text}."""
    out: dict[str, set[str]] = {}
    for text in sources.values():
        for key, body in _BLOCK.findall(text):
            out.setdefault(key, set()).update(_IMPL.findall(body))
    return out


def check(tree: str) -> list[str]:
    """Lines describing what is wrong with the _C built in `tree` ([] when all is well); prints what it found."""
    import torch

    found = sorted(glob.glob(os.path.join(tree, "emsedit_fast", "_C.*.so")))
    if len(found) != 1:
        return [f"expected one emsedit_fast/_C.*.so in {tree}, found {found}"]
    spec = importlib.util.spec_from_file_location("emsedit_fast._C", found[0])
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # undefined symbol, missing libcudart, ABI mismatch
        return [f"importing {found[0]} failed: {type(err).__name__}: {err}"]
    info = dict(module.build_info())
    print(f"_C: {found[0]}\n  build_info: {info}")
    errors = [] if info.get("cuda") is True else [f"_C was not compiled with CUDA: build_info()={info}"]

    texts = {}
    for path in sorted(glob.glob(os.path.join(tree, "csrc", "**", "*.c*"), recursive=True)):
        with open(path) as f:
            texts[path] = f.read()
    expected = registered_ops(texts)
    if not expected.get("CUDA"):
        errors.append(f"no TORCH_LIBRARY_IMPL(emsedit_fast, CUDA, m) blocks found under {tree}/csrc")
    for key in sorted(expected):
        missing = sorted(op for op in expected[key]
                         if not torch._C._dispatch_has_kernel_for_dispatch_key(f"emsedit_fast::{op}", key))
        print(f"  {key}: {len(expected[key]) - len(missing)}/{len(expected[key])} kernels registered")
        errors += [f"emsedit_fast::{op} has no {key} kernel" for op in missing]

    record_path = os.path.join(tree, "emsedit_fast", "_build.json")
    if os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
        print(f"  build record: torch {record.get('torch')}, {record.get('cxx_std')}, "
              f"CUDA_HOME={record.get('cuda_home')}, arch {record.get('arch_list')}")
    else:
        errors.append(f"{record_path} is missing (setup.py writes it on every build)")
    return errors


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    errors = check(argv[0])
    for line in errors:
        print("FAIL: " + line, file=sys.stderr)
    if not errors:
        print("OK: _C imports with its CUDA kernels registered")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
