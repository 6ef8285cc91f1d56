"""Ridge least squares (docs/method.md, "Ridge least squares"): the solve, its backward, and the primal (d_in x d_in)
vs dual (n x n) sweep.

    dual:   M = (K K^T + beta I_n)^-1 V        primal: S = (K^T K + beta I_d_in)^-1 K^T V        dW = M^T K = S^T

Providers (see benchmarks/_harness.py):
    reference   bench_ridge_solve: the published solve, a general LU in the *primal* form whatever n is (so its ratio
                mixes the algorithm, dual vs primal, with the kernels); in the sweep and the backward: LU in the
                form of the point
    competent   the kernels' algorithm in plain PyTorch, in the *same* form: the Gram plus beta I by one batched GEMM,
                torch.linalg.cholesky_ex, torch.cholesky_solve (LU only where a pivot fails, as the kernels do)
    cpp/triton  form="auto" (dual while n < d_in) in bench_ridge_solve, the point's form in the sweep

The kernels and `competent` are gated against the reference in their own form (relative to the solution's scale;
fp64 oracle where the fp32 LU itself is off, the ill-conditioned primal systems). Inputs have the magnitudes the
editor produces: unit-scale keys, value targets of the small-model profile's scale (|coeff| = eta |<u, u~>| ~
eta d_in ~ 0.5), ridge beta = e^lambda near 1.

bench_ridge_form_sweep: one layer, n = 16 .. 8192 rows, d_in 576, 1536, 4096 and 14336; points whose cost model
exceeds the CPU budget are skipped with the estimate, except the target point d_in 4096, d_out 14336, n 256.
"""

from types import SimpleNamespace

import _cases
import _harness
import pytest
import torch

from emsedit_fast import ops
from emsedit_fast import reference
from emsedit_fast import testing
from emsedit_fast.reference.ridge import lu_solve

SWEEP_PRESETS = ("smollm2-135m", "smollm2-135m-down", "llama3-gate_up", "mistral7b-down")
SWEEP_ROWS = (16, 64, 256, 1024, 4096, 8192)
TARGET = ("llama3-gate_up", 256)  # d_in 4096, d_out 14336, n 256: always runs
CPU_FLOP_CAP = 150e9  # sweep points above this many FLOP per call are not run on the CPU
CPU_SOLVE_CAP = 1.5e12  # bench_ridge_solve / the target point


def _system(keys, log_ridge, form):
    """K K^T + beta I (L, n, n) or K^T K + beta I (L, d_in, d_in), by one batched GEMM and a diagonal add."""
    gram = keys @ keys.transpose(1, 2) if form == "dual" else keys.transpose(1, 2) @ keys
    gram.diagonal(dim1=1, dim2=2).add_(log_ridge.exp().unsqueeze(1))
    return gram


def _factor(gram):
    factor, info = torch.linalg.cholesky_ex(gram)
    return None if bool(info.any()) else factor  # not positive definite in fp32: solve by LU instead


def cholesky_ridge(keys, targets, log_ridge, form="auto"):
    """Competent ridge solve in `form`: M (L, n, d_out) for dual, S (L, d_in, d_out) for primal."""
    form = ops.choose_form(keys.shape[1], keys.shape[2], form)
    gram = _system(keys, log_ridge, form)
    rhs = targets if form == "dual" else keys.transpose(1, 2) @ targets
    factor = _factor(gram)
    return lu_solve(gram, rhs) if factor is None else torch.cholesky_solve(rhs, factor)


def cholesky_ridge_backward(grad_solution, keys, solution, log_ridge, form="auto"):
    """Competent backward: dual P = C^-1 dL/dM; primal Y = A^-1 dL/dS, P = K Y; dL/dlog_ridge = -beta <., solution>."""
    form = ops.choose_form(keys.shape[1], keys.shape[2], form)
    gram = _system(keys, log_ridge, form)
    factor = _factor(gram)
    y = lu_solve(gram, grad_solution) if factor is None else torch.cholesky_solve(grad_solution, factor)
    grad_log_ridge = -log_ridge.exp() * torch.linalg.vecdot(y.flatten(1), solution.flatten(1))
    return (y if form == "dual" else keys @ y), grad_log_ridge


