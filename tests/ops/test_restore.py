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
