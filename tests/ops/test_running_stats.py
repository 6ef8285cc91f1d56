"""running_stats_update_ / running_stats_normalize: every backend against the reference, and merge properties."""

import pytest
import torch

from emsedit_fast import kernels
from emsedit_fast import ops
from emsedit_fast import reference
from emsedit_fast.testing import assert_close_to_reference
from emsedit_fast.testing import backend_params
from emsedit_fast.testing import device_for
from emsedit_fast.testing import randn
from emsedit_fast.testing import require_backend

# (rows, d_in, d_out): one row, primes, non-powers of two, a power of two
SHAPES = [(1, 3, 2), (7, 13, 11), (33, 64, 31), (130, 37, 97)]


def _state(d, device, count=0.0):
    return (torch.full((1,), count, dtype=torch.float64, device=device), torch.zeros(d, device=device),
            torch.zeros(d, device=device), torch.ones(d, device=device))


def _rows(m, d_in, d_out, seed, dtype, device):
    # offset and scale the columns differently, as real keys and value-grads are (|delta| << |u|)
    keys = randn(m, d_in, seed=seed, dtype=dtype, device=device, scale=3.0) + 1.5
    grads = randn(m, d_out, seed=seed + 1, dtype=dtype, device=device, scale=1e-3)
    return keys, grads


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"m{s[0]}-{s[1]}x{s[2]}")
def test_running_stats_update__matches_reference(backend, dtype, shape):
    device = device_for(backend)
    require_backend(backend, device)
    m, d_in, d_out = shape
    d = d_in + d_out
    fast, ref = _state(d, device), _state(d, device)
    # a first batch through the reference, so the merge starts from a non-trivial state
    first = _rows(5, d_in, d_out, 10, dtype, device)
    reference.running_stats_update_(*fast, *first)
    reference.running_stats_update_(*ref, *first)
    second = _rows(m, d_in, d_out, 20, dtype, device)
    before = [x.clone() for x in fast]
    with ops.record_backends() as seen:
        ops.running_stats_update_(*fast, *second, backend=backend)
    assert seen == {"running_stats_update_": {backend}}
    reference.running_stats_update_(*ref, *second)
    assert torch.equal(fast[0], ref[0])
    for name, a, e, b in zip(("mean", "var", "std"), fast[1:], ref[1:], before[1:]):
        assert_close_to_reference(a, e, kind="reduction", label=f"{backend}-{name}", before=b)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"m{s[0]}-{s[1]}x{s[2]}")
def test_running_stats_normalize_matches_reference(backend, shape):
    device = device_for(backend)
    require_backend(backend, device)
    m, d_in, d_out = shape
    keys, grads = _rows(m, d_in, d_out, 3, torch.float32, device)
    mean = randn(d_in + d_out, seed=5, device=device)
    std = randn(d_in + d_out, seed=6, device=device).abs() + 0.1
    out = ops.running_stats_normalize(keys, grads, mean, std, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (m, d_in + d_out)
    assert_close_to_reference(out, reference.running_stats_normalize(keys, grads, mean, std), label=backend)


@pytest.mark.parametrize("backend", ["reference"] + backend_params())
def test_running_stats_update__any_partition_equals_one_shot(backend):
    """Merging rows in uneven chunks gives the one-shot mean, population variance and M2 / (N - 1 + 1e-8)."""
    device = device_for(backend)
    require_backend(backend, device)
    d_in, d_out = 6, 5
    keys, grads = _rows(40, d_in, d_out, 7, torch.float32, device)
    state = _state(d_in + d_out, device)
    for lo, hi in ((0, 1), (1, 4), (4, 21), (21, 40)):
        ops.running_stats_update_(*state, keys[lo:hi], grads[lo:hi], backend=backend)
    x = torch.cat([keys, grads], 1).double()
    assert state[0].item() == 40
    assert_close_to_reference(state[1], x.mean(0).float(), kind="reduction", label="mean")
    assert_close_to_reference(state[2], x.var(0, unbiased=False).float(), kind="reduction", label="var")
    m2 = ((x - x.mean(0)) ** 2).sum(0)
    assert_close_to_reference(state[3], (m2 / (40 - 1 + 1e-8)).sqrt().float(), kind="reduction", label="std")


@pytest.mark.interpret
def test_running_stats_update__interpreter_splits_rows():
    """Under the interpreter the Triton update splits the 130-row case into several slices of two row tiles each, so
    the tests above run the per-slice statistics, their multi-tile row loops and the merge, not a single slice."""
    if not kernels.interpreting():
        pytest.skip("checks the interpreter's launch configuration")
    from emsedit_fast.kernels import _common
    from emsedit_fast.kernels import running_stats as rs_kernels

    cfg = _common.pick(**rs_kernels._UPDATE_CONFIG, BLOCK_M=130, BLOCK_D=134)
    n_splits, rows_per_split = rs_kernels.row_splits(130, cfg["BLOCK_M"], 134 // cfg["BLOCK_D"] + 1,
                                                     torch.device("cpu"))
    assert n_splits >= 3 and rows_per_split == 2 * cfg["BLOCK_M"]


@pytest.mark.parametrize("backend", ["reference"] + backend_params())
def test_running_stats_update__single_row_gives_zero_std(backend):
    device = device_for(backend)
    require_backend(backend, device)
    state = _state(5, device)
    keys, grads = _rows(1, 3, 2, 1, torch.float32, device)
    ops.running_stats_update_(*state, keys, grads, backend=backend)
    assert torch.isfinite(state[3]).all() and state[3].abs().max() == 0
    assert torch.equal(state[1], torch.cat([keys, grads], 1)[0])


@pytest.mark.parametrize("backend", backend_params())
def test_running_stats_update__mutates_only_declared_args(backend):
    device = device_for(backend)
    require_backend(backend, device)
    keys, grads = _rows(9, 4, 3, 2, torch.float32, device)
    before = (keys.clone(), grads.clone())
    state = _state(7, device)
    ops.running_stats_update_(*state, keys, grads, backend=backend)
    assert torch.equal(keys, before[0]) and torch.equal(grads, before[1])
    assert state[0].item() == 9 and not torch.equal(state[1], torch.zeros(7, device=device))


def test_running_stats_update__rejects_bad_shapes():
    state = _state(5, "cpu")
    with pytest.raises(ValueError, match="statistics must have shape"):
        ops.running_stats_update_(*state, torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="same number of rows"):
        ops.running_stats_update_(*state, torch.zeros(2, 3), torch.zeros(3, 2))
