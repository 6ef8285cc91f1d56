"""ridge_solve / ridge_solve_backward: every backend and form against the reference; dual = primal; gradients."""

import pytest
import torch

from emsedit_fast import ops
from emsedit_fast import reference
from emsedit_fast.testing import assert_close_to_reference
from emsedit_fast.testing import backend_params
from emsedit_fast.testing import device_for
from emsedit_fast.testing import randn
from emsedit_fast.testing import require_backend

# (layers, n, d_in, d_out): n < d_in (dual is the natural form) and n >= d_in (primal), one row, primes
CASES = [(1, 1, 5, 3), (3, 7, 13, 11), (2, 33, 64, 31), (2, 40, 17, 23), (4, 9, 37, 6)]


def _ids(case):
    return f"L{case[0]}-n{case[1]}-{case[2]}x{case[3]}"


def _inputs(case, device, dtype=torch.float32):
    n_layers, n, d_in, d_out = case
    keys = randn(n_layers, n, d_in, seed=1, device=device, dtype=dtype)
    targets = randn(n_layers, n, d_out, seed=2, device=device, dtype=dtype, scale=0.1)
    log_ridge = randn(n_layers, seed=3, device=device, dtype=dtype, scale=0.5)
    return keys, targets, log_ridge


def _delta(keys, solution, form):
    """The shift S = dW^T (L, d_in, d_out) a solution stands for."""
    return keys.transpose(1, 2) @ solution if form == "dual" else solution


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("form", ["dual", "primal"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_ridge_solve_matches_reference(backend, case, form):
    """The backend's solution, in either form, gives the shift of the published primal LU solve."""
    device = device_for(backend)
    require_backend(backend, device)
    keys, targets, log_ridge = _inputs(case, device)
    with ops.record_backends() as seen:
        sol = ops.ridge_solve(keys, targets, log_ridge, form, backend=backend)
    assert seen == {"ridge_solve": {backend}}
    assert_close_to_reference(sol, reference.ridge_solve(keys, targets, log_ridge, form), kind="reduction",
                              label=f"{backend}-{form}")
    oracle = reference.ridge_solve(keys.double(), targets.double(), log_ridge.double(), "primal")
    assert_close_to_reference(_delta(keys, sol, form), oracle.float(), kind="reduction", label=f"{backend}-shift")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("form", ["dual", "primal"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_ridge_solve_grad_matches_reference(backend, case, form):
    """Autograd through the backend's op equals autograd through torch.linalg.solve, for targets and log_ridge."""
    device = device_for(backend)
    require_backend(backend, device)
    keys, targets, log_ridge = _inputs(case, device)
    out_shape = reference.ridge_solve(keys, targets, log_ridge, form).shape
    weight = randn(*out_shape, seed=4, device=device)

    def grads(fn, **kw):
        t, lr = targets.clone().requires_grad_(), log_ridge.clone().requires_grad_()
        return torch.autograd.grad((fn(keys, t, lr, form, **kw) * weight).sum(), [t, lr])

    fast = grads(ops.ridge_solve, backend=backend)
    ref = grads(reference.ridge_solve)
    assert_close_to_reference(fast[0], ref[0], kind="reduction", label=f"{backend}-grad_targets")
    assert_close_to_reference(fast[1], ref[1], kind="reduction", label=f"{backend}-grad_log_ridge")


@pytest.mark.parametrize("backend", ["reference"] + backend_params())
@pytest.mark.parametrize("form", ["dual", "primal"])
def test_ridge_solve_backward_matches_finite_differences(backend, form):
    """The backward formulas (emsedit_fast/reference/ridge.py) in fp64: dL/dtargets and dL/dlog_ridge against central
    differences of L = <W, solution>."""
    device = device_for(backend)
    require_backend(backend, device)
    if backend != "reference":
        # compiled backends work in fp32: compare them with the fp64 reference backward instead
        keys, targets, log_ridge = _inputs((2, 6, 9, 4), device)
        sol = ops.ridge_solve(keys, targets, log_ridge, form, backend=backend)
        g = randn(*sol.shape, seed=5, device=device)
        fast = ops.ridge_solve_backward(g, keys, sol, log_ridge, form, backend=backend)
        ref = reference.ridge_solve_backward(g.double(), keys.double(), sol.double(), log_ridge.double(), form)
        assert_close_to_reference(fast[0], ref[0].float(), kind="reduction", label="grad_targets")
        assert_close_to_reference(fast[1], ref[1].float(), kind="reduction", label="grad_log_ridge")
        return
    keys, targets, log_ridge = _inputs((2, 6, 9, 4), device, torch.float64)
    sol = reference.ridge_solve(keys, targets, log_ridge, form)
    g = randn(*sol.shape, seed=5, device=device, dtype=torch.float64)
    grad_t, grad_lr = reference.ridge_solve_backward(g, keys, sol, log_ridge, form)
    h = 1e-6
    for layer in range(2):
        bump = torch.zeros_like(log_ridge)
        bump[layer] = h
        fd = ((reference.ridge_solve(keys, targets, log_ridge + bump, form) * g).sum()
              - (reference.ridge_solve(keys, targets, log_ridge - bump, form) * g).sum()) / (2 * h)
        assert abs(fd.item() - grad_lr[layer].item()) < 1e-6 * max(1.0, abs(fd.item()))
    bump = torch.zeros_like(targets)
    bump[1, 2, 3] = h
    fd = ((reference.ridge_solve(keys, targets + bump, log_ridge, form) * g).sum()
          - (reference.ridge_solve(keys, targets - bump, log_ridge, form) * g).sum()) / (2 * h)
    assert abs(fd.item() - grad_t[1, 2, 3].item()) < 1e-6


@pytest.mark.parametrize("n", [5, 30])
def test_ridge_solve_properties_dual_equals_primal(n):
    """Push-through identity in fp64: K^T (K K^T + bI)^-1 V = (K^T K + bI)^-1 K^T V, for n < d_in and n > d_in."""
    keys, targets, log_ridge = _inputs((3, n, 12, 7), "cpu", torch.float64)
    dual = reference.ridge_solve(keys, targets, log_ridge, "dual")
    primal = reference.ridge_solve(keys, targets, log_ridge, "primal")
    assert torch.allclose(_delta(keys, dual, "dual"), primal, rtol=1e-10, atol=1e-10)
    # normal equations of the primal problem: (K^T K + bI) S = K^T V
    beta = log_ridge.exp()[:, None, None]
    lhs = keys.transpose(1, 2) @ keys @ primal + beta * primal
    assert torch.allclose(lhs, keys.transpose(1, 2) @ targets, rtol=1e-10, atol=1e-10)


def test_ridge_solve_properties_auto_form():
    assert ops.choose_form(10, 576) == "dual"
    assert ops.choose_form(576, 576) == "primal"
    assert ops.choose_form(5000, 576, "dual") == "dual"
    with pytest.raises(ValueError, match="form must be one of"):
        ops.choose_form(5, 6, "qr")


@pytest.mark.parametrize("backend", backend_params())
def test_ridge_solve_nearly_singular_stays_finite(backend):
    """Duplicated key rows and a tiny ridge: the Cholesky path must not produce NaN (fp64 retry or LU fallback)."""
    device = device_for(backend)
    require_backend(backend, device)
    keys, targets, _ = _inputs((2, 8, 16, 4), device)
    keys[:, 4:] = keys[:, :4]  # rank 4 of 8 rows
    log_ridge = torch.full((2,), -40.0, device=device)
    sol = ops.ridge_solve(keys, targets, log_ridge, "dual", backend=backend)
    assert torch.isfinite(sol).all()


@pytest.mark.parametrize("backend", backend_params())
def test_ridge_solve_mutates_only_declared_args(backend):
    device = device_for(backend)
    require_backend(backend, device)
    inputs = _inputs((2, 5, 9, 4), device)
    before = [x.clone() for x in inputs]
    ops.ridge_solve(*inputs, "dual", backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(inputs, before))
