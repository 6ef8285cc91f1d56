"""Operator registration of every op on every backend and device: torch.library.opcheck and torch.compile.

opcheck runs the schema check (declared mutations are the real ones), the fake-tensor check (the fake kernel agrees
with the real one on shapes, dtypes and strides), the autograd-registration check and AOT dispatch with dynamic shapes.
The compile smoke test traces the public op (input check and dispatch included) with fullgraph=True, so a graph
break anywhere in the ops layer fails it, and compares the compiled result with the eager one.

Tiers: the C++ ops on the CPU run in the default tier (compile through the 'aot_eager' backend: Dynamo, fake tensors
and functionalisation, no code generation); Triton ops run on CUDA, and in the interpreter tier opcheck's schema and
autograd checks. Every compile
test carries the `compile` marker (`pytest -m compile tests/ops` on a GPU machine runs them all, with Inductor on
CUDA); Inductor on the CPU needs a C++ toolchain and about a minute per graph, so it is also `slow` (--run-slow).
"""

from __future__ import annotations

import os

import pytest
import torch

from emsedit_fast import ops
from emsedit_fast import testing
from emsedit_fast.ops._dispatch import _load_triton
from emsedit_fast.ops._dispatch import cpp_has_kernel
from emsedit_fast.testing import randn

OPS = [(stem, op) for stem, names in ops.OPS_BY_STEM.items() for op in names]
DIFFERENTIABLE = {"hypernet_block": (0, 1, 2, 3, 4, 5), "value_targets": (1, 2), "ridge_solve": (1, 2)}


def _args(op: str, device: str, requires_grad: bool = False) -> tuple:
    """Positional arguments of torch.ops.emsedit_fast.<op> (the schema in csrc/ops.cpp), tiny and realistic."""
    n_layers, n, d_in, d_out, rank = 2, 3, 5, 4, 3
    d = d_in + d_out
    g = testing.hypernet_params(d, rank, n_layers, seed=1, device=device)
    idx = torch.tensor([0, 1, 1, 0, 1, 0], device=device)
    keys, grads = randn(2 * n, d_in, seed=2, device=device), randn(2 * n, d_out, seed=3, device=device)
    z = randn(2 * n, d, seed=4, device=device)
    st = testing.running_stats_state(d, seed=5, device=device)
    eta = torch.full((n_layers,), 1e-3, device=device)
    rk, rt, rl = testing.ridge_problem(n_layers, n, d_in, d_out, seed=6, device=device)
    weights = testing.layer_weights(n_layers, d_in, d_out, seed=7, device=device)
    coeffs, factors = testing.low_rank_factors(n_layers, n, d_in, d_out, seed=8, device=device)
    args = {
        "running_stats_update_": (st["count"], st["mean"], st["var"], st["std"], keys, grads),
        "running_stats_normalize": (keys, grads, st["mean"], st["std"], ops.NORM_EPS),
        "hypernet_block": (z, g["a"], g["b"], g["c"], g["s"], g["t"], idx, True, st["mean"], st["std"], True),
        "hypernet_block_backward": (randn(2 * n, d, seed=9, device=device), z, g["a"], g["b"], g["c"], g["s"],
                                    g["t"], idx, False, None, None),
        "value_targets": (keys, z, eta, idx),
        "value_targets_backward": (randn(2 * n, d_out, seed=10, device=device), randn(2 * n, seed=11, device=device),
                                   keys, z, eta, idx),
        "ridge_solve": (rk, rt, rl, "dual"),
        "ridge_solve_backward": (randn(n_layers, n, d_out, seed=12, device=device), rk, rt.clone(), rl, "dual"),
        "apply_deltas_": (weights, coeffs, factors, torch.tensor([0.5, 2.0], device=device), False),
        "apply_deltas_dense_": ([w.t().contiguous() for w in weights],
                                [randn(d_in, d_out, seed=13, device=device) for _ in weights], None, True),
        "restore_": (weights, [w + 1 for w in weights]),
    }[op]
    if requires_grad:
        args = tuple(a.requires_grad_() if i in DIFFERENTIABLE.get(op, ()) else a for i, a in enumerate(args))
    return args


def _public_call(op: str):
    """fn(*raw_args) calling the public op the way the editors do (keywords where the public op has them)."""
    if op == "hypernet_block":
        def call(*args, backend):  # the public op decides save_for_backward itself
            *tensors, relu_first, mean, std, _ = args
            return ops.hypernet_block(*tensors, relu_first=relu_first, mean=mean, std=std, backend=backend)
        return call
    if op == "hypernet_block_backward":
        def call(*args, backend):
            *tensors, relu_first, mean, std = args
            return ops.hypernet_block_backward(*tensors, relu_first=relu_first, mean=mean, std=std, backend=backend)
        return call
    return lambda *args, backend: getattr(ops, op)(*args, backend=backend)


