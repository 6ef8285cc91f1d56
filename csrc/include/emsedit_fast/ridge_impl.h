// Device-agnostic implementation of ridge_solve / ridge_solve_backward (reference: emsedit_fast/reference/ridge.py;
// docs/method.md, "Ridge least squares" and "Meta-gradient"), shared by csrc/cpu/ridge.cpp and csrc/cuda/ridge.cu. It is built from ATen calls only
// (batched GEMM, Cholesky, triangular/inverse solves), so the same code runs on whichever device the registration
// routes to; each device file only registers it.
//
// For layer l with keys K (n x d_in), targets V (n x d_out) and beta = exp(log_ridge):
//   dual:    C = K K^T + beta I_n      (n x n),       M = C^-1 V             (n x d_out)
//   primal:  A = K^T K + beta I_d_in   (d_in x d_in), S = A^-1 K^T V         (d_in x d_out)
// Backward from dL/dsolution:
//   dual:    P = C^-1 dL/dM,                  dL/dlog_ridge = -beta <P, M>
//   primal:  Y = A^-1 dL/dS,  P = K Y,        dL/dlog_ridge = -beta <Y, S>
//
// Both systems are SPD, so they are factored with one batched Cholesky (the reference uses LU, as published); the
// GEMMs and the factorisation are library calls: we fuse around the solver, not through it. The dual path touches
// only n x n, n x d_in and n x d_out matrices, never anything of size d_in^2. The backward recomputes the factor (the
// op schema carries no saved state).
//
// Robustness: a layer whose fp32 Cholesky fails (info > 0, a non-positive pivot) or whose solution is not finite is
// redone in fp64 (Gram rebuilt from fp64 keys); if that fails too, with LU (linalg_solve); if LU finds an exactly
// singular matrix, with the minimum-norm least-squares solution (gelsd). Each fallback emits a warning naming the
// layer.

#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <string>
#include <tuple>

#include "emsedit_fast/checks.h"

