// hypernet_block / hypernet_block_backward on CUDA (reference: emsedit_fast/reference/hypernet_block.py;
// docs/method.md, "Hypernetwork" and "Meta-gradient").
//
//   a = z0 A (N x r),  p = a B + c,  h = s[idx] * relu(p) + t[idx]  (or relu(s[idx] * p + t[idx])),  z' = z0 + h
//
// The two GEMMs of the block are cuBLAS calls through ATen (all layers stacked: A and B are read once per call); the
// elementwise work around them is one fused kernel per direction:
//   forward:   (mean/std) z0 normalised straight into the output buffer; p = a B (cuBLAS); epilogue kernel
//              z' = z0 + h(p + c, s[idx], t[idx]) in place over the output (one read of p, one read-modify-write).
//              save_for_backward also returns a and pre = p + c, which the backward then takes instead of the GEMMs.
//   backward:  column kernel, one thread per column walking the rows in order: mask, pi (written over p), and the
//              reductions dc, ds[idx], dt[idx] in fp64 registers / a per-column-owned buffer (no atomics, fixed
//              order: deterministic); then dB = a^T pi, alpha = pi B^T, dA = z0^T alpha, dz = gamma + alpha A^T.

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
constexpr float kEps = 1.1920928955078125e-07f;  // fp32 machine epsilon (reference.running_stats.EPS)

unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>((n + kThreads - 1) / kThreads);
}

// out[i] = (x[i] - mean[c]) / (std[c] + eps) over N x D elements.
__global__ void normalise_kernel(const float* __restrict__ x, const float* __restrict__ mean,
                                 const float* __restrict__ std, int64_t total, int64_t D, float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < total) {
    const int64_t c = i % D;
    out[i] = __fdiv_rn(__fsub_rn(x[i], mean[c]), __fadd_rn(std[c], kEps));
  }
}

// out[i] = z0[i] + h(p[i] + c), z0 may alias out. Explicit _rn arithmetic reproduces the reference's roundings.
__global__ void forward_epilogue_kernel(const float* __restrict__ p, const float* __restrict__ c,
                                        const float* __restrict__ s, const float* __restrict__ t,
                                        const int64_t* __restrict__ idx, const float* z0, int64_t total, int64_t D,
                                        int64_t n_layers, bool relu_first, float* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) {
    return;
  }
  const int64_t j = i / D, k = i % D, l = idx[j];
  CUDA_KERNEL_ASSERT(l >= 0 && l < n_layers);
  const float pre = __fadd_rn(p[i], c[k]);
  const float sv = s[l * D + k], tv = t[l * D + k];
  float h;
  if (relu_first) {
    const float q = __fmul_rn(pre, pre >= 0.0f ? 1.0f : 0.0f);  // x * [x >= 0]: NaN stays NaN, as the reference
    h = __fadd_rn(__fmul_rn(sv, q), tv);
  } else {
    const float u = __fadd_rn(__fmul_rn(sv, pre), tv);
    h = __fmul_rn(u, u >= 0.0f ? 1.0f : 0.0f);
  }
  out[i] = __fadd_rn(z0[i], h);
}

// One thread per column k: walks rows j = 0..N-1 in order. p_pi holds p on entry and pi on exit (N x D).
// ds_acc, dt_acc (L x D) fp64 are zeroed on entry; only this thread touches column k of them.
__global__ void backward_column_kernel(float* __restrict__ p_pi, const float* __restrict__ gamma,
                                       const float* __restrict__ c, const float* __restrict__ s,
                                       const float* __restrict__ t, const int64_t* __restrict__ idx, int64_t N,
                                       int64_t D, bool relu_first, double* __restrict__ ds_acc,
                                       double* __restrict__ dt_acc, float* __restrict__ grad_c) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= D) {
    return;
  }
  const float ck = c[k];
  double dc = 0.0;
  for (int64_t j = 0; j < N; ++j) {
    const int64_t i = j * D + k, l = idx[j];
    const float pre = __fadd_rn(p_pi[i], ck);
    const float g = gamma[i], sv = s[l * D + k];
    float v;
    if (relu_first) {
      const float mask = pre >= 0.0f ? 1.0f : 0.0f;
      dt_acc[l * D + k] += static_cast<double>(g);
      ds_acc[l * D + k] += static_cast<double>(__fmul_rn(g, __fmul_rn(pre, mask)));
      v = __fmul_rn(__fmul_rn(sv, g), mask);
    } else {
      const float u = __fadd_rn(__fmul_rn(sv, pre), t[l * D + k]);
      const float gm = __fmul_rn(g, u >= 0.0f ? 1.0f : 0.0f);
      dt_acc[l * D + k] += static_cast<double>(gm);
      ds_acc[l * D + k] += static_cast<double>(__fmul_rn(gm, pre));
      v = __fmul_rn(sv, gm);
    }
    p_pi[i] = v;
    dc += static_cast<double>(v);
  }
  grad_c[k] = static_cast<float>(dc);
}

