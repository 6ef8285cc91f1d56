// value_targets / value_targets_backward on CUDA (reference: emsedit_fast/reference/value_targets.py).
//
//   forward:   coeff_j = -eta[idx_j] <u_j, u~_j>,  target_j = coeff_j delta~_j
//   backward:  g_j = <P_j, delta~_j> (+ dL/dcoeff_j); dL/du~_j = (-eta_i g_j) u_j; dL/ddelta~_j = coeff_j P_j;
//              dL/deta_i = sum_{j: idx_j = i} -g_j <u_j, u~_j>
//
// One block per row: the block reduces the row's dot products (fp64 partials, fixed tree order: deterministic),
// then scales the row it has just read, so each input row is read once from global memory (the second read hits
// L1/L2). dL/deta: one block per layer sums its rows' contributions in a fixed order (no atomics).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "emsedit_fast/checks.h"

namespace {

constexpr int kThreads = 256;

// Block-wide sum of one double per thread, in a fixed order (shared-memory tree); every thread gets the result.
// fp64 partials: the products of two floats are exact in fp64, so the dot is more accurate than the reference's
// fp32 row sum and the result stays within the reference's own distance of the fp64 oracle.
__device__ double block_sum(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      shared[threadIdx.x] += shared[threadIdx.x + stride];
    }
    __syncthreads();
  }
  const double out = shared[0];
  __syncthreads();  // shared is reused by the next call
  return out;
}

__device__ double row_dot(const float* __restrict__ x, const float* __restrict__ y, int64_t n, double* shared) {
  double acc = 0.0;
  for (int64_t c = threadIdx.x; c < n; c += blockDim.x) {
    acc = fma(static_cast<double>(x[c]), static_cast<double>(y[c]), acc);
  }
  return block_sum(acc, shared);
}

// keys (N, d_in), z (N, D), eta (L,), idx (N,) -> targets (N, d_out), coeffs (N,)
// grid: one block per row j; block: kThreads threads striding over the row's columns.
__global__ void forward_kernel(const float* __restrict__ keys, const float* __restrict__ z,
                               const float* __restrict__ eta, const int64_t* __restrict__ idx, int64_t d_in,
                               int64_t d_out, int64_t n_layers, float* __restrict__ targets,
                               float* __restrict__ coeffs) {
  __shared__ double shared[kThreads];
  const int64_t j = blockIdx.x, D = d_in + d_out, l = idx[j];
  CUDA_KERNEL_ASSERT(l >= 0 && l < n_layers);
  const float* zrow = z + j * D;
  const float dot = static_cast<float>(row_dot(keys + j * d_in, zrow, d_in, shared));
  // coeff = (-eta) * fp32(dot): the reference's two roundings; _rn ops keep nvcc from fusing them
  const float coef = __fmul_rn(-eta[l], dot);
  if (threadIdx.x == 0) {
    coeffs[j] = coef;
  }
  for (int64_t c = threadIdx.x; c < d_out; c += blockDim.x) {
    targets[j * d_out + c] = __fmul_rn(coef, zrow[d_in + c]);
  }
}

// grad_targets P (N, d_out), grad_coeffs (N,) or null -> grad_z (N, D), contrib (N,) = -g_j <u_j, u~_j>
__global__ void backward_kernel(const float* __restrict__ grad_targets, const float* __restrict__ grad_coeffs,
                                const float* __restrict__ keys, const float* __restrict__ z,
                                const float* __restrict__ eta, const int64_t* __restrict__ idx, int64_t d_in,
                                int64_t d_out, int64_t n_layers, float* __restrict__ grad_z,
                                float* __restrict__ contrib) {
  __shared__ double shared[kThreads];
  const int64_t j = blockIdx.x, D = d_in + d_out, l = idx[j];
  CUDA_KERNEL_ASSERT(l >= 0 && l < n_layers);
  const float* u = keys + j * d_in;
  const float* zrow = z + j * D;
  const float* p = grad_targets + j * d_out;
  const float neg_eta = -eta[l];
  const float dot = static_cast<float>(row_dot(u, zrow, d_in, shared));
  float g = static_cast<float>(row_dot(p, zrow + d_in, d_out, shared));
  if (grad_coeffs != nullptr) {
    g = __fadd_rn(g, grad_coeffs[j]);
  }
  const float coef = __fmul_rn(neg_eta, dot);
  const float key_scale = __fmul_rn(neg_eta, g);
  float* out = grad_z + j * D;
  for (int64_t c = threadIdx.x; c < d_in; c += blockDim.x) {
    out[c] = __fmul_rn(key_scale, u[c]);
  }
  for (int64_t c = threadIdx.x; c < d_out; c += blockDim.x) {
    out[d_in + c] = __fmul_rn(coef, p[c]);
  }
  if (threadIdx.x == 0) {
    contrib[j] = __fmul_rn(-g, dot);
  }
}

// grad_eta[l] = sum of contrib over the rows of layer l: one block per layer, strided partials, fixed tree.
// Each block scans all N layer indices; L is small (one row per edited layer), so this costs O(L N) index reads,
// negligible next to the row kernels, and it needs neither atomics nor a sort by layer.
__global__ void eta_kernel(const float* __restrict__ contrib, const int64_t* __restrict__ idx, int64_t n_rows,
                           float* __restrict__ grad_eta) {
  __shared__ double shared[kThreads];
  const int64_t l = blockIdx.x;
  double acc = 0.0;
  for (int64_t j = threadIdx.x; j < n_rows; j += blockDim.x) {
    if (idx[j] == l) {
      acc += static_cast<double>(contrib[j]);
    }
  }
  const double total = block_sum(acc, shared);
  if (threadIdx.x == 0) {
    grad_eta[l] = static_cast<float>(total);
  }
}

