"""scripts/: the install stamp behind `dev.sh train|test` skipping pip, the CUDA-build check, gpu_check.sh's command
line, and the two attentions attention_check.py times. Nothing is compiled here; `bash scripts/gpu_check.sh
--dry-run` does the real CUDA build."""

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(f"emsedit_fast_scripts_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tree(tmp_path):
    """A miniature checkout: the stamp's input files and a csrc/ tree."""
    for rel, text in {"setup.py": "setup()\n", "pyproject.toml": "[project]\n", "scripts/dev.sh": "echo\n",
                      "csrc/ops.cpp": "int a;\n", "csrc/cpu/ridge.cpp": "int b;\n",
                      "csrc/include/emsedit_fast/checks.h": "#pragma once\n", "README.md": "docs\n"}.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_stamp_inputs_are_the_build_files_and_csrc(tree):
    stamp = _script("install_stamp")
    assert stamp.input_paths(str(tree)) == ["csrc/cpu/ridge.cpp", "csrc/include/emsedit_fast/checks.h",
                                            "csrc/ops.cpp", "pyproject.toml", "scripts/dev.sh", "setup.py"]


def test_stamp_changes_with_every_input_and_nothing_else(tree):
    stamp = _script("install_stamp")
    env = {"EMSEDIT_FAST_BUILD_EXT": "auto"}
    base = stamp.digest(str(tree), "2.13.0+cpu", env)
    assert stamp.digest(str(tree), "2.13.0+cpu", dict(env)) == base  # deterministic
    (tree / "README.md").write_text("other docs\n")
    assert stamp.digest(str(tree), "2.13.0+cpu", env) == base  # not an input
    assert stamp.digest(str(tree), "2.14.1+cu130", env) != base
    assert stamp.digest(str(tree), "2.13.0+cpu", {**env, "TORCH_CUDA_ARCH_LIST": "9.0"}) != base
    assert stamp.digest(str(tree), "2.13.0+cpu", {**env, "EMSEDIT_FAST_CUDA": "0"}) != base
    changed = []
    for rel in ("csrc/cpu/ridge.cpp", "csrc/include/emsedit_fast/checks.h", "setup.py", "pyproject.toml",
                "scripts/dev.sh"):
        before = (tree / rel).read_text()
        (tree / rel).write_text(before + "// edited\n")
        changed.append(stamp.digest(str(tree), "2.13.0+cpu", env))
        (tree / rel).write_text(before)
    assert base not in changed and len(set(changed)) == len(changed)
    (tree / "csrc" / "cuda").mkdir()
    (tree / "csrc" / "cuda" / "ridge.cu").write_text("")  # a new (even empty) source file is a change too
    assert stamp.digest(str(tree), "2.13.0+cpu", env) != base


def test_stamp_check_on_this_checkout(tmp_path):
    """Against the real editable install: no stamp -> install needed; a fresh stamp -> up to date (when _C built);
    a changed input -> install needed."""
    stamp = _script("install_stamp")
    path = str(tmp_path / "stamp")
    why = stamp.problems(str(ROOT), path)
    if why and ("not from this checkout" in why[0] or "not installed" in why[0]):
        pytest.skip(why[0])
    assert why == ["no install stamp yet"]
    import importlib.metadata

    with open(path, "w") as f:
        f.write(stamp.digest(str(ROOT), importlib.metadata.version("torch"), os.environ))
    why = stamp.problems(str(ROOT), path)
    assert why in ([], ["no record of a successful build of emsedit_fast._C (emsedit_fast/_build.json)"],
                   ["emsedit_fast/_C*.so is missing"])
    with open(path, "w") as f:
        f.write("0" * 64)
    assert stamp.problems(str(ROOT), path)[0].startswith("setup.py, pyproject.toml, scripts/dev.sh, csrc/")


def test_the_registrations_expected_of_c_are_read_from_the_sources():
    check = _script("check_cuda_ext")
    src = {"a.cu": 'TORCH_LIBRARY_IMPL(emsedit_fast, CUDA, m) {\n  m.impl("restore_", &restore_cuda);\n'
                   '  m.impl("ridge_solve", &f);\n}\nTORCH_LIBRARY_IMPL(other, CUDA, m) { m.impl("x", &g); }\n',
           "b.cpp": 'TORCH_LIBRARY_IMPL( emsedit_fast , CPU , m ) { m.impl("restore_", &restore_cpu); }'}
    assert check.registered_ops(src) == {"CUDA": {"restore_", "ridge_solve"}, "CPU": {"restore_"}}
    real = {str(p): p.read_text() for p in ROOT.glob("csrc/**/*.c*")}
    ops = check.registered_ops(real)
    assert ops["CUDA"] and ops["CUDA"] <= ops["CPU"]  # every CUDA kernel has a CPU twin


def test_cuda_ext_check_rejects_a_cpu_build():
    """The check on this checkout's CPU-only _C: it finds every CPU kernel, and fails because there is no CUDA."""
    if not list(ROOT.glob("emsedit_fast/_C.*.so")):
        pytest.skip("_C is not built in this checkout")
    import torch

    if torch.version.cuda is not None:
        pytest.skip("this torch has CUDA: the checkout's _C may be a CUDA build")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_cuda_ext.py"), str(ROOT)],
                         capture_output=True, text=True)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAIL: _C was not compiled with CUDA" in out.stderr
    cpu_line = next(line for line in out.stdout.splitlines() if line.strip().startswith("CPU:"))
    n, total = cpu_line.split()[1].split("/")
    assert n == total and int(total) > 0, cpu_line
    assert "has no CUDA kernel" in out.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_command_line():
    script = str(ROOT / "scripts" / "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    bad = subprocess.run(["bash", script, "--frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage: bash scripts/gpu_check.sh" in bad.stderr
    import torch

    if not torch.cuda.is_available():
        gpu = subprocess.run(["bash", script], capture_output=True, text=True)
        assert gpu.returncode == 2 and "no CUDA device visible" in gpu.stderr


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_attention_check_times_the_same_attention_both_ways(dtype, tol):
    """scripts/attention_check.py: its SDPA and eager functions compute the same causal attention, forward and
    gradients, so the timings it prints compare like with like."""
    import torch

    sdpa, eager, inputs = _script("attention_check").attention_pair(getattr(torch, dtype), batch=3, tokens=7)
    outs, grads = [], []
    for fn in (sdpa, eager):
        out = fn().float()
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), inputs))
    assert outs[0].abs().max() > 0.1  # a real attention output, not zeros
    torch.testing.assert_close(outs[0], outs[1], atol=tol, rtol=tol)
    for a, b in zip(*grads):
        assert a.abs().max() > 0
        torch.testing.assert_close(a.float(), b.float(), atol=10 * tol, rtol=10 * tol)