struct Inputs {
  at::Tensor z, a, b, c, s, t, idx, mean, std;
  int64_t N, D, r, L;
};

Inputs check_inputs(const at::Tensor& z, const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                    const at::Tensor& s, const at::Tensor& t, const at::Tensor& idx,
                    const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std, const char* op) {
  EMS_CHECK_CUDA(z);
  for (const at::Tensor* x : {&a, &b, &c, &s, &t, &idx}) {
    EMS_CHECK(x->device() == z.device(), op, ": all tensors must be on ", z.device(), ", got ", x->device());
  }
  for (const at::Tensor* x : {&z, &a, &b, &c, &s, &t}) {
    EMS_CHECK(x->scalar_type() == at::kFloat, op, ": z, a, b, c, s, t must be fp32, got ", x->scalar_type());
  }
  EMS_CHECK(z.dim() == 2, op, ": z must be (N, D), got ", z.sizes());
  const int64_t N = z.size(0), D = z.size(1);
  EMS_CHECK(a.dim() == 2 && a.size(0) == D, op, ": a must be (D=", D, ", rank), got ", a.sizes());
  const int64_t r = a.size(1);
  EMS_CHECK(b.dim() == 2 && b.size(0) == r && b.size(1) == D, op, ": b must be (", r, ", ", D, "), got ", b.sizes());
  EMS_CHECK(c.dim() == 1 && c.size(0) == D, op, ": c must be (", D, ",), got ", c.sizes());
  EMS_CHECK(s.dim() == 2 && s.size(1) == D && t.sizes() == s.sizes(), op, ": s and t must be (layers, ", D, ")");
  EMS_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 1 && idx.size(0) == N, op, ": idx must be (", N, ",) int64");
  const bool has_mean = mean.has_value() && mean->defined(), has_std = std.has_value() && std->defined();
  EMS_CHECK(has_mean == has_std, op, ": give both mean and std, or neither");
  Inputs in{z.contiguous(),
            a.contiguous(),
            b.contiguous(),
            c.contiguous(),
            s.contiguous(),
            t.contiguous(),
            idx.contiguous(),
            {},
            {},
            N,
            D,
            r,
            s.size(0)};
  if (has_mean) {
    for (const at::Tensor* x : {&*mean, &*std}) {
      EMS_CHECK(x->device() == z.device() && x->scalar_type() == at::kFloat && x->dim() == 1 && x->size(0) == D, op,
                ": mean and std must be (", D, ",) fp32 on ", z.device());
    }
    in.mean = mean->contiguous();
    in.std = std->contiguous();
  }
  return in;
}

