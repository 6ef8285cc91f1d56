// hypernet_block / hypernet_block_backward on the CPU (reference: emsedit_fast/reference/hypernet_block.py;
// docs/method.md, "Hypernetwork" and "Meta-gradient").
//
// For rows z (N x D) of all layers stacked, with layer index idx (N,):
//   a = z A (N x r),  p = a B + c (N x D)
//   relu_first:  h = s[idx] * relu(p) + t[idx]        otherwise:  h = relu(s[idx] * p + t[idx])
//   z' = z + h,   relu'(0) = 1 (mask p >= 0)
// With mean/std given, z is the raw row x and the block works on z0 = (x - mean) / (std + 2^-23).
//
// Forward, one call for all layers (A and B are read once, not once per layer as in the published code):
//   0. (mean/std only) z0 is written straight into the output buffer: the output is z0 + h anyway, so the
//      normalised rows need no buffer of their own.
//   1. GEMM1 a = z0 A with BLAS over all rows (N x r, small next to N x D).
//   2. GEMM2 per (row tile x column tile), with a fused epilogue while the tile is in L2: + c, ReLU mask, gather
//      s[idx], t[idx], residual. Memory traffic of stage 2: reads z0 and writes z' once; p never exists as an N x D
//      tensor (the reference materialises p, the mask, relu(p), s[idx], t[idx], h and z' separately).
//   save_for_backward (training: the backward follows at once): the epilogue also stores pre = p + c (N x D) and the
//   op returns a and pre, so the backward runs no GEMM of the forward again. Otherwise both come back empty.
//
// Backward, recomputing a and p unless the forward saved them:
//   column-block pass: for each block of columns (in parallel), walk the row tiles in row order: p tile by GEMM (or
//   the saved pre), then in one fused loop the mask, pi = s[idx] * gamma * [p >= 0] (N x D, needed by two GEMMs),
//   and the per-column reductions dc, ds[idx], dt[idx] in fp64. A column block owns its columns of dc, ds, dt, so the
//   reductions need no atomics and run in row order whatever the thread count (deterministic).
//   GEMMs: dB = a^T pi, alpha = pi B^T, dA = z0^T alpha, dz = gamma + alpha A^T (then / (std + eps) with mean/std).

#include <torch/extension.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "emsedit_fast/checks.h"
#include "emsedit_fast/cpu_kernels.h"