def ridge_flops(form: str, n: int, d_in: int, d_out: int, *, lu: bool = False) -> float:
    """Cost model per layer. primal: 2n d_in^2 (Gram) + d_in^3/3 (Cholesky; 2/3 for LU) + 2n d_in d_out (K^T V) +
    2 d_in^2 d_out (two triangular solves); dual: 2n^2 d_in + n^3/3 (2/3) + 2n^2 d_out."""
    if form == "primal":
        return 2.0 * n * d_in ** 2 + (2 if lu else 1) * d_in ** 3 / 3 + 2.0 * n * d_in * d_out + 2.0 * d_in ** 2 * d_out
    return 2.0 * n * n * d_in + (2 if lu else 1) * n ** 3 / 3 + 2.0 * n * n * d_out


def model_crossover(d_in: int, d_out: int) -> int:
    """Smallest n at which the dual cost model reaches the primal one."""
    lo, hi = 1, 1 << 20
    while lo < hi:
        mid = (lo + hi) // 2
        if ridge_flops("dual", mid, d_in, d_out) >= ridge_flops("primal", mid, d_in, d_out):
            hi = mid
        else:
            lo = mid + 1
    return lo


class Solve(_harness.OpSpec):
    op = "ridge_solve"
    CPU_LAYERS = {"gpt2-xl": 1, "gptj-fc_out": 1, "llama3-gate_up": 1}

    def cases(self, smoke, device):
        if smoke:
            return [_cases.case(p, primary=p == "tiny") for p in _cases.SMOKE_PRESETS]
        return [_cases.case(p, layers=_cases.layers_on(device, p, self.CPU_LAYERS), primary=p == "smollm2-135m")
                for p in _cases.MODEL_PRESETS]

    def make(self, case, device):
        keys = testing.randn(case.layers, case.rows, case.d_in, seed=11, device=device)
        targets = testing.randn(case.layers, case.rows, case.d_out, seed=12, device=device, scale=0.5)
        log_ridge = testing.randn(case.layers, seed=13, device=device, scale=0.1)
        return SimpleNamespace(case=case, keys=keys, targets=targets, log_ridge=log_ridge, reset=lambda: None)

    def form(self, case, provider):
        """The form `provider` solves in: the point's form in the sweep; else primal for the published reference and
        choose_form (dual while n < d_in) for everything else, the reference semantics of the gate included."""
        if case.form:
            return case.form
        return "primal" if provider == "reference" else ops.choose_form(case.rows, case.d_in)

    def kernel(self, x, backend):
        return ops.ridge_solve(x.keys, x.targets, x.log_ridge, self.form(x.case, "kernels"), backend=backend)

    def published(self, x):
        return ops.ridge_solve(x.keys, x.targets, x.log_ridge, self.form(x.case, "reference"), backend="reference")

    def published_is_expected(self, case):
        return self.form(case, "reference") == self.form(case, "cpp")

    def competent_fn(self, x):
        return cholesky_ridge, (x.keys, x.targets, x.log_ridge, self.form(x.case, "competent"))

    def passthrough(self, x):
        return [x.targets] if self.form(x.case, "cpp") == "dual" else None

    def oracle(self, x):
        """fp64 through the n x n dual system whatever the form (the primal S = K^T M by the push-through identity):
        an fp64 d_in x d_in solve would cost more than the benchmark."""
        keys, targets, log_ridge = (t.double() for t in (x.keys, x.targets, x.log_ridge))
        m = reference.ridge_solve(keys, targets, log_ridge, "dual")
        return [m if self.form(x.case, "cpp") == "dual" else keys.transpose(1, 2) @ m]

    def cost(self, case, provider) -> float:
        return case.layers * ridge_flops(self.form(case, provider), case.rows, case.d_in, case.d_out,
                                         lu=provider == "reference")

    def skip_reason(self, case, provider, device):
        if device != "cpu" or _harness.SETTINGS.smoke:
            return None
        limit = CPU_SOLVE_CAP if not case.form or (case.preset, case.rows) == TARGET else CPU_FLOP_CAP
        cost = self.cost(case, provider)
        if cost > limit:
            return (f"{self.form(case, provider)} solve costs {cost / 1e9:.0f} GFLOP by the cost model "
                    f"(> {limit / 1e9:.0f} GFLOP CPU budget per call)")
        return None

    def info(self, case, provider):
        form = self.form(case, provider)
        ll, n, d_in, d_out = case.layers, case.rows, case.d_in, case.d_out
        if form == "primal":  # Gram, K^T V and LAPACK's copies of both
            model = 4 * ll * (2 * d_in * d_in + 2 * d_in * d_out)
        elif provider == "reference":
            model = 4 * ll * (2 * n * n + n * d_out)  # Gram + LAPACK copies of Gram and V
        else:
            model = 4 * ll * n * n  # one Cholesky factor
        return {"form": form, "flops": self.cost(case, provider), "workspace_model_bytes": model,
                "bytes_moved": 4 * ll * n * (d_in + 2 * d_out), "auto_form": ops.choose_form(n, d_in),
                "flops_primal": ll * ridge_flops("primal", n, d_in, d_out),
                "flops_dual": ll * ridge_flops("dual", n, d_in, d_out),
                "model_crossover_n": model_crossover(d_in, d_out)}


