// value_targets / value_targets_backward on the CPU (reference: emsedit_fast/reference/value_targets.py).
//
// With z = [u~ | delta~] (N x D, D = d_in + d_out), raw keys u (N x d_in), eta (L,), idx (N,):
//   forward:   coeff_j = -eta[idx_j] <u_j, u~_j>,  target_j = coeff_j delta~_j
//   backward:  g_j = <P_j, delta~_j> (+ dL/dcoeff_j),  dL/du~_j = (-eta_i g_j) u_j,  dL/ddelta~_j = coeff_j P_j,
//              dL/deta_i = sum_{j: idx_j = i} -g_j <u_j, u~_j>
//
// One pass over the rows in parallel: each row's dot and its scaling run back to back while the row is in L1, so
// keys and z are read from memory once and every output element is written once. The per-layer reduction of the
// backward runs afterwards over N scalars in row order (deterministic, no atomics).

#include <torch/extension.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "emsedit_fast/checks.h"
#include "emsedit_fast/cpu_kernels.h"

namespace {

using emsedit_fast::cpu::dot_f64;
using emsedit_fast::cpu::parallel_grain;

struct Args {
  at::Tensor keys, z, eta;
  const int64_t* idx;
  int64_t n_rows, d_in, d_out, n_layers;
};

Args check_args(const at::Tensor& keys, const at::Tensor& z, const at::Tensor& eta, const at::Tensor& idx,
                const char* op) {
  for (const at::Tensor* t : {&keys, &z, &eta, &idx}) {
    EMS_CHECK(t->device().is_cpu(), op, ": all tensors must be on the CPU, got ", t->device());
  }
  EMS_CHECK_F32(keys);
  EMS_CHECK_F32(z);
  EMS_CHECK_F32(eta);
  EMS_CHECK_DIM(keys, 2);
  EMS_CHECK_DIM(z, 2);
  EMS_CHECK_DIM(eta, 1);
  EMS_CHECK(keys.size(0) == z.size(0) && z.size(1) > keys.size(1), op, ": keys (N, d_in) and z (N, D > d_in) ",
            "must share N, got ", keys.sizes(), " and ", z.sizes());
  EMS_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 1 && idx.size(0) == z.size(0), op, ": idx must be (",
            z.size(0), ",) int64, got ", idx.sizes(), " ", idx.scalar_type());
  EMS_CHECK_CONTIG(idx);
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t L = eta.size(0);
  for (int64_t j = 0; j < idx.size(0); ++j) {
    EMS_CHECK(ip[j] >= 0 && ip[j] < L, op, ": idx[", j, "] = ", ip[j], " is outside [0, ", L, ")");
  }
  return {keys.contiguous(), z.contiguous(), eta.contiguous(),         ip,
          z.size(0),         keys.size(1),   z.size(1) - keys.size(1), L};
}

std::tuple<at::Tensor, at::Tensor> value_targets_cpu(const at::Tensor& keys_in, const at::Tensor& z_in,
                                                     const at::Tensor& eta_in, const at::Tensor& idx) {
  const Args a = check_args(keys_in, z_in, eta_in, idx, "value_targets");
  const int64_t N = a.n_rows, d_in = a.d_in, d_out = a.d_out, D = d_in + d_out;
  at::Tensor targets = at::empty({N, d_out}, a.z.options());  // (N, d_out)
  at::Tensor coeffs = at::empty({N}, a.z.options());          // (N,)
  const float* kp = a.keys.data_ptr<float>();
  const float* zp = a.z.data_ptr<float>();
  const float* ep = a.eta.data_ptr<float>();
  float* tp = targets.data_ptr<float>();
  float* cp = coeffs.data_ptr<float>();
  at::parallel_for(0, N, parallel_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const float* zrow = zp + j * D;
      // coeff = (-eta) * fp32(dot): the same two roundings as the reference's -eta[idx] * (u * u~).sum(1)
      const float dot = static_cast<float>(dot_f64(kp + j * d_in, zrow, d_in));
      const float coef = -ep[a.idx[j]] * dot;
      cp[j] = coef;
      const float* grads = zrow + d_in;  // delta~_j (d_out,)
      float* out = tp + j * d_out;
      for (int64_t c = 0; c < d_out; ++c) {
        out[c] = coef * grads[c];
      }
    }
  });
  return {targets, coeffs};
}