namespace {

using emsedit_fast::cpu::parallel_grain;
using emsedit_fast::cpu::sgemm;

// fp32 machine epsilon: the normaliser's guard (reference.running_stats.EPS).
constexpr float kEps = 1.1920928955078125e-07f;
// Forward tiles: 256 rows x 256 columns of p (256 KiB, L2) plus the B panel (r x 256) they read. The BLAS runs
// short tiles slower: one core computing act B for N = 180, r = 1024, D = 18432 took 0.94 s in 64-row tiles, 0.68 s
// in 256-row tiles and 0.72 s as one GEMM.
constexpr int64_t kFwdRows = 256;
constexpr int64_t kFwdCols = 256;
// Backward: 128-column blocks (the unit of parallelism and of reduction ownership), walked in 256-row tiles.
constexpr int64_t kBwdRows = 256;
constexpr int64_t kBwdCols = 128;

struct Inputs {
  at::Tensor z, a, b, c, s, t, mean, std;  // contiguous; mean/std undefined when not given
  const int64_t* idx;
  int64_t N, D, r, L;
  std::vector<float> den;  // std + eps (D,), when mean/std are given
};

Inputs check_inputs(const at::Tensor& z, const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                    const at::Tensor& s, const at::Tensor& t, const at::Tensor& idx,
                    const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std, const char* op) {
  for (const at::Tensor* x : {&z, &a, &b, &c, &s, &t, &idx}) {
    EMS_CHECK(x->device().is_cpu(), op, ": all tensors must be on the CPU, got ", x->device());
  }
  EMS_CHECK_DIM(z, 2);
  const int64_t N = z.size(0), D = z.size(1);
  EMS_CHECK(a.dim() == 2 && a.size(0) == D, op, ": a must be (D=", D, ", rank), got ", a.sizes());
  const int64_t r = a.size(1);
  EMS_CHECK(b.dim() == 2 && b.size(0) == r && b.size(1) == D, op, ": b must be (rank=", r, ", D=", D, "), got ",
            b.sizes());
  EMS_CHECK(c.dim() == 1 && c.size(0) == D, op, ": c must be (", D, ",), got ", c.sizes());
  EMS_CHECK(s.dim() == 2 && s.size(1) == D && t.sizes() == s.sizes(), op, ": s and t must be (layers, D=", D, "), got ",
            s.sizes(), " and ", t.sizes());
  for (const at::Tensor* x : {&z, &a, &b, &c, &s, &t}) {
    EMS_CHECK(x->scalar_type() == at::kFloat, op, ": z, a, b, c, s, t must be fp32, got ", x->scalar_type());
  }
  EMS_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 1 && idx.size(0) == N, op, ": idx must be (", N,
            ",) int64, got ", idx.sizes(), " ", idx.scalar_type());
  EMS_CHECK_CONTIG(idx);
  const bool has_mean = mean.has_value() && mean->defined();
  const bool has_std = std.has_value() && std->defined();
  EMS_CHECK(has_mean == has_std, op, ": give both mean and std, or neither");
  Inputs in{z.contiguous(),
            a.contiguous(),
            b.contiguous(),
            c.contiguous(),
            s.contiguous(),
            t.contiguous(),
            {},
            {},
            idx.data_ptr<int64_t>(),
            N,
            D,
            r,
            s.size(0),
            {}};
  for (int64_t j = 0; j < N; ++j) {
    EMS_CHECK(in.idx[j] >= 0 && in.idx[j] < in.L, op, ": idx[", j, "] = ", in.idx[j], " is outside [0, ", in.L, ")");
  }
  if (has_mean) {
    for (const at::Tensor* x : {&*mean, &*std}) {
      EMS_CHECK(x->device().is_cpu() && x->scalar_type() == at::kFloat && x->dim() == 1 && x->size(0) == D, op,
                ": mean and std must be (", D, ",) fp32 on the CPU, got ", x->sizes(), " ", x->scalar_type());
    }
    in.mean = mean->contiguous();
    in.std = std->contiguous();
    in.den.resize(static_cast<size_t>(D));
    const float* sp = in.std.data_ptr<float>();
    for (int64_t k = 0; k < D; ++k) {
      in.den[k] = sp[k] + kEps;  // fp32, as the reference's std + EPS
    }
  }
  return in;
}

// z0 = (x - mean) / (std + eps) for all rows, into `out` (N x D). Rows in parallel; reads x once, writes out once.
EMS_EXACT void normalise_rows(const Inputs& in, float* out) {
  const float* x = in.z.data_ptr<float>();
  const float* mu = in.mean.data_ptr<float>();
  const float* den = in.den.data();
  const int64_t D = in.D;
  at::parallel_for(0, in.N, parallel_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const float* xr = x + j * D;
      float* o = out + j * D;
      for (int64_t k = 0; k < D; ++k) {
        o[k] = (xr[k] - mu[k]) / den[k];
      }
    }
  });
}

