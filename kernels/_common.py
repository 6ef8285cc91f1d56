"""Launch configuration shared by every Triton kernel: interpreter detection, block sizes, num_warps, dot precision.

Two regimes (docs/architecture.md, "Ops layer"):

- **CUDA.** Kernels whose outputs are fresh tensors are wrapped in `triton.autotune` over a few sane configs. The
  autotune keys hold sizes rounded up to a power of two (`bucket`): the row count changes with every edit batch, and
  an exact key would re-tune for each new batch size. In-place kernels (apply_deltas, restore, the running-stats
  merge) are *not* autotuned: benchmarking would apply the update several times, and a tuned block size would change
  the reduction order between processes, which breaks bit-exact replay. They pick one config from the problem size
  instead (`pick`).
- **Interpreter** (TRITON_INTERPRET=1, CPU tensors; the correctness tier). Autotune needs a GPU benchmarker, so each
  kernel gets one fixed config of small blocks (`INTERPRET_BLOCK` = 16, the smallest `tl.dot` accepts): the tests'
  shapes then span several tiles in every dimension, so multi-tile loops, rank chunks, row splits and masked edge
  tiles all run on the CPU. Blocks shrink further only for problems smaller than one block.
  `tl.dot` on bf16 operands is wrong in the interpreter; every dot operand in these kernels is fp32 (or fp64) by op
  contract (hypernetwork, factors and keys are fp32; only model weights are bf16, and they appear in epilogues), so
  no upcast flag is needed.

Dot precision: fp32 `tl.dot` is IEEE by default here ("ieee": FMA, no tensor cores). The hypernetwork GEMMs and the
low-rank weight update follow PyTorch's global switch, as their torch references do:
`torch.set_float32_matmul_precision("high")` -> TF32 tensor cores. The ridge products always stay IEEE fp32 (the
solve stays fp32).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from dataclasses import field

import torch
import triton
import triton.language as tl

# Read once, like triton itself: the flag must be in the environment before triton is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# The block size of every dot dimension under the interpreter (see the module docstring).
INTERPRET_BLOCK = 32


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_pow2(x: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(x, minimum); `tl.dot` needs every block dimension >= 16."""
    return max(minimum, triton.next_power_of_2(max(int(x), 1)))


def bucket(x: int) -> int:
    """Autotune-key value of a size: the next power of two (>= 1), so nearby sizes share one tuning."""
    return triton.next_power_of_2(max(int(x), 1))


def dot_precision() -> str:
    """'ieee' (exact fp32) unless torch.get_float32_matmul_precision() allows TF32 ('high' or 'medium').

    Used by the hypernetwork GEMMs and the weight-update GEMM, whose references (torch matmuls) follow the same
    switch; the ridge products always use 'ieee'.
    """
    if INTERPRET:
        return "ieee"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def is_tracing(*tensors: torch.Tensor) -> bool:
    """True under torch.compile / fake-tensor tracing: no data pointers, no host syncs.

    Launchers that build device-side pointer tables or inspect results on the host (Cholesky failures) take a plain
    path then: one launch per tensor, so every mutated tensor is a visible kernel argument.
    """
    if torch.compiler.is_compiling():
        return True
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    # AOT autograd (opcheck's aot_dispatch tests, inductor lowering a triton_op) runs the op's body on Python
    # FunctionalTensor wrappers, which torch._is_functional_tensor (the C++ wrapper test) does not see; a proxy mode
    # records a graph even from real tensors, and addresses read then would be baked into it.
    return (any(isinstance(t, (FakeTensor, FunctionalTensor)) or torch._is_functional_tensor(t) for t in tensors)
            or get_proxy_mode() is not None)


def pointer_table(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """(G, C) int64 device tensor of addresses and sizes, one row per tensor group member (one host-to-device copy)."""
    return torch.tensor(rows, dtype=torch.int64, device=device)


@dataclass
class Tuned:
    """A kernel and the meta-parameters a launcher passes it.

    On CUDA `kernel` is a `triton.autotune` wrapper and `meta` is empty (the autotuner supplies BLOCK_* and
    num_warps); under the interpreter `kernel` is the plain @triton.jit function and `meta` the fixed config.
    """

    kernel: object
    meta: dict = field(default_factory=dict)

    def launch_meta(self, **dims: int) -> dict:
        """Meta-parameters for one launch. Under the interpreter a fixed block size named in `dims` shrinks to a
        problem smaller than the block (next power of two >= 16): padded lanes only cost numpy time there."""
        return {k: min(v, next_pow2(dims[k])) if k in dims else v for k, v in self.meta.items()}


def autotuned(kernel, *, configs: list[triton.Config], key: list[str], interpret: dict) -> Tuned:
    """Autotune `kernel` over `configs` on CUDA; hand out the single `interpret` config under the interpreter."""
    if INTERPRET:
        return Tuned(kernel, dict(interpret))
    return Tuned(triton.autotune(configs=configs, key=key)(kernel), {})


def config(num_warps: int = 4, num_stages: int = 3, **blocks: int) -> triton.Config:
    return triton.Config(dict(blocks), num_warps=num_warps, num_stages=num_stages)


def pick(interpret: dict, cuda: dict, **dims: int) -> dict:
    """A fixed launch config (no autotuning): `interpret` under the interpreter (blocks named in `dims` shrunk to the
    problem, as `Tuned.launch_meta`), else `cuda` (with num_warps etc.)."""
    if INTERPRET:
        return {k: min(v, next_pow2(dims[k])) if k in dims else v for k, v in interpret.items()
                if k not in ("num_warps", "num_stages")}
    return dict(cuda)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (1 under the interpreter: one program at a time anyway)."""
    if INTERPRET or device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


# ----------------------------------------------------------------------------------------------------------------------
# Exact conversions between fp32 and the model dtypes, written with integer ops so that the interpreter and the GPU
# run the same arithmetic. The interpreter's own fp32 -> bf16 cast truncates instead of rounding to nearest even
# (triton 3.9, runtime/interpreter.py `cast_impl`), which would break the "round once, like torch" contract of the
# in-place updates; on the GPU these few integer ops hide behind the memory traffic of those kernels.


@triton.jit
def upcast_fp32(x):
    """x (fp32, bf16 or fp16) as fp32, exactly. bf16 -> fp32 is a 16-bit shift of the bit pattern."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def round_fp32_to(x, DTYPE: tl.constexpr):
    """fp32 x rounded to nearest even into DTYPE (fp32: unchanged). NaN -> 0x7FC0 in bf16, as torch does."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16  # ties go to the even upper half
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(DTYPE)
