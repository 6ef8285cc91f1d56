"""Ahead-of-time compilation of every Triton kernel for an H100 (sm_90), without a GPU.

The interpreter tier checks what the kernels compute, but the interpreter accepts code that the real compiler
rejects (calling methods on an argument that Triton specialised to the constant 1, dtype mismatches in `tl.where`,
`tl.dot` shapes under 16, ...). Here every `@triton.jit` kernel in emsedit_fast.kernels goes through the full
pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with ptxas) for GPUTarget("cuda", 90, 32), with fp32 and bf16/fp16
weight variants where the dtype matters, with both dot precisions, and once with every integer argument specialised
to 1 (what the launcher does at run time for a single row, rank 1 or a unit stride).

Each compilation must produce PTX and a cubin. Whether `tl.dot` lowered to Hopper `wgmma`, to `mma.sync`, or to plain
FMAs is recorded (as a test property, and in a summary at the end) but never asserted: IEEE fp32 dots (the default;
TF32 only under torch.set_float32_matmul_precision("high")) have no tensor-core path at all.

Runs in the normal tier: it needs the real compiler, so it skips under TRITON_INTERPRET=1 (the interpreter tier runs
in its own process, and triton is imported here only inside the tests).
"""

from __future__ import annotations

import importlib
import os

import pytest

from emsedit_fast.ops import STEMS

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1",
                       reason="AOT compilation needs the real compiler: run in the normal tier, without "
                              "TRITON_INTERPRET"),
    pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION"),
]

# Per kernel: variants as (label, argument types overriding the defaults, constexpr values). Defaults: `*_ptr`
# arguments are "*fp32", other runtime arguments "i32", `eps` "fp32". A variant lists every constexpr.
_HB_GEMM = dict(BLOCK_N=64, BLOCK_J=64, BLOCK_K=32)
_WIDE = dict(BLOCK_N=128, BLOCK_J=128, BLOCK_K=32)
# The chain kernels (forward, dz backward) with every CUDA autotune config: the rank loop runs in BLOCK_R chunks, so
# these cover ranks 256 and 1024 (rank is a runtime argument).
_HB_CHAIN = {f"n{c['BLOCK_N']}-r{c['BLOCK_R']}-d{c['BLOCK_D']}": c for c in (
    dict(BLOCK_N=32, BLOCK_K=32, BLOCK_D=64, BLOCK_R=32), dict(BLOCK_N=64, BLOCK_K=32, BLOCK_D=64, BLOCK_R=64),
    dict(BLOCK_N=64, BLOCK_K=64, BLOCK_D=128, BLOCK_R=64), dict(BLOCK_N=128, BLOCK_K=32, BLOCK_D=64, BLOCK_R=32))}