at::Tensor normalised(const Inputs& in, cudaStream_t stream) {
  at::Tensor out = at::empty_like(in.z);
  const int64_t total = in.N * in.D;
  if (total > 0) {
    normalise_kernel<<<blocks_for(total), kThreads, 0, stream>>>(in.z.data_ptr<float>(), in.mean.data_ptr<float>(),
                                                                 in.std.data_ptr<float>(), total, in.D,
                                                                 out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hypernet_block_cuda(
    const at::Tensor& z, const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, const at::Tensor& s,
    const at::Tensor& t, const at::Tensor& idx, bool relu_first, const std::optional<at::Tensor>& mean,
    const std::optional<at::Tensor>& std, bool save_for_backward) {
  const Inputs in = check_inputs(z, a, b, c, s, t, idx, mean, std, "hypernet_block");
  const c10::cuda::CUDAGuard guard(z.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // z0: normalised into the buffer that becomes the output (z' = z0 + h overwrites it in place)
  at::Tensor out = in.mean.defined() ? normalised(in, stream) : at::empty_like(in.z);
  const at::Tensor z0 = in.mean.defined() ? out : in.z;
  const at::Tensor act = at::mm(z0, in.a);  // (N, r), before the epilogue overwrites z0 (stream order)
  const at::Tensor p = at::mm(act, in.b);   // (N, D); never A B (D x D)
  const int64_t total = in.N * in.D;
  if (total > 0) {
    forward_epilogue_kernel<<<blocks_for(total), kThreads, 0, stream>>>(p.data_ptr<float>(), in.c.data_ptr<float>(),
                                                                        in.s.data_ptr<float>(), in.t.data_ptr<float>(),
                                                                        in.idx.data_ptr<int64_t>(),
                                                                        z0.data_ptr<float>(), total, in.D, in.L,
                                                                        relu_first, out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (!save_for_backward) {
    return {out, at::empty({0}, in.z.options()), at::empty({0}, in.z.options())};
  }
  return {out, act, at::add(p, in.c)};  // pre = p + c, the epilogue's single fp32 rounding
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> hypernet_block_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& z, const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
    const at::Tensor& s, const at::Tensor& t, const at::Tensor& idx, bool relu_first,
    const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std,
    const std::optional<at::Tensor>& act_saved, const std::optional<at::Tensor>& pre_saved) {
  const char* op = "hypernet_block_backward";
  const Inputs in = check_inputs(z, a, b, c, s, t, idx, mean, std, op);
  EMS_CHECK(grad_out.device() == z.device() && grad_out.scalar_type() == at::kFloat && grad_out.sizes() == z.sizes(),
            op, ": grad_out must be fp32 ", z.sizes(), " on ", z.device());
  const bool saved = act_saved.has_value() && act_saved->defined();
  EMS_CHECK(saved == (pre_saved.has_value() && pre_saved->defined()), op, ": give both act and pre, or neither");
  if (saved) {
    EMS_CHECK(act_saved->device() == z.device() && act_saved->scalar_type() == at::kFloat && act_saved->dim() == 2 &&
                  act_saved->size(0) == in.N && act_saved->size(1) == in.r,
              op, ": act must be (", in.N, ", ", in.r, ") fp32 on ", z.device(), ", got ", act_saved->sizes());
    EMS_CHECK(pre_saved->device() == z.device() && pre_saved->scalar_type() == at::kFloat &&
                  pre_saved->sizes() == z.sizes(),
              op, ": pre must be (", in.N, ", ", in.D, ") fp32 on ", z.device(), ", got ", pre_saved->sizes());
  }
  const c10::cuda::CUDAGuard guard(z.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor gamma = grad_out.contiguous();  // dL/dz' (N, D)
  const at::Tensor z0 = in.mean.defined() ? normalised(in, stream) : in.z;
  const at::Tensor act = saved ? act_saved->contiguous() : at::mm(z0, in.a);  // (N, r)
  // p, then pi in place (N, D); a saved pre already holds + c (and is copied: backward may run twice)
  at::Tensor pi = saved ? pre_saved->clone(at::MemoryFormat::Contiguous) : at::mm(act, in.b);
  const at::Tensor bias = saved ? at::zeros_like(in.c) : in.c;
  at::Tensor ds_acc = at::zeros({in.L, in.D}, in.z.options().dtype(at::kDouble));
  at::Tensor dt_acc = at::zeros({in.L, in.D}, in.z.options().dtype(at::kDouble));
  at::Tensor grad_c = at::empty({in.D}, in.z.options());
  if (in.D > 0) {
    backward_column_kernel<<<blocks_for(in.D), kThreads, 0, stream>>>(pi.data_ptr<float>(), gamma.data_ptr<float>(),
                                                                      bias.data_ptr<float>(), in.s.data_ptr<float>(),
                                                                      in.t.data_ptr<float>(),
                                                                      in.idx.data_ptr<int64_t>(), in.N, in.D,
                                                                      relu_first, ds_acc.data_ptr<double>(),
                                                                      dt_acc.data_ptr<double>(),
                                                                      grad_c.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const at::Tensor grad_b = at::mm(act.t(), pi);          // (r, D)
  const at::Tensor alpha = at::mm(pi, in.b.t());          // (N, r)
  const at::Tensor grad_a = at::mm(z0.t(), alpha);        // (D, r)
  at::Tensor grad_z = at::addmm(gamma, alpha, in.a.t());  // gamma + alpha A^T (N, D)
  if (in.mean.defined()) {
    grad_z.div_(in.std + kEps);  // dL/dx = dL/dz0 / (std + eps)
  }
  return {grad_z, grad_a, grad_b, grad_c, ds_acc.to(at::kFloat), dt_acc.to(at::kFloat)};
}

}  // namespace

TORCH_LIBRARY_IMPL(emsedit_fast, CUDA, m) {
  m.impl("hypernet_block", &hypernet_block_cuda);
  m.impl("hypernet_block_backward", &hypernet_block_backward_cuda);
}