def _backend_device_params():
    return [pytest.param("cpp", "cpu", id="cpp-cpu"),
            pytest.param("cpp", "cuda", id="cpp-cuda", marks=pytest.mark.cuda),
            pytest.param("triton", "cpu", id="triton-interpret", marks=pytest.mark.interpret),
            pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.cuda)]


def _require(backend: str, device: str, stem: str, op: str) -> str:
    """Skip unless `backend` serves `op` on `device`; return the qualified operator name."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    testing.require_backend(backend, device)  # Triton on the CPU: only under TRITON_INTERPRET=1
    if backend == "cpp":
        if not cpp_has_kernel(op, device):
            pytest.skip(f"emsedit_fast._C has no {device} kernel for {op}")
        return op
    _load_triton(stem, op)
    return f"triton_{op}"


@pytest.mark.parametrize("backend, device", _backend_device_params())
@pytest.mark.parametrize("stem, op", OPS, ids=[op for _, op in OPS])
def test_opcheck(stem, op, backend, device):
    qualname = _require(backend, device, stem, op)
    overload = getattr(torch.ops.emsedit_fast, qualname).default
    args = _args(op, device, requires_grad=op in DIFFERENTIABLE)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if backend == "triton" and device == "cpu":
        # Triton's interpreter executes a launch even on fake tensors (it copies their data), so the fake-tensor and
        # AOT checks of the Triton ops need the compiled (CUDA) path; the interpreter tier checks schema and autograd.
        utils = utils[:2]
    torch.library.opcheck(overload, args, test_utils=utils)


def _compile_params():
    return [pytest.param("cpp", "cpu", "aot_eager", id="cpp-cpu-aot_eager"),
            pytest.param("cpp", "cpu", "inductor", id="cpp-cpu-inductor", marks=pytest.mark.slow),
            pytest.param("cpp", "cuda", "inductor", id="cpp-cuda-inductor", marks=pytest.mark.cuda),
            pytest.param("triton", "cuda", "inductor", id="triton-cuda-inductor", marks=pytest.mark.cuda)]


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, list):
        return [_clone(t) for t in x]
    return x


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


@pytest.mark.compile
@pytest.mark.parametrize("backend, device, compiler", _compile_params())
@pytest.mark.parametrize("stem, op", OPS, ids=[op for _, op in OPS])
def test_compile_fullgraph(stem, op, backend, device, compiler):
    """torch.compile(fullgraph=True) of the public op: same outputs, and same in-place effects, as eager."""
    _require(backend, device, stem, op)
    call = _public_call(op)
    args = _args(op, device)
    eager_args, compiled_args = _clone(args), _clone(args)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: call(*a, backend=backend), fullgraph=True, backend=compiler)
    with torch.no_grad():
        expected = call(*eager_args, backend=backend)
        got = compiled(*compiled_args)
    # outputs, then every argument (the mutated ones must match, the others must be untouched in both runs)
    for e, g in zip(_tensors(expected) + _tensors(eager_args), _tensors(got) + _tensors(compiled_args)):
        if e.is_floating_point():
            testing.assert_close_to_reference(g, e, kind="reduction", label=f"{op}-{backend}-{compiler}")
        else:
            assert torch.equal(g, e), f"{op}-{backend}-{compiler}: integer argument differs"


def _fake_symbolic(x, mode):
    """x (tensors, lists of tensors, other values) as fake tensors of `mode` with every size symbolic."""
    from torch.fx.experimental.symbolic_shapes import DimDynamic
    from torch.fx.experimental.symbolic_shapes import StatelessSymbolicContext

    if isinstance(x, torch.Tensor):
        ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * x.dim())
        return mode.from_tensor(x, symbolic_context=ctx)
    if isinstance(x, (list, tuple)):
        return type(x)(_fake_symbolic(t, mode) for t in x)
    return x


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter runs launches on fake tensors")
@pytest.mark.parametrize("stem, op", OPS, ids=[op for _, op in OPS])
def test_triton_op_traces_with_symbolic_shapes(stem, op):
    """Each Triton op's Python body, traced as AOT autograd traces it under torch.compile and opcheck (Python
    FunctionalTensor wrappers over fake tensors, every size symbolic), with no GPU: no data pointer is read, no
    symbolic size hashed, no data-dependent branch taken. On an H200, opcheck's AOT check and Inductor failed on
    exactly these for apply_deltas_, apply_deltas_dense_, ridge_solve(_backward) and restore_."""
    from torch._functorch.aot_autograd import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    pytest.importorskip("triton")
    _load_triton(stem, op)
    fn = getattr(torch.ops.emsedit_fast, f"triton_{op}")
    mode = FakeTensorMode(shape_env=ShapeEnv())
    args = _fake_symbolic(_args(op, "cpu"), mode)
    graphs = []

    def keep(gm, _):
        graphs.append(gm)
        return gm

    with mode:
        aot_function(lambda *a: fn(*a), fw_compiler=keep, dynamic=True)(*args)
    kernels = [n for n in graphs[0].graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    assert kernels, f"no Triton launch in the traced graph of {op}"