SPECS: dict[str, list[tuple[str, dict, dict]]] = {
    "_running_stats_update_fwd_kernel": [
        (dt, {"keys_ptr": f"*{dt}", "vgrads_ptr": f"*{dt}"}, dict(BLOCK_M=32, BLOCK_D=128))
        for dt in ("fp32", "bf16", "fp16")],
    "_running_stats_update_merge_kernel": [("fp64-count", {"count_ptr": "*fp64"}, dict(BLOCK_D=256))],
    "_running_stats_normalize_fwd_kernel": [
        (dt, {"keys_ptr": f"*{dt}", "vgrads_ptr": f"*{dt}"}, dict(BLOCK_M=32, BLOCK_D=128)) for dt in ("fp32", "bf16")],
    "_value_targets_fwd_kernel": [("fp32", {"idx_ptr": "*i64"}, dict(BLOCK_N=16, BLOCK_K=128))],
    "_value_targets_bwd_kernel": [
        (f"grad_coeffs={flag}", {"idx_ptr": "*i64"}, dict(HAS_GRAD_COEFFS=flag, BLOCK_N=16, BLOCK_K=128))
        for flag in (True, False)],
    "_value_targets_eta_bwd_kernel": [("fp32", {"idx_ptr": "*i64"}, dict(BLOCK_N=1024))],
    "_hypernet_block_fwd_kernel": [
        (f"{prec}-relu_first={rf}-normalize={norm}-save={save}-{label}", {"idx_ptr": "*i64"},
         dict(RELU_FIRST=rf, NORMALIZE=norm, SAVE=save, EPS=2.0**-23, DOT_PRECISION=prec, **_HB_CHAIN[label]))
        for prec, rf, norm, save, label in [("ieee", True, True, False, "n32-r32-d64"),
                                            ("tf32", False, False, True, "n32-r32-d64")]
        + [("tf32", True, True, label.startswith("n64"), label) for label in list(_HB_CHAIN)[1:]]],
    "_hypernet_block_rowgemm_kernel": [
        (f"{prec}-norm_x={norm}", {}, dict(NORM_X=norm, EPS=2.0**-23, DOT_PRECISION=prec, **blocks))
        for prec, norm, blocks in (("ieee", True, _HB_GEMM), ("tf32", False, _WIDE))],
    "_hypernet_block_pi_bwd_kernel": [
        (f"{prec}-relu_first={rf}-pre={pre}", {"perm_ptr": "*i64", "offsets_ptr": "*i64"},
         dict(RELU_FIRST=rf, HAS_PRE=pre, DOT_PRECISION=prec, BLOCK_N=32, BLOCK_D=64, BLOCK_R=32))
        for prec, rf, pre in (("ieee", True, False), ("tf32", False, True))],
    "_hypernet_block_dz_bwd_kernel": [
        (f"{prec}-scale={scale}-{label}", {}, dict(SCALE_OUT=scale, EPS=2.0**-23, DOT_PRECISION=prec,
                                                   **_HB_CHAIN[label]))
        for prec, scale, label in (("ieee", True, "n32-r32-d64"), ("tf32", False, "n64-r64-d128"))],
    "_hypernet_block_wgrad_bwd_kernel": [
        (f"{prec}-norm_x={norm}", {}, dict(NORM_X=norm, EPS=2.0**-23, DOT_PRECISION=prec, BLOCK_I=128, BLOCK_J=128,
                                           BLOCK_K=32))
        for prec, norm in (("ieee", True), ("tf32", True), ("tf32", False))],
    "_ridge_solve_gram_kernel": [
        (f"{dt}-{'sym+ridge' if sym else 'product'}",
         {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "ridge_ptr": f"*{dt}", "out_ptr": f"*{dt}"},
         dict(ADD_RIDGE=sym, SYMMETRIC=sym, BLOCK_I=64, BLOCK_J=64, BLOCK_K=32))
        for dt, sym in (("fp32", True), ("fp32", False), ("fp64", True))],
    "_apply_deltas_fwd_kernel": [
        (f"{dt}-{prec}-table={table}-alpha={alpha}", {"w_ptr": f"*{dt}", "table_ptr": "*i64"},
         dict(HAS_ALPHA=alpha, FROM_TABLE=table, DOT_PRECISION=prec, BLOCK_O=128, BLOCK_I=128, BLOCK_K=32))
        for dt, prec, table, alpha in (("fp32", "ieee", False, False), ("bf16", "ieee", True, True),
                                       ("fp16", "ieee", True, False), ("bf16", "tf32", False, True))],
    "_apply_deltas_dense_fwd_kernel": [
        (f"{dt}-table={table}", {"w_ptr": f"*{dt}", "table_ptr": "*i64"},
         dict(HAS_ALPHA=True, FROM_TABLE=table, BLOCK_O=64, BLOCK_I=64))
        for dt, table in (("fp32", False), ("bf16", True), ("fp16", False))],
    "_restore_fwd_kernel": [
        (f"{dt}-table={table}", {"dst_ptr": f"*{dt}", "src_ptr": f"*{dt}", "table_ptr": "*i64"},
         dict(FROM_TABLE=table, BLOCK=4096))
        for dt, table in (("i32", True), ("i16", False), ("i8", True), ("i64", False))],
}
FLOAT_ARGS = {"eps"}

