"""Public ridge least-squares ops (reference: emsedit_fast.reference.ridge; docs/method.md, "Ridge least squares").

For layer l with keys K (n, d_in), targets V (n, d_out) and beta = exp(log_ridge_l):

    dual:    M = (K K^T + beta I_n)^-1 V          (n, d_out),     dW = M^T K
    primal:  S = (K^T K + beta I_d_in)^-1 K^T V   (d_in, d_out),  dW = S^T

`form="auto"` picks the dual (n x n) system while n < d_in and the primal (d_in x d_in) one otherwise: the system
is then the smaller of the two. Fast backends factor the SPD system with a batched Cholesky and fall back to fp64,
then LU, when a pivot fails; the reference solves with LU as published.
"""

from __future__ import annotations

import torch

from emsedit_fast import _ext
from emsedit_fast import reference
from emsedit_fast.ops import _checks
from emsedit_fast.ops._dispatch import cpp_impl
from emsedit_fast.ops._dispatch import register_autograd_once
from emsedit_fast.ops._dispatch import select
from emsedit_fast.ops._dispatch import triton_impl

FORMS = ("auto", "dual", "primal")


def choose_form(n_rows: int, d_in: int, form: str = "auto") -> str:
    """'dual' when n_rows < d_in, else 'primal' (or `form` itself when it is not 'auto')."""
    if form not in FORMS:
        raise ValueError(f"emsedit_fast.ridge_solve: form must be one of {FORMS}, got {form!r}")
    if form != "auto":
        return form
    return "dual" if n_rows < d_in else "primal"


def _autograd(backward_op):
    def setup_context(ctx, inputs, output):
        keys, targets, log_ridge, form = inputs
        ctx.save_for_backward(keys, output, log_ridge)
        ctx.form = form

    def backward(ctx, grad_solution):
        keys, solution, log_ridge = ctx.saved_tensors
        grad_targets, grad_log_ridge = backward_op(grad_solution.contiguous(), keys, solution, log_ridge, ctx.form)
        return None, grad_targets, grad_log_ridge, None

    return backward, setup_context


if _ext.load_error() is None:
    register_autograd_once("emsedit_fast::ridge_solve", *_autograd(cpp_impl("ridge_solve_backward")))

    # Fake (meta) kernels: shapes and dtypes only, so FakeTensor tracing and torch.compile can see through the C++ ops.
    @torch.library.register_fake("emsedit_fast::ridge_solve")
    def _ridge_solve_fake(keys, targets, log_ridge, form):
        n_layers, n, d_in = keys.shape
        rows = n if form == "dual" else d_in
        return keys.new_empty(n_layers, rows, targets.shape[2])  # M (L, n, d_out) or S (L, d_in, d_out)

    @torch.library.register_fake("emsedit_fast::ridge_solve_backward")
    def _ridge_solve_backward_fake(grad_solution, keys, solution, log_ridge, form):
        n_layers, n, _ = keys.shape
        return keys.new_empty(n_layers, n, solution.shape[2]), log_ridge.new_empty(n_layers)


_FORWARD = {
    "reference": reference.ridge_solve,
    "cpp": cpp_impl("ridge_solve"),
    "triton": triton_impl("ridge", "ridge_solve", autograd=_autograd(triton_impl("ridge", "ridge_solve_backward"))),
}
_BACKWARD = {
    "reference": reference.ridge_solve_backward,
    "cpp": cpp_impl("ridge_solve_backward"),
    "triton": triton_impl("ridge", "ridge_solve_backward"),
}


def check_ridge_solve(keys, targets, log_ridge, form) -> str:
    """The input check of `ridge_solve`; returns the resolved form ('dual' or 'primal')."""
    op = "ridge_solve"
    _check_keys(op, keys, log_ridge)
    _checks.check(targets.dim() == 3 and targets.shape[:2] == keys.shape[:2], op,
                  lambda: f"targets must be (L, n, d_out) with (L, n) = {tuple(keys.shape[:2])}, got "
                          f"{_checks.shape(targets)}")
    _checks.check(targets.dtype == keys.dtype, op,
                  lambda: f"targets must have the keys' dtype {keys.dtype}, got {targets.dtype}")
    _checks.same_device(op, keys=keys, targets=targets, log_ridge=log_ridge)
    return choose_form(keys.shape[1], keys.shape[2], form)


