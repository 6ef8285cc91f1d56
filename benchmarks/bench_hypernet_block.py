"""One hypernetwork block over the stacked rows of a whole shape group (docs/method.md, "Hypernetwork"):
z' = z + s[idx] * relu(z A B + c) + t[idx], its manual backward op, and forward + backward under autograd (what
meta-training runs per chunk).

Providers (see benchmarks/_harness.py):
    reference   the published block: one call per edited layer (rows gathered with nonzero, results put back with
                index_copy), so A and B are read L times; its manual backward is already grouped
    competent   the same block in plain PyTorch over the whole group at once: one (N x D)(D x r) GEMM, one addmm
                (N x r)(r x D) + c, the per-layer scale and shift gathered by idx (addcmul); backward: the same
                formulas with addmm and in-place masks
    cpp/triton  A and B read once for all layers, the scale/shift/ReLU/residual epilogue fused

Cases: the rows of one step of each preset's group (on the CPU two layers of the GPT-J and LLaMA-3 groups: a full
LLaMA-3 group is 12 x 90 rows of D = 18432), the preset's rank, trained-like parameters (B != 0, s != 1, t != 0).
"""

import functools
from types import SimpleNamespace

import _cases
import _harness
import pytest
import torch

from emsedit_fast import ops
from emsedit_fast import reference
from emsedit_fast import testing
from emsedit_fast.reference.running_stats import EPS


def block(z, a, b, c, s, t, idx, relu_first=True, mean=None, std=None):
    """Competent grouped block: p = (z A) B + c for every row at once; relu_first: z + s[idx] relu(p) + t[idx], else
    z + relu(s[idx] p + t[idx]). clamp_min(0) has derivative 1 at 0, the op's convention."""
    if mean is not None:
        z = (z - mean) / (std + EPS)
    p = torch.addmm(c, z @ a, b)  # (N, D)
    s_rows, t_rows = s.index_select(0, idx), t.index_select(0, idx)
    if relu_first:
        h = torch.addcmul(t_rows, s_rows, p.clamp_min(0))
    else:
        h = torch.addcmul(t_rows, s_rows, p).clamp_min(0)
    return z + h


def block_backward(grad_out, z, a, b, c, s, t, idx, relu_first=True, mean=None, std=None):
    """Competent manual backward (recomputes the forward): with gamma = dL/dz', pi = s[idx] gamma [pre-activation
    >= 0], dc = sum pi, dB = (z A)^T pi, alpha = pi B^T, dA = z^T alpha, dz = gamma + alpha A^T, ds / dt = per-layer
    sums of gamma relu(p) / gamma (relu_first)."""
    z0 = z if mean is None else (z - mean) / (std + EPS)
    act = z0 @ a  # (N, r)
    p = torch.addmm(c, act, b)  # (N, D)
    s_rows = s.index_select(0, idx)
    if relu_first:
        mask = p >= 0
        g = grad_out
        grad_s = torch.zeros_like(s).index_add_(0, idx, grad_out * p.clamp_min_(0))
    else:
        pre = torch.addcmul(t.index_select(0, idx), s_rows, p)
        mask = pre >= 0
        g = grad_out * mask
        grad_s = torch.zeros_like(s).index_add_(0, idx, g * p)
    grad_t = torch.zeros_like(t).index_add_(0, idx, g)
    pi = s_rows.mul_(grad_out).mul_(mask)
    grad_c = pi.sum(0)
    grad_b = act.t() @ pi
    alpha = pi @ b.t()  # (N, r)
    grad_a = z0.t() @ alpha
    grad_z = torch.addmm(grad_out, alpha, a.t())
    if mean is not None:
        grad_z = grad_z / (std + EPS)
    return grad_z, grad_a, grad_b, grad_c, grad_s, grad_t


def autograd_step(fwd, z, a, b, c, s, t, idx, grad_out):
    """Forward + backward of `fwd` under autograd: the gradients of (z, A, B, c, s, t) for dL/dz' = grad_out."""
    leaves = [x.detach().requires_grad_() for x in (z, a, b, c, s, t)]
    return torch.autograd.grad(fwd(*leaves, idx), leaves, grad_out)


def _flops(case) -> float:
    return 4.0 * case.n_total * case.d * case.rank  # (N x D)(D x r) and (N x r)(r x D)


