"""Packaging and build: _C optional, info output, the kernels folder only reachable as emsedit_fast.kernels."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(code, **env):
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, cwd="/")


def test_import_does_not_import_triton():
    out = _run("import sys, emsedit_fast, emsedit_fast.ops; print('triton' in sys.modules)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_constant_result_mark_matches_the_official_decorator():
    # ops._dispatch marks its trace-time constants without importing torch._dynamo; the mark must be exactly what
    # torch.compiler.assume_constant_result sets, or torch.compile would trace into them
    code = ("import sys, emsedit_fast.ops._dispatch as d; assert 'torch._dynamo' not in sys.modules; "
            "import torch; f = lambda: 1; g = lambda: 1; ours = set(d._constant_result(f).__dict__); "
            "ref = set(torch.compiler.assume_constant_result(g).__dict__); print(ours == ref and bool(ref), "
            "d._static_reasons._dynamo_marked_constant)")
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]


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
    # the ops whose CPU work the cpp backend hands to ATen are named, with what runs
    assert "where the cpp backend runs ATen" in out.stdout
    assert "cpu restore_" in out.stdout and "torch._foreach_copy_" in out.stdout


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


# ----------------------------------------------------------------------------------------------------------------------
# setup.py's build logic, as pure functions (nothing is compiled here)


def _setup_module():
    """setup.py as a module: its setup() call runs only as __main__, so importing it builds nothing."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("emsedit_fast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cxx_standard_follows_the_aten_header_guard():
    s = _setup_module()
    torch_2_14 = "#pragma once\n\n#if !defined(_MSC_VER) && __cplusplus < 202002L\n#error C++20 or later ...\n#endif\n"
    torch_2_13 = "#pragma once\n\n#if !defined(_MSC_VER) && __cplusplus < 201703L\n#error C++17 or later ...\n#endif\n"
    assert s.cxx_std_from_header(torch_2_14) == 20
    assert s.cxx_std_from_header(torch_2_13) == 17
    assert s.cxx_std_from_header("#pragma once\n") is None
    # the header decides, whatever the version says; csrc/ never gets less than C++17
    assert s.cxx_std("2.13.0+cpu", torch_2_14) == 20
    assert s.cxx_std("2.14.1+cu130", torch_2_13) == 17
    assert s.cxx_std("2.14.1", "#if __cplusplus < 201402L\n#error\n#endif") == 17
    assert s.cxx_std("2.11.0+cu130", "#if __cplusplus < 202302L\n#error\n#endif") == 23


def test_cxx_standard_from_the_version_when_the_header_is_unreadable():
    s = _setup_module()
    assert s.cxx_std("2.14.1+cu130", None) == 20
    assert s.cxx_std("2.15.0.dev20260101", None) == 20
    assert s.cxx_std("3.0.0", None) == 20
    assert s.cxx_std("2.13.0+cpu", None) == 17
    assert s.cxx_std("2.4.1", None) == 17
    with pytest.raises(ValueError, match="cannot parse the torch version 'nightly'"):
        s.cxx_std("nightly", None)


def test_the_installed_torch_header_is_found_and_read():
    import torch
    from torch.utils import cpp_extension

    s = _setup_module()
    header = s._read_aten_header(cpp_extension.include_paths())
    assert header is not None and "__cplusplus" in header
    # the header read from disk agrees with the release rule (2.13: C++17, 2.14: C++20)
    assert s.cxx_std(torch.__version__, header) == s.cxx_std_from_version(torch.__version__)


