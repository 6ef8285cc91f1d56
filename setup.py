"""Build of emsedit_fast: the pure-Python package, plus the optional C++ (and CUDA) extension emsedit_fast._C.

Switches (environment variables):
    EMSEDIT_FAST_BUILD_EXT  auto (default): build _C when possible, warn and install pure Python otherwise;
                            1: any build failure is fatal (CI); 0: never build _C.
    EMSEDIT_FAST_CUDA       auto (default): add csrc/cuda/*.cu with a CUDA torch, a toolkit and a GPU or
                            TORCH_CUDA_ARCH_LIST; 1: require that (a missing piece or a failed build is fatal);
                            0: CPU sources only.
    CUDA_HOME / CUDA_PATH   the CUDA toolkit root (bin/nvcc, include/cuda_runtime.h, lib64/ or lib/libcudart.so).
                            Unset: found from nvcc's real location (nvcc on PATH may be a wrapper script),
                            /usr/local/cuda*, /opt/cuda, or the pip nvidia-* packages.
    TORCH_CUDA_ARCH_LIST    GPU architectures to compile for, e.g. "9.0" (H100/H200); needed without a GPU.
    DEBUG=1                 -O0 -g.     MAX_JOBS  parallel compile jobs (ninja).

The C++ standard follows the torch being built against: its ATen/ATen.h rejects older standards (torch 2.14 needs
C++20, earlier releases C++17), and csrc/ needs C++17 at least.

Every build of _C leaves emsedit_fast/_build.json (torch, standard, CUDA toolkit, and why CUDA kernels or the whole
extension are missing), which `python -m emsedit_fast.info` shows. The helper functions below are pure where they can
be and run without building anything (tests/test_build.py imports this file; setup() runs only as __main__).
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import warnings

from setuptools import find_packages
from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_RECORD = "_build.json"  # written next to _C by every build; read by emsedit_fast._ext.build_record()
MIN_CXX_STD = 17  # what csrc/ itself needs

# ----------------------------------------------------------------------------------------------------------------------
# C++ standard


def cxx_std_from_header(text: str) -> int | None:
    """The standard an ATen/ATen.h demands, from its guard `#if ... __cplusplus < 202002L  #error ...`: 20 here.

    None when the text has no such guard. The year-month value maps to the standard by its year: 2011 -> 11,
    2014 -> 14, 2017 -> 17, 2020 -> 20, 2023 -> 23.
    """
    m = re.search(r"__cplusplus\s*<\s*(\d{6})L", text)
    if m is None:
        return None
    year = int(m.group(1)[:4])
    return {2011: 11, 2014: 14, 2017: 17, 2020: 20, 2023: 23}.get(year, year % 100)


def cxx_std_from_version(torch_version: str) -> int:
    """Fallback when the header cannot be read: torch >= 2.14 needs C++20, older releases C++17."""
    m = re.match(r"(\d+)\.(\d+)", torch_version)
    if m is None:
        raise ValueError(f"cannot parse the torch version {torch_version!r} (expected e.g. '2.14.1+cu130')")
    return 20 if (int(m.group(1)), int(m.group(2))) >= (2, 14) else 17


def cxx_std(torch_version: str, aten_header: str | None) -> int:
    """The C++ standard to compile with: what the torch's ATen.h demands (else what its version implies), never
    below MIN_CXX_STD."""
    need = cxx_std_from_header(aten_header) if aten_header is not None else None
    if need is None:
        need = cxx_std_from_version(torch_version)
    return max(need, MIN_CXX_STD)


def _read_aten_header(torch_include_dirs: list[str]) -> str | None:
    for inc in torch_include_dirs:
        path = os.path.join(inc, "ATen", "ATen.h")
        if os.path.isfile(path):
            with open(path) as f:
                return f.read(4096)  # the guard is at the top
    return None


# ----------------------------------------------------------------------------------------------------------------------
# CUDA toolkit


def toolkit_problem(root: str) -> str | None:
    """None when `root` is a CUDA toolkit torch can build and link with, else what is missing there.

    torch compiles with CUDA_HOME/bin/nvcc, includes CUDA_HOME/include and links -lcudart from CUDA_HOME/lib64 (or
    lib): the unversioned libcudart.so, which runtime-only installs (the pip nvidia-cuda-runtime wheels:
    libcudart.so.13 only) lack.
    """
    if not os.path.isdir(root):
        return f"{root} does not exist"
    missing = []
    if not os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
        missing.append("bin/nvcc")
    if not os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
        missing.append("include/cuda_runtime.h")
    if not any(os.path.exists(os.path.join(root, d, "libcudart.so")) for d in ("lib64", "lib")):
        versioned = sorted(glob.glob(os.path.join(root, "lib*", "libcudart.so.*")))
        missing.append("lib64/libcudart.so or lib/libcudart.so" +
                       (f" (only {os.path.relpath(versioned[0], root)}, a runtime without the link-time library)"
                        if versioned else ""))
    return f"{root} lacks " + ", ".join(missing) if missing else None


def nvcc_bin_dir_from_dryrun(text: str) -> str | None:
    """nvcc's real bin folder from the output of `nvcc --dryrun -c x.cu` (its `#$ _HERE_=/usr/local/cuda-13.0/bin`
    line): the way through a wrapper script on PATH, which realpath cannot see through."""
    m = re.search(r"^#\$ _HERE_=(.+?)\s*$", text, re.MULTILINE)
    return m.group(1) if m else None


def _nvcc_root_via_dryrun(nvcc: str) -> str | None:
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "emsedit_fast_probe.cu"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    here = nvcc_bin_dir_from_dryrun(out.stdout + out.stderr)
    return os.path.dirname(os.path.normpath(here)) if here else None


def cuda_home_candidates(environ: dict, nvcc_on_path: str | None, nvcc_real_root, search_roots: list[str],
                         site_dirs: list[str]) -> list[tuple[str, str]]:
    """Where to look for the toolkit, in order, as (where it came from, root).

    An explicit CUDA_HOME or CUDA_PATH is the only candidate: a wrong one must be reported, not skipped.
    Otherwise: the folder above nvcc's real location (symlinks resolved; then `nvcc_real_root(nvcc)`, called only
    when that folder is no toolkit, sees through wrapper scripts), then `search_roots` (e.g. /usr/local/cuda,
    /usr/local/cuda-13.0, /opt/cuda), then the pip nvidia-* packages under `site_dirs` (nvidia/cu13, ...).
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(var):
            return [(f"${var}", environ[var])]
    out = []
    if nvcc_on_path:
        root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc_on_path)))
        out.append((f"nvcc on PATH ({nvcc_on_path})", root))
        if toolkit_problem(root) is not None:
            real = nvcc_real_root(nvcc_on_path)
            if real and real != root:
                out.append((f"nvcc --dryrun ({nvcc_on_path})", real))
    out += [("search", r) for r in search_roots]
    for site in site_dirs:
        out += [("pip nvidia package", r) for r in sorted(glob.glob(os.path.join(site, "nvidia", "cu[0-9]*")),
                                                            reverse=True)]
    seen, unique = set(), []
    for origin, root in out:
        key = os.path.realpath(root)
        if key not in seen:
            seen.add(key)
            unique.append((origin, root))
    return unique


