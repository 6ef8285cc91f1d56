"""Ridge least squares from value targets to one weight shift per layer (docs/method.md, "Ridge least squares"
and "Meta-gradient").

For layer l with keys U (n x d_in), targets V (n x d_out) and ridge beta = exp(log_ridge):

    primal:  S = (U^T U + beta I_{d_in})^-1 U^T V          (d_in x d_out),  dW = S^T
    dual:    M = (U U^T + beta I_n)^-1 V                    (n x d_out),     dW = M^T U  (rank <= n)

The two are equal by the push-through identity, S = U^T M. The dual never forms a d_in x d_in matrix and is the cheap
form while n < d_in; the primal is cheaper for very large batches (n >= d_in).

Backward, given the gradient of the loss with respect to the solution (dL/dM = U G^T in the dual, dL/dS = G^T in the
primal, G = dL/dW in linear orientation):

    dual:    P = dL/dV = C^-1 dL/dM,              dL/dlog_ridge = -beta <P, M>
    primal:  Y = A^-1 dL/dS;  P = dL/dV = U Y,    dL/dlog_ridge = -beta <Y, S>

Keys are constants (the first-order truncation of the method): no gradient flows into them.
The reference solves with a general LU (`torch.linalg.solve`), as the published code does, one layer at a time
(`lu_solve`).
"""

import torch


def lu_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A^-1 B for A (L, m, m), B (L, m, k) by general LU, one layer at a time (torch.linalg.solve per matrix).

    Why not one batched call: the batched CPU LU of torch 2.13 returns invalid pivots with more than one thread at
    these sizes (measured with 2 threads on 12 SPD systems of 576 x 576: every batched solve failed with "Pivots given
    to lu_solve must all be greater or equal to 1", every per-matrix solve succeeded). One matrix per call is what
    the published code does anyway, and the matrices are large enough that the LU itself uses every thread."""
    if a.shape[0] == 0:
        return torch.linalg.solve(a, b)  # (0, m, k): nothing to stack
    return torch.stack([torch.linalg.solve(a[i], b[i]) for i in range(a.shape[0])])


def _gram_dual(keys, log_ridge):
    n = keys.shape[1]
    eye = torch.eye(n, dtype=keys.dtype, device=keys.device)
    return keys @ keys.transpose(1, 2) + torch.exp(log_ridge)[:, None, None] * eye  # (L, n, n)


def _gram_primal(keys, log_ridge):
    d_in = keys.shape[2]
    eye = torch.eye(d_in, dtype=keys.dtype, device=keys.device)
    return keys.transpose(1, 2) @ keys + torch.exp(log_ridge)[:, None, None] * eye  # (L, d_in, d_in)


def ridge_solve(
    keys: torch.Tensor,
    targets: torch.Tensor,
    log_ridge: torch.Tensor,
    form: str = "primal",
) -> torch.Tensor:
    """Solve the ridge problem of every layer.

    keys: (L, n, d_in) fp32. targets: (L, n, d_out) fp32. log_ridge: (L,) fp32.
    form "dual" returns M: (L, n, d_out); form "primal" returns S: (L, d_in, d_out). New tensors, fp32.
    Differentiable in targets and log_ridge through PyTorch autograd.
    """
    if form == "dual":
        return lu_solve(_gram_dual(keys, log_ridge), targets)
    if form == "primal":
        return lu_solve(_gram_primal(keys, log_ridge), keys.transpose(1, 2) @ targets)
    raise ValueError(f"ridge_solve: form must be 'dual' or 'primal', got {form!r}")


def ridge_solve_backward(
    grad_solution: torch.Tensor,
    keys: torch.Tensor,
    solution: torch.Tensor,
    log_ridge: torch.Tensor,
    form: str = "primal",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (grad_targets (L, n, d_out), grad_log_ridge (L,)) from dL/dsolution.

    grad_solution and solution have the shape `ridge_solve` returned for `form`.
    """
    beta = torch.exp(log_ridge)
    if form == "dual":
        p = lu_solve(_gram_dual(keys, log_ridge), grad_solution)  # (L, n, d_out)
        return p, -beta * (p * solution).sum((1, 2))
    if form == "primal":
        y = lu_solve(_gram_primal(keys, log_ridge), grad_solution)  # (L, d_in, d_out)
        return keys @ y, -beta * (y * solution).sum((1, 2))
    raise ValueError(f"ridge_solve_backward: form must be 'dual' or 'primal', got {form!r}")