// Forward epilogue of one row piece (n columns): out = z0 + h, with pre = p + c (also stored to pre_out when kSave).
// z0 and out may alias (the folded-normaliser case reads z0 from the output buffer), which is why the loop is
// vectorised by hand rather than left to the compiler. Same operations in the same order as the scalar tail.
template <bool kReluFirst, bool kSave>
EMS_EXACT void forward_epilogue(const float* __restrict p, const float* __restrict c, const float* __restrict s,
                                const float* __restrict t, const float* z0, float* out, float* __restrict pre_out,
                                int64_t n) {
  int64_t k = 0;
#ifdef EMSEDIT_FAST_AVX2
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  for (; k + 8 <= n; k += 8) {
    const __m256 pre = _mm256_add_ps(_mm256_loadu_ps(p + k), _mm256_loadu_ps(c + k));
    if (kSave) {
      _mm256_storeu_ps(pre_out + k, pre);
    }
    __m256 h;
    if (kReluFirst) {
      // q = pre * [pre >= 0] (ordered compare: NaN gives 0, and NaN * 0 stays NaN, as in the reference)
      const __m256 q = _mm256_mul_ps(pre, _mm256_and_ps(_mm256_cmp_ps(pre, zero, _CMP_GE_OQ), one));
      h = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(s + k), q), _mm256_loadu_ps(t + k));
    } else {
      const __m256 u = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(s + k), pre), _mm256_loadu_ps(t + k));
      h = _mm256_mul_ps(u, _mm256_and_ps(_mm256_cmp_ps(u, zero, _CMP_GE_OQ), one));
    }
    _mm256_storeu_ps(out + k, _mm256_add_ps(_mm256_loadu_ps(z0 + k), h));
  }
#endif
  for (; k < n; ++k) {
    const float pre = p[k] + c[k];
    if (kSave) {
      pre_out[k] = pre;
    }
    float h;
    if (kReluFirst) {
      const float q = pre * (pre >= 0.0f ? 1.0f : 0.0f);  // x * [x >= 0]: keeps NaN like the reference
      h = s[k] * q + t[k];
    } else {
      const float u = s[k] * pre + t[k];
      h = u * (u >= 0.0f ? 1.0f : 0.0f);
    }
    out[k] = z0[k] + h;
  }
}

template <bool kReluFirst>
void forward_epilogue_row(const float* p, const float* c, const float* s, const float* t, const float* z0,
                          float* out, float* pre_out, int64_t n) {
  if (pre_out != nullptr) {
    forward_epilogue<kReluFirst, true>(p, c, s, t, z0, out, pre_out, n);
  } else {
    forward_epilogue<kReluFirst, false>(p, c, s, t, z0, out, nullptr, n);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hypernet_block_cpu(
    const at::Tensor& z_in, const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& c_in,
    const at::Tensor& s_in, const at::Tensor& t_in, const at::Tensor& idx, bool relu_first,
    const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std, bool save_for_backward) {
  const Inputs in = check_inputs(z_in, a_in, b_in, c_in, s_in, t_in, idx, mean, std, "hypernet_block");
  const int64_t N = in.N, D = in.D, r = in.r;
  at::Tensor out = at::empty({N, D}, in.z.options());  // (N, D)
  at::Tensor pre = save_for_backward ? at::empty({N, D}, in.z.options()) : at::empty({0}, in.z.options());
  float* op = out.data_ptr<float>();
  float* prep = save_for_backward ? pre.data_ptr<float>() : nullptr;
  const float* z0;
  if (in.mean.defined()) {
    normalise_rows(in, op);  // stage 0: z0 lives in the output buffer
    z0 = op;
  } else {
    z0 = in.z.data_ptr<float>();
  }
  if (N == 0) {
    return {out, save_for_backward ? at::empty({0, r}, in.z.options()) : at::empty({0}, in.z.options()), pre};
  }
  // stage 1: a = z0 A (N x r), multi-threaded BLAS over all rows
  const at::Tensor z0t = in.mean.defined() ? out : in.z;
  const at::Tensor act = at::mm(z0t, in.a);
  const float* ap = act.data_ptr<float>();
  const float* bp = in.b.data_ptr<float>();
  const float* cp = in.c.data_ptr<float>();
  const float* sp = in.s.data_ptr<float>();
  const float* tp = in.t.data_ptr<float>();

  // stage 2: tiles of p = a B, each followed by its epilogue while hot
  const int64_t row_tiles = (N + kFwdRows - 1) / kFwdRows;
  const int64_t col_tiles = (D + kFwdCols - 1) / kFwdCols;
  // work per tile: the rank-r GEMM and the epilogue
  at::parallel_for(0, row_tiles * col_tiles, parallel_grain(kFwdRows * kFwdCols * (r + 1)), [&](int64_t begin,
                                                                                              int64_t end) {
    std::vector<float> buf(static_cast<size_t>(kFwdRows * kFwdCols));  // one p tile per thread
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t r0 = (tile / col_tiles) * kFwdRows, rows = std::min(kFwdRows, N - r0);
      const int64_t c0 = (tile % col_tiles) * kFwdCols, cols = std::min(kFwdCols, D - c0);
      // buf (rows x cols) = a[r0:r0+rows, :] (rows x r) @ B[:, c0:c0+cols] (r x cols)
      sgemm(false, false, rows, cols, r, 1.0f, ap + r0 * r, r, bp + c0, D, 0.0f, buf.data(), cols);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t j = r0 + i, l = in.idx[j];
        const float* pr = buf.data() + i * cols;
        const float* srow = sp + l * D + c0;  // gathered s[idx_j], t[idx_j]
        const float* trow = tp + l * D + c0;
        float* pre_row = prep != nullptr ? prep + j * D + c0 : nullptr;
        if (relu_first) {
          forward_epilogue_row<true>(pr, cp + c0, srow, trow, z0 + j * D + c0, op + j * D + c0, pre_row, cols);
        } else {
          forward_epilogue_row<false>(pr, cp + c0, srow, trow, z0 + j * D + c0, op + j * D + c0, pre_row, cols);
        }
      }
    }
  });
  return {out, save_for_backward ? act : at::empty({0}, in.z.options()), pre};
}