RESULTS: dict[str, str] = {}  # "kernel[variant]" -> "wgmma" | "mma.sync" | "no mma"


def _kernels():
    """Every @triton.jit function named *_kernel in emsedit_fast.kernels.<stem>, as (stem, name, function)."""
    from triton.runtime.jit import JITFunction

    out = []
    for stem in STEMS:
        module = importlib.import_module(f"emsedit_fast.kernels.{stem}")
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel") and obj.__module__ == module.__name__:
                out.append((stem, name, obj))
    return out


def _cases():
    cases = []
    for kernel, variants in SPECS.items():
        for label, types, constexprs in variants:
            cases.append(pytest.param(kernel, types, constexprs, False, id=f"{kernel}[{label}]"))
        label, types, constexprs = variants[0]
        cases.append(pytest.param(kernel, types, constexprs, True, id=f"{kernel}[{label}-ints=1]"))
    return cases


def _compile(fn, types, constexprs, ints_are_one):
    import triton
    from triton.backends.compiler import GPUTarget

    signature, attrs, consts = {}, {}, dict(constexprs)
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            assert name in consts, f"variant gives no value for constexpr {name}"
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = types.get(name, "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned, as the JIT assumes
        elif name in FLOAT_ARGS:
            signature[name] = types.get(name, "fp32")
        elif ints_are_one:
            signature[name] = "constexpr"  # what the JIT does with an int argument equal to 1
            consts[name] = 1
        else:
            signature[name] = types.get(name, "i32")
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    num_warps = 8 if max(consts.get(k, 0) for k in ("BLOCK_N", "BLOCK_I", "BLOCK_O")) >= 128 else 4
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": 3})


def test_every_kernel_has_an_aot_spec():
    pytest.importorskip("triton")
    found = {name for _, name, _ in _kernels()}
    assert found, "no Triton kernels found in emsedit_fast.kernels"
    missing = sorted(found - set(SPECS))
    stale = sorted(set(SPECS) - found)
    assert not missing, f"kernels without an AOT spec in {__name__}.SPECS: {missing}"
    assert not stale, f"SPECS names kernels that no longer exist: {stale}"


@pytest.mark.parametrize("kernel, types, constexprs, ints_are_one", _cases())
def test_kernel_compiles_for_sm90(kernel, types, constexprs, ints_are_one, record_property, request):
    pytest.importorskip("triton")
    fns = {name: fn for _, name, fn in _kernels()}
    assert kernel in fns, f"{kernel} is not a @triton.jit kernel of emsedit_fast.kernels"
    compiled = _compile(fns[kernel], types, constexprs, ints_are_one)
    ptx = compiled.asm.get("ptx", "")
    cubin = compiled.asm.get("cubin", b"")
    assert ".target sm_90" in ptx, f"{kernel}: no sm_90 PTX produced"
    assert isinstance(cubin, bytes) and len(cubin) > 0, f"{kernel}: ptxas produced no cubin"
    mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "no mma"
    uses_dot = "tt.dot" in compiled.asm.get("ttir", "")
    record_property("mma", mma if uses_dot else "n/a (no tl.dot)")
    if uses_dot:
        RESULTS[request.node.callspec.id] = mma


def test_report_tensor_core_use():
    """Not a check: prints which dot kernels lowered to wgmma / mma.sync / FMA (run with -rA or -s to see it)."""
    if not RESULTS:
        pytest.skip("no dot kernels were compiled in this session")
    lines = [f"  {name}: {mma}" for name, mma in sorted(RESULTS.items())]
    print("tl.dot lowering for sm_90 (ieee = exact fp32 FMA; tf32 = tensor cores):\n" + "\n".join(lines))
