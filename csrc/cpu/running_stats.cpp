// running_stats_update_ / running_stats_normalize on the CPU (reference: emsedit_fast/reference/running_stats.py).
//
// Rows are x = [keys | value_grads] (m x D, D = d_in + d_out); the concatenation is never materialised: both kernels
// read keys (m x d_in) and value_grads (m x d_out) in place, in whatever float dtype they arrive.
//
//   update_:    merge the batch into (count f64 (1,), mean, var, std fp32 (D,)) with Chan, Golub and LeVeque's
//               parallel formula, in fp64 (docs/method.md, "Running normaliser")
//   normalize:  Z = (x - mean) / (std + eps), a new (m, D) fp32 tensor

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "emsedit_fast/checks.h"
#include "emsedit_fast/cpu_kernels.h"

namespace {

using emsedit_fast::cpu::parallel_grain;
using emsedit_fast::cpu::to_f32;

// Columns per task of the update: 64 fp64 accumulator pairs (1 KiB) stay in registers / L1 while the task streams
// its 64-column strip of every row.
constexpr int64_t kCols = 64;

void check_rows(const at::Tensor& keys, const at::Tensor& value_grads, const at::Tensor& mean, const char* op) {
  EMS_CHECK_CPU(keys);
  EMS_CHECK_CPU(value_grads);
  EMS_CHECK_DIM(keys, 2);
  EMS_CHECK_DIM(value_grads, 2);
  EMS_CHECK(keys.size(0) == value_grads.size(0), op, ": keys and value_grads must have the same number of rows, got ",
            keys.size(0), " and ", value_grads.size(0));
  EMS_CHECK(keys.is_floating_point() && value_grads.is_floating_point(), op,
            ": keys and value_grads must be floating point");
  const int64_t d = keys.size(1) + value_grads.size(1);
  EMS_CHECK(mean.dim() == 1 && mean.size(0) == d, op, ": statistics must have shape (", d, ",) = d_in + d_out, got ",
            mean.sizes());
}

void check_stat(const at::Tensor& t, int64_t d, const char* name, const char* op) {
  EMS_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  EMS_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == d, op, ": ", name, " must be (", d,
            ",) fp32, got ", t.sizes(), " ", t.scalar_type());
  EMS_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// Shifted sums of one column strip [c0, c0 + cols) of x (m x ld): s1 = sum_j (x_j - x_0), s2 = sum_j (x_j - x_0)^2,
// in fp64. Shifting by the first row keeps the one-pass variance free of cancellation (|mean - x_0| ~ std), so this
// reads every element once and still matches the reference's two-pass fp64 mean/variance to ~1e-16.
template <typename scalar_t>
void strip_sums(const scalar_t* x, int64_t m, int64_t ld, int64_t c0, int64_t cols, double* shift, double* s1,
                double* s2) {
  for (int64_t c = 0; c < cols; ++c) {
    shift[c] = static_cast<double>(x[c0 + c]);  // exact widening (bf16/fp16 via fp32)
    s1[c] = 0.0;
    s2[c] = 0.0;
  }
  for (int64_t j = 1; j < m; ++j) {  // row 0 contributes exactly 0
    const scalar_t* row = x + j * ld + c0;
    for (int64_t c = 0; c < cols; ++c) {
      const double v = static_cast<double>(row[c]) - shift[c];
      s1[c] += v;
      s2[c] += v * v;
    }
  }
}

void running_stats_update_cpu(const at::Tensor& count, const at::Tensor& mean, const at::Tensor& var,
                              const at::Tensor& std, const at::Tensor& keys_in, const at::Tensor& value_grads_in) {
  const char* op = "running_stats_update_";
  check_rows(keys_in, value_grads_in, mean, op);
  const int64_t d_in = keys_in.size(1), d_out = value_grads_in.size(1), D = d_in + d_out;
  const int64_t m = keys_in.size(0);
  EMS_CHECK(m >= 1, op, ": needs at least one row");
  EMS_CHECK(count.device().is_cpu() && count.scalar_type() == at::kDouble && count.numel() == 1, op,
            ": count must be a (1,) float64 CPU tensor, got ", count.sizes(), " ", count.scalar_type());
  check_stat(mean, D, "mean", op);
  check_stat(var, D, "var", op);
  check_stat(std, D, "std", op);
  const at::Tensor keys = keys_in.contiguous();
  const at::Tensor value_grads = value_grads_in.contiguous();

  // The merge scalars, in fp64 exactly as the reference forms them in Python.
  const double n_old = *count.data_ptr<double>();
  const double n_new = n_old + static_cast<double>(m);
  const double md = static_cast<double>(m);
  const double cross = n_old * md / n_new;  // d^2 weight in M2
  const double step = md / n_new;           // mean step
  const double var_div = std::max(n_new, 1.0);
  const double std_div = n_new - 1.0 + 1e-8;

  float* mean_p = mean.data_ptr<float>();
  float* var_p = var.data_ptr<float>();
  float* std_p = std.data_ptr<float>();

  // Tasks: 64-column strips of keys, then of value_grads; each owns its columns of the statistics (no races, and
  // every column is reduced in row order whatever the thread count).
  const int64_t key_tasks = (d_in + kCols - 1) / kCols;
  const int64_t grad_tasks = (d_out + kCols - 1) / kCols;
  at::parallel_for(0, key_tasks + grad_tasks, parallel_grain(m * kCols), [&](int64_t begin, int64_t end) {
    double shift[kCols], s1[kCols], s2[kCols];
    for (int64_t task = begin; task < end; ++task) {
      const bool is_key = task < key_tasks;
      const at::Tensor& x = is_key ? keys : value_grads;
      const int64_t ld = is_key ? d_in : d_out;
      const int64_t c0 = (is_key ? task : task - key_tasks) * kCols;
      const int64_t cols = std::min(kCols, ld - c0);
      const int64_t col_base = is_key ? c0 : d_in + c0;  // column of the statistics
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "running_stats_update_cpu",
                                      [&] { strip_sums(x.data_ptr<scalar_t>(), m, ld, c0, cols, shift, s1, s2); });
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t k = col_base + c;
        const double xbar = shift[c] + s1[c] / md;
        const double v_b = std::max(s2[c] / md - (s1[c] / md) * (s1[c] / md), 0.0);  // population variance
        const double mu = static_cast<double>(mean_p[k]);
        const double dlt = xbar - mu;
        const double m2 = static_cast<double>(var_p[k]) * n_old + v_b * md + dlt * dlt * cross;
        mean_p[k] = static_cast<float>(mu + dlt * step);
        var_p[k] = static_cast<float>(m2 / var_div);
        std_p[k] = static_cast<float>(std::sqrt(m2 / std_div));
      }
    }
  });
  *count.data_ptr<double>() = n_new;
}