namespace emsedit_fast::ridge {

enum class Form { kDual, kPrimal };

inline Form parse_form(c10::string_view form, const char* op) {
  if (form == "dual") {
    return Form::kDual;
  }
  if (form == "primal") {
    return Form::kPrimal;
  }
  TORCH_CHECK(false, "emsedit_fast: ", op, ": form must be 'dual' or 'primal', got '", std::string(form), "'");
}

// Every tensor on keys' device (the registration decides which device that is).
inline void check_device(const at::Tensor& keys, const at::Tensor& t, const char* name, const char* op) {
  EMS_CHECK(t.device() == keys.device(), op, ": ", name, " must be on ", keys.device(), " like keys, got ", t.device());
}

inline void check_keys(const at::Tensor& keys, const at::Tensor& log_ridge, const char* op) {
  check_device(keys, log_ridge, "log_ridge", op);
  EMS_CHECK(keys.dim() == 3, op, ": keys must be (layers, n, d_in), got ", keys.sizes());
  EMS_CHECK(keys.scalar_type() == at::kFloat || keys.scalar_type() == at::kDouble, op,
            ": keys must be fp32 or fp64, got ", keys.scalar_type());
  EMS_CHECK(log_ridge.dim() == 1 && log_ridge.size(0) == keys.size(0), op, ": log_ridge must be (", keys.size(0),
            ",), got ", log_ridge.sizes());
}

// The system matrix of every layer: dual K K^T + beta I (L, n, n), primal K^T K + beta I (L, d_in, d_in).
inline at::Tensor gram(const at::Tensor& keys, const at::Tensor& beta, Form form) {
  at::Tensor g = form == Form::kDual ? at::bmm(keys, keys.transpose(1, 2)) : at::bmm(keys.transpose(1, 2), keys);
  g.diagonal(0, -2, -1).add_(beta.unsqueeze(-1));  // the reference adds beta * I: off-diagonal entries get + 0
  return g;
}

// X = G^-1 rhs per layer for SPD G (L, m, m), rhs (L, m, k). `gram_f64(l)` rebuilds layer l's matrix in fp64 for the
// retry. Returns X in rhs's dtype.
//
// Two ways, both from the Cholesky factor G = L L^T, chosen by the shape (one thread on this CPU, L layers):
// - m <= 256 or k >= 8 m (small systems, or very wide right-hand sides: n x n dual systems against d_out = 14336):
//   X = G^-1 rhs with G^-1 = L^-T L^-1, L^-1 by one triangular solve against the identity, G^-1 by one batched GEMM
//   (2 m^3), then one batched GEMM with rhs (2 m^2 k) at full BLAS speed: 76 vs 128 ms at m = 256, k = 14336;
//   89 vs 112 ms at m = 256, k = 1536 (11 layers); 0.96 vs 1.15 s at m = 1024, k = 14336. The explicit inverse is not
//   backward stable (about 3x a solve's error: 4.4e-5 vs 1.6e-5 relative at m = 1024, k = 14336), which is small
//   next to the gates' tolerance at these sizes.
// - otherwise two triangular solves from the right on transposed views: X^T = (rhs^T L^-T) L^-1. rhs^T is a
//   column-major view of the row-major rhs, which LAPACK's trsm takes as it is, and X^T comes back column-major, i.e.
//   X row-major: no layout copies, where cholesky_solve copies rhs in and its column-major result out. Measured
//   against cholesky_solve + the copy: 0.48 vs 0.74 s at m = 576, k = 1536 (11 layers), 16.6 vs 22.0 s at m = 4096,
//   k = 14336; and against the inverse at that primal shape it is faster and 3x more accurate (3.2e-5 vs 9.8e-5).
inline at::Tensor solve_spd(const at::Tensor& g, const at::Tensor& rhs,
                            const std::function<at::Tensor(int64_t)>& gram_f64, const char* op) {
  auto [chol, info] = at::linalg_cholesky_ex(g, /*upper=*/false, /*check_errors=*/false);
  const at::Tensor failed = info.gt(0);  // (L,) layers with a non-positive pivot
  const bool any_failed = failed.any().item<bool>();
  at::Tensor x;
  const int64_t m = g.size(1);
  if (m <= 256 || rhs.size(2) >= 8 * m) {
    const at::Tensor eye = at::eye(m, chol.options()).expand_as(chol);
    if (any_failed) {
      // a failed factor may hold zero or NaN pivots: give those layers the identity (they are redone below anyway)
      chol = at::where(failed.view({-1, 1, 1}), eye, chol);
    }
    const at::Tensor linv = at::linalg_solve_triangular(chol, eye, /*upper=*/false);  // L^-1 (L, m, m)
    x = at::bmm(at::bmm(linv.transpose(1, 2), linv), rhs);                             // (L, m, k)
  } else {
    const at::Tensor yt = at::linalg_solve_triangular(chol.transpose(1, 2), rhs.transpose(1, 2), /*upper=*/true,
                                                      /*left=*/false);  // rhs^T L^-T (L, k, m)
    x = at::linalg_solve_triangular(chol, yt, /*upper=*/false, /*left=*/false).transpose(1, 2);  // (L, m, k)
    // the row-major layout the op (and its fake kernel) promise; a no-op when LAPACK returned column-major X^T
    x = x.contiguous();
  }
  // A layer also needs the fallback when a tiny positive pivot blew its solution up. One summing pass finds
  // non-finite values (NaN and inf propagate; a finite sum that overflows only costs a needless fp64 redo).
  const at::Tensor bad = failed.logical_or(at::isfinite(x.sum({1, 2})).logical_not());
  if (!bad.any().item<bool>()) {
    return x;
  }
  const at::Tensor bad_cpu = bad.cpu();  // (on CUDA: one small device-to-host copy, only on this rare path)
  const at::Tensor info_cpu = info.cpu();
  for (int64_t l = 0; l < g.size(0); ++l) {
    if (!bad_cpu[l].item<bool>()) {
      continue;
    }
    // The ladder runs on the CPU whatever the device: it exists for (nearly) singular matrices, the inputs on which
    // GPU LU drivers are least dependable (cuSOLVER's getrf has returned invalid pivots for small singular
    // matrices; on an H200 with torch 2.11 + CUDA 13.0 the nearly singular test crashed its process on this path,
    // cause not isolated), gelsd exists only there, and the path is rare, so one (m, m) fp64 round trip per failed
    // layer is cheap insurance.
    const at::Tensor g64 = gram_f64(l).cpu();  // (m, m) fp64
    const at::Tensor r64 = rhs[l].to(at::kDouble).cpu();
    at::Tensor sol;
    const int64_t pivot = info_cpu[l].item<int64_t>();
    if (g.scalar_type() != at::kDouble) {
      TORCH_WARN("emsedit_fast.", op, ": Cholesky of layer ", l, " failed in fp32 (",
                 pivot > 0 ? "non-positive pivot " + std::to_string(pivot) : std::string("non-finite solution"),
                 "); retrying in fp64");
      auto [c64, i64] = at::linalg_cholesky_ex(g64, false, false);
      if (i64.item<int64_t>() == 0) {
        sol = at::cholesky_solve(r64, c64, false);
        if (!at::isfinite(sol).all().item<bool>()) {
          sol = at::Tensor();
        }
      }
    }
    if (!sol.defined()) {
      TORCH_WARN("emsedit_fast.", op, ": Cholesky of layer ", l, " failed in fp64; falling back to LU");
      auto [lu_sol, lu_info] = at::linalg_solve_ex(g64, r64);
      if (lu_info.item<int64_t>() == 0 && at::isfinite(lu_sol).all().item<bool>()) {
        sol = lu_sol;
      } else {
        TORCH_WARN("emsedit_fast.", op, ": layer ", l, " is numerically singular; using the minimum-norm ",
                   "least-squares solution");
        // gelsd (SVD, rank-revealing): the minimum-norm solution of a singular system
        sol = std::get<0>(at::linalg_lstsq(g64, r64, c10::nullopt, c10::string_view("gelsd")));
      }
    }
    x[l].copy_(sol);
  }
  return x;
}

inline std::function<at::Tensor(int64_t)> gram_f64_of(const at::Tensor& keys, const at::Tensor& log_ridge, Form form) {
  return [keys, log_ridge, form](int64_t l) {
    const at::Tensor k = keys[l].to(at::kDouble).unsqueeze(0);                // (1, n, d_in)
    const at::Tensor beta = log_ridge.narrow(0, l, 1).to(at::kDouble).exp();  // (1,)
    return gram(k, beta, form)[0];
  };
}

inline at::Tensor ridge_solve(const at::Tensor& keys_in, const at::Tensor& targets_in, const at::Tensor& log_ridge_in,
                              c10::string_view form_name) {
  const char* op = "ridge_solve";
  const Form form = parse_form(form_name, op);
  check_keys(keys_in, log_ridge_in, op);
  check_device(keys_in, targets_in, "targets", op);
  EMS_CHECK(targets_in.dim() == 3 && targets_in.size(0) == keys_in.size(0) && targets_in.size(1) == keys_in.size(1), op,
            ": targets must be (L, n, d_out) with (L, n) = (", keys_in.size(0), ", ", keys_in.size(1), "), got ",
            targets_in.sizes());
  EMS_CHECK(targets_in.scalar_type() == keys_in.scalar_type(), op, ": targets must have the keys' dtype ",
            keys_in.scalar_type(), ", got ", targets_in.scalar_type());
  const at::Tensor keys = keys_in.contiguous();        // (L, n, d_in)
  const at::Tensor targets = targets_in.contiguous();  // (L, n, d_out)
  const at::Tensor log_ridge = log_ridge_in.to(keys.scalar_type());
  const at::Tensor beta = log_ridge.exp();  // (L,)
  const at::Tensor g = gram(keys, beta, form);
  // dual: C^-1 V (L, n, d_out); primal: A^-1 (K^T V) (L, d_in, d_out)
  const at::Tensor rhs = form == Form::kDual ? targets : at::bmm(keys.transpose(1, 2), targets);
  return solve_spd(g, rhs, gram_f64_of(keys, log_ridge, form), op);
}

inline std::tuple<at::Tensor, at::Tensor> ridge_solve_backward(const at::Tensor& grad_solution_in,
                                                               const at::Tensor& keys_in, const at::Tensor& solution_in,
                                                               const at::Tensor& log_ridge_in,
                                                               c10::string_view form_name) {
  const char* op = "ridge_solve_backward";
  const Form form = parse_form(form_name, op);
  check_keys(keys_in, log_ridge_in, op);
  check_device(keys_in, grad_solution_in, "grad_solution", op);
  check_device(keys_in, solution_in, "solution", op);
  EMS_CHECK(grad_solution_in.sizes() == solution_in.sizes(), op, ": grad_solution ", grad_solution_in.sizes(),
            " must match solution ", solution_in.sizes());
  const int64_t L = keys_in.size(0), n = keys_in.size(1), d_in = keys_in.size(2);
  EMS_CHECK(solution_in.dim() == 3 && solution_in.size(0) == L &&
                solution_in.size(1) == (form == Form::kDual ? n : d_in),
            op, ": solution must be (", L, ", ", form == Form::kDual ? n : d_in, ", d_out) for the ",
            std::string(form_name), " form, got ", solution_in.sizes());
  const auto dtype = keys_in.scalar_type();
  const at::Tensor keys = keys_in.contiguous();
  const at::Tensor grad_solution = grad_solution_in.to(dtype).contiguous();
  const at::Tensor solution = solution_in.to(dtype);
  const at::Tensor log_ridge = log_ridge_in.to(dtype);
  const at::Tensor beta = log_ridge.exp();
  const at::Tensor g = gram(keys, beta, form);
  // dual: P = C^-1 dL/dM; primal: Y = A^-1 dL/dS
  const at::Tensor y = solve_spd(g, grad_solution, gram_f64_of(keys, log_ridge, form), op);
  const at::Tensor grad_targets = form == Form::kDual ? y : at::bmm(keys, y);  // (L, n, d_out)
  const at::Tensor grad_log_ridge = -beta * (y * solution).sum({1, 2});        // (L,)
  return {grad_targets, grad_log_ridge.to(log_ridge_in.scalar_type())};
}

}  // namespace emsedit_fast::ridge
