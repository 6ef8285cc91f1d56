"""Build of emsedit_fast: the pure-Python package, plus the optional C++ (and CUDA) extension emsedit_fast._C.

Switches (environment variables):
    EMSEDIT_FAST_BUILD_EXT  auto (default): build _C when possible, warn and install pure Python otherwise;
                            1: any build failure is fatal (CI); 0: never build _C.
    EMSEDIT_FAST_CUDA       auto (default): add csrc/cuda/*.cu with a CUDA torch, a toolkit and a GPU or
                            TORCH_CUDA_ARCH_LIST; 1: require that; 0: CPU sources only.
    DEBUG=1                 -O0 -g.     MAX_JOBS  parallel compile jobs (ninja).
"""

import glob
import os
import sys
import warnings

from setuptools import find_packages
from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_EXT = os.environ.get("EMSEDIT_FAST_BUILD_EXT", "auto")
WANT_CUDA = os.environ.get("EMSEDIT_FAST_CUDA", "auto")
DEBUG = os.environ.get("DEBUG", "0") == "1"


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


def _extensions_and_cmdclass():
    """(ext_modules, cmdclass) for _C, or ([], {}) with a warning when it cannot be built."""
    if BUILD_EXT == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
        from torch.utils.cpp_extension import BuildExtension
        from torch.utils.cpp_extension import CppExtension
        from torch.utils.cpp_extension import CUDAExtension
    except Exception as err:  # torch missing from the build environment
        if BUILD_EXT == "1":
            raise
        warnings.warn(f"emsedit_fast: torch not importable at build time ({err}); installing without _C.")
        return [], {}

    class OptionalBuildExt(BuildExtension):
        """BuildExtension that, in auto mode, turns a failed build into a warning and a pure-Python install.

        setuptools' optional=True does not cover this: BuildExtension compiles through ninja, whose failures raise
        past it.
        """

        def run(self):
            try:
                super().run()
            except Exception as err:  # no compiler, ninja failure, nvcc error, ...
                if BUILD_EXT == "1":
                    raise
                warnings.warn(f"emsedit_fast: C++ extension not built ({type(err).__name__}: {err}); the reference "
                              "backend will serve. See python -m emsedit_fast.info.")

    cuda_torch = torch.version.cuda is not None
    if WANT_CUDA == "1" and not cuda_torch:
        sys.exit("EMSEDIT_FAST_CUDA=1 needs a CUDA build of torch: CUDA code cannot link against the CPU torch "
                 f"(installed: torch {torch.__version__}).")
    use_cuda = WANT_CUDA != "0" and cuda_torch and CUDA_HOME is not None and (
        WANT_CUDA == "1" or torch.cuda.is_available() or bool(os.environ.get("TORCH_CUDA_ARCH_LIST")))

    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    opt = ["-O0", "-g", "-DEMSEDIT_FAST_DEBUG"] if DEBUG else ["-O3"]
    cxx = opt + ["-std=c++17", "-fopenmp"] + _simd_flags()
    args = dict(include_dirs=[os.path.join(ROOT, "csrc", "include")], extra_link_args=["-fopenmp"])
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        ext = CUDAExtension("emsedit_fast._C", sources,
                            extra_compile_args={"cxx": cxx + ["-DEMSEDIT_FAST_WITH_CUDA"],
                                                "nvcc": opt + ["-DEMSEDIT_FAST_WITH_CUDA"]}, **args)
    else:
        ext = CppExtension("emsedit_fast._C", sources, extra_compile_args={"cxx": cxx}, **args)
    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions_and_cmdclass()

setup(
    name="emsedit_fast",
    version=_version(),
    packages=find_packages(include=["emsedit_fast", "emsedit_fast.*"]) + ["emsedit_fast.kernels"],
    package_dir={"emsedit_fast.kernels": "kernels"},
    package_data={"emsedit_fast": ["configs/*/*.yaml", "data/facts/*.tsv"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