def _toolkit(root, *, nvcc=True, header=True, lib="lib64", versioned_only=False):
    """A fake CUDA toolkit folder with the pieces asked for."""
    if nvcc:
        (root / "bin").mkdir(parents=True)
        (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
        (root / "bin" / "nvcc").chmod(0o755)
    if header:
        (root / "include").mkdir(parents=True)
        (root / "include" / "cuda_runtime.h").write_text("")
    if lib:
        (root / lib).mkdir(parents=True)
        (root / lib / ("libcudart.so.13" if versioned_only else "libcudart.so")).write_text("")
    return root


def test_toolkit_problem_names_what_is_missing(tmp_path):
    s = _setup_module()
    assert s.toolkit_problem(str(_toolkit(tmp_path / "full"))) is None
    assert s.toolkit_problem(str(_toolkit(tmp_path / "lib", lib="lib"))) is None  # lib/ instead of lib64/
    why = s.toolkit_problem(str(_toolkit(tmp_path / "wrapper-dir", header=False, lib=None)))
    assert why.endswith("lacks include/cuda_runtime.h, lib64/libcudart.so or lib/libcudart.so")
    why = s.toolkit_problem(str(_toolkit(tmp_path / "pip-runtime", nvcc=False, lib="lib", versioned_only=True)))
    assert "bin/nvcc" in why and "only lib/libcudart.so.13" in why
    assert s.toolkit_problem(str(tmp_path / "nowhere")).endswith("does not exist")


def test_nvcc_real_location_from_its_dryrun_output():
    s = _setup_module()
    out = ("#$ _NVVM_BRANCH_=nvvm\n#$ _SPACE_= \n#$ _CUDART_=cudart\n#$ _HERE_=/usr/local/cuda-13.0/bin\n"
           "#$ _THERE_=/usr/local/cuda-13.0/bin\n#$ TOP=/usr/local/cuda-13.0/bin/..\n")
    assert s.nvcc_bin_dir_from_dryrun(out) == "/usr/local/cuda-13.0/bin"
    assert s.nvcc_bin_dir_from_dryrun("nvcc fatal   : Unknown option '--dryrun'\n") is None


def test_cuda_home_through_a_wrapper_script_on_path(tmp_path):
    """The case of this project's build machine: PATH holds /usr/local/bin/nvcc, a shell script that execs the real
    nvcc; the folder above it (/usr/local) has no libcudart.so, torch's own guess, so the build would not link."""
    s = _setup_module()
    real = _toolkit(tmp_path / "cuda-13.0")
    wrapper_root = tmp_path / "usr-local"
    (wrapper_root / "bin").mkdir(parents=True)
    (wrapper_root / "bin" / "nvcc").write_text(f"#!/bin/sh\nexec {real}/bin/nvcc \"$@\"\n")
    asked = []

    def dryrun(nvcc):
        asked.append(nvcc)
        return str(real)

    cands = s.cuda_home_candidates({}, str(wrapper_root / "bin" / "nvcc"), dryrun, [], [])
    assert [root for _, root in cands] == [str(wrapper_root), str(real)]
    assert asked == [str(wrapper_root / "bin" / "nvcc")]
    home, notes = s.find_cuda_home(cands)
    assert home == str(real)
    assert len(notes) == 1 and str(wrapper_root) in notes[0] and "libcudart.so" in notes[0]


def test_cuda_home_through_a_symlinked_nvcc_needs_no_dryrun(tmp_path):
    s = _setup_module()
    real = _toolkit(tmp_path / "cuda-12.8")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(real / "bin" / "nvcc")
    cands = s.cuda_home_candidates({}, str(tmp_path / "bin" / "nvcc"), lambda _: pytest.fail("dryrun not needed"),
                                   [], [])
    assert s.find_cuda_home(cands) == (str(real), [])


def test_an_explicit_cuda_home_is_the_only_candidate(tmp_path):
    """A wrong CUDA_HOME is reported, not silently replaced by another toolkit."""
    s = _setup_module()
    good = _toolkit(tmp_path / "good")
    bad = tmp_path / "bad"
    bad.mkdir()
    cands = s.cuda_home_candidates({"CUDA_HOME": str(bad)}, str(good / "bin" / "nvcc"), lambda _: None,
                                   [str(good)], [])
    assert cands == [("$CUDA_HOME", str(bad))]
    home, notes = s.find_cuda_home(cands)
    assert home is None and notes[0].startswith(f"$CUDA_HOME: {bad} lacks bin/nvcc")
    assert s.cuda_home_candidates({"CUDA_PATH": str(good)}, None, None, [], []) == [("$CUDA_PATH", str(good))]


def test_cuda_home_search_order_without_nvcc_on_path(tmp_path):
    """No nvcc on PATH: the search roots in order, then the pip nvidia-* toolkits (newest first), duplicates once."""
    s = _setup_module()
    first_bad = tmp_path / "usr-local-cuda"
    first_bad.mkdir()
    second = _toolkit(tmp_path / "cuda-13.0")
    site = tmp_path / "site-packages"
    pip12 = _toolkit(site / "nvidia" / "cu12")
    pip13 = _toolkit(site / "nvidia" / "cu13")
    cands = s.cuda_home_candidates({}, None, None, [str(first_bad), str(second), str(second)], [str(site)])
    assert [root for _, root in cands] == [str(first_bad), str(second), str(pip13), str(pip12)]
    assert s.find_cuda_home(cands)[0] == str(second)
    assert s.find_cuda_home(cands[2:])[0] == str(pip13)
    home, notes = s.find_cuda_home([])
    assert home is None and "no nvcc on PATH" in notes[0]


def test_cuda_kernels_status_says_why_and_shouts_on_a_gpu_machine():
    from emsedit_fast.info import cuda_kernels_status

    assert cuda_kernels_status(True, "13.0", True, {}) == "available"
    assert cuda_kernels_status(False, None, False, {}) == "not built: this torch has no CUDA"
    skipped = {"cuda": False, "cuda_skipped": "no usable CUDA toolkit: ...", "built": True, "error": None}
    assert cuda_kernels_status(False, "13.0", False, skipped) == "not built: no usable CUDA toolkit: ..."
    lost = cuda_kernels_status(False, "13.0", True, skipped)
    assert lost.startswith("LOST on this GPU machine: ") and "no usable CUDA toolkit" in lost
    failed = {"cuda": True, "built": False, "error": "RuntimeError: Error compiling objects for extension"}
    assert "the last build failed (RuntimeError: Error compiling" in cuda_kernels_status(False, "13.0", True, failed)
    assert "rebuild to see why" in cuda_kernels_status(False, "13.0", False, {})


class _FakeTorch:
    """What setup.py's CUDA decision reads of torch: the version, torch.version.cuda, torch.cuda.is_available()."""

    def __init__(self, cuda, gpu):
        self.__version__ = "2.14.1+cu130" if cuda else "2.13.0+cpu"
        self.version = type("V", (), {"cuda": cuda})
        self.cuda = type("C", (), {"is_available": staticmethod(lambda: gpu)})


def test_cuda_decision_without_a_toolkit(monkeypatch, capsys):
    """A GPU machine without a usable toolkit: auto mode builds the CPU kernels but says loudly that the CUDA ones are
    lost and why; EMSEDIT_FAST_CUDA=1 stops with the same reason; no GPU and no arch list: quietly CPU only."""
    s = _setup_module()
    monkeypatch.setattr(s, "locate_cuda_home", lambda: (None, ["nvcc on PATH (/usr/local/bin/nvcc): /usr/local lacks "
                                                               "lib64/libcudart.so or lib/libcudart.so"]))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    with pytest.warns(UserWarning, match="this machine has a GPU but the CUDA kernels will NOT be built"):
        use, home, why = s._cuda_decision(_FakeTorch("13.0", gpu=True), "auto")
    assert (use, home) == (False, None) and "/usr/local lacks lib64/libcudart.so" in why
    assert "!!!!" in capsys.readouterr().err and "Set CUDA_HOME" in why
    with pytest.raises(SystemExit, match="EMSEDIT_FAST_CUDA=1: no usable CUDA toolkit .*/usr/local lacks"):
        s._cuda_decision(_FakeTorch("13.0", gpu=True), "1")
    assert s._cuda_decision(_FakeTorch("13.0", gpu=False), "auto") == (
        False, None, "no GPU at build time and TORCH_CUDA_ARCH_LIST unset")
    with pytest.raises(SystemExit, match="needs TORCH_CUDA_ARCH_LIST"):
        s._cuda_decision(_FakeTorch("13.0", gpu=False), "1")
    with pytest.raises(SystemExit, match="needs a CUDA build of torch"):
        s._cuda_decision(_FakeTorch(None, gpu=False), "1")
    why = s._cuda_decision(_FakeTorch(None, gpu=False), "auto")[2]
    assert why == "this torch has no CUDA (torch 2.13.0+cpu)"
    assert s._cuda_decision(_FakeTorch("13.0", gpu=True), "0") == (False, None, "EMSEDIT_FAST_CUDA=0")


def test_cuda_decision_with_a_toolkit(monkeypatch, tmp_path):
    s = _setup_module()
    monkeypatch.setattr(s, "locate_cuda_home", lambda: (str(tmp_path), []))
    assert s._cuda_decision(_FakeTorch("13.0", gpu=True), "auto") == (True, str(tmp_path), None)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert s._cuda_decision(_FakeTorch("13.0", gpu=False), "auto") == (True, str(tmp_path), None)