def find_cuda_home(candidates: list[tuple[str, str]]) -> tuple[str | None, list[str]]:
    """(the first candidate that is a toolkit, or None; one line per candidate that was not, saying what it lacks)."""
    notes = []
    for origin, root in candidates:
        why = toolkit_problem(root)
        if why is None:
            return root, notes
        notes.append(f"{origin}: {why}")
    return None, notes or ["no nvcc on PATH, no CUDA_HOME, no /usr/local/cuda*, no pip nvidia-* toolkit"]


def _version_key(path: str):
    return tuple(int(x) for x in re.findall(r"\d+", os.path.basename(path)))


def _default_search_roots() -> list[str]:
    return ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), key=_version_key, reverse=True) + ["/opt/cuda"]


def _site_dirs() -> list[str]:
    import site

    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    return dirs + [p for p in sys.path if p.endswith("site-packages") and p not in dirs]


def locate_cuda_home() -> tuple[str | None, list[str]]:
    """find_cuda_home over this machine's candidates."""
    cands = cuda_home_candidates(os.environ, shutil.which("nvcc"), _nvcc_root_via_dryrun, _default_search_roots(),
                                 _site_dirs())
    return find_cuda_home(cands)


# ----------------------------------------------------------------------------------------------------------------------
# the extension


def _version():
    ns = {}
    with open(os.path.join(ROOT, "emsedit_fast", "version.py")) as f:
        exec(f.read(), ns)
    return ns["__version__"]


