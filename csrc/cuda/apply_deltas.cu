// apply_deltas_ / apply_deltas_dense_ on CUDA (reference: emsedit_fast/reference/apply_deltas.py).
//
//   low rank:  W_l <- round(W_l + alpha_l * M_l^T K_l)      dense:  W_l <- round(W_l + alpha_l * S_l^T)
//
// As on the CPU, both layouts are one case: W is (R, C) row-major and its low-rank delta is X^T Y, X (n, R),
// Y (n, C) (Linear: X = M, Y = K; Conv1D, transposed=True: X = K, Y = M).
//
// The low-rank kernel is a plain shared-memory tiled GEMM whose epilogue IS the weight update: each 32 x 32 block of
// W accumulates its delta in fp32 registers over n in a fixed order (no split-n, no atomics: deterministic), then
// reads W once, adds in fp32 and writes W once with a single rounding. No fp32 delta exists in global memory, so
// traffic is 2 x sizeof(W) plus the factors. It is deliberately simple (no tensor cores: fp32 accuracy, and n is
// small, so the op is bandwidth-bound on W); one launch per layer on the current stream.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "emsedit_fast/checks.h"

namespace {

constexpr int kTile = 32;  // W tile edge; also the n-chunk staged in shared memory
constexpr int kRowsPerThread = 4;
constexpr int kThreadsY = kTile / kRowsPerThread;  // block = 32 x 8 threads, each owns 4 rows of one column

// W (R x C) tile (blockIdx.y, blockIdx.x) += alpha * X^T Y restricted to the tile.
// w: weight (R, C) in its own dtype; x: (n, R) fp32; y: (n, C) fp32.
template <typename scalar_t>
__global__ void apply_deltas_kernel(scalar_t* __restrict__ w, const float* __restrict__ x, const float* __restrict__ y,
                                    int64_t R, int64_t C, int64_t n, float alpha) {
  __shared__ float xs[kTile][kTile];      // xs[k][r] = X[k0 + k, r0 + r]
  __shared__ float ys[kTile][kTile + 1];  // ys[k][c] = Y[k0 + k, c0 + c] (+1: no bank conflicts on the column read)
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile, c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  float acc[kRowsPerThread] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t k0 = 0; k0 < n; k0 += kTile) {
    // stage a 32-row chunk of X and Y; loads are coalesced along r and c
    for (int i = ty; i < kTile; i += kThreadsY) {
      const int64_t k = k0 + i;
      xs[i][tx] = (k < n && r0 + tx < R) ? x[k * R + r0 + tx] : 0.0f;
      ys[i][tx] = (k < n && c0 + tx < C) ? y[k * C + c0 + tx] : 0.0f;
    }
    __syncthreads();
    const int kmax = n - k0 < kTile ? static_cast<int>(n - k0) : kTile;
    for (int k = 0; k < kmax; ++k) {  // fixed order over n
      const float yv = ys[k][tx];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        acc[i] = fmaf(xs[k][ty + i * kThreadsY], yv, acc[i]);
      }
    }
    __syncthreads();
  }
  const int64_t c = c0 + tx;
  if (c >= C) {
    return;
  }
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t r = r0 + ty + i * kThreadsY;
    if (r < R) {
      // reference rounding: delta * alpha, then W + delta in fp32 (explicit _rn ops: no contraction), then W's dtype
      const float sum = __fadd_rn(static_cast<float>(w[r * C + c]), __fmul_rn(acc[i], alpha));
      w[r * C + c] = static_cast<scalar_t>(sum);
    }
  }
}

// W (R x C) += alpha * T, T = S (same layout, Conv1D) or S^T (S is (C, R), Linear) through a shared-memory
// transpose so both S and W are accessed in coalesced rows. Reads S once, reads and writes W once.
template <typename scalar_t>
__global__ void apply_deltas_dense_kernel(scalar_t* __restrict__ w, const float* __restrict__ s, int64_t R, int64_t C,
                                          bool transposed, float alpha) {
  __shared__ float tile[kTile][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile, c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  for (int i = ty; i < kTile; i += kThreadsY) {
    if (transposed) {  // tile[i][tx] = S[r0 + i, c0 + tx]
      tile[i][tx] = (r0 + i < R && c0 + tx < C) ? s[(r0 + i) * C + c0 + tx] : 0.0f;
    } else {  // tile[tx][i] = S[c0 + i, r0 + tx] = T[r0 + tx, c0 + i]
      tile[tx][i] = (c0 + i < C && r0 + tx < R) ? s[(c0 + i) * R + r0 + tx] : 0.0f;
    }
  }
  __syncthreads();
  for (int i = ty; i < kTile; i += kThreadsY) {
    const int64_t r = r0 + i, c = c0 + tx;
    if (r < R && c < C) {
      const float sum = __fadd_rn(static_cast<float>(w[r * C + c]), __fmul_rn(tile[i][tx], alpha));
      w[r * C + c] = static_cast<scalar_t>(sum);
    }
  }
}

std::vector<float> alpha_values(const std::optional<at::Tensor>& alpha, size_t n_layers, const char* op) {
  std::vector<float> out(n_layers, 1.0f);
  if (alpha.has_value()) {
    EMS_CHECK(alpha->scalar_type() == at::kFloat && alpha->dim() == 1 &&
                  alpha->size(0) == static_cast<int64_t>(n_layers),
              op, ": alpha must be (", n_layers, ",) fp32, got ", alpha->sizes());
    // one small device-to-host copy: the per-layer scale is a kernel argument
    const at::Tensor a = alpha->to(at::kCPU).contiguous();
    std::copy(a.data_ptr<float>(), a.data_ptr<float>() + n_layers, out.begin());
  }
  return out;
}

void check_weight(const at::Tensor& w, size_t layer, const char* op) {
  EMS_CHECK(w.is_cuda() && w.dim() == 2 && w.is_contiguous(), op, ": weights[", layer,
            "] must be a contiguous 2-D CUDA tensor, got ", w.sizes(), " on ", w.device());
  const auto st = w.scalar_type();
  EMS_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op, ": weights[", layer,
            "] must be fp32, bf16 or fp16, got ", st);
}