// out[c] = (x[c] - mean[c]) / den[c] for one row part; den = std + eps precomputed in fp32 like the reference.
template <typename scalar_t>
EMS_EXACT void normalize_row(const scalar_t* __restrict x, const float* __restrict mean, const float* __restrict den,
                             float* __restrict out, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    out[c] = (to_f32(x[c]) - mean[c]) / den[c];
  }
}

at::Tensor running_stats_normalize_cpu(const at::Tensor& keys_in, const at::Tensor& value_grads_in,
                                       const at::Tensor& mean_in, const at::Tensor& std_in, double eps) {
  const char* op = "running_stats_normalize";
  check_rows(keys_in, value_grads_in, mean_in, op);
  const int64_t d_in = keys_in.size(1), d_out = value_grads_in.size(1), D = d_in + d_out;
  const int64_t m = keys_in.size(0);
  EMS_CHECK(mean_in.device().is_cpu() && mean_in.scalar_type() == at::kFloat, op, ": mean must be fp32 on the CPU");
  EMS_CHECK(std_in.device().is_cpu() && std_in.scalar_type() == at::kFloat && std_in.dim() == 1 && std_in.size(0) == D,
            op, ": std must be (", D, ",) fp32 on the CPU, got ", std_in.sizes(), " ", std_in.scalar_type());
  const at::Tensor keys = keys_in.contiguous();
  const at::Tensor value_grads = value_grads_in.contiguous();
  const at::Tensor mean = mean_in.contiguous();
  const float* mean_p = mean.data_ptr<float>();

  // std + eps in fp32, as `std + eps` is evaluated on an fp32 tensor (the scalar is rounded to fp32 first).
  std::vector<float> den(static_cast<size_t>(D));
  const at::Tensor stdc = std_in.contiguous();
  const float eps_f = static_cast<float>(eps);
  for (int64_t k = 0; k < D; ++k) {
    den[k] = stdc.data_ptr<float>()[k] + eps_f;
  }

  at::Tensor out = at::empty({m, D}, keys.options().dtype(at::kFloat));
  float* out_p = out.data_ptr<float>();
  // Rows in parallel; reads each input element once and writes each output element once.
  at::parallel_for(0, m, parallel_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, keys.scalar_type(), "running_stats_normalize_cpu", [&] {
        normalize_row(keys.data_ptr<scalar_t>() + j * d_in, mean_p, den.data(), out_p + j * D, d_in);
      });
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, value_grads.scalar_type(),
                                      "running_stats_normalize_cpu", [&] {
                                        normalize_row(value_grads.data_ptr<scalar_t>() + j * d_out, mean_p + d_in,
                                                      den.data() + d_in, out_p + j * D + d_in, d_out);
                                      });
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(emsedit_fast, CPU, m) {
  m.impl("running_stats_update_", &running_stats_update_cpu);
  m.impl("running_stats_normalize", &running_stats_normalize_cpu);
}
