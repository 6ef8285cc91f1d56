"""Triton kernels around the batched ridge solve (reference: emsedit_fast/reference/ridge.py;
docs/method.md, "Ridge least squares", "Meta-gradient" and "Fused operations").

    dual:    C_l = K_l K_l^T + beta_l I_n       (n x n),      M_l = C_l^-1 V_l
    primal:  A_l = K_l^T K_l + beta_l I_d_in    (d_in x d_in), S_l = A_l^-1 (K_l^T V_l)       beta_l = exp(log_ridge_l)

One batched kernel, `_ridge_solve_gram_kernel`, forms every product around the solver: out_l = X_l Y_l (+ beta_l I),
with X and Y addressed through strides, so K K^T, K^T K (K loop over the rows n: the primal Gram is accumulated over
row chunks and never needs K^T materialised), the primal right-hand side K^T V and the primal backward's K Y are the
same kernel, with no transposed copies. Symmetric Gram matrices compute only the lower tile triangle and mirror it.

The factorisation stays a library call (we fuse around the solver, not through it): batched
`torch.linalg.cholesky_ex` + `torch.cholesky_solve`. Layers whose factorisation fails (info > 0) or whose solution is
not finite are retried in fp64, then by LU, then (exactly singular) by minimum-norm least squares; each event is
logged. Keys may be fp32 or fp64; products accumulate in the keys' dtype with IEEE dots (never TF32: the solve stays
fp32: TF32 products, with a 10-bit mantissa, would leave the Gram matrix only about three correct digits).

Backward (keys are constants):
    dual:    P = C^-1 dL/dM,                     dL/dlog_ridge = -beta <P, M>
    primal:  Y = A^-1 dL/dS,  P = K Y (kernel),  dL/dlog_ridge = -beta <Y, S>
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl
from torch.library import triton_op
from torch.library import wrap_triton

from . import _common

log = logging.getLogger(__name__)


@triton.jit
def _ridge_solve_gram_kernel(
    x_ptr,  # (L, I, K) left operand through strides: K (dual Gram, primal backward) or K^T (primal Gram, rhs)
    y_ptr,  # (L, K, J) right operand through strides: K^T (dual Gram), K (primal Gram), V (rhs), Y (backward)
    ridge_ptr,  # (L,) beta = exp(log_ridge) in out's dtype, computed by torch as in the reference (ADD_RIDGE)
    out_ptr,  # (L, I, J) out, dtype of x
    i_dim,
    j_dim,
    k_dim,
    sizes_bucket,  # the autotune key: next powers of two of (i, j, k) packed as 3 x 8 bits of their log2 (the row
    # count n is one of the three and changes with every edit batch; one tuning per bucket, not per batch size)
    stride_xl,
    stride_xi,
    stride_xk,
    stride_yl,
    stride_yk,
    stride_yj,
    stride_ol,
    stride_oi,
    stride_oj,
    ADD_RIDGE: tl.constexpr,  # add beta_l on the diagonal
    SYMMETRIC: tl.constexpr,  # out is symmetric (Y = X^T): compute lower tiles only, store each tile twice
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    layer = tl.program_id(2).to(tl.int64)  # int64: layer * stride_xl can pass 2^31 elements
    if SYMMETRIC and pid_j > pid_i:  # the mirror image of tile (j, i), which that program stores
        return
    ii = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    jj = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    i_ok = ii < i_dim
    j_ok = jj < j_dim
    x_base = x_ptr + layer * stride_xl
    y_base = y_ptr + layer * stride_yl
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=x_ptr.dtype.element_ty)
    for k0 in range(0, k_dim, BLOCK_K):  # fixed order over the reduction: deterministic
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < k_dim
        x = tl.load(x_base + ii[:, None] * stride_xi + kk[None, :] * stride_xk, mask=i_ok[:, None] & k_ok[None, :],
                    other=0.0)
        y = tl.load(y_base + kk[:, None] * stride_yk + jj[None, :] * stride_yj, mask=k_ok[:, None] & j_ok[None, :],
                    other=0.0)
        # out_dtype spelled out: fp64 operands (the fallback's Gram) accumulate in fp64; triton <= 3.6 defaults the
        # dot's output to fp32 whatever acc is, and rejects the fp64 accumulator
        acc = tl.dot(x, y, acc, input_precision="ieee", out_dtype=x_ptr.dtype.element_ty)
    if ADD_RIDGE:
        beta = tl.load(ridge_ptr + layer)
        acc = tl.where(ii[:, None] == jj[None, :], acc + beta, acc)
    out_base = out_ptr + layer * stride_ol
    mask = i_ok[:, None] & j_ok[None, :]
    tl.store(out_base + ii[:, None] * stride_oi + jj[None, :] * stride_oj, acc, mask=mask)
    if SYMMETRIC and pid_j < pid_i:
        tl.store(out_base + jj[None, :] * stride_oi + ii[:, None] * stride_oj, acc, mask=mask)


_GRAM = _common.autotuned(
    _ridge_solve_gram_kernel,
    configs=[_common.config(BLOCK_I=64, BLOCK_J=64, BLOCK_K=32, num_warps=4, num_stages=3),
             _common.config(BLOCK_I=128, BLOCK_J=128, BLOCK_K=32, num_warps=8, num_stages=3),
             _common.config(BLOCK_I=32, BLOCK_J=32, BLOCK_K=64, num_warps=4, num_stages=3)],
    key=["sizes_bucket"],
    interpret=dict(BLOCK_I=_common.INTERPRET_BLOCK, BLOCK_J=_common.INTERPRET_BLOCK, BLOCK_K=_common.INTERPRET_BLOCK),
)


def _sizes_bucket(*dims: int) -> int:
    code = 0
    for d in dims:
        code = (code << 8) | _common.bucket(d).bit_length()
    return code


def _product(x, x_strides, y, y_strides, i_dim, j_dim, k_dim, log_ridge=None, symmetric=False):
    """out (L, i_dim, j_dim) = X Y (+ exp(log_ridge) I); X, Y given as (base tensor, (layer, row, col) strides)."""
    # beta as the reference forms it: torch.exp in log_ridge's dtype, then promoted to the keys' dtype.
    ridge = torch.exp(log_ridge).to(x.dtype) if log_ridge is not None else None
    n_layers = x.shape[0]
    out = torch.empty((n_layers, i_dim, j_dim), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if k_dim == 0:  # an empty product: just the ridge
        out.zero_()
        if log_ridge is not None:
            out.diagonal(dim1=1, dim2=2).add_(ridge[:, None])
        return out
    if symmetric:
        # Mirrored tiles must be square and aligned: one block size for both dimensions (CUDA configs are square).
        assert i_dim == j_dim
    meta = _GRAM.launch_meta(BLOCK_I=max(i_dim, j_dim) if symmetric else i_dim,
                             BLOCK_J=max(i_dim, j_dim) if symmetric else j_dim, BLOCK_K=k_dim)
    wrap_triton(_GRAM.kernel)[lambda m: (triton.cdiv(i_dim, m["BLOCK_I"]), triton.cdiv(j_dim, m["BLOCK_J"]),
                                         n_layers)](
        x, y, ridge if ridge is not None else x, out, i_dim, j_dim, k_dim, _sizes_bucket(i_dim, j_dim, k_dim),
        *x_strides, *y_strides,
        *out.stride(), ADD_RIDGE=log_ridge is not None, SYMMETRIC=symmetric, **meta)
    return out


def _gram(keys, log_ridge, form):
    """Dual K K^T + beta I (L, n, n) or primal K^T K + beta I (L, d_in, d_in), symmetric, from K in place."""
    _, n, d_in = keys.shape
    sl, sn, sd = keys.stride()
    if form == "dual":  # X = K (i: n, k: d_in), Y = K^T (k: d_in, j: n)
        return _product(keys, (sl, sn, sd), keys, (sl, sd, sn), n, n, d_in, log_ridge, symmetric=True)
    # X = K^T (i: d_in, k: n), Y = K (k: n, j: d_in): the K loop runs over row chunks of K
    return _product(keys, (sl, sd, sn), keys, (sl, sn, sd), d_in, d_in, n, log_ridge, symmetric=True)


def _spd_solve(gram, rhs, op, gram64_of):
    """gram^-1 rhs for a batch of SPD matrices (L, m, m), rhs (L, m, k); returns rhs's dtype.

    A layer needs a fallback when its Cholesky fails (info > 0: a non-positive pivot) or when a tiny positive pivot
    blew its solution up (not finite). Such layers are redone in fp64 with their matrix rebuilt from fp64 keys by
    gram64_of(layers) (the retry must not inherit the rounding of the fp32 products, usually what made the matrix
    indefinite); then by LU; and a matrix that LU finds exactly singular gets the minimum-norm least-squares solution
    (gelsd). The fp64 ladder runs on the CPU. Each fallback is logged, naming the layers: the same ladder as the C++
    backend (csrc/include/emsedit_fast/ridge_impl.h).
    """
    chol, info = torch.linalg.cholesky_ex(gram)
    sol = torch.cholesky_solve(rhs, chol)
    if _common.is_tracing(gram):
        return sol  # no host sync while tracing: the fallbacks below are eager-only
    bad = ((info > 0) | ~torch.isfinite(sol).flatten(1).all(1)).nonzero().flatten()
    if bad.numel() == 0:
        return sol
    # The ladder runs on the CPU (as in the C++ backend): it exists for (nearly) singular matrices, the inputs on
    # which GPU LU drivers are least dependable, gelsd exists only there, and the path is rare.
    gram64 = gram64_of(bad).cpu()  # (B, m, m) fp64
    layers = bad.cpu()
    rhs64 = rhs.index_select(0, bad).double().cpu()
    sol64 = torch.full_like(rhs64, float("nan"))
    todo = torch.ones(bad.numel(), dtype=torch.bool)
    if gram.dtype != torch.float64:
        log.warning("emsedit_fast.triton_%s: Cholesky failed in fp32 for layers %s; retrying in fp64", op,
                    layers.tolist())
        chol64, info64 = torch.linalg.cholesky_ex(gram64)
        sol64 = torch.cholesky_solve(rhs64, chol64)
        todo = (info64 > 0) | ~torch.isfinite(sol64).flatten(1).all(1)
    if todo.any():
        log.warning("emsedit_fast.triton_%s: Cholesky failed in fp64 for layers %s; falling back to LU", op,
                    layers[todo].tolist())
        lu_sol, lu_info = torch.linalg.solve_ex(gram64[todo], rhs64[todo])
        sol64[todo] = lu_sol
        singular = torch.zeros_like(todo)
        singular[todo] = (lu_info > 0) | ~torch.isfinite(lu_sol).flatten(1).all(1)
        if singular.any():
            log.warning("emsedit_fast.triton_%s: layers %s are numerically singular; using the minimum-norm "
                        "least-squares solution", op, layers[singular].tolist())
            sol64[singular] = torch.linalg.lstsq(gram64[singular], rhs64[singular], driver="gelsd").solution
    sol[bad] = sol64.to(device=sol.device, dtype=sol.dtype)
    return sol


def _gram64_of(keys, log_ridge, form):
    def build(layers):
        return _gram(keys.index_select(0, layers).double(), log_ridge.index_select(0, layers).double(), form)

    return build


@triton_op("emsedit_fast::triton_ridge_solve", mutates_args={})
def ridge_solve(keys: torch.Tensor, targets: torch.Tensor, log_ridge: torch.Tensor, form: str) -> torch.Tensor:
    """Dual M (L, n, d_out) or primal S (L, d_in, d_out). Reference: emsedit_fast.reference.ridge_solve."""
    op = "ridge_solve"  # inputs checked by the ops layer (emsedit_fast/ops/ridge.py)
    n_layers, n, d_in = keys.shape
    d_out = targets.shape[2]
    gram = _gram(keys, log_ridge, form)
    if form == "dual":
        return _spd_solve(gram, targets, op, _gram64_of(keys, log_ridge, form))
    # Right-hand side K^T V (L, d_in, d_out): X = K^T (i: d_in, k: n), Y = V (k: n, j: d_out)
    sl, sn, sd = keys.stride()
    rhs = _product(keys, (sl, sd, sn), targets, targets.stride(), d_in, d_out, n)
    return _spd_solve(gram, rhs, op, _gram64_of(keys, log_ridge, form))


@triton_op("emsedit_fast::triton_ridge_solve_backward", mutates_args={})
def ridge_solve_backward(grad_solution: torch.Tensor, keys: torch.Tensor, solution: torch.Tensor,
                         log_ridge: torch.Tensor, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_targets (L, n, d_out), grad_log_ridge (L,)). Reference: emsedit_fast.reference.ridge_solve_backward."""
    op = "ridge_solve_backward"  # inputs checked by the ops layer (emsedit_fast/ops/ridge.py)
    n_layers, n, d_in = keys.shape
    beta = torch.exp(log_ridge)
    gram = _gram(keys, log_ridge, form)
    # dual: P = C^-1 dL/dM;  primal: Y = A^-1 dL/dS
    y = _spd_solve(gram, grad_solution, op, _gram64_of(keys, log_ridge, form))
    grad_log_ridge = -beta * (y * solution).sum((1, 2))
    if form == "dual":
        return y, grad_log_ridge
    # P = K Y (L, n, d_out): X = K (i: n, k: d_in), Y (k: d_in, j: d_out)
    d_out = y.shape[2]
    p = _product(keys, keys.stride(), y, y.stride(), n, d_out, d_in)
    return p, grad_log_ridge
