"""hypernet_block forward and backward: every backend against the per-layer reference and PyTorch autograd."""

import pytest
import torch

from emsedit_fast import kernels
from emsedit_fast import ops
from emsedit_fast import reference
from emsedit_fast.testing import assert_close_to_reference
from emsedit_fast.testing import backend_params
from emsedit_fast.testing import device_for
from emsedit_fast.testing import hypernet_params
from emsedit_fast.testing import randn
from emsedit_fast.testing import require_backend

# (layers, rows per layer, D, rank): one row, rank 1, primes, one and many layers, rank above 64 and above D (several
# rank chunks in every backend), and ragged layers (rows per layer differ, one layer has none).
CASES = [(1, 1, 5, 1), (3, 7, 13, 4), (2, 33, 64, 16), (4, 9, 97, 8), (2, 9, 40, 80), (4, (5, 0, 17, 2), 37, 20)]
PARAM_NAMES = ("a", "b", "c", "s", "t")


def _ids(case):
    rows = case[1] if isinstance(case[1], int) else "-".join(map(str, case[1]))
    return f"L{case[0]}-n{rows}-D{case[2]}-r{case[3]}"


def _inputs(case, device, seed=0, trained=True, normalise=False):
    n_layers, n, d, rank = case
    counts = [n] * n_layers if isinstance(n, int) else list(n)
    p = hypernet_params(d, rank, n_layers, seed=seed, trained=trained, device=device)
    z = randn(sum(counts), d, seed=seed + 10, device=device)
    # rows of the layers interleaved and shuffled: the kernels must not assume sorted idx
    idx = torch.repeat_interleave(torch.arange(n_layers), torch.tensor(counts))
    idx = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(seed))].to(device)
    stats = {}
    if normalise:
        z = z * 2.0 + 0.5
        stats = {"mean": randn(d, seed=seed + 11, device=device, scale=0.3),
                 "std": randn(d, seed=seed + 12, device=device).abs() + 0.5}
    return z, p, idx, stats


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("normalise", [False, True], ids=["plain", "folded-norm"])
@pytest.mark.parametrize("relu_first", [True, False], ids=["relu_affine", "affine_relu"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_hypernet_block_matches_reference(backend, case, relu_first, normalise):
    device = device_for(backend)
    require_backend(backend, device)
    z, p, idx, stats = _inputs(case, device, normalise=normalise)
    with ops.record_backends() as seen:
        out = ops.hypernet_block(z, *(p[k] for k in PARAM_NAMES), idx, relu_first=relu_first, backend=backend, **stats)
    assert seen == {"hypernet_block": {backend}}
    expected = reference.hypernet_block(z, *(p[k] for k in PARAM_NAMES), idx, relu_first, **stats)
    assert_close_to_reference(out, expected, kind="reduction", label=f"{backend}-{_ids(case)}")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("normalise", [False, True], ids=["plain", "folded-norm"])
@pytest.mark.parametrize("relu_first", [True, False], ids=["relu_affine", "affine_relu"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_hypernet_block_grad_matches_reference(backend, case, relu_first, normalise):
    """torch.autograd.grad through the backend's op equals autograd through the reference, for z and all params."""
    device = device_for(backend)
    require_backend(backend, device)
    z, p, idx, stats = _inputs(case, device, normalise=normalise)
    weight = randn(*z.shape, seed=99, device=device)  # L = <weight, z'>: a generic upstream gradient

    def grads(fn, **kw):
        leaves = [z.clone().requires_grad_()] + [p[k].clone().requires_grad_() for k in PARAM_NAMES]
        out = fn(leaves[0], *leaves[1:], idx, **kw)
        return torch.autograd.grad((out * weight).sum(), leaves)

    fast = grads(ops.hypernet_block, relu_first=relu_first, backend=backend, **stats)
    ref = grads(reference.hypernet_block, relu_first=relu_first, **stats)
    for name, a, e in zip(("z",) + PARAM_NAMES, fast, ref):
        assert_close_to_reference(a, e, kind="reduction", label=f"{backend}-grad_{name}")


@pytest.mark.parametrize("backend", ["reference"] + backend_params())
@pytest.mark.parametrize("relu_first", [True, False], ids=["relu_affine", "affine_relu"])
@pytest.mark.parametrize("case", [(3, 5, 11, 3), (2, 9, 40, 80), (4, (5, 0, 17, 2), 37, 20)], ids=_ids)
def test_hypernet_block_backward_matches_autograd(backend, relu_first, case):
    """The manual backward op equals PyTorch autograd of the reference forward in fp64, for z (here the raw rows x,
    normaliser folded in), A, B, c, s and t: ragged layers, ranks from 3 to 80."""
    device = device_for(backend)
    require_backend(backend, device)
    z, p, idx, stats = _inputs(case, device, normalise=True)
    grad_out = randn(*z.shape, seed=7, device=device)
    manual = ops.hypernet_block_backward(grad_out, z, *(p[k] for k in PARAM_NAMES), idx, relu_first=relu_first,
                                         backend=backend, **stats)
    leaves = [z.double().requires_grad_()] + [p[k].double().requires_grad_() for k in PARAM_NAMES]
    out = reference.hypernet_block(leaves[0], *leaves[1:], idx, relu_first,
                                   stats["mean"].double(), stats["std"].double())
    auto = torch.autograd.grad(out, leaves, grad_out.double())
    for name, a, e in zip(("z",) + PARAM_NAMES, manual, auto):
        assert_close_to_reference(a, e.float(), kind="reduction", label=f"{backend}-{name}")


@pytest.mark.parametrize("backend", backend_params())
def test_hypernet_block_autograd_runs_the_fused_backward_op(backend):
    """Backpropagating through the C++ or Triton block runs that backend's own backward op once (the fused pass that
    recomputes p), not PyTorch autograd of the forward's pieces."""
    device = device_for(backend)
    require_backend(backend, device)
    z, p, idx, stats = _inputs((2, 5, 9, 3), device, normalise=True)
    leaves = [p[k].clone().requires_grad_() for k in PARAM_NAMES]
    out = ops.hypernet_block(z, *leaves, idx, backend=backend, **stats)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out.sum().backward()
    prefix = "triton_" if backend == "triton" else ""
    names = [e.name for e in prof.events()]
    assert names.count(f"emsedit_fast::{prefix}hypernet_block_backward") == 1, sorted(set(names))
    assert all(x.grad is not None for x in leaves)


def _raw_forward(backend):
    """The backend's forward operator, which also returns (act, pre) when asked to save them."""
    if backend == "cpp":
        return torch.ops.emsedit_fast.hypernet_block
    from emsedit_fast.ops._dispatch import _load_triton

    _load_triton("hypernet_block", "hypernet_block")
    return torch.ops.emsedit_fast.triton_hypernet_block


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("relu_first", [True, False], ids=["relu_affine", "affine_relu"])
@pytest.mark.parametrize("case", [(2, 9, 40, 80), (4, (5, 0, 17, 2), 37, 20)], ids=_ids)
def test_hypernet_block_saved_intermediates(backend, relu_first, case):
    """save_for_backward returns act = z0 A and pre = act B + c, and the backward given them equals the backward that
    recomputes them; without saving, both come back empty."""
    device = device_for(backend)
    require_backend(backend, device)
    z, p, idx, stats = _inputs(case, device, normalise=True)
    args = (z, *(p[k] for k in PARAM_NAMES), idx, relu_first, stats["mean"], stats["std"])
    out, act, pre = _raw_forward(backend)(*args, True)
    z0 = reference.running_stats_normalize(z, z[:, :0], stats["mean"], stats["std"])
    assert_close_to_reference(act, z0 @ p["a"], kind="reduction", label="act")
    assert_close_to_reference(pre, z0 @ p["a"] @ p["b"] + p["c"], kind="reduction", label="pre")
    plain, act0, pre0 = _raw_forward(backend)(*args, False)
    assert torch.equal(out, plain) and act0.numel() == 0 and pre0.numel() == 0
    grad_out = randn(*z.shape, seed=8, device=device)
    kw = dict(relu_first=relu_first, backend=backend, **stats)
    saved = ops.hypernet_block_backward(grad_out, z, *(p[k] for k in PARAM_NAMES), idx, act=act, pre=pre, **kw)
    recomputed = ops.hypernet_block_backward(grad_out, z, *(p[k] for k in PARAM_NAMES), idx, **kw)
    for name, a, e in zip(("z",) + PARAM_NAMES, saved, recomputed):
        assert_close_to_reference(a, e, kind="reduction", label=f"{backend}-saved-{name}")


@pytest.mark.parametrize("backend", ["reference"] + backend_params())
def test_hypernet_block_properties_identity_at_init(backend):
    """With B = 0, c = 0, s = 1, t = 0 the block is exactly the identity on (normalised) rows."""
    device = device_for(backend)
    require_backend(backend, device)
    z, p, idx, stats = _inputs((3, 6, 17, 4), device, trained=False, normalise=True)
    out = ops.hypernet_block(z, *(p[k] for k in PARAM_NAMES), idx, backend=backend, **stats)
    expected = reference.running_stats_normalize(z[:, :9], z[:, 9:], stats["mean"], stats["std"])
    assert_close_to_reference(out, expected, label="normalised identity")
    plain = ops.hypernet_block(z, *(p[k] for k in PARAM_NAMES), idx, backend=backend)
    assert torch.equal(plain, z)


@pytest.mark.parametrize("backend", ["reference"] + backend_params())
def test_hypernet_block_properties_relu_grad_at_zero(backend):
    """relu'(0) = 1: at initialisation (every pre-activation exactly 0) B, c and s still receive gradients."""
    device = device_for(backend)
    require_backend(backend, device)
    z, p, idx, _ = _inputs((2, 4, 7, 3), device, trained=False)
    leaves = {k: p[k].clone().requires_grad_() for k in PARAM_NAMES}
    out = ops.hypernet_block(z, *(leaves[k] for k in PARAM_NAMES), idx, backend=backend)
    out.sum().backward()
    assert leaves["b"].grad.abs().sum() > 0
    assert leaves["c"].grad.abs().sum() > 0
    assert leaves["a"].grad.abs().sum() == 0  # B = 0 blocks the path to A on the first step, as the math says


@pytest.mark.parametrize("backend", backend_params())
def test_hypernet_block_mutates_only_declared_args(backend):
    device = device_for(backend)
    require_backend(backend, device)
    z, p, idx, stats = _inputs((2, 5, 9, 2), device, normalise=True)
    before = [x.clone() for x in (z, idx, *p.values(), *stats.values())]
    ops.hypernet_block(z, *(p[k] for k in PARAM_NAMES), idx, backend=backend, **stats)
    for a, b in zip((z, idx, *p.values(), *stats.values()), before):
        assert torch.equal(a, b)


@pytest.mark.interpret
def test_hypernet_block_interpreter_runs_rank_chunks():
    """Under the interpreter the Triton block works in small row, column and rank tiles: the rank-80 and D-97 cases
    above loop over several rank chunks and column tiles, and the 66-row case over several row tiles."""
    if not kernels.interpreting():
        pytest.skip("checks the interpreter's launch configuration")
    from emsedit_fast.kernels import hypernet_block as hb_kernels

    for tuned in (hb_kernels._FWD, hb_kernels._DZ):
        meta = hb_kernels._chain_meta(tuned, 66, 97, 80)
        assert 80 > 2 * meta["BLOCK_R"] and 97 > 2 * meta["BLOCK_D"] and 66 > 2 * meta["BLOCK_N"], meta


def test_hypernet_block_rejects_bad_shapes():
    z, p, idx, _ = _inputs((2, 3, 6, 2), "cpu")
    with pytest.raises(ValueError, match="b must be"):
        ops.hypernet_block(z, p["a"], p["b"].t(), p["c"], p["s"], p["t"], idx)
    with pytest.raises(ValueError, match="idx must be int64"):
        ops.hypernet_block(z, p["a"], p["b"], p["c"], p["s"], p["t"], idx.int())