class Forward(_harness.OpSpec):
    op = "hypernet_block"
    CPU_LAYERS = {"gptj-fc_out": 2, "llama3-gate_up": 2}

    def cases(self, smoke, device):
        if smoke:
            return [_cases.case(p, primary=p == "tiny") for p in _cases.SMOKE_PRESETS]
        return [_cases.case(p, layers=_cases.layers_on(device, p, self.CPU_LAYERS), primary=p == "smollm2-135m")
                for p in _cases.MODEL_PRESETS]

    def make(self, case, device):
        z = testing.randn(case.n_total, case.d, seed=5, device=device)
        params = testing.hypernet_params(case.d, case.rank, case.layers, seed=6, trained=True, device=device)
        idx = testing.layer_index(case.layers, case.rows, device=device)
        grad_out = testing.randn(case.n_total, case.d, seed=7, device=device, scale=1e-2)
        return SimpleNamespace(case=case, z=z, idx=idx, grad_out=grad_out, reset=lambda: None, **params)

    def args(self, x):
        return x.z, x.a, x.b, x.c, x.s, x.t, x.idx

    def kernel(self, x, backend):
        return ops.hypernet_block(*self.args(x), backend=backend)

    def competent_fn(self, x):
        return block, self.args(x)

    def passthrough(self, x):
        return [x.z]

    def oracle(self, x):
        return [reference.hypernet_block(*_double(self.args(x)))]

    def info(self, case, provider):
        nd = 4 * case.n_total * case.d
        model = {"reference": nd + 5 * 4 * case.rows * case.d + 4 * case.rows * case.rank,  # two (N, D) outputs
                 "competent": 3 * nd + 4 * case.n_total * case.rank,  # p, s[idx], t[idx]; z A
                 "cpp": 4 * case.n_total * case.rank, "triton": 4 * case.n_total * case.rank}  # P = z A only
        # z in, z' out, A and B read once (the reference re-reads them once per layer)
        return {"bytes_moved": 2 * nd + 8 * case.d * case.rank + 16 * case.layers * case.d, "flops": _flops(case),
                "workspace_model_bytes": model.get(provider)}


def _double(args):
    return [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args]


class Backward(Forward):
    op = "hypernet_block_backward"

    def kernel(self, x, backend):
        return ops.hypernet_block_backward(x.grad_out, *self.args(x), backend=backend)

    def competent_fn(self, x):
        return block_backward, (x.grad_out, *self.args(x))

    def passthrough(self, x):
        return [x.grad_out, None, None, None, None, None]  # dL/dz' handed back as dL/dz

    def oracle(self, x):
        return list(reference.hypernet_block_backward(*_double((x.grad_out, *self.args(x)))))

    def info(self, case, provider):
        model = {"reference": 6 * 4 * case.n_total * case.d + 2 * 4 * case.n_total * case.rank}
        return {"bytes_moved": 12 * case.n_total * case.d + 16 * case.d * case.rank + 16 * case.layers * case.d,
                "flops": 3 * _flops(case), "workspace_model_bytes": model.get(provider)}


class Autograd(Forward):
    """What meta-training runs per chunk: the forward under autograd, then its backward."""

    op = "hypernet_block"

    def kernel(self, x, backend):
        return autograd_step(functools.partial(ops.hypernet_block, backend=backend), *self.args(x), x.grad_out)

    def competent_fn(self, x):
        return autograd_step, (block, *self.args(x), x.grad_out)

    def compiled_fn(self, x):
        return autograd_step, (torch.compile(block, dynamic=False), *self.args(x), x.grad_out)

    def passthrough(self, x):
        return [x.grad_out, None, None, None, None, None]

    def oracle(self, x):
        return list(autograd_step(reference.hypernet_block, *_double(self.args(x)), x.grad_out.double()))

    def info(self, case, provider):
        return {"flops": 3 * _flops(case)}


FORWARD, BACKWARD, AUTOGRAD = Forward(), Backward(), Autograd()


@pytest.mark.bench(FORWARD)
def bench_hypernet_block_forward(benchmark, case, provider, device):
    _harness.run_op_bench(benchmark, FORWARD, case, provider, device)


@pytest.mark.bench(BACKWARD)
def bench_hypernet_block_backward(benchmark, case, provider, device):
    _harness.run_op_bench(benchmark, BACKWARD, case, provider, device)


@pytest.mark.bench(AUTOGRAD)
def bench_hypernet_block_autograd(benchmark, case, provider, device):
    _harness.run_op_bench(benchmark, AUTOGRAD, case, provider, device)
