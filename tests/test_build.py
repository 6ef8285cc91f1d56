"""Packaging and build: _C optional, info output, the kernels folder only reachable as emsedit_fast.kernels."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(code, **env):
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, cwd="/")


def test_import_does_not_import_triton():
    out = _run("import sys, emsedit_fast, emsedit_fast.ops; print('triton' in sys.modules)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_disabled_extension_still_works_on_the_reference():
    code = ("import torch, emsedit_fast.ops as o; w=[torch.zeros(2)]; o.restore_(w,[torch.ones(2)]); "
            "print(o.availability()['cpp'])")
    out = _run(code, EMSEDIT_FAST_DISABLE_EXT="1")
    assert out.returncode == 0, out.stderr
    assert "disabled by EMSEDIT_FAST_DISABLE_EXT=1" in out.stdout


def test_info_lists_every_backend_with_a_reason():
    out = subprocess.run([sys.executable, "-m", "emsedit_fast.info"], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    for name in ("reference", "cpp", "triton"):
        assert f"cpu   {name}" in out.stdout
    assert "C++ extension:" in out.stdout and "Triton:" in out.stdout


def test_no_code_imports_the_top_level_kernels_package():
    """kernels/ is packaged as emsedit_fast.kernels; a bare `import kernels` would hit an unrelated PyPI package."""
    offenders = []
    for path in list(ROOT.glob("emsedit_fast/**/*.py")) + list(ROOT.glob("kernels/*.py")) + \
            list(ROOT.glob("tests/**/*.py")) + list(ROOT.glob("benchmarks/*.py")):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import kernels", "from kernels")):
                offenders.append(f"{path}: {stripped}")
    assert not offenders, offenders


def test_kernels_are_installed_under_the_package():
    out = _run("import emsedit_fast.kernels as k, os; print(os.path.basename(os.path.dirname(k.__file__)))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("kernels",)
