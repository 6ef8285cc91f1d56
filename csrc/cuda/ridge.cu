// ridge_solve / ridge_solve_backward on CUDA: the device-agnostic ATen implementation shared with the CPU
// (csrc/include/emsedit_fast/ridge_impl.h): batched Gram GEMM, cuSOLVER Cholesky via linalg_cholesky_ex, inverse or
// triangular solves, fp64 / LU fallbacks. Reference: emsedit_fast/reference/ridge.py.

#include <ATen/ATen.h>
#include <torch/library.h>

#include "emsedit_fast/checks.h"
#include "emsedit_fast/ridge_impl.h"

namespace {

at::Tensor ridge_solve_cuda(const at::Tensor& keys, const at::Tensor& targets, const at::Tensor& log_ridge,
                            c10::string_view form) {
  EMS_CHECK_CUDA(keys);
  return emsedit_fast::ridge::ridge_solve(keys, targets, log_ridge, form);
}

std::tuple<at::Tensor, at::Tensor> ridge_solve_backward_cuda(const at::Tensor& grad_solution, const at::Tensor& keys,
                                                             const at::Tensor& solution, const at::Tensor& log_ridge,
                                                             c10::string_view form) {
  EMS_CHECK_CUDA(keys);
  return emsedit_fast::ridge::ridge_solve_backward(grad_solution, keys, solution, log_ridge, form);
}

}  // namespace

TORCH_LIBRARY_IMPL(emsedit_fast, CUDA, m) {
  m.impl("ridge_solve", &ridge_solve_cuda);
  m.impl("ridge_solve_backward", &ridge_solve_backward_cuda);
}
