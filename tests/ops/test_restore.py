"""restore_: bit-exact restore after an update, every backend, both layouts, fp32 and bf16."""

import pytest
import torch

from emsedit_fast import ops
from emsedit_fast.testing import backend_params
from emsedit_fast.testing import device_for
from emsedit_fast.testing import randn
from emsedit_fast.testing import require_backend


@pytest.mark.parametrize("backend", ["reference"] + backend_params())
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_restore__is_bit_exact(backend, dtype, transposed):
    device = device_for(backend)
    require_backend(backend, device)
    shapes = [(13, 11), (64, 96), (5, 3)]
    weights = [randn(*s, seed=i, dtype=dtype, device=device) for i, s in enumerate(shapes)]
    snaps = ops.snapshot(weights)
    # factors sized for the layout: Linear (d_out, d_in) vs Conv1D (d_in, d_out)
    coeffs = [randn(4, (s[1] if transposed else s[0]), seed=10 + i, device=device) for i, s in enumerate(shapes)]
    keys = [randn(4, (s[0] if transposed else s[1]), seed=20 + i, device=device) for i, s in enumerate(shapes)]
    ops.apply_deltas_(weights, coeffs, keys, transposed=transposed, backend="reference")
    assert not any(torch.equal(w, s) for w, s in zip(weights, snaps))
    with ops.record_backends() as seen:
        ops.restore_(weights, snaps, backend=backend)
    assert seen == {"restore_": {backend}}
    assert all(torch.equal(w, s) for w, s in zip(weights, snaps))


def test_snapshot_is_an_independent_copy():
    weights = [torch.randn(3, 3)]
    snaps = ops.snapshot(weights)
    weights[0].add_(1.0)
    assert not torch.equal(weights[0], snaps[0])


def test_restore__rejects_mismatched_snapshot():
    with pytest.raises(ValueError, match="layer 0: snapshot 3x2"):
        ops.restore_([torch.zeros(2, 3)], [torch.zeros(3, 2)])


@pytest.mark.parametrize("backend", ["reference"] + backend_params())
def test_compact_snapshot_takes_the_narrowest_exact_dtype_and_restores_bit_for_bit(backend):
    require_backend(backend, "cpu")
    bf16_values = randn(16, 8, seed=1).to(torch.bfloat16).float()  # fp32 holding bf16 values (a promoted layer)
    fp16_values = torch.full((4, 4), 1.0 + 2.0 ** -10)  # fp16 holds it exactly, bf16 (7 mantissa bits) does not
    full = randn(16, 8, seed=2)  # needs all of fp32
    weights = [bf16_values, fp16_values, full]
    originals = [w.clone() for w in weights]
    snaps = ops.snapshot(weights, compact=True)
    assert [s.dtype for s in snaps] == [torch.bfloat16, torch.float16, torch.float32]
    assert [s.dtype for s in ops.snapshot(weights)] == [torch.float32] * 3  # not compact unless asked
    for w in weights:
        w.add_(0.1)
    assert not any(torch.equal(w, o) for w, o in zip(weights, originals))
    with ops.record_backends() as seen:
        ops.restore_(weights, snaps, backend=backend)
    assert seen == {"restore_": {"reference"}}  # a widening copy is a plain copy_, whichever backend was asked for
    assert all(w.dtype == torch.float32 and torch.equal(w, o) for w, o in zip(weights, originals))


def test_restore__rejects_a_narrowing_snapshot():
    message = "layer 0: snapshot 2x3 torch.float32 does not match weight 2x3 torch.bfloat16"
    with pytest.raises(ValueError, match=message):
        ops.restore_([torch.zeros(2, 3, dtype=torch.bfloat16)], [torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="layer 0"):  # fp16 and bf16 do not hold each other's values
        ops.restore_([torch.zeros(2, 3, dtype=torch.float16)], [torch.zeros(2, 3, dtype=torch.bfloat16)])


def test_the_exactness_check_reads_every_block():
    from emsedit_fast.ops.restore import _holds_exactly

    w = randn(5, 9, seed=3).to(torch.bfloat16).float()
    assert _holds_exactly(w, torch.bfloat16, block=7)
    w[-1, -1] += 2.0 ** -20  # only the last block (elements 42-44) no longer fits bf16
    assert not _holds_exactly(w, torch.bfloat16, block=7)
    assert not _holds_exactly(torch.tensor([float("nan")]), torch.bfloat16)  # NaN: never taken as exact
