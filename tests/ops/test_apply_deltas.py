"""apply_deltas_ / apply_deltas_dense_: grouped in-place updates against the dense reference, both layouts."""

import pytest
import torch

from emsedit_fast import ops
from emsedit_fast import reference
from emsedit_fast.testing import assert_close_to_reference
from emsedit_fast.testing import assert_ulp_close
from emsedit_fast.testing import backend_params
from emsedit_fast.testing import device_for
from emsedit_fast.testing import randn
from emsedit_fast.testing import require_backend

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Each case is a list of layers (n rows, d_in, d_out); the last mixes shapes in one call.
CASES = {
    "L1-n1-5x3": [(1, 5, 3)],
    "L3-n7-13x11": [(7, 13, 11)] * 3,
    "L2-n33-64x96": [(33, 64, 96)] * 2,
    "mixed": [(4, 17, 23), (9, 31, 7), (4, 17, 23), (1, 2, 129)],
    # wider than one tile of the dense transpose-add (16 x 256 of W) in both directions, with ragged edges
    "L2-n3-300x37": [(3, 300, 37)] * 2,
    # Linear: wider than 2048 columns, so the C++ low-precision update cuts it into 64 x 1024 tiles (ragged on both
    # sides) instead of whole rows; Conv1D: 70 columns, whole rows
    "L1-n2-2100x70": [(2, 2100, 70)],
}


def _layers(spec, dtype, transposed, device, seed=0):
    weights, coeffs, keys = [], [], []
    for i, (n, d_in, d_out) in enumerate(spec):
        shape = (d_in, d_out) if transposed else (d_out, d_in)
        weights.append(randn(*shape, seed=seed + 3 * i, dtype=dtype, device=device))
        coeffs.append(randn(n, d_out, seed=seed + 3 * i + 1, device=device, scale=0.05))
        keys.append(randn(n, d_in, seed=seed + 3 * i + 2, device=device))
    return weights, coeffs, keys


def _check(fast, ref, before, dtype, label):
    """fp32: within the reduction tolerance of the expected change; bf16/fp16: within one ulp (the single rounding)."""
    for i, (a, e, b) in enumerate(zip(fast, ref, before)):
        assert not torch.equal(e, b), f"[{label}-layer{i}] the case does not change the weight"
        if dtype == torch.float32:
            assert_close_to_reference(a, e, kind="reduction", label=f"{label}-layer{i}", before=b)
        else:
            assert_ulp_close(a, e, ulps=1, label=f"{label}-layer{i}")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("use_alpha", [False, True], ids=["alpha1", "alpha"])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_apply_deltas__matches_reference(backend, case, dtype_name, transposed, use_alpha):
    device = device_for(backend)
    require_backend(backend, device)
    dtype = DTYPES[dtype_name]
    weights, coeffs, keys = _layers(CASES[case], dtype, transposed, device)
    alpha = randn(len(weights), seed=50, device=device) if use_alpha else None
    before = [w.clone() for w in weights]
    expected = [w.clone() for w in weights]
    reference.apply_deltas_(expected, coeffs, keys, alpha, transposed)
    with ops.record_backends() as seen:
        ops.apply_deltas_(weights, coeffs, keys, alpha, transposed, backend=backend)
    assert seen == {"apply_deltas_": {backend}}
    _check(weights, expected, before, dtype, f"{backend}-{case}-{dtype_name}")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("case", ["L3-n7-13x11", "mixed", "L2-n3-300x37"])
def test_apply_deltas_dense__matches_reference(backend, case, dtype_name, transposed):
    device = device_for(backend)
    require_backend(backend, device)
    dtype = DTYPES[dtype_name]
    weights, _, _ = _layers(CASES[case], dtype, transposed, device)
    shifts = [randn(d_in, d_out, seed=70 + i, device=device, scale=0.05) for i, (_, d_in, d_out) in
              enumerate(CASES[case])]
    alpha = randn(len(weights), seed=51, device=device)
    before = [w.clone() for w in weights]
    expected = [w.clone() for w in weights]
    reference.apply_deltas_dense_(expected, shifts, alpha, transposed)
    ops.apply_deltas_dense_(weights, shifts, alpha, transposed, backend=backend)
    _check(weights, expected, before, dtype, f"{backend}-{case}-{dtype_name}")


@pytest.mark.parametrize("backend", backend_params())
def test_apply_deltas__mutates_only_declared_args(backend):
    device = device_for(backend)
    require_backend(backend, device)
    weights, coeffs, keys = _layers(CASES["mixed"], torch.bfloat16, False, device)
    alpha = randn(len(weights), seed=1, device=device)
    frozen = [x.clone() for x in coeffs + keys + [alpha]]
    before = [w.clone() for w in weights]
    ops.apply_deltas_(weights, coeffs, keys, alpha, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(coeffs + keys + [alpha], frozen))
    assert all(not torch.equal(a, b) for a, b in zip(weights, before))


@pytest.mark.parametrize("backend", backend_params())
def test_apply_deltas__is_deterministic(backend):
    """Two runs from the same inputs give identical bits: journal replay depends on it."""
    device = device_for(backend)
    require_backend(backend, device)
    w1, coeffs, keys = _layers(CASES["L2-n33-64x96"], torch.float32, False, device)
    w2 = [w.clone() for w in w1]
    ops.apply_deltas_(w1, coeffs, keys, backend=backend)
    ops.apply_deltas_(w2, coeffs, keys, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))


def test_apply_deltas_properties_rank_at_most_n():
    """A MEND-style update sum_j m_j u_j^T has rank <= n."""
    weights = [torch.zeros(40, 30)]
    m, k = torch.randn(3, 40), torch.randn(3, 30)
    reference.apply_deltas_(weights, [m], [k])
    assert torch.linalg.matrix_rank(weights[0]).item() <= 3


def test_apply_deltas_properties_subtraction_is_not_a_revert():
    """Guard: round(round(W + d) - d) != W for some bf16 elements, which is why every revert restores a snapshot."""
    w = randn(256, 256, seed=3, dtype=torch.bfloat16)
    d = randn(256, 256, seed=4, scale=1e-3)
    back = ((w.float() + d).bfloat16().float() - d).bfloat16()
    assert (back != w).float().mean().item() > 1e-3


def test_apply_deltas__rejects_mismatched_factors():
    weights, coeffs, keys = _layers(CASES["L3-n7-13x11"], torch.float32, False, "cpu")
    with pytest.raises(ValueError, match="layer 1: weight implies d_in=13, d_out=11"):
        ops.apply_deltas_(weights, [coeffs[0], coeffs[1][:, :5], coeffs[2]], keys)
    with pytest.raises(ValueError, match="one coeffs and one keys tensor per weight"):
        ops.apply_deltas_(weights, coeffs[:2], keys)
