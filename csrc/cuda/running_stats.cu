// running_stats_update_ / running_stats_normalize on CUDA (reference: emsedit_fast/reference/running_stats.py).
//
// Rows are x = [keys | value_grads] (m x D); both kernels read keys and value_grads in place (never concatenated).
//   update_:    one thread per column: shifted sums over the rows in fp64 (coalesced: neighbouring threads read
//               neighbouring columns of a row), then the Chan-Golub-LeVeque merge in fp64, exactly the reference's
//               formulas; a one-thread kernel then advances the count (stream order: after every column read it).
//   normalize:  one thread per output element, Z = (x - mean) / (std + eps).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "emsedit_fast/checks.h"

namespace {

constexpr int kThreads = 256;

// Statistics columns [col_base, col_base + cols) from x (m x cols, row-major). count: (1,) fp64, read only here.
//   x:        keys (m, d_in) or value_grads (m, d_out), any float dtype; widened exactly to fp64
//   mean/var/std: (D,) fp32 statistics, updated in place; thread c owns column col_base + c (no races)
template <typename scalar_t>
__global__ void update_kernel(const scalar_t* __restrict__ x, int64_t m, int64_t cols, int64_t col_base,
                              const double* __restrict__ count, float* __restrict__ mean, float* __restrict__ var,
                              float* __restrict__ std) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) {
    return;
  }
  // shift by the first row: a one-pass variance without cancellation (|mean - x_0| ~ std)
  const double shift = static_cast<double>(x[c]);  // exact widening (bf16 / fp16 through fp32)
  double s1 = 0.0, s2 = 0.0;
  for (int64_t j = 1; j < m; ++j) {
    const double v = static_cast<double>(x[j * cols + c]) - shift;
    s1 += v;
    s2 = fma(v, v, s2);
  }
  const double md = static_cast<double>(m);
  const double n_old = count[0];
  const double n_new = n_old + md;
  const double xbar = shift + s1 / md;
  const double v_b = fmax(s2 / md - (s1 / md) * (s1 / md), 0.0);
  const int64_t k = col_base + c;
  const double mu = static_cast<double>(mean[k]);
  const double d = xbar - mu;
  const double m2 = static_cast<double>(var[k]) * n_old + v_b * md + d * d * (n_old * md / n_new);
  mean[k] = static_cast<float>(mu + d * (md / n_new));
  var[k] = static_cast<float>(m2 / fmax(n_new, 1.0));
  std[k] = static_cast<float>(sqrt(m2 / (n_new - 1.0 + 1e-8)));
}

// count (1,) fp64 += m; launched after the update kernels, so every column read the old count.
__global__ void advance_count_kernel(double* count, int64_t m) {
  count[0] += static_cast<double>(m);
}

// One part of Z: x (m x cols) read row-major, written to columns [col_base, col_base + cols) of out (m x ld_out).
// mean, std: (D,) fp32. Reads x once and writes each output element once (no concatenated copy of the rows).
template <typename scalar_t>
__global__ void normalize_kernel(const scalar_t* __restrict__ x, int64_t m, int64_t cols, int64_t ld_out,
                                 int64_t col_base, const float* __restrict__ mean, const float* __restrict__ std,
                                 float eps, float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= m * cols) {
    return;
  }
  const int64_t j = i / cols, c = i % cols, k = col_base + c;
  // (x - mean) / (std + eps) with the reference's roundings (explicit _rn: no contraction)
  out[j * ld_out + k] = __fdiv_rn(__fsub_rn(static_cast<float>(x[i]), mean[k]), __fadd_rn(std[k], eps));
}

void check_rows(const at::Tensor& keys, const at::Tensor& value_grads, const at::Tensor& mean, const char* op) {
  EMS_CHECK_CUDA(keys);
  EMS_CHECK(value_grads.device() == keys.device() && mean.device() == keys.device(), op,
            ": keys, value_grads and the statistics must be on one device");
  EMS_CHECK(keys.dim() == 2 && value_grads.dim() == 2 && keys.size(0) == value_grads.size(0), op,
            ": keys (m, d_in) and value_grads (m, d_out) must be 2-D with the same rows, got ", keys.sizes(), " and ",
            value_grads.sizes());
  const int64_t d = keys.size(1) + value_grads.size(1);
  EMS_CHECK(mean.scalar_type() == at::kFloat && mean.dim() == 1 && mean.size(0) == d, op, ": statistics must be (", d,
            ",) fp32, got ", mean.sizes());
}

unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>((n + kThreads - 1) / kThreads);
}

void running_stats_update_cuda(const at::Tensor& count, const at::Tensor& mean, const at::Tensor& var,
                               const at::Tensor& std, const at::Tensor& keys_in, const at::Tensor& value_grads_in) {
  const char* op = "running_stats_update_";
  check_rows(keys_in, value_grads_in, mean, op);
  const int64_t m = keys_in.size(0), d_in = keys_in.size(1), d_out = value_grads_in.size(1);
  EMS_CHECK(m >= 1, op, ": needs at least one row");
  EMS_CHECK(count.device() == keys_in.device() && count.scalar_type() == at::kDouble && count.numel() == 1, op,
            ": count must be a (1,) float64 tensor on ", keys_in.device());
  for (const at::Tensor* t : {&mean, &var, &std}) {
    EMS_CHECK(t->device() == keys_in.device() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                  t->sizes() == mean.sizes(),
              op, ": mean, var and std must be contiguous fp32 (", mean.size(0), ",) on ", keys_in.device());
  }
  const c10::cuda::CUDAGuard guard(keys_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor keys = keys_in.contiguous();
  const at::Tensor value_grads = value_grads_in.contiguous();
  double* cp = count.data_ptr<double>();  // stays on the device: no host sync for the merge scalars
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, keys.scalar_type(), "running_stats_update_cuda", [&] {
    if (d_in > 0) {
      update_kernel<scalar_t><<<blocks_for(d_in), kThreads, 0, stream>>>(keys.data_ptr<scalar_t>(), m, d_in, 0, cp,
                                                                         mean.data_ptr<float>(), var.data_ptr<float>(),
                                                                         std.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, value_grads.scalar_type(), "running_stats_update_cuda",
                                  [&] {
                                    if (d_out > 0) {
                                      update_kernel<scalar_t>
                                          <<<blocks_for(d_out), kThreads, 0, stream>>>(value_grads.data_ptr<scalar_t>(),
                                                                                       m, d_out, d_in, cp,
                                                                                       mean.data_ptr<float>(),
                                                                                       var.data_ptr<float>(),
                                                                                       std.data_ptr<float>());
                                      C10_CUDA_KERNEL_LAUNCH_CHECK();
                                    }
                                  });
  advance_count_kernel<<<1, 1, 0, stream>>>(cp, m);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor running_stats_normalize_cuda(const at::Tensor& keys_in, const at::Tensor& value_grads_in,
                                        const at::Tensor& mean_in, const at::Tensor& std_in, double eps) {
  const char* op = "running_stats_normalize";
  check_rows(keys_in, value_grads_in, mean_in, op);
  EMS_CHECK(std_in.device() == keys_in.device() && std_in.scalar_type() == at::kFloat &&
                std_in.sizes() == mean_in.sizes(),
            op, ": std must match mean");
  const c10::cuda::CUDAGuard guard(keys_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t m = keys_in.size(0), d_in = keys_in.size(1), d_out = value_grads_in.size(1), D = d_in + d_out;
  const at::Tensor keys = keys_in.contiguous(), value_grads = value_grads_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), std = std_in.contiguous();
  at::Tensor out = at::empty({m, D}, keys.options().dtype(at::kFloat));  // (m, D)
  const float eps_f = static_cast<float>(eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, keys.scalar_type(), "running_stats_normalize_cuda", [&] {
    if (m * d_in > 0) {
      normalize_kernel<scalar_t><<<blocks_for(m * d_in), kThreads, 0, stream>>>(keys.data_ptr<scalar_t>(), m, d_in, D,
                                                                                0, mean.data_ptr<float>(),
                                                                                std.data_ptr<float>(), eps_f,
                                                                                out.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, value_grads.scalar_type(), "running_stats_normalize_cuda",
                                  [&] {
                                    if (m * d_out > 0) {
                                      normalize_kernel<scalar_t>
                                          <<<blocks_for(m * d_out), kThreads, 0, stream>>>(value_grads
                                                                                               .data_ptr<scalar_t>(),
                                                                                           m, d_out, D, d_in,
                                                                                           mean.data_ptr<float>(),
                                                                                           std.data_ptr<float>(), eps_f,
                                                                                           out.data_ptr<float>());
                                      C10_CUDA_KERNEL_LAUNCH_CHECK();
                                    }
                                  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(emsedit_fast, CUDA, m) {
  m.impl("running_stats_update_", &running_stats_update_cuda);
  m.impl("running_stats_normalize", &running_stats_normalize_cuda);
}