def check_ridge_solve_backward(grad_solution, keys, solution, log_ridge, form) -> str:
    """The input check of `ridge_solve_backward`; returns the resolved form."""
    op = "ridge_solve_backward"
    _check_keys(op, keys, log_ridge)
    form = choose_form(keys.shape[1], keys.shape[2], form)
    n_layers, n, d_in = keys.shape
    rows = n if form == "dual" else d_in
    _checks.check(solution.dim() == 3 and solution.shape[:2] == (n_layers, rows), op,
                  lambda: f"solution must be ({n_layers}, {rows}, d_out) for the {form} form, got "
                          f"{_checks.shape(solution)}")
    _checks.check(grad_solution.shape == solution.shape, op,
                  lambda: f"grad_solution must match solution ({_checks.shape(solution)}), got "
                          f"{_checks.shape(grad_solution)}")
    _checks.dtype(op, (keys.dtype,), solution=solution, grad_solution=grad_solution)
    _checks.same_device(op, grad_solution=grad_solution, keys=keys, solution=solution, log_ridge=log_ridge)
    return form


def _check_keys(op, keys, log_ridge):
    _checks.check(keys.dim() == 3, op, lambda: f"keys must be (layers, n, d_in), got {_checks.shape(keys)}")
    _checks.check(log_ridge.shape == (keys.shape[0],), op,
                  lambda: f"log_ridge must be ({keys.shape[0]},), got ({_checks.shape(log_ridge)})")
    _checks.dtype(op, (torch.float32, torch.float64), keys=keys, log_ridge=log_ridge)


def ridge_solve(keys: torch.Tensor, targets: torch.Tensor, log_ridge: torch.Tensor, form: str = "auto", *,
                backend: str | None = None) -> torch.Tensor:
    """Ridge solve for every layer: dual M = (K K^T + e^lr I)^-1 V, or primal S = (K^T K + e^lr I)^-1 K^T V.

    keys: (L, n, d_in), targets: (L, n, d_out), log_ridge: (L,); fp32 (fp64 accepted). Returns M (L, n, d_out) for
    the dual form, S (L, d_in, d_out) for the primal; dW_l = M_l^T K_l = S_l^T. Differentiable in targets and
    log_ridge (keys are constants). Reference: emsedit_fast.reference.ridge_solve.
    """
    form = check_ridge_solve(keys, targets, log_ridge, form)
    _, fn = select("ridge_solve", _FORWARD, (keys, targets), backend)
    return fn(keys.contiguous(), targets.contiguous(), log_ridge.contiguous(), form)


def ridge_solve_backward(grad_solution: torch.Tensor, keys: torch.Tensor, solution: torch.Tensor,
                         log_ridge: torch.Tensor, form: str = "auto", *,
                         backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dtargets (L, n, d_out), dL/dlog_ridge (L,)) from dL/dsolution; keys are constants.

    dual:    P = C^-1 dL/dM,                   dL/dlog_ridge = -beta <P, M>      (C = K K^T + beta I)
    primal:  Y = A^-1 dL/dS,  P = K Y,         dL/dlog_ridge = -beta <Y, S>      (A = K^T K + beta I)

    and dL/dtargets = P. From G = dL/dW: dL/dM = K G^T (dual), dL/dS = G^T (primal).
    Reference: emsedit_fast.reference.ridge_solve_backward.
    """
    form = check_ridge_solve_backward(grad_solution, keys, solution, log_ridge, form)
    _, fn = select("ridge_solve_backward", _BACKWARD, (keys, solution), backend)
    return fn(grad_solution.contiguous(), keys.contiguous(), solution.contiguous(), log_ridge.contiguous(), form)
