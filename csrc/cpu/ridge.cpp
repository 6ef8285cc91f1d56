// ridge_solve / ridge_solve_backward on the CPU. The implementation is device-agnostic ATen code shared with the
// CUDA registration: csrc/include/emsedit_fast/ridge_impl.h (dual form via the n x n Gram, batched Cholesky, fp64 and
// LU fallbacks). Reference: emsedit_fast/reference/ridge.py.

#include <torch/extension.h>

#include "emsedit_fast/checks.h"
#include "emsedit_fast/ridge_impl.h"

namespace {

at::Tensor ridge_solve_cpu(const at::Tensor& keys, const at::Tensor& targets, const at::Tensor& log_ridge,
                           c10::string_view form) {
  EMS_CHECK_CPU(keys);
  return emsedit_fast::ridge::ridge_solve(keys, targets, log_ridge, form);
}

std::tuple<at::Tensor, at::Tensor> ridge_solve_backward_cpu(const at::Tensor& grad_solution, const at::Tensor& keys,
                                                            const at::Tensor& solution, const at::Tensor& log_ridge,
                                                            c10::string_view form) {
  EMS_CHECK_CPU(keys);
  return emsedit_fast::ridge::ridge_solve_backward(grad_solution, keys, solution, log_ridge, form);
}

}  // namespace

TORCH_LIBRARY_IMPL(emsedit_fast, CPU, m) {
  m.impl("ridge_solve", &ridge_solve_cpu);
  m.impl("ridge_solve_backward", &ridge_solve_backward_cpu);
}
