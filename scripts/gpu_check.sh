#!/usr/bin/env bash
# The GPU check: everything a CUDA machine must confirm, in one run of under 8 minutes on one H100/H200.
#
#   bash scripts/gpu_check.sh             on a machine with a GPU:
#       1. build _C with its CUDA kernels for this card (a failure is fatal), then check they are registered
#       2. the op tests (tests/ops) with the GPU present: reference vs cpp and triton on CUDA, opcheck and the
#          torch.compile(fullgraph=True) smoke tests; then that cpp and triton really served CUDA
#       3. the op and editor benchmarks at LLaMA-3-8B shapes against the competent PyTorch baseline (GB/s next to
#          the bandwidth floor) -> benchmarks/results/gpu-<card>.json and its tables, benchmarks/results/gpu-<card>.md
#   bash scripts/gpu_check.sh --dry-run   on a machine without one (CI-able, no device needed):
#       1. every Triton kernel compiled for sm_90 (tests/test_triton_compile.py)
#       2. _C built for real with EMSEDIT_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 against a CUDA build of torch in its
#          own virtual environment (created on first use: pip install torch==$GPU_CHECK_CUDA_TORCH), in a copy of the
#          tree under build/gpu-check/ (this checkout's own _C is left alone), then imported with every CUDA kernel
#          registered (scripts/check_cuda_ext.py)
#   --triton-only (with --dry-run): step 1 alone.  --fresh: rebuild the CUDA objects from scratch.
#   Duration of --dry-run on two shared cores: step 1 about 20 s with a warm Triton cache, 110 s cold; step 2 took
#   32 min for a fresh copy at load average 9 (15 CPU-minutes, so about 8 min on two idle cores; the virtual
#   environment's torch install adds about a minute from local disk), and later runs recompile only changed sources.
#
# Needs only what a bare GPU machine has (python, torch with CUDA, triton, nvcc, pytest, pytest-benchmark,
# hypothesis): nothing is installed from the network in GPU mode. Logs of every step: build/gpu-check/*.log.
# Adjustable (environment):
#   GPU_CHECK_OP_TESTS     pytest arguments of step 2 (default: tests/ops)
#   GPU_CHECK_OP_JOBS      pytest-xdist workers of step 2 (default: one per core, at most 16; 1: one process)
#   GPU_CHECK_BENCH        pytest -k selection of step 3 (default: "llama3 and not sweep": every op and the editor
#                          step at LLaMA-3-8B shapes, without the 60-case ridge form sweep)
#   GPU_CHECK_BENCH_ARGS   further benchmark options (default: "--time-budget 0.3 --compiled primary": 0.3 s timed
#                          per benchmark, torch.compile baselines only for each op's primary case, as compiling
#                          every case would not fit the budget)
#   GPU_CHECK_BUDGET_S     the whole run's budget in seconds (default 480); exceeding it fails the check
#   GPU_CHECK_CUDA_TORCH   torch release of the dry run's virtual environment (default 2.14.1, a CUDA 13.0 build)
#   GPU_CHECK_VENV         that environment (default ~/.cache/emsedit_fast/venv-torch-<release>)
#   PYTHON                 the interpreter (default python)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OP_TESTS=${GPU_CHECK_OP_TESTS:-tests/ops}
BENCH=${GPU_CHECK_BENCH:-llama3 and not sweep}
BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:---time-budget 0.3 --compiled primary}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
CUDA_TORCH=${GPU_CHECK_CUDA_TORCH:-2.14.1}
VENV=${GPU_CHECK_VENV:-$HOME/.cache/emsedit_fast/venv-torch-$CUDA_TORCH}
WORK=$REPO/build/gpu-check  # git-ignored
DRY=0 TRITON_ONLY=0 FRESH=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --triton-only) TRITON_ONLY=1 ;;
    --fresh) FRESH=1 ;;
    *) echo "usage: bash scripts/gpu_check.sh [--dry-run [--triton-only]] [--fresh]" >&2; exit 2 ;;
  esac
done
mkdir -p "$WORK"
T0=$SECONDS
SUMMARY=()

# step NAME CMD...: run CMD in a fresh `bash -eu -o pipefail` (so a failing command inside a step function fails the
# step: errexit is void in functions called from `||` or `if`), its output on the terminal and in $WORK/NAME.log,
# and record its duration
step() {
  local name=$1 t=$SECONDS rc
  shift
  echo "== $name"
  set +e
  bash -eu -o pipefail -c '"$@"' step "$@" 2>&1 | tee "$WORK/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  SUMMARY+=("$(printf '%-22s %5ds  %s' "$name" $((SECONDS - t)) "$([ $rc = 0 ] && echo ok || echo "FAILED (rc $rc)")")")
  if [ $rc != 0 ]; then finish 1; fi
}

finish() {
  local rc=$1 total=$((SECONDS - T0))
  echo "== summary (mode: $([ $DRY = 1 ] && echo dry-run || echo gpu))"
  printf '%s\n' "${SUMMARY[@]}"
  printf '%-22s %5ds%s\n' total $total "$([ $DRY = 0 ] && echo "  (budget ${BUDGET_S}s)")"
  if [ "$rc" = 0 ] && [ $DRY = 0 ] && [ $total -gt "$BUDGET_S" ]; then
    echo "FAILED: the GPU check took ${total}s, over its ${BUDGET_S}s budget" >&2
    rc=1
  fi
  exit "$rc"
}

triton_sm90() {
  env -u TRITON_INTERPRET "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_compile.py
}