void check_factor(const at::Tensor& f, const at::Tensor& w, const char* name, size_t layer, int64_t rows, int64_t cols,
                  const char* op) {
  EMS_CHECK(f.device() == w.device() && f.scalar_type() == at::kFloat && f.is_contiguous(), op, ": ", name, "[", layer,
            "] must be contiguous fp32 on ", w.device());
  EMS_CHECK(f.dim() == 2 && (rows < 0 || f.size(0) == rows) && f.size(1) == cols, op, ": ", name, "[", layer,
            "] must be (", rows < 0 ? "n" : std::to_string(rows), ", ", cols, "), got ", f.sizes());
}

void apply_deltas_cuda(at::TensorList weights, at::TensorList coeffs, at::TensorList keys,
                       const std::optional<at::Tensor>& alpha, bool transposed) {
  const char* op = "apply_deltas_";
  const size_t L = weights.size();
  EMS_CHECK(coeffs.size() == L && keys.size() == L, op, ": need one coeffs and one keys tensor per weight");
  if (L == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(weights[0].device());
  const std::vector<float> scale = alpha_values(alpha, L, op);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (size_t l = 0; l < L; ++l) {
    const at::Tensor& w = weights[l];
    check_weight(w, l, op);
    const int64_t d_out = transposed ? w.size(1) : w.size(0);
    const int64_t d_in = transposed ? w.size(0) : w.size(1);
    check_factor(coeffs[l], w, "coeffs", l, -1, d_out, op);
    check_factor(keys[l], w, "keys", l, coeffs[l].size(0), d_in, op);
    const int64_t R = w.size(0), C = w.size(1), n = coeffs[l].size(0);
    if (n == 0 || R == 0 || C == 0) {
      continue;  // nothing to add (the reference's fp32 round trip is the identity)
    }
    const float* x = (transposed ? keys[l] : coeffs[l]).data_ptr<float>();
    const float* y = (transposed ? coeffs[l] : keys[l]).data_ptr<float>();
    const dim3 grid(static_cast<unsigned>((C + kTile - 1) / kTile), static_cast<unsigned>((R + kTile - 1) / kTile));
    const dim3 block(kTile, kThreadsY);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "apply_deltas_cuda", [&] {
      apply_deltas_kernel<scalar_t><<<grid, block, 0, stream>>>(w.data_ptr<scalar_t>(), x, y, R, C, n, scale[l]);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void apply_deltas_dense_cuda(at::TensorList weights, at::TensorList shifts, const std::optional<at::Tensor>& alpha,
                             bool transposed) {
  const char* op = "apply_deltas_dense_";
  const size_t L = weights.size();
  EMS_CHECK(shifts.size() == L, op, ": need one shift per weight");
  if (L == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(weights[0].device());
  const std::vector<float> scale = alpha_values(alpha, L, op);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (size_t l = 0; l < L; ++l) {
    const at::Tensor& w = weights[l];
    check_weight(w, l, op);
    const int64_t d_out = transposed ? w.size(1) : w.size(0);
    const int64_t d_in = transposed ? w.size(0) : w.size(1);
    check_factor(shifts[l], w, "shifts", l, d_in, d_out, op);
    const int64_t R = w.size(0), C = w.size(1);
    if (R == 0 || C == 0) {
      continue;
    }
    const dim3 grid(static_cast<unsigned>((C + kTile - 1) / kTile), static_cast<unsigned>((R + kTile - 1) / kTile));
    const dim3 block(kTile, kThreadsY);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "apply_deltas_dense_cuda", [&] {
      apply_deltas_dense_kernel<scalar_t>
          <<<grid, block, 0, stream>>>(w.data_ptr<scalar_t>(), shifts[l].data_ptr<float>(), R, C, transposed, scale[l]);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(emsedit_fast, CUDA, m) {
  m.impl("apply_deltas_", &apply_deltas_cuda);
  m.impl("apply_deltas_dense_", &apply_deltas_dense_cuda);
}