void check_args(const at::Tensor& keys, const at::Tensor& z, const at::Tensor& eta, const at::Tensor& idx,
                const char* op) {
  EMS_CHECK_CUDA(z);
  for (const at::Tensor* t : {&keys, &eta, &idx}) {
    EMS_CHECK(t->device() == z.device(), op, ": all tensors must be on ", z.device(), ", got ", t->device());
  }
  EMS_CHECK(keys.scalar_type() == at::kFloat && z.scalar_type() == at::kFloat && eta.scalar_type() == at::kFloat, op,
            ": keys, z and eta must be fp32");
  EMS_CHECK(keys.dim() == 2 && z.dim() == 2 && keys.size(0) == z.size(0) && z.size(1) > keys.size(1), op,
            ": keys (N, d_in) and z (N, D > d_in) must share N, got ", keys.sizes(), " and ", z.sizes());
  EMS_CHECK(eta.dim() == 1, op, ": eta must be (layers,), got ", eta.sizes());
  EMS_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 1 && idx.size(0) == z.size(0), op, ": idx must be (",
            z.size(0), ",) int64");
}

std::tuple<at::Tensor, at::Tensor> value_targets_cuda(const at::Tensor& keys_in, const at::Tensor& z_in,
                                                      const at::Tensor& eta_in, const at::Tensor& idx_in) {
  check_args(keys_in, z_in, eta_in, idx_in, "value_targets");
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor keys = keys_in.contiguous(), z = z_in.contiguous(), eta = eta_in.contiguous();
  const at::Tensor idx = idx_in.contiguous();
  const int64_t N = z.size(0), d_in = keys.size(1), d_out = z.size(1) - d_in;
  at::Tensor targets = at::empty({N, d_out}, z.options());
  at::Tensor coeffs = at::empty({N}, z.options());
  if (N > 0) {
    forward_kernel<<<static_cast<unsigned>(N), kThreads, 0,
                     c10::cuda::getCurrentCUDAStream()>>>(keys.data_ptr<float>(), z.data_ptr<float>(),
                                                          eta.data_ptr<float>(), idx.data_ptr<int64_t>(), d_in, d_out,
                                                          eta.size(0), targets.data_ptr<float>(),
                                                          coeffs.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {targets, coeffs};
}

std::tuple<at::Tensor, at::Tensor> value_targets_backward_cuda(const at::Tensor& grad_targets_in,
                                                               const std::optional<at::Tensor>& grad_coeffs_in,
                                                               const at::Tensor& keys_in, const at::Tensor& z_in,
                                                               const at::Tensor& eta_in, const at::Tensor& idx_in) {
  const char* op = "value_targets_backward";
  check_args(keys_in, z_in, eta_in, idx_in, op);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor keys = keys_in.contiguous(), z = z_in.contiguous(), eta = eta_in.contiguous();
  const at::Tensor idx = idx_in.contiguous();
  const int64_t N = z.size(0), d_in = keys.size(1), d_out = z.size(1) - d_in, L = eta.size(0);
  EMS_CHECK(grad_targets_in.device() == z.device() && grad_targets_in.scalar_type() == at::kFloat &&
                grad_targets_in.dim() == 2 && grad_targets_in.size(0) == N && grad_targets_in.size(1) == d_out,
            op, ": grad_targets must be (", N, ", ", d_out, ") fp32 on ", z.device());
  const at::Tensor grad_targets = grad_targets_in.contiguous();
  at::Tensor grad_coeffs;
  if (grad_coeffs_in.has_value() && grad_coeffs_in->defined()) {
    grad_coeffs = grad_coeffs_in->to(z.device(), at::kFloat).contiguous();
    EMS_CHECK(grad_coeffs.numel() == N, op, ": grad_coeffs must be (", N, ",)");
  }
  at::Tensor grad_z = at::empty({N, z.size(1)}, z.options());
  at::Tensor contrib = at::empty({N}, z.options());
  at::Tensor grad_eta = at::zeros({L}, eta.options());
  if (N > 0) {
    backward_kernel<<<static_cast<unsigned>(N), kThreads, 0, stream>>>(grad_targets.data_ptr<float>(),
                                                                       grad_coeffs.defined()
                                                                           ? grad_coeffs.data_ptr<float>()
                                                                           : nullptr,
                                                                       keys.data_ptr<float>(), z.data_ptr<float>(),
                                                                       eta.data_ptr<float>(), idx.data_ptr<int64_t>(),
                                                                       d_in, d_out, L, grad_z.data_ptr<float>(),
                                                                       contrib.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (L > 0) {
    eta_kernel<<<static_cast<unsigned>(L), kThreads, 0, stream>>>(contrib.data_ptr<float>(), idx.data_ptr<int64_t>(), N,
                                                                  grad_eta.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {grad_z, grad_eta};
}

}  // namespace

TORCH_LIBRARY_IMPL(emsedit_fast, CUDA, m) {
  m.impl("value_targets", &value_targets_cuda);
  m.impl("value_targets_backward", &value_targets_backward_cuda);
}
