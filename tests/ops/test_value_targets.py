"""value_targets forward and backward: every backend against the reference and PyTorch autograd."""

import pytest
import torch

from emsedit_fast import ops
from emsedit_fast import reference
from emsedit_fast.testing import assert_close_to_reference
from emsedit_fast.testing import backend_params
from emsedit_fast.testing import device_for
from emsedit_fast.testing import randn
from emsedit_fast.testing import require_backend

# (layers, rows per layer, d_in, d_out)
CASES = [(1, 1, 3, 2), (3, 7, 13, 11), (2, 33, 64, 31), (4, 9, 37, 97)]


def _ids(case):
    return f"L{case[0]}-n{case[1]}-{case[2]}x{case[3]}"


def _inputs(case, device):
    n_layers, n, d_in, d_out = case
    keys = randn(n_layers * n, d_in, seed=1, device=device, scale=2.0)
    z = randn(n_layers * n, d_in + d_out, seed=2, device=device)
    eta = randn(n_layers, seed=3, device=device, scale=1e-3)
    idx = torch.randint(0, n_layers, (n_layers * n,), generator=torch.Generator().manual_seed(4)).to(device)
    return keys, z, eta, idx


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_value_targets_matches_reference(backend, case):
    device = device_for(backend)
    require_backend(backend, device)
    keys, z, eta, idx = _inputs(case, device)
    with ops.record_backends() as seen:
        targets, coeffs = ops.value_targets(keys, z, eta, idx, backend=backend)
    assert seen == {"value_targets": {backend}}
    ref_targets, ref_coeffs = reference.value_targets(keys, z, eta, idx)
    assert_close_to_reference(coeffs, ref_coeffs, kind="reduction", label=f"{backend}-coeffs")
    assert_close_to_reference(targets, ref_targets, kind="reduction", label=f"{backend}-targets")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("use_coeffs", [False, True], ids=["targets", "targets+coeffs"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_value_targets_grad_matches_reference(backend, case, use_coeffs):
    device = device_for(backend)
    require_backend(backend, device)
    keys, z, eta, idx = _inputs(case, device)
    w_t = randn(keys.shape[0], z.shape[1] - keys.shape[1], seed=5, device=device)
    w_c = randn(keys.shape[0], seed=6, device=device)

    def grads(fn, **kw):
        zz, ee = z.clone().requires_grad_(), eta.clone().requires_grad_()
        targets, coeffs = fn(keys, zz, ee, idx, **kw)
        loss = (targets * w_t).sum() + ((coeffs * w_c).sum() if use_coeffs else 0.0)
        return torch.autograd.grad(loss, [zz, ee])

    fast = grads(ops.value_targets, backend=backend)
    ref = grads(reference.value_targets)
    assert_close_to_reference(fast[0], ref[0], kind="reduction", label=f"{backend}-grad_z")
    assert_close_to_reference(fast[1], ref[1], kind="reduction", label=f"{backend}-grad_eta")


@pytest.mark.parametrize("backend", ["reference"] + backend_params())
def test_value_targets_backward_matches_autograd(backend):
    """The manual backward equals autograd of the reference forward in fp64."""
    device = device_for(backend)
    require_backend(backend, device)
    keys, z, eta, idx = _inputs((3, 5, 7, 6), device)
    grad_t = randn(keys.shape[0], 6, seed=8, device=device)
    grad_c = randn(keys.shape[0], seed=9, device=device)
    manual = ops.value_targets_backward(grad_t, grad_c, keys, z, eta, idx, backend=backend)
    zz, ee = z.double().requires_grad_(), eta.double().requires_grad_()
    t, c = reference.value_targets(keys.double(), zz, ee, idx)
    auto = torch.autograd.grad([t, c], [zz, ee], [grad_t.double(), grad_c.double()])
    assert_close_to_reference(manual[0], auto[0].float(), kind="reduction", label="grad_z")
    assert_close_to_reference(manual[1], auto[1].float(), kind="reduction", label="grad_eta")


@pytest.mark.parametrize("backend", backend_params())
def test_value_targets_mutates_only_declared_args(backend):
    device = device_for(backend)
    require_backend(backend, device)
    inputs = _inputs((2, 4, 5, 3), device)
    before = [x.clone() for x in inputs]
    ops.value_targets(*inputs, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(inputs, before))


def test_value_targets_properties_hand_computed():
    """One row by hand: u = (1, 2), u~ = (3, -1), delta~ = (4,), eta = 0.5 -> coeff = -0.5 * (3 - 2) = -0.5."""
    keys = torch.tensor([[1.0, 2.0]])
    z = torch.tensor([[3.0, -1.0, 4.0]])
    targets, coeffs = reference.value_targets(keys, z, torch.tensor([0.5]), torch.tensor([0]))
    assert coeffs.tolist() == [-0.5] and targets.tolist() == [[-2.0]]
