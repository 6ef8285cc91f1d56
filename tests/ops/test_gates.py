"""The correctness checks reject wrong kernels, at the magnitudes the editors really see.

For every op, on inputs drawn like real ones (emsedit_fast.testing factories: value-gradients ~1e-3, eta ~1e-6,
ridge targets ~1e-3 so solutions are ~1e-6, weights ~0.02), the check the op tests use
(`assert_close_to_reference`, loosest tier 'reduction'; one ulp for bf16 weights; bit equality for restores) must
    - accept the C++ kernel's result (the tolerance is not too tight for a correct kernel), and
    - reject a kernel that returns zeros, and one that hands an input back unchanged (or skips the op's last step).
An absolute tolerance would accept zeros here: most of these outputs are far below 1e-4.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field

import pytest
import torch

from emsedit_fast import ops
from emsedit_fast import reference
from emsedit_fast import testing
from emsedit_fast.testing import assert_close_to_reference
from emsedit_fast.testing import assert_ulp_close

N_LAYERS, ROWS, D_IN, D_OUT, RANK = 2, 24, 96, 160, 32
D = D_IN + D_OUT


@dataclass
class Case:
    expected: list[torch.Tensor]
    correct: object  # () -> list of tensors: the C++ backend's result
    wrong: dict[str, list[torch.Tensor]]
    before: list[torch.Tensor | None] = field(default_factory=list)  # in-place ops: the inputs
    exact: bool = False


def _rows():
    keys, grads = testing.edit_rows(N_LAYERS * ROWS, D_IN, D_OUT, seed=1)
    return keys, grads, testing.layer_index(N_LAYERS, ROWS)


def _normalized():
    keys, grads, idx = _rows()
    st = testing.running_stats_state(D, seed=2)
    return reference.running_stats_normalize(keys, grads, st["mean"], st["std"]), idx


def _case_running_stats_normalize():
    keys, grads, _ = _rows()
    st = testing.running_stats_state(D, seed=2)
    exp = reference.running_stats_normalize(keys, grads, st["mean"], st["std"])
    return Case([exp], lambda: [ops.running_stats_normalize(keys, grads, st["mean"], st["std"], backend="cpp")],
                {"zeros": [torch.zeros_like(exp)], "input unchanged": [torch.cat([keys, grads], 1)]})


def _case_running_stats_update_():
    keys, grads, _ = _rows()
    st = testing.running_stats_state(D, seed=2)
    state = [st[k] for k in ("count", "mean", "var", "std")]
    exp = [x.clone() for x in state]
    reference.running_stats_update_(*exp, keys, grads)

    def correct():
        got = [x.clone() for x in state]
        ops.running_stats_update_(*got, keys, grads, backend="cpp")
        return got[1:]

    return Case(exp[1:], correct, {"zeros": [torch.zeros_like(x) for x in exp[1:]], "input unchanged": state[1:]},
                before=state[1:])


def _hypernet_inputs():
    z, idx = _normalized()
    p = testing.hypernet_params(D, RANK, N_LAYERS, seed=3)
    return z, idx, [p[k] for k in ("a", "b", "c", "s", "t")]


def _case_hypernet_block():
    z, idx, params = _hypernet_inputs()
    exp = reference.hypernet_block(z, *params, idx)
    return Case([exp], lambda: [ops.hypernet_block(z, *params, idx, backend="cpp")],
                {"zeros": [torch.zeros_like(exp)], "input unchanged": [z]})


def _case_hypernet_block_backward():
    z, idx, params = _hypernet_inputs()
    gamma = testing.randn(*z.shape, seed=4, scale=1e-3)
    exp = list(reference.hypernet_block_backward(gamma, z, *params, idx))
    skipped = [gamma] + [torch.zeros_like(x) for x in exp[1:]]  # grad_z = gamma: the low-rank path dropped
    return Case(exp, lambda: list(ops.hypernet_block_backward(gamma, z, *params, idx, backend="cpp")),
                {"zeros": [torch.zeros_like(x) for x in exp], "grad_z = gamma": skipped})


def _value_inputs():
    keys, _, idx = _rows()
    z, _ = _normalized()
    eta = torch.full((N_LAYERS,), 1e-6)  # the hypernetwork's initial step size
    return keys, z, eta, idx


def _case_value_targets():
    keys, z, eta, idx = _value_inputs()
    exp = list(reference.value_targets(keys, z, eta, idx))
    return Case(exp, lambda: list(ops.value_targets(keys, z, eta, idx, backend="cpp")),
                {"zeros": [torch.zeros_like(x) for x in exp],
                 "pseudo-grads unscaled": [z[:, D_IN:], -eta[idx] * torch.ones(len(idx))]})


def _case_value_targets_backward():
    keys, z, eta, idx = _value_inputs()
    grad_t = testing.randn(len(idx), D_OUT, seed=5, scale=1e-3)
    exp = list(reference.value_targets_backward(grad_t, None, keys, z, eta, idx))
    return Case(exp, lambda: list(ops.value_targets_backward(grad_t, None, keys, z, eta, idx, backend="cpp")),
                {"zeros": [torch.zeros_like(x) for x in exp],
                 "input unchanged": [torch.cat([torch.zeros(len(idx), D_IN), grad_t], 1), torch.zeros(N_LAYERS)]})


def _case_ridge_solve():
    keys, targets, log_ridge = testing.ridge_problem(N_LAYERS, ROWS, D_IN, D_OUT, seed=6)
    exp = reference.ridge_solve(keys, targets, log_ridge, "dual")  # (L, n, d_out), entries ~1e-5
    return Case([exp], lambda: [ops.ridge_solve(keys, targets, log_ridge, "dual", backend="cpp")],
                {"zeros": [torch.zeros_like(exp)], "input unchanged": [targets]})


def _case_ridge_solve_backward():
    keys, targets, log_ridge = testing.ridge_problem(N_LAYERS, ROWS, D_IN, D_OUT, seed=6)
    sol = reference.ridge_solve(keys, targets, log_ridge, "dual")
    grad = testing.randn(*sol.shape, seed=7, scale=1e-3)
    exp = list(reference.ridge_solve_backward(grad, keys, sol, log_ridge, "dual"))
    return Case(exp, lambda: list(ops.ridge_solve_backward(grad, keys, sol, log_ridge, "dual", backend="cpp")),
                {"zeros": [torch.zeros_like(x) for x in exp], "input unchanged": [grad, torch.zeros(N_LAYERS)]})


def _weights(dtype):
    return testing.layer_weights(N_LAYERS, D_IN, D_OUT, seed=8, dtype=dtype)


def _case_apply_deltas_(dtype=torch.float32):
    weights = _weights(dtype)
    coeffs, keys = testing.low_rank_factors(N_LAYERS, ROWS, D_IN, D_OUT, seed=9)
    exp = [w.clone() for w in weights]
    reference.apply_deltas_(exp, coeffs, keys)

    def correct():
        got = [w.clone() for w in weights]
        ops.apply_deltas_(got, coeffs, keys, backend="cpp")
        return got

    return Case(exp, correct, {"zeros": [torch.zeros_like(w) for w in weights], "input unchanged": weights},
                before=weights)


def _case_apply_deltas_dense_():
    weights = _weights(torch.float32)
    shifts = [testing.randn(D_IN, D_OUT, seed=10 + i, scale=1e-4) for i in range(N_LAYERS)]
    exp = [w.clone() for w in weights]
    reference.apply_deltas_dense_(exp, shifts)

    def correct():
        got = [w.clone() for w in weights]
        ops.apply_deltas_dense_(got, shifts, backend="cpp")
        return got

    return Case(exp, correct, {"zeros": [torch.zeros_like(w) for w in weights], "input unchanged": weights},
                before=weights)


def _case_restore_():
    snaps = _weights(torch.bfloat16)
    edited = [w.clone() for w in snaps]
    coeffs, keys = testing.low_rank_factors(N_LAYERS, ROWS, D_IN, D_OUT, seed=9)
    reference.apply_deltas_(edited, coeffs, keys)

    def correct():
        got = [w.clone() for w in edited]
        ops.restore_(got, snaps, backend="cpp")
        return got

    return Case(snaps, correct, {"zeros": [torch.zeros_like(w) for w in snaps], "input unchanged": edited},
                exact=True)


CASES = {
    "running_stats_normalize": _case_running_stats_normalize,
    "running_stats_update_": _case_running_stats_update_,
    "hypernet_block": _case_hypernet_block,
    "hypernet_block_backward": _case_hypernet_block_backward,
    "value_targets": _case_value_targets,
    "value_targets_backward": _case_value_targets_backward,
    "ridge_solve": _case_ridge_solve,
    "ridge_solve_backward": _case_ridge_solve_backward,
    "apply_deltas_": _case_apply_deltas_,
    "apply_deltas_dense_": _case_apply_deltas_dense_,
    "restore_": _case_restore_,
}


def _check(got, case, label):
    for i, (g, e) in enumerate(zip(got, case.expected)):
        if case.exact:
            assert torch.equal(g, e), f"[{label}-{i}] not bit-exact"
        else:
            before = case.before[i] if case.before else None
            assert_close_to_reference(g, e, kind="reduction", label=f"{label}-{i}", before=before)


def test_every_op_has_a_gate_case():
    assert set(CASES) == {op for names in ops.OPS_BY_STEM.values() for op in names}


@pytest.mark.parametrize("op", list(CASES))
def test_gate_rejects_wrong_kernels(op):
    case = CASES[op]()
    for name, wrong in case.wrong.items():
        with pytest.raises(AssertionError):
            _check(wrong, case, f"{op}-{name}")


@pytest.mark.parametrize("op", list(CASES))
def test_gate_accepts_the_cpp_kernel(op):
    testing.require_backend("cpp", "cpu")
    case = CASES[op]()
    _check(case.correct(), case, op)


def test_gate_rejects_unchanged_bf16_weights():
    """bf16 weights are checked to one ulp: an edit of realistic size moves many elements by more than that."""
    case = _case_apply_deltas_(torch.bfloat16)
    for w, e in zip(case.wrong["input unchanged"], case.expected):
        with pytest.raises(AssertionError):
            assert_ulp_close(w, e, ulps=1, label="bf16 unchanged")


def test_absolute_tolerance_would_accept_zeros():
    """Why the tolerance scales: for the ridge solution an absolute 1e-4 cannot tell zeros from the answer."""
    case = _case_ridge_solve()
    assert torch.allclose(torch.zeros_like(case.expected[0]), case.expected[0], rtol=1e-5, atol=1e-4)
