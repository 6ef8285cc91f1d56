"""value_targets (coeff_j = -eta[idx_j] <u_j, u~_j>, V_j = coeff_j delta~_j) and its manual backward
(docs/method.md, "Value targets").

Providers (see benchmarks/_harness.py):
    reference   the published formulas: keys * pseudo-keys materialised (N, d_in) before the row sum
    competent   the same in plain PyTorch without the product temporary: torch.linalg.vecdot for the row dots, one
                broadcast multiply for V; backward: vecdot, and both halves of dL/dz written into one (N, D) buffer
    cpp/triton  one pass over the rows

Cases: the rows of one step of each preset's full group (N = L n), the hypernetwork output z of order one, and the
small-model step size (eta ~ 1e-3), so the targets have the scale the solve sees.
"""

from types import SimpleNamespace

import _cases
import _harness
import pytest
import torch

from emsedit_fast import ops
from emsedit_fast import reference
from emsedit_fast import testing


def value_targets(keys, z, eta, idx):
    """Competent (targets (N, d_out), coeffs (N,)): coeffs = -eta[idx] <u, u~> by vecdot, targets = coeffs delta~."""
    d_in = keys.shape[1]
    coeffs = torch.linalg.vecdot(keys, z[:, :d_in]).mul_(eta.index_select(0, idx)).neg_()
    return z[:, d_in:] * coeffs.unsqueeze(1), coeffs


def value_targets_backward(grad_targets, grad_coeffs, keys, z, eta, idx):
    """Competent (dL/dz (N, D), dL/deta (L,)): with g = <P, delta~> (+ dL/dcoeff), dL/du~ = -eta g u,
    dL/ddelta~ = coeff P, dL/deta_l = -sum_{rows of l} g <u, u~>."""
    d_in = keys.shape[1]
    dots = torch.linalg.vecdot(keys, z[:, :d_in])
    eta_rows = eta.index_select(0, idx)
    g = torch.linalg.vecdot(grad_targets, z[:, d_in:])
    if grad_coeffs is not None:
        g = g + grad_coeffs
    grad_z = torch.empty_like(z)
    torch.mul(keys, (-eta_rows * g).unsqueeze(1), out=grad_z[:, :d_in])
    torch.mul(grad_targets, (-eta_rows * dots).unsqueeze(1), out=grad_z[:, d_in:])
    grad_eta = torch.zeros_like(eta).index_add_(0, idx, -g * dots)
    return grad_z, grad_eta


class Forward(_harness.OpSpec):
    op = "value_targets"

    def cases(self, smoke, device):
        presets = _cases.SMOKE_PRESETS if smoke else _cases.MODEL_PRESETS
        return [_cases.case(p, primary=p in ("smollm2-135m", "tiny")) for p in presets]

    def make(self, case, device):
        keys, _ = testing.edit_rows(case.n_total, case.d_in, case.d_out, seed=3, device=device)
        z = testing.randn(case.n_total, case.d, seed=8, device=device)
        eta = 1e-3 * (1.0 + testing.randn(case.layers, seed=9, device=device, scale=0.1))
        idx = testing.layer_index(case.layers, case.rows, device=device)
        grad_targets = testing.randn(case.n_total, case.d_out, seed=10, device=device, scale=1e-2)
        return SimpleNamespace(case=case, keys=keys, z=z, eta=eta, idx=idx, grad_targets=grad_targets,
                               reset=lambda: None)

    def args(self, x):
        return x.keys, x.z, x.eta, x.idx

    def kernel(self, x, backend):
        return ops.value_targets(*self.args(x), backend=backend)

    def competent_fn(self, x):
        return value_targets, self.args(x)

    def passthrough(self, x):
        return [x.z[:, x.case.d_in:], None]  # delta~ as the targets

    def oracle(self, x):
        return list(reference.value_targets(*_double(self.args(x))))

    def info(self, case, provider):
        model = {"reference": 4 * case.n_total * case.d_in, "competent": 0, "cpp": 0, "triton": 0}
        return {"bytes_moved": 4 * case.n_total * (case.d_in + case.d + case.d_out + 1),
                "flops": 2.0 * case.n_total * (case.d_in + case.d_out), "workspace_model_bytes": model.get(provider)}


def _double(args):
    return [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args]


class Backward(Forward):
    op = "value_targets_backward"

    def bargs(self, x):
        return x.grad_targets, None, x.keys, x.z, x.eta, x.idx

    def kernel(self, x, backend):
        return ops.value_targets_backward(*self.bargs(x), backend=backend)

    def competent_fn(self, x):
        return value_targets_backward, self.bargs(x)

    def passthrough(self, x):
        return [x.z, None]

    def oracle(self, x):
        return list(reference.value_targets_backward(*_double(self.bargs(x))))

    def info(self, case, provider):
        model = {"reference": 4 * case.n_total * (2 * case.d_in + 2 * case.d_out), "competent": 0, "cpp": 0,
                 "triton": 0}
        return {"bytes_moved": 4 * case.n_total * (case.d_out + case.d_in + 2 * case.d),
                "flops": 4.0 * case.n_total * (case.d_in + case.d_out), "workspace_model_bytes": model.get(provider)}


FORWARD, BACKWARD = Forward(), Backward()


@pytest.mark.bench(FORWARD)
def bench_value_targets_forward(benchmark, case, provider, device):
    _harness.run_op_bench(benchmark, FORWARD, case, provider, device)


@pytest.mark.bench(BACKWARD)
def bench_value_targets_backward(benchmark, case, provider, device):
    _harness.run_op_bench(benchmark, BACKWARD, case, provider, device)