def _simd_flags():
    """-mavx2 -mfma (-mf16c) where the build machine has them: the CPU kernels vectorise fp32 loops and bf16/fp16
    conversions with them."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return []
    out = ["-mavx2", "-mfma"] if (" avx2" in flags and " fma" in flags) else []
    return out + (["-mf16c"] if out and " f16c" in flags else [])


def _loud(message: str) -> None:
    """A warning that stands out in a build log (pip shows it with -v; scripts/dev.sh repeats it after install)."""
    bar = "!" * 100
    print(f"\n{bar}\n{message}\n{bar}\n", file=sys.stderr, flush=True)
    warnings.warn(message, stacklevel=2)


def _cuda_decision(torch, want_cuda: str) -> tuple[bool, str | None, str | None]:
    """(build the CUDA sources?, CUDA_HOME, why not when not). Exits with a clear message when EMSEDIT_FAST_CUDA=1
    cannot be honoured."""
    if want_cuda == "0":
        return False, None, "EMSEDIT_FAST_CUDA=0"
    if torch.version.cuda is None:
        if want_cuda == "1":
            sys.exit("EMSEDIT_FAST_CUDA=1 needs a CUDA build of torch: CUDA code cannot link against the CPU torch "
                     f"(installed: torch {torch.__version__}).")
        return False, None, f"this torch has no CUDA (torch {torch.__version__})"
    gpu = torch.cuda.is_available()
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if want_cuda == "auto" and not gpu and not arch_list:
        return False, None, "no GPU at build time and TORCH_CUDA_ARCH_LIST unset"
    if want_cuda == "1" and not gpu and not arch_list:
        sys.exit("EMSEDIT_FAST_CUDA=1 without a visible GPU needs TORCH_CUDA_ARCH_LIST, the architectures to compile "
                 "for (e.g. TORCH_CUDA_ARCH_LIST=9.0 for H100/H200).")
    home, notes = locate_cuda_home()
    if home is None:
        why = ("no usable CUDA toolkit (torch " + torch.__version__ + f" needs CUDA {torch.version.cuda}'s nvcc and "
               "libcudart.so): " + "; ".join(notes) + ". Set CUDA_HOME to the toolkit root.")
        if want_cuda == "1":
            sys.exit("EMSEDIT_FAST_CUDA=1: " + why)
        if gpu:
            _loud("emsedit_fast: this machine has a GPU but the CUDA kernels will NOT be built: " + why +
                  " (EMSEDIT_FAST_CUDA=0 builds the CPU kernels only, without this warning.)")
        return False, None, why
    return True, home, None


def _extensions_and_cmdclass(build_ext_mode: str, want_cuda: str, debug: bool):
    """(ext_modules, cmdclass) for _C, or ([], {}) with a warning when it cannot be built."""
    if build_ext_mode == "0":
        return [], {}
    try:
        import torch
    except Exception as err:  # torch missing from the build environment
        if build_ext_mode == "1" or want_cuda == "1":
            raise
        warnings.warn(f"emsedit_fast: torch not importable at build time ({err}); installing without _C.")
        return [], {}

    use_cuda, cuda_home, no_cuda_reason = _cuda_decision(torch, want_cuda)
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension computes its own guess at import
    from torch.utils import cpp_extension

    if cuda_home is not None:
        cpp_extension.CUDA_HOME = cuda_home  # in case it was imported (and guessed) earlier
    std = cxx_std(torch.__version__, _read_aten_header(cpp_extension.include_paths()))
    fatal = build_ext_mode == "1" or want_cuda == "1"
    record = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cxx_std": f"c++{std}",
              "cuda_mode": want_cuda, "cuda": use_cuda, "cuda_home": cuda_home, "cuda_skipped": no_cuda_reason,
              "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if use_cuda else None,
              "built": False, "error": None}

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """BuildExtension that records the outcome next to _C and, in auto mode, turns a failed build into a loud
        warning and a pure-Python install.

        setuptools' optional=True does not cover this: BuildExtension compiles through ninja, whose failures raise
        past it.
        """

        def run(self):
            try:
                super().run()
                record["built"] = True
            except Exception as err:  # no compiler, ninja failure, nvcc error, ...
                record["error"] = f"{type(err).__name__}: {err}"
                self._write_record()
                if fatal:
                    raise
                lost = "the C++ and CUDA kernels" if use_cuda else "the C++ kernels"
                _loud(f"emsedit_fast: extension NOT built ({record['error']}): {lost} are lost and the reference "
                      "backend will serve. The compiler output is above; python -m emsedit_fast.info shows this.")
                return
            self._write_record()

        def _write_record(self):
            path = os.path.join(os.path.dirname(self.get_ext_fullpath("emsedit_fast._C")), BUILD_RECORD)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(record, f, indent=1)

    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    opt = ["-O0", "-g", "-DEMSEDIT_FAST_DEBUG"] if debug else ["-O3"]
    cxx = opt + [f"-std=c++{std}", "-fopenmp"] + _simd_flags()
    args = dict(include_dirs=[os.path.join(ROOT, "csrc", "include")], extra_link_args=["-fopenmp"])
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        ext = cpp_extension.CUDAExtension(
            "emsedit_fast._C", sources,
            extra_compile_args={"cxx": cxx + ["-DEMSEDIT_FAST_WITH_CUDA"],
                                "nvcc": opt + [f"-std=c++{std}", "-DEMSEDIT_FAST_WITH_CUDA"]}, **args)
    else:
        ext = cpp_extension.CppExtension("emsedit_fast._C", sources, extra_compile_args={"cxx": cxx}, **args)
    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


if __name__ == "__main__":  # setuptools' build backend and `python setup.py ...` both run this file as __main__
    ext_modules, cmdclass = _extensions_and_cmdclass(os.environ.get("EMSEDIT_FAST_BUILD_EXT", "auto"),
                                                     os.environ.get("EMSEDIT_FAST_CUDA", "auto"),
                                                     os.environ.get("DEBUG", "0") == "1")
    setup(
        name="emsedit_fast",
        version=_version(),
        packages=find_packages(include=["emsedit_fast", "emsedit_fast.*"]) + ["emsedit_fast.kernels"],
        package_dir={"emsedit_fast.kernels": "kernels"},
        package_data={"emsedit_fast": ["configs/*/*.yaml", "data/facts/*.tsv"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