cuda_venv() {
  if "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
    "$VENV/bin/python" -c "import torch; print(f'{torch.__version__} (CUDA {torch.version.cuda}) in $VENV')"
    return 0
  fi
  echo "creating $VENV with torch==$CUDA_TORCH (a CUDA build: several GB)"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "torch==$CUDA_TORCH" setuptools wheel ninja
  "$VENV/bin/python" -c "import torch, sys; print(torch.__version__, 'CUDA', torch.version.cuda); \
sys.exit('torch==$CUDA_TORCH has no CUDA: pick a release with a CUDA build' if torch.version.cuda is None else 0)"
}

# the working tree (tracked and untracked, not ignored) copied to $WORK/src, keeping its build/ between runs so ninja
# recompiles only what changed (cp -p keeps modification times)
copy_tree() {
  local dst=$WORK/src
  mkdir -p "$dst"
  [ $FRESH = 1 ] && rm -rf "$dst/build"
  find "$dst" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
  git ls-files -z --cached --others --exclude-standard | xargs -0 cp -p --parents -t "$dst"
  echo "copied $(git ls-files --cached --others --exclude-standard | wc -l) files to $dst"
}

cuda_build_dry() {
  cd "$WORK/src"
  EMSEDIT_FAST_BUILD_EXT=1 EMSEDIT_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 \
    nice -n 10 "$VENV/bin/python" setup.py -q build_ext --inplace
}

cuda_build() {
  local cc
  cc=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
  # an editable install, so that emsedit_fast.kernels (packaged from kernels/) resolves; --no-index: no network
  EMSEDIT_FAST_BUILD_EXT=1 EMSEDIT_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cc} MAX_JOBS=$(nproc) \
    "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e .
}

op_tests() {
  # In parallel (pytest-xdist, in the GPU image): on an H200 the suite took over 6 minutes in one process, most of it
  # compiling and autotuning Triton kernels for each new shape on one CPU core; 14 workers ran its slower half in 68 s.
  local jobs=${GPU_CHECK_OP_JOBS:-$(( $(nproc) < 16 ? $(nproc) : 16 ))} par=()
  if [ "$jobs" -gt 1 ] && "$PY" -c "import xdist" 2>/dev/null; then par=(-n "$jobs"); fi
  # shellcheck disable=SC2086  # GPU_CHECK_OP_TESTS is a list of pytest arguments
  "$PY" -m pytest -q -rs -p no:cacheprovider ${par[@]+"${par[@]}"} $OP_TESTS
  # the tests skip (with a reason) a backend that is unavailable: make sure cpp and triton really served CUDA
  "$PY" - <<'EOF'
import sys
from emsedit_fast.ops._dispatch import availability
why = {k: v for k, v in availability("cuda").items() if v is not None}
print("CUDA backends:", why or "reference, cpp and triton all available")
sys.exit(f"a backend is unavailable on CUDA, so its tests were skipped: {why}" if why else 0)
EOF
}

benchmarks() {
  # shellcheck disable=SC2086  # GPU_CHECK_BENCH_ARGS is a list of options
  "$PY" -m pytest -q -p no:cacheprovider benchmarks --benchmark-only --bench-device cuda -k "$BENCH" $BENCH_ARGS \
    --benchmark-json="benchmarks/results/gpu-$CARD.json"
  "$PY" benchmarks/report.py "benchmarks/results/gpu-$CARD.json" > "benchmarks/results/gpu-$CARD.md"
  echo "wrote benchmarks/results/gpu-$CARD.json and benchmarks/results/gpu-$CARD.md"
}

export PY REPO OP_TESTS BENCH BENCH_ARGS CUDA_TORCH VENV WORK FRESH
export -f triton_sm90 cuda_venv copy_tree cuda_build_dry cuda_build op_tests benchmarks

if [ $DRY = 1 ]; then
  step triton-sm90 triton_sm90
  if [ $TRITON_ONLY = 0 ]; then
    step cuda-venv cuda_venv
    step copy-tree copy_tree
    step cuda-build cuda_build_dry
    step cuda-ext-check "$VENV/bin/python" scripts/check_cuda_ext.py "$WORK/src"
  fi
  finish 0
fi

if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "no CUDA device visible to $PY: run bash scripts/gpu_check.sh --dry-run on a machine without a GPU" >&2
  exit 2
fi
missing=$("$PY" -c "
import importlib.util as u
needed = ('pytest', 'pytest_benchmark', 'hypothesis', 'triton', 'setuptools')
print(' '.join(m for m in needed if u.find_spec(m) is None))")
if [ -n "$missing" ]; then
  echo "missing Python packages for the GPU check: $missing" >&2
  exit 2
fi
if ! "$PY" -c "import sys, torch.utils.cpp_extension as c; sys.exit(not c.is_ninja_available())"; then
  echo "WARNING: no ninja: torch compiles the extension one file at a time, which may not fit the budget" >&2
fi
# the card's name as a file name: "NVIDIA H200" -> h200, "NVIDIA H100 80GB HBM3" -> h100-80gb-hbm3
CARD=$("$PY" -c "import re, torch; n = torch.cuda.get_device_name(0).lower().removeprefix('nvidia').strip(); \
print(re.sub(r'[^a-z0-9]+', '-', n).strip('-'))")
echo "card: $CARD"
export CARD
step cuda-build cuda_build
step cuda-ext-check "$PY" scripts/check_cuda_ext.py "$REPO"
step op-tests op_tests
step benchmarks benchmarks
finish 0
