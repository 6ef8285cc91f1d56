"""Grouped in-place weight updates: apply_deltas_ (low rank, W_l += M_l^T K_l) and apply_deltas_dense_ (W_l += S_l^T).

Providers (see benchmarks/_harness.py):
    reference   the published update: a dense fp32 delta K^T M per layer, an fp32 sum, a copy back (16-20 B moved per
                bf16 weight element)
    competent   the same algorithm in plain PyTorch as a strong engineer writes it: one GEMM per layer accumulating
                into W (`W.addmm_(M^T, K)`, no dense delta); bf16/fp16 weights: W.float().addmm_(...) rounded once
                into W (one fp32 temporary per layer, the op's fp32-sum-then-round contract)
    cpp/triton  the fused kernels: W read and written once, the rank-n product formed tile by tile

Cases: every preset's edited group, fp32 and bf16 weights, nn.Linear and GPT-2 Conv1D layouts; on the CPU one layer
of the GPT-J and LLaMA-3 groups (the rest is the same work again). Each timed round starts from the original weights
(untimed restore in `setup`).
"""

from types import SimpleNamespace

import _cases
import _harness
import pytest
import torch

from emsedit_fast import ops
from emsedit_fast import testing


def addmm_update_(weights, coeffs, keys, alpha=None, transposed=False):
    """Competent W_l += alpha_l M_l^T K_l: W (d_out, d_in) gets M^T (d_out, n) @ K (n, d_in) accumulated in place by
    one GEMM (Conv1D W (d_in, d_out): K^T @ M); bf16/fp16 W: the fp32 sum in one temporary, rounded once."""
    for i, (w, m, k) in enumerate(zip(weights, coeffs, keys)):
        a, b = (k.t(), m) if transposed else (m.t(), k)
        scale = 1.0 if alpha is None else float(alpha[i])
        if w.dtype == torch.float32:
            w.addmm_(a, b, alpha=scale)
        else:
            w.copy_(w.float().addmm_(a, b, alpha=scale))


def add_update_(weights, shifts, alpha=None, transposed=False):
    """Competent W_l += alpha_l S_l^T (S (d_in, d_out) fp32): an in-place add for fp32 W; bf16/fp16 W: the fp32
    sum (one temporary, type promotion does the upcast inside the add), rounded once."""
    for i, (w, s) in enumerate(zip(weights, shifts)):
        d = s if transposed else s.t()
        scale = 1.0 if alpha is None else float(alpha[i])
        if w.dtype == torch.float32:
            w.add_(d, alpha=scale)
        else:
            w.copy_(torch.add(w, d, alpha=scale))


def _reset(weights, snapshots):
    for w, s in zip(weights, snapshots):
        w.copy_(s)


class ApplyDeltas(_harness.OpSpec):
    """apply_deltas_ over every layer of a group (alpha = None, as the editor calls it)."""

    op = "apply_deltas_"
    inplace = True
    CPU_LAYERS = {"gptj-fc_out": 1, "llama3-gate_up": 1}

    def cases(self, smoke, device):
        if smoke:
            return _cases.weight_cases([("tiny", False), ("tiny-gpt2", True)], device)
        return _cases.weight_cases([("smollm2-135m", False), ("smollm2-135m", True), ("gpt2-xl", True),
                                    ("gptj-fc_out", False), ("llama3-gate_up", False)], device, self.CPU_LAYERS)

    def make(self, case, device):
        weights = testing.layer_weights(case.layers, case.d_in, case.d_out, seed=1, dtype=case.torch_dtype,
                                        transposed=case.layout_transposed, device=device)
        coeffs, keys = testing.low_rank_factors(case.layers, case.rows, case.d_in, case.d_out, seed=2, device=device)
        snap = _harness.clone_all(weights)
        return SimpleNamespace(case=case, weights=weights, coeffs=coeffs, keys=keys, snap=snap,
                               transposed=case.layout_transposed, reset=lambda: _reset(weights, snap))

    def kernel(self, x, backend):
        ops.apply_deltas_(x.weights, x.coeffs, x.keys, None, x.transposed, backend=backend)

    def competent_fn(self, x):
        return addmm_update_, (x.weights, x.coeffs, x.keys, None, x.transposed)

    def outputs(self, x, result):
        return x.weights

    def oracle(self, x):
        out = []
        for w0, m, k in zip(x.snap, x.coeffs, x.keys):
            delta = k.double().t() @ m.double()
            out.append(w0.double() + (delta if x.transposed else delta.t()))
        return out

    def info(self, case, provider):
        e, low = case.d_in * case.d_out, case.dtype != "fp32"
        model = {"reference": e * (8 + (4 if low else 0)),  # per layer: dense fp32 delta + fp32 sum (+ upcast W)
                 "competent": 4 * e if low else 0,  # the fp32 sum of a bf16/fp16 W; fp32 accumulates in place
                 "competent_compiled": 4 * e if low else 0,
                 "cpp": 64 * 1024 * 4 * torch.get_num_threads(),  # one 64 x 1024 fp32 tile per thread
                 "triton": 0}  # tiles live in registers
        return {"bytes_moved": case.layers * (2 * e * case.torch_dtype.itemsize + 4 * case.rows * (case.d_in
                                                                                                   + case.d_out)),
                "flops": 2.0 * case.layers * case.rows * e, "workspace_model_bytes": model.get(provider),
                "factor_bytes": 4 * case.layers * case.rows * (case.d_in + case.d_out), "dense_delta_bytes": 4 * e}


class ApplyDeltasDense(ApplyDeltas):
    """apply_deltas_dense_: W_l += S_l^T (the primal-form update, S_l (d_in, d_out) fp32)."""

    op = "apply_deltas_dense_"

    def cases(self, smoke, device):
        if smoke:
            return [_cases.case("tiny", dtype=dt, weights=True, primary=dt == "fp32") for dt in ("fp32", "bf16")]
        return _cases.weight_cases([("smollm2-135m", False), ("gpt2-xl", True)], device)

    def make(self, case, device):
        x = super().make(case, device)
        # shifts of the size a real primal solve produces (the scale of M^T K above): changes W by percents
        x.shifts = [testing.randn(case.d_in, case.d_out, seed=30 + i, device=device, scale=1e-2)
                    for i in range(case.layers)]
        return x

    def kernel(self, x, backend):
        ops.apply_deltas_dense_(x.weights, x.shifts, None, x.transposed, backend=backend)

    def competent_fn(self, x):
        return add_update_, (x.weights, x.shifts, None, x.transposed)

    def oracle(self, x):
        return [w0.double() + (s.double() if x.transposed else s.double().t()) for w0, s in zip(x.snap, x.shifts)]

    def info(self, case, provider):
        e, low = case.d_in * case.d_out, case.dtype != "fp32"
        model = {"reference": e * (4 + (4 if low else 0)), "competent": 4 * e if low else 0, "cpp": 0, "triton": 0}
        return {"bytes_moved": case.layers * e * (2 * case.torch_dtype.itemsize + 4),
                "flops": float(case.layers * e), "workspace_model_bytes": model.get(provider)}


APPLY = ApplyDeltas()
DENSE = ApplyDeltasDense()


@pytest.mark.bench(APPLY)
def bench_apply_deltas_grouped(benchmark, case, provider, device):
    _harness.run_op_bench(benchmark, APPLY, case, provider, device)


@pytest.mark.bench(DENSE)
def bench_apply_deltas_dense(benchmark, case, provider, device):
    _harness.run_op_bench(benchmark, DENSE, case, provider, device)