class Sweep(Solve):
    """ridge_solve in a fixed form, one layer: every provider (the reference LU included) in the point's form."""

    def cases(self, smoke, device):
        if smoke:
            return [_cases.case("tiny", layers=1, rows=n, form=f) for n in (16, 128) for f in ("primal", "dual")]
        return [_cases.case(p, layers=1, rows=n, form=f) for p in SWEEP_PRESETS for n in SWEEP_ROWS
                for f in ("primal", "dual")]


class Backward(Solve):
    """ridge_solve_backward from a dense dL/dW = G (L, d_out, d_in): through dL/dS = G^T in the primal form (the
    published reference), through dL/dM = K G^T in the dual form (kernels and competent; the product is timed)."""

    op = "ridge_solve_backward"

    def cases(self, smoke, device):
        if smoke:
            return [_cases.case(p, primary=p == "tiny") for p in _cases.SMOKE_PRESETS]
        return [_cases.case(p, layers=_cases.layers_on(device, p, self.CPU_LAYERS), primary=p == "smollm2-135m")
                for p in ("smollm2-135m", "llama3-gate_up")]

    def make(self, case, device):
        x = super().make(case, device)
        m = cholesky_ridge(x.keys.double(), x.targets.double(), x.log_ridge.double(), "dual").float()
        x.solution = {"dual": m, "primal": x.keys.transpose(1, 2) @ m}  # S = K^T M (push-through identity)
        x.grad_w = testing.randn(case.layers, case.d_out, case.d_in, seed=14, device=device, scale=1e-2)
        return x

    def _call(self, x, backend, form):
        grad = x.keys @ x.grad_w.transpose(1, 2) if form == "dual" else x.grad_w.transpose(1, 2)
        return ops.ridge_solve_backward(grad, x.keys, x.solution[form], x.log_ridge, form, backend=backend)

    def kernel(self, x, backend):
        return self._call(x, backend, self.form(x.case, "kernels"))

    def published(self, x):
        return self._call(x, "reference", self.form(x.case, "reference"))

    def published_is_expected(self, case):
        return False  # same quantities in both forms, but the fp32 primal solve is the less accurate one

    def competent_fn(self, x):
        return _competent_backward, (x.keys, x.grad_w, x.solution, x.log_ridge, self.form(x.case, "competent"))

    def passthrough(self, x):
        return [x.targets, None]  # V handed back as dL/dV

    def oracle(self, x):
        d = {k: getattr(x, k).double() for k in ("keys", "log_ridge", "grad_w")}
        grad = d["keys"] @ d["grad_w"].transpose(1, 2)
        return list(reference.ridge_solve_backward(grad, d["keys"], x.solution["dual"].double(), d["log_ridge"],
                                                   "dual"))


def _competent_backward(keys, grad_w, solution, log_ridge, form):
    grad = keys @ grad_w.transpose(1, 2) if form == "dual" else grad_w.transpose(1, 2)
    return cholesky_ridge_backward(grad, keys, solution[form], log_ridge, form)


SOLVE, SWEEP, BACKWARD = Solve(), Sweep(), Backward()


@pytest.mark.bench(SOLVE)
def bench_ridge_solve(benchmark, case, provider, device):
    _harness.run_op_bench(benchmark, SOLVE, case, provider, device)


@pytest.mark.bench(BACKWARD)
def bench_ridge_solve_backward(benchmark, case, provider, device):
    _harness.run_op_bench(benchmark, BACKWARD, case, provider, device)


@pytest.mark.bench(SWEEP)
def bench_ridge_form_sweep(benchmark, case, provider, device):
    _harness.run_op_bench(benchmark, SWEEP, case, provider, device)
