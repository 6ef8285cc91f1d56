// Schemas of every emsedit_fast C++ op, and the Python module that loads them.
//
// Importing emsedit_fast._C runs the static TORCH_LIBRARY / TORCH_LIBRARY_IMPL registrations in this library:
// the ops then appear as torch.ops.emsedit_fast.<op>. Tensor ops are never bound through pybind11 (that would hide
// them from torch.compile and leave them without fake kernels); pybind11 only carries build_info().
// Semantics of each op: emsedit_fast/reference/<stem>.py. Mutated arguments are annotated (a!).

#include <torch/extension.h>

#include <thread>

TORCH_LIBRARY(emsedit_fast, m) {
  // running_stats: merge rows [keys | value_grads] into (count f64 (1,), mean, var, std f32 (D,)); normalise rows.
  m.def("running_stats_update_(Tensor(a!) count, Tensor(b!) mean, Tensor(c!) var, Tensor(d!) std, Tensor keys, "
        "Tensor value_grads) -> ()");
  m.def("running_stats_normalize(Tensor keys, Tensor value_grads, Tensor mean, Tensor std, float eps) -> Tensor");
  // hypernet_block: z + s[idx] * relu(z A B + c) + t[idx] (or MEND's relu(s[idx] * (zAB + c) + t[idx])).
  // Returns (z', act, pre): with save_for_backward, act = z0 A (N, r) and pre = p = act B + c (N, D), which the
  // backward then takes instead of recomputing them; otherwise both are empty.
  m.def("hypernet_block(Tensor z, Tensor a, Tensor b, Tensor c, Tensor s, Tensor t, Tensor idx, bool relu_first, "
        "Tensor? mean, Tensor? std, bool save_for_backward=False) -> (Tensor, Tensor, Tensor)");
  m.def("hypernet_block_backward(Tensor grad_out, Tensor z, Tensor a, Tensor b, Tensor c, Tensor s, Tensor t, "
        "Tensor idx, bool relu_first, Tensor? mean, Tensor? std, Tensor? act=None, Tensor? pre=None) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // value_targets: coeff_j = -eta[idx_j] <u_j, u~_j>, target_j = coeff_j delta~_j.
  m.def("value_targets(Tensor keys, Tensor z, Tensor eta, Tensor idx) -> (Tensor, Tensor)");
  m.def("value_targets_backward(Tensor grad_targets, Tensor? grad_coeffs, Tensor keys, Tensor z, Tensor eta, "
        "Tensor idx) -> (Tensor, Tensor)");
  // ridge: dual M = (K K^T + e^lr I)^-1 V or primal S = (K^T K + e^lr I)^-1 K^T V, and the backward.
  m.def("ridge_solve(Tensor keys, Tensor targets, Tensor log_ridge, str form) -> Tensor");
  m.def("ridge_solve_backward(Tensor grad_solution, Tensor keys, Tensor solution, Tensor log_ridge, str form) -> "
        "(Tensor, Tensor)");
  // apply_deltas: W_l += alpha_l M_l^T K_l (low rank) or W_l += alpha_l S_l^T (dense), fp32 accumulate, one rounding.
  m.def("apply_deltas_(Tensor(a!)[] weights, Tensor[] coeffs, Tensor[] keys, Tensor? alpha, bool transposed) -> ()");
  m.def("apply_deltas_dense_(Tensor(a!)[] weights, Tensor[] shifts, Tensor? alpha, bool transposed) -> ()");
  // restore: weights[l] <- snapshots[l], bit for bit.
  m.def("restore_(Tensor(a!)[] weights, Tensor[] snapshots) -> ()");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#if defined(__clang__)
  info["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = "gcc " __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
#ifdef _OPENMP
  info["openmp"] = true;
  info["openmp_max_threads"] = at::get_num_threads();
#else
  info["openmp"] = false;
#endif
#ifdef __AVX2__
  info["avx2"] = true;
#else
  info["avx2"] = false;
#endif
#ifdef __AVX512F__
  info["avx512f"] = true;
#else
  info["avx512f"] = false;
#endif
#ifdef EMSEDIT_FAST_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
#ifdef EMSEDIT_FAST_DEBUG
  info["debug"] = true;
#else
  info["debug"] = false;
#endif
  info["hardware_threads"] = std::thread::hardware_concurrency();
  return info;
}

}  // namespace

// The module itself: importing it is what runs the registrations above and in cpu/*.cpp (and cuda/*.cu).
PYBIND11_MODULE(_C, module) {
  module.doc() = "emsedit_fast compiled ops (registered under torch.ops.emsedit_fast)";
  module.def("build_info", &build_info, "Compiler, flags and features of this build");
}