std::tuple<at::Tensor, at::Tensor> value_targets_backward_cpu(const at::Tensor& grad_targets_in,
                                                              const std::optional<at::Tensor>& grad_coeffs_in,
                                                              const at::Tensor& keys_in, const at::Tensor& z_in,
                                                              const at::Tensor& eta_in, const at::Tensor& idx) {
  const char* op = "value_targets_backward";
  const Args a = check_args(keys_in, z_in, eta_in, idx, op);
  const int64_t N = a.n_rows, d_in = a.d_in, d_out = a.d_out, D = d_in + d_out;
  EMS_CHECK(grad_targets_in.device().is_cpu() && grad_targets_in.scalar_type() == at::kFloat &&
                grad_targets_in.dim() == 2 && grad_targets_in.size(0) == N && grad_targets_in.size(1) == d_out,
            op, ": grad_targets must be (", N, ", ", d_out, ") fp32 on the CPU, got ", grad_targets_in.sizes());
  const at::Tensor grad_targets = grad_targets_in.contiguous();
  at::Tensor grad_coeffs;
  if (grad_coeffs_in.has_value() && grad_coeffs_in->defined()) {
    grad_coeffs = grad_coeffs_in->contiguous();
    EMS_CHECK(grad_coeffs.device().is_cpu() && grad_coeffs.scalar_type() == at::kFloat && grad_coeffs.numel() == N, op,
              ": grad_coeffs must be (", N, ",) fp32 on the CPU, got ", grad_coeffs.sizes());
  }
  const float* gcp = grad_coeffs.defined() ? grad_coeffs.data_ptr<float>() : nullptr;

  at::Tensor grad_z = at::empty({N, D}, a.z.options());  // (N, D)
  std::vector<float> contrib(static_cast<size_t>(N));    // -g_j <u_j, u~_j>, reduced per layer below
  const float* kp = a.keys.data_ptr<float>();
  const float* zp = a.z.data_ptr<float>();
  const float* ep = a.eta.data_ptr<float>();
  const float* pp = grad_targets.data_ptr<float>();
  float* gzp = grad_z.data_ptr<float>();
  at::parallel_for(0, N, parallel_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const float* u = kp + j * d_in;
      const float* zrow = zp + j * D;
      const float* p = pp + j * d_out;
      const float neg_eta = -ep[a.idx[j]];
      const float dot = static_cast<float>(dot_f64(u, zrow, d_in));  // <u_j, u~_j>
      const float coef = neg_eta * dot;
      float g = static_cast<float>(dot_f64(p, zrow + d_in, d_out));  // <P_j, delta~_j>
      if (gcp != nullptr) {
        g = g + gcp[j];
      }
      const float key_scale = neg_eta * g;
      float* out = gzp + j * D;
      for (int64_t c = 0; c < d_in; ++c) {
        out[c] = key_scale * u[c];  // dL/du~_j
      }
      for (int64_t c = 0; c < d_out; ++c) {
        out[d_in + c] = coef * p[c];  // dL/ddelta~_j
      }
      contrib[j] = -g * dot;
    }
  });

  // dL/deta: per-layer sums in row order, accumulated in fp64 (the reference adds in fp32 in the same order).
  std::vector<double> acc(static_cast<size_t>(a.n_layers), 0.0);
  for (int64_t j = 0; j < N; ++j) {
    acc[a.idx[j]] += static_cast<double>(contrib[j]);
  }
  at::Tensor grad_eta = at::empty({a.n_layers}, a.eta.options());
  for (int64_t l = 0; l < a.n_layers; ++l) {
    grad_eta.data_ptr<float>()[l] = static_cast<float>(acc[l]);
  }
  return {grad_z, grad_eta};
}

}  // namespace

TORCH_LIBRARY_IMPL(emsedit_fast, CPU, m) {
  m.impl("value_targets", &value_targets_cpu);
  m.impl("value_targets_backward", &value_targets_backward_cpu);
}
