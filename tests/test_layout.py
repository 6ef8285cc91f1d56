"""Every op stem has all its twins (docs/architecture.md, "Ops layer"), and nothing exists outside the stem list.

For each stem of emsedit_fast.ops.OPS_BY_STEM (the one list of stems) and each of its ops:
    emsedit_fast/reference/<stem>.py    the semantics, exported by emsedit_fast.reference
    emsedit_fast/ops/<stem>.py          the public op (input check + dispatch), exported by emsedit_fast.ops
    csrc/ops.cpp                        the op's schema (m.def)
    csrc/cpu/<stem>.cpp                 its CPU kernel (m.impl), and csrc/cuda/<stem>.cu its CUDA kernel
    kernels/<stem>.py                   the Triton op emsedit_fast::triton_<op> (triton_op)
    tests/ops/test_<stem>.py            its tests, which name the op
    benchmarks/bench_<stem>.py          its benchmark
Sources are read as text, so the test needs neither a build nor triton; where _C is loaded, the registered CPU kernel
is checked too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from emsedit_fast import ops
from emsedit_fast import reference
from emsedit_fast.ops import OPS_BY_STEM
from emsedit_fast.ops import STEMS

ROOT = Path(__file__).resolve().parents[1]
OPS = [(stem, op) for stem, names in OPS_BY_STEM.items() for op in names]


def _text(rel: str) -> str:
    path = ROOT / rel
    assert path.is_file(), f"{rel} is missing"
    return path.read_text()


def _defined_schemas() -> set[str]:
    return set(re.findall(r'm\.def\(\s*"(\w+)\(', _text("csrc/ops.cpp")))


@pytest.mark.parametrize("stem, op", OPS, ids=[op for _, op in OPS])
def test_op_has_reference(stem, op):
    _text(f"emsedit_fast/reference/{stem}.py")
    fn = getattr(reference, op, None)
    assert callable(fn), f"emsedit_fast.reference does not export {op}"
    assert fn.__module__ == f"emsedit_fast.reference.{stem}", f"reference.{op} lives in {fn.__module__}"


@pytest.mark.parametrize("stem, op", OPS, ids=[op for _, op in OPS])
def test_op_has_dispatch_entry(stem, op):
    _text(f"emsedit_fast/ops/{stem}.py")
    fn = getattr(ops, op, None)
    assert callable(fn), f"emsedit_fast.ops does not export {op}"
    assert fn.__module__ == f"emsedit_fast.ops.{stem}", f"ops.{op} lives in {fn.__module__}"
    assert op in ops.__all__


@pytest.mark.parametrize("stem, op", OPS, ids=[op for _, op in OPS])
def test_op_has_cpp_kernels(stem, op):
    assert op in _defined_schemas(), f"csrc/ops.cpp defines no schema for {op}"
    for rel in (f"csrc/cpu/{stem}.cpp", f"csrc/cuda/{stem}.cu"):
        assert re.search(rf'm\.impl\(\s*"{op}"', _text(rel)), f"{rel} registers no kernel for {op}"
    from emsedit_fast import _ext
    from emsedit_fast.ops._dispatch import cpp_has_kernel

    if _ext.load_error() is None:
        assert cpp_has_kernel(op, "cpu"), f"the loaded emsedit_fast._C has no CPU kernel for {op} (rebuild?)"


@pytest.mark.parametrize("stem, op", OPS, ids=[op for _, op in OPS])
def test_op_has_triton_kernel(stem, op):
    src = _text(f"kernels/{stem}.py")
    assert re.search(rf'triton_op\(\s*"emsedit_fast::triton_{op}"', src), (
        f"kernels/{stem}.py registers no Triton op emsedit_fast::triton_{op}")


@pytest.mark.parametrize("stem, op", OPS, ids=[op for _, op in OPS])
def test_op_has_tests_and_benchmark(stem, op):
    assert re.search(rf"\b{op}\b", _text(f"tests/ops/test_{stem}.py")), f"tests/ops/test_{stem}.py never names {op}"
    _text(f"benchmarks/bench_{stem}.py")


def test_every_schema_and_source_belongs_to_a_stem():
    """The inverse direction: no schema, kernel file or test file outside OPS_BY_STEM (a new op must be listed)."""
    listed = {op for _, op in OPS}
    assert _defined_schemas() == listed, f"schemas {sorted(_defined_schemas() ^ listed)} are not in OPS_BY_STEM"
    stems = set(STEMS)
    for folder, pattern in (("emsedit_fast/reference", "*.py"), ("emsedit_fast/ops", "*.py"), ("kernels", "*.py"),
                            ("csrc/cpu", "*.cpp"), ("csrc/cuda", "*.cu")):
        found = {p.stem for p in (ROOT / folder).glob(pattern) if not p.stem.startswith("_")}
        assert found <= stems, f"{folder} has sources for unknown stems {sorted(found - stems)}"
    tests = {p.stem.removeprefix("test_") for p in (ROOT / "tests/ops").glob("test_*.py")}
    assert stems <= tests, f"stems without tests: {sorted(stems - tests)}"


def _import_kernels_from_root(extra_path: Path | None, *flags: str) -> list[str]:
    """`import kernels` in a fresh interpreter started in the repository root (as `python -m ...` from a checkout
    is): the file the name resolves to and the module's MARK."""
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env["PYTHONPATH"] = str(extra_path) if extra_path else ""
    code = "import kernels; print(kernels.__file__); print(getattr(kernels, 'MARK', 'none'))"
    out = subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.splitlines()


def test_top_level_kernels_folder_yields_its_name_to_an_installed_package(tmp_path):
    # transformers imports Hugging Face's `kernels` while loading a model; from the checkout's root this folder must
    # not shadow it
    pkg = tmp_path / "site" / "kernels"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("MARK = 'installed'\n")
    assert _import_kernels_from_root(tmp_path / "site") == [str(pkg / "__init__.py"), "installed"]


def test_top_level_kernels_folder_stays_without_an_installed_package():
    # -S: no site-packages, so no other package of that name anywhere on sys.path
    assert _import_kernels_from_root(None, "-S") == [str(ROOT / "kernels" / "__init__.py"), "none"]