// Backward epilogue of one row piece (n columns of row j, layer rows ds/dt of idx_j):
//   relu_first:  dt += gamma; ds += gamma * relu(p); pi = s * gamma * [p >= 0]
//   otherwise:   g = gamma * [s p + t >= 0]; dt += g; ds += g * p; pi = s * g
//   dc += pi.  Sums in fp64; products rounded to fp32 first, as the reference forms them.
#ifdef EMSEDIT_FAST_AVX2
// acc[0:8] += fp64(v): the fp64 accumulators of 8 columns
EMS_INLINE void add_f64x8(double* acc, __m256 v) {
  _mm256_storeu_pd(acc, _mm256_add_pd(_mm256_loadu_pd(acc), _mm256_cvtps_pd(_mm256_castps256_ps128(v))));
  _mm256_storeu_pd(acc + 4, _mm256_add_pd(_mm256_loadu_pd(acc + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))));
}
#endif

template <bool kReluFirst>
EMS_EXACT void backward_epilogue(const float* __restrict p, const float* __restrict c, const float* __restrict s,
                                 const float* __restrict t, const float* __restrict gamma, float* __restrict pi,
                                 double* __restrict ds, double* __restrict dt, double* __restrict dc, int64_t n) {
  int64_t k = 0;
#ifdef EMSEDIT_FAST_AVX2
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  for (; k + 8 <= n; k += 8) {
    const __m256 pre = _mm256_add_ps(_mm256_loadu_ps(p + k), _mm256_loadu_ps(c + k));
    const __m256 g = _mm256_loadu_ps(gamma + k), sv = _mm256_loadu_ps(s + k);
    __m256 v;
    if (kReluFirst) {
      const __m256 mask = _mm256_and_ps(_mm256_cmp_ps(pre, zero, _CMP_GE_OQ), one);
      add_f64x8(dt + k, g);
      add_f64x8(ds + k, _mm256_mul_ps(g, _mm256_mul_ps(pre, mask)));
      v = _mm256_mul_ps(_mm256_mul_ps(sv, g), mask);
    } else {
      const __m256 u = _mm256_add_ps(_mm256_mul_ps(sv, pre), _mm256_loadu_ps(t + k));
      const __m256 gm = _mm256_mul_ps(g, _mm256_and_ps(_mm256_cmp_ps(u, zero, _CMP_GE_OQ), one));
      add_f64x8(dt + k, gm);
      add_f64x8(ds + k, _mm256_mul_ps(gm, pre));
      v = _mm256_mul_ps(sv, gm);
    }
    _mm256_storeu_ps(pi + k, v);
    add_f64x8(dc + k, v);
  }
#endif
  for (; k < n; ++k) {
    const float pre = p[k] + c[k];
    const float g = gamma[k];
    float v;
    if (kReluFirst) {
      const float mask = pre >= 0.0f ? 1.0f : 0.0f;
      const float q = pre * mask;
      dt[k] += static_cast<double>(g);
      ds[k] += static_cast<double>(g * q);
      v = (s[k] * g) * mask;
    } else {
      const float u = s[k] * pre + t[k];
      const float gm = g * (u >= 0.0f ? 1.0f : 0.0f);
      dt[k] += static_cast<double>(gm);
      ds[k] += static_cast<double>(gm * pre);
      v = s[k] * gm;
    }
    pi[k] = v;
    dc[k] += static_cast<double>(v);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> hypernet_block_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& z_in, const at::Tensor& a_in, const at::Tensor& b_in,
    const at::Tensor& c_in, const at::Tensor& s_in, const at::Tensor& t_in, const at::Tensor& idx, bool relu_first,
    const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std,
    const std::optional<at::Tensor>& act_saved, const std::optional<at::Tensor>& pre_saved) {
  const char* opname = "hypernet_block_backward";
  const Inputs in = check_inputs(z_in, a_in, b_in, c_in, s_in, t_in, idx, mean, std, opname);
  const int64_t N = in.N, D = in.D, r = in.r, L = in.L;
  EMS_CHECK(grad_out_in.device().is_cpu() && grad_out_in.scalar_type() == at::kFloat &&
                grad_out_in.sizes() == in.z.sizes(),
            opname, ": grad_out must be fp32 ", in.z.sizes(), " on the CPU, got ", grad_out_in.sizes(), " ",
            grad_out_in.scalar_type());
  const bool saved = act_saved.has_value() && act_saved->defined();
  EMS_CHECK(saved == (pre_saved.has_value() && pre_saved->defined()), opname, ": give both act and pre, or neither");
  if (saved) {
    EMS_CHECK(act_saved->device().is_cpu() && act_saved->scalar_type() == at::kFloat && act_saved->dim() == 2 &&
                  act_saved->size(0) == N && act_saved->size(1) == r,
              opname, ": act must be (", N, ", ", r, ") fp32 on the CPU, got ", act_saved->sizes());
    EMS_CHECK(pre_saved->device().is_cpu() && pre_saved->scalar_type() == at::kFloat &&
                  pre_saved->sizes() == in.z.sizes(),
              opname, ": pre must be (", N, ", ", D, ") fp32 on the CPU, got ", pre_saved->sizes());
  }
  const at::Tensor gamma = grad_out_in.contiguous();  // dL/dz' (N, D)

  // z0: with mean/std it is materialised once, in the buffer that will later hold dz (it is needed by GEMM1 and by
  // dA = z0^T alpha, and dz overwrites it only after both).
  at::Tensor grad_z = at::empty({N, D}, in.z.options());
  at::Tensor z0 = in.z;
  if (in.mean.defined()) {
    normalise_rows(in, grad_z.data_ptr<float>());
    z0 = grad_z;
  }
  const at::Tensor act = saved ? act_saved->contiguous() : at::mm(z0, in.a);  // a = z0 A (N, r)
  const at::Tensor pre = saved ? pre_saved->contiguous() : at::Tensor();      // p + c (N, D), from the forward
  const std::vector<float> no_bias(saved ? static_cast<size_t>(D) : 0, 0.0f);  // pre already holds + c
  at::Tensor pi = at::empty({N, D}, in.z.options());                          // (N, D)
  std::vector<double> ds_acc(static_cast<size_t>(L * D), 0.0), dt_acc(static_cast<size_t>(L * D), 0.0);
  std::vector<double> dc_acc(static_cast<size_t>(D), 0.0);

  const float* ap = act.data_ptr<float>();
  const float* bp = in.b.data_ptr<float>();
  const float* cp = saved ? no_bias.data() : in.c.data_ptr<float>();
  const float* prep = saved ? pre.data_ptr<float>() : nullptr;
  const float* sp = in.s.data_ptr<float>();
  const float* tp = in.t.data_ptr<float>();
  const float* gp = gamma.data_ptr<float>();
  float* pip = pi.data_ptr<float>();
  const int64_t col_blocks = (D + kBwdCols - 1) / kBwdCols;
  const int64_t work = N * kBwdCols * (saved ? 1 : r + 1);  // per column block: the epilogue (and the p GEMM)
  at::parallel_for(0, col_blocks, parallel_grain(work), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(saved ? 0 : static_cast<size_t>(kBwdRows * kBwdCols));  // one p tile per thread
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t c0 = blk * kBwdCols, cols = std::min(kBwdCols, D - c0);
      for (int64_t r0 = 0; r0 < N; r0 += kBwdRows) {  // row order: fixed reduction order
        const int64_t rows = std::min(kBwdRows, N - r0);
        if (!saved) {
          sgemm(false, false, rows, cols, r, 1.0f, ap + r0 * r, r, bp + c0, D, 0.0f, buf.data(), cols);
        }
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t j = r0 + i, l = in.idx[j];
          const int64_t off = j * D + c0;
          const float* prow = saved ? prep + off : buf.data() + i * cols;  // p (+ c when saved) of row j
          double* ds = ds_acc.data() + l * D + c0;  // this block's columns of ds[idx_j], dt[idx_j]
          double* dt = dt_acc.data() + l * D + c0;
          if (relu_first) {
            backward_epilogue<true>(prow, cp + c0, sp + l * D + c0, tp + l * D + c0, gp + off, pip + off, ds, dt,
                                    dc_acc.data() + c0, cols);
          } else {
            backward_epilogue<false>(prow, cp + c0, sp + l * D + c0, tp + l * D + c0, gp + off, pip + off, ds, dt,
                                     dc_acc.data() + c0, cols);
          }
        }
      }
    }
  });

  at::Tensor grad_c = at::empty({D}, in.z.options());
  at::Tensor grad_s = at::empty({L, D}, in.z.options());
  at::Tensor grad_t = at::empty({L, D}, in.z.options());
  std::transform(dc_acc.begin(), dc_acc.end(), grad_c.data_ptr<float>(),
                 [](double v) { return static_cast<float>(v); });
  std::transform(ds_acc.begin(), ds_acc.end(), grad_s.data_ptr<float>(),
                 [](double v) { return static_cast<float>(v); });
  std::transform(dt_acc.begin(), dt_acc.end(), grad_t.data_ptr<float>(),
                 [](double v) { return static_cast<float>(v); });

  const at::Tensor grad_b = at::mm(act.t(), pi);    // (r, D)
  const at::Tensor alpha = at::mm(pi, in.b.t());    // (N, r)
  const at::Tensor grad_a = at::mm(z0.t(), alpha);  // (D, r); last use of z0
  at::addmm_out(grad_z, gamma, alpha, in.a.t());    // dz = gamma + alpha A^T (N, D), overwriting z0
  if (in.mean.defined()) {
    // dL/dx = dL/dz0 / (std + eps), in place (reads and writes dz once)
    float* gz = grad_z.data_ptr<float>();
    const float* den = in.den.data();
    at::parallel_for(0, N, parallel_grain(D), [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        float* row = gz + j * D;
        for (int64_t k = 0; k < D; ++k) {
          row[k] = row[k] / den[k];
        }
      }
    });
  }
  return {grad_z, grad_a, grad_b, grad_c, grad_s, grad_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(emsedit_fast, CPU, m) {
  m.impl("hypernet_block", &hypernet_block_cpu);
  m.impl("hypernet_block_backward", &hypernet_block_backward_cpu);
}
