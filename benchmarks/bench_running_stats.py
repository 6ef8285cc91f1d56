"""Running normaliser: running_stats_update_ (merge N = L n rows [U | Delta] into count, mean, var, std) and
running_stats_normalize (Z = ([U | Delta] - mean) / (std + eps)); docs/method.md, "Running normaliser".

Providers (see benchmarks/_harness.py):
    reference   the published oracle: the rows concatenated and merged in fp64 (Chan, Golub and LeVeque)
    competent   the same parallel merge in plain PyTorch without the concatenation: `torch.var_mean` of the keys and
                of the value-grads (ATen accumulates fp32 in fp64 on the CPU), merged into their column slices;
                normalize: one concatenation, then in-place subtract and divide
    cpp/triton  one pass over the rows, keys and value-grads read where they lie

Cases: the rows of one step of each preset's group (L n rows of D = d_in + d_out), merged into a state that has
already seen 128 rows, so every statistic moves.
"""

from types import SimpleNamespace

import _cases
import _harness
import pytest
import torch

from emsedit_fast import ops
from emsedit_fast import testing
from emsedit_fast.reference.running_stats import EPS


def stats_update_(count, mean, var, std, keys, value_grads):
    """Competent merge of the rows [keys | value_grads] (m rows) into the state, column block by column block:
    d = xbar - mu; mu += d m / N'; M2 = v N + v_b m + d^2 N m / N'; v = M2 / N'; sigma = sqrt(M2 / (N' - 1))."""
    m = keys.shape[0]
    n_old = float(count.item())
    n_new = n_old + m
    d_in = keys.shape[1]
    for cols, x in ((slice(0, d_in), keys), (slice(d_in, None), value_grads)):
        v_b, xbar = torch.var_mean(x.float(), dim=0, correction=0)
        d = xbar - mean[cols]
        m2 = var[cols] * n_old + v_b * m + d * d * (n_old * m / n_new)
        mean[cols] += d * (m / n_new)
        torch.div(m2, max(n_new, 1.0), out=var[cols])
        torch.sqrt(m2 / (n_new - 1.0 + 1e-8), out=std[cols])
    count.fill_(n_new)


def normalize(keys, value_grads, mean, std, eps=EPS):
    """Competent Z = ([keys | value_grads] - mean) / (std + eps): one (m, D) allocation, the rest in place."""
    return torch.cat([keys.float(), value_grads.float()], dim=1).sub_(mean).div_(std + eps)


def _rows(case, device):
    return testing.edit_rows(case.n_total, case.d_in, case.d_out, seed=3, device=device)


class StatsUpdate(_harness.OpSpec):
    op = "running_stats_update_"
    inplace = True

    def cases(self, smoke, device):
        presets = _cases.SMOKE_PRESETS if smoke else _cases.MODEL_PRESETS
        return [_cases.case(p, primary=p in ("smollm2-135m", "tiny")) for p in presets]

    def make(self, case, device):
        keys, grads = _rows(case, device)
        state = testing.running_stats_state(case.d, seed=4, device=device)
        snap = {k: v.clone() for k, v in state.items()}

        def reset():
            for k in state:
                state[k].copy_(snap[k])

        return SimpleNamespace(case=case, keys=keys, grads=grads, state=state, reset=reset)

    def _args(self, x):
        s = x.state
        return s["count"], s["mean"], s["var"], s["std"], x.keys, x.grads

    def kernel(self, x, backend):
        ops.running_stats_update_(*self._args(x), backend=backend)

    def competent_fn(self, x):
        return stats_update_, self._args(x)

    def outputs(self, x, result):
        return [x.state[k] for k in ("count", "mean", "var", "std")]

    def info(self, case, provider):
        model = {"reference": 3 * 8 * case.n_total * case.d}  # fp64 [U | Delta], X - xbar and its square
        return {"bytes_moved": 4 * case.n_total * case.d + 2 * 3 * 4 * case.d, "flops": 4.0 * case.n_total * case.d,
                "workspace_model_bytes": model.get(provider)}


class StatsNormalize(StatsUpdate):
    op = "running_stats_normalize"
    inplace = False

    def make(self, case, device):
        keys, grads = _rows(case, device)
        state = testing.running_stats_state(case.d, seed=4, device=device)
        return SimpleNamespace(case=case, keys=keys, grads=grads, mean=state["mean"], std=state["std"],
                               reset=lambda: None)

    def kernel(self, x, backend):
        return ops.running_stats_normalize(x.keys, x.grads, x.mean, x.std, backend=backend)

    def competent_fn(self, x):
        return normalize, (x.keys, x.grads, x.mean, x.std)

    def outputs(self, x, result):
        return [result]

    def passthrough(self, x):
        return [torch.cat([x.keys, x.grads], dim=1)]  # the raw rows, not normalised

    def info(self, case, provider):
        model = {"reference": 2 * 4 * case.n_total * case.d, "competent": 0, "cpp": 0, "triton": 0}
        return {"bytes_moved": 8 * case.n_total * case.d, "flops": 2.0 * case.n_total * case.d,
                "workspace_model_bytes": model.get(provider)}


UPDATE = StatsUpdate()
NORMALIZE = StatsNormalize()


@pytest.mark.bench(UPDATE)
def bench_running_stats_update(benchmark, case, provider, device):
    _harness.run_op_bench(benchmark, UPDATE, case, provider, device)


@pytest.mark.bench(NORMALIZE)
def bench_running_stats_normalize(benchmark, case, provider, device):
    _harness.run_op_bench(benchmark, NORMALIZE, case, provider, device)
