// Shared building blocks of the CPU kernels (csrc/cpu/*.cpp): a raw-pointer GEMM through ATen, and the row loops
// that convert between fp32 and the weight dtypes (fp32, bf16, fp16) with exactly one rounding.
//
// Vector paths use AVX2 (+FMA) when the build enables them (setup.py adds -mavx2 -mfma on machines that have them);
// fp16 additionally needs F16C, which every AVX2 CPU has but -mavx2 does not switch on, so the fp16 loops carry a
// function-level target attribute and a run-time check. Every vector loop has a scalar tail and a scalar fallback
// that computes the same value bit for bit.
//
// Rounding: GCC contracts a * b + c into one FMA by default (-ffp-contract=fast), even across statements and
// through intrinsics. The elementwise epilogues below are marked EMS_EXACT so that they round exactly where the
// PyTorch reference rounds (product, then sum): the weight update of apply_deltas_dense_ is then bit-identical to the
// reference, and the others differ only through their GEMMs' accumulation order.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define EMSEDIT_FAST_AVX2 1
#endif

// Dispatch over the weight dtypes of the in-place update ops (fp32, bf16, fp16); the body sees `scalar_t`.
#define EMS_DISPATCH_WEIGHT_TYPES(TYPE, NAME, ...)                                                          \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                                                            \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

#if defined(__GNUC__) && !defined(__clang__)
#define EMS_EXACT __attribute__((optimize("fp-contract=off")))
#else
#define EMS_EXACT  // clang fuses only within one expression (fp-contract=on): at most 1 ulp off, within tolerance
#endif
#define EMS_INLINE inline __attribute__((always_inline))

namespace emsedit_fast::cpu {

// --------------------------------------------------------------------------------------------------------------------
// Grain of an at::parallel_for over tasks of `work_per_task` units (elements touched, or multiply-adds for GEMM
// tiles). at::parallel_for runs on the calling thread when the range is no longer than its grain, and otherwise wakes
// the thread pool, which costs tens of microseconds on an idle machine and milliseconds on a busy one. Grouping tasks
// so that every chunk carries at least kMinParallelWork units keeps small inputs (a 32 KiB restore, a SmolLM2-size
// value-target row block) on one thread, as ATen's own elementwise kernels do (their grain is 32768 elements).
constexpr int64_t kMinParallelWork = int64_t{1} << 16;

inline int64_t parallel_grain(int64_t work_per_task) {
  return std::max<int64_t>(1, kMinParallelWork / std::max<int64_t>(work_per_task, 1));
}

// --------------------------------------------------------------------------------------------------------------------
// GEMM on raw row-major buffers.
//
//   C (m x n, row stride ldc) = alpha * op(A) op(B) + beta * C
//   op(A) is (m x k): A is stored (m x k) with row stride lda, or (k x m) with row stride lda when trans_a.
//   op(B) is (k x n): B is stored (k x n) with row stride ldb, or (n x k) with row stride ldb when trans_b.
//
// The tensors are zero-copy views (from_blob), and ATen's addmm hands row-major views with a leading dimension
// straight to the BLAS torch was built with (MKL here), so no operand is copied. Called inside an at::parallel_for
// region the BLAS runs single-threaded (nested OpenMP is off), which is what the tiled kernels want: each thread owns
// one tile, and the k-reduction order of a tile does not depend on the number of threads. beta == 0 means C is
// write-only (BLAS semantics: NaN in C is not propagated).
inline void sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                  const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) {
    return;
  }
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(at::kCPU);
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  if (k == 0) {  // empty reduction: C = beta * C
    if (beta == 0.0f) {
      out.zero_();
    } else if (beta != 1.0f) {
      out.mul_(beta);
    }
    return;
  }
  at::Tensor ta = trans_a ? at::from_blob(const_cast<float*>(a), {m, k}, {1, lda}, opts)
                          : at::from_blob(const_cast<float*>(a), {m, k}, {lda, 1}, opts);
  at::Tensor tb = trans_b ? at::from_blob(const_cast<float*>(b), {k, n}, {1, ldb}, opts)
                          : at::from_blob(const_cast<float*>(b), {k, n}, {ldb, 1}, opts);
  if (beta == 0.0f && alpha == 1.0f) {
    at::mm_out(out, ta, tb);
  } else {
    at::addmm_out(out, out, ta, tb, beta, alpha);
  }
}

// --------------------------------------------------------------------------------------------------------------------
// Scalar conversions (the reference semantics of Tensor.to(dtype): round to nearest even, NaN stays NaN).

inline float to_f32(float x) {
  return x;
}
inline float to_f32(c10::BFloat16 x) {
  return static_cast<float>(x);
}
inline float to_f32(c10::Half x) {
  return static_cast<float>(x);
}
inline float to_f32(double x) {
  return static_cast<float>(x);
}

template <typename scalar_t>
inline scalar_t from_f32(float x) {
  return static_cast<scalar_t>(x);  // c10::BFloat16 / c10::Half round to nearest even
}

#ifdef EMSEDIT_FAST_AVX2
// 8 bf16 -> 8 fp32: bf16 is the top half of an fp32, so widen and shift (exact).
EMS_INLINE __m256 load_bf16x8(const c10::BFloat16* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

// 8 fp32 -> 8 bf16 with round-to-nearest-even and NaN -> 0x7FC0, exactly as c10::BFloat16's constructor.
EMS_INLINE void store_bf16x8(c10::BFloat16* p, __m256 f) {
  const __m256i bits = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256 nan = _mm256_cmp_ps(f, f, _CMP_UNORD_Q);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
  // results are in [0, 0xFFFF], so the unsigned-saturating pack is exact
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

// fp16 <-> fp32 uses F16C; the callers are the target("f16c") loops below.
__attribute__((target("f16c"))) EMS_INLINE __m256 load_halfx8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
__attribute__((target("f16c"))) EMS_INLINE void store_halfx8(c10::Half* p, __m256 f) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

inline bool has_f16c() {
  static const bool ok = __builtin_cpu_supports("f16c");
  return ok;
}
#endif

// --------------------------------------------------------------------------------------------------------------------
// dst[j][i] = src[i][j] for an 8 x 8 fp32 block (row strides lds, ldd). AVX2: eight row loads, a three-stage
// unpack / shuffle / lane-permute network, eight row stores; the scalar fallback moves the same values (exact).
inline void transpose8x8_f32(const float* __restrict src, int64_t lds, float* __restrict dst, int64_t ldd) {
#ifdef EMSEDIT_FAST_AVX2
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  // stage 1: interleave pairs of rows: t0 = a0 b0 a1 b1 | a4 b4 a5 b5, t1 = a2 b2 a3 b3 | a6 b6 a7 b7, ...
  __m256 t[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // stage 2: gather 4-row columns within each 128-bit lane: u0 = a0 b0 c0 d0 | a4 b4 c4 d4, ...
  __m256 u[8];
  for (int h = 0; h < 2; ++h) {  // rows 0-3, then rows 4-7
    const __m256 lo = t[4 * h], hi = t[4 * h + 1], lo2 = t[4 * h + 2], hi2 = t[4 * h + 3];
    u[4 * h + 0] = _mm256_shuffle_ps(lo, lo2, _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * h + 1] = _mm256_shuffle_ps(lo, lo2, _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * h + 2] = _mm256_shuffle_ps(hi, hi2, _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * h + 3] = _mm256_shuffle_ps(hi, hi2, _MM_SHUFFLE(3, 2, 3, 2));
  }
  // stage 3: join the lanes of the two row halves: column j = low lane (j < 4) or high lane (j >= 4)
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_ps(dst + j * ldd, _mm256_permute2f128_ps(u[j], u[4 + j], 0x20));
    _mm256_storeu_ps(dst + (j + 4) * ldd, _mm256_permute2f128_ps(u[j], u[4 + j], 0x31));
  }
#else
  for (int i = 0; i < 8; ++i) {
    for (int j = 0; j < 8; ++j) dst[j * ldd + i] = src[i * lds + j];
  }
#endif
}

// --------------------------------------------------------------------------------------------------------------------
// w[i] <- round(float(w[i]) + d[i] * alpha), i < n: the epilogue of every weight update.
// Two fp32 roundings (the product, then the sum) as in the reference `W.float() + delta * alpha`, then one rounding
// into w's dtype. Memory traffic: reads w and d once, writes w once.

EMS_EXACT inline void add_scaled_row_scalar_f32(float* __restrict w, const float* __restrict d, float alpha,
                                                int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float prod = d[i] * alpha;
    w[i] = w[i] + prod;
  }
}

template <typename scalar_t>
EMS_EXACT inline void add_scaled_row_scalar(scalar_t* __restrict w, const float* __restrict d, float alpha, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float prod = d[i] * alpha;
    w[i] = from_f32<scalar_t>(to_f32(w[i]) + prod);
  }
}

EMS_EXACT inline void add_scaled_row(float* __restrict w, const float* __restrict d, float alpha, int64_t n) {
  int64_t i = 0;
#ifdef EMSEDIT_FAST_AVX2
  const __m256 va = _mm256_set1_ps(alpha);
  for (; i + 8 <= n; i += 8) {
    const __m256 prod = _mm256_mul_ps(_mm256_loadu_ps(d + i), va);
    _mm256_storeu_ps(w + i, _mm256_add_ps(_mm256_loadu_ps(w + i), prod));
  }
#endif
  add_scaled_row_scalar_f32(w + i, d + i, alpha, n - i);
}

EMS_EXACT inline void add_scaled_row(c10::BFloat16* __restrict w, const float* __restrict d, float alpha, int64_t n) {
  int64_t i = 0;
#ifdef EMSEDIT_FAST_AVX2
  const __m256 va = _mm256_set1_ps(alpha);
  for (; i + 8 <= n; i += 8) {
    const __m256 prod = _mm256_mul_ps(_mm256_loadu_ps(d + i), va);
    store_bf16x8(w + i, _mm256_add_ps(load_bf16x8(w + i), prod));
  }
#endif
  add_scaled_row_scalar(w + i, d + i, alpha, n - i);
}

#ifdef EMSEDIT_FAST_AVX2
__attribute__((target("f16c"))) EMS_EXACT inline void add_scaled_row_f16c(c10::Half* __restrict w,
                                                                          const float* __restrict d, float alpha,
                                                                          int64_t n) {
  int64_t i = 0;
  const __m256 va = _mm256_set1_ps(alpha);
  for (; i + 8 <= n; i += 8) {
    const __m256 prod = _mm256_mul_ps(_mm256_loadu_ps(d + i), va);
    store_halfx8(w + i, _mm256_add_ps(load_halfx8(w + i), prod));
  }
  add_scaled_row_scalar(w + i, d + i, alpha, n - i);
}
#endif

inline void add_scaled_row(c10::Half* __restrict w, const float* __restrict d, float alpha, int64_t n) {
#ifdef EMSEDIT_FAST_AVX2
  if (has_f16c()) {
    add_scaled_row_f16c(w, d, alpha, n);
    return;
  }
#endif
  add_scaled_row_scalar(w, d, alpha, n);
}

// --------------------------------------------------------------------------------------------------------------------
// dst[i] <- float(src[i]), i < n (exact widening; used where inputs may arrive in bf16 / fp16).

inline void widen_row(const float* __restrict src, float* __restrict dst, int64_t n) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
}

inline void widen_row(const c10::BFloat16* __restrict src, float* __restrict dst, int64_t n) {
  int64_t i = 0;
#ifdef EMSEDIT_FAST_AVX2
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, load_bf16x8(src + i));
  }
#endif
  for (; i < n; ++i) {
    dst[i] = to_f32(src[i]);
  }
}

#ifdef EMSEDIT_FAST_AVX2
__attribute__((target("f16c"))) inline void widen_row_f16c(const c10::Half* __restrict src, float* __restrict dst,
                                                           int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, load_halfx8(src + i));
  }
  for (; i < n; ++i) {
    dst[i] = to_f32(src[i]);
  }
}
#endif

inline void widen_row(const c10::Half* __restrict src, float* __restrict dst, int64_t n) {
#ifdef EMSEDIT_FAST_AVX2
  if (has_f16c()) {
    widen_row_f16c(src, dst, n);
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = to_f32(src[i]);
  }
}

inline void widen_row(const double* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = static_cast<float>(src[i]);
  }
}

// --------------------------------------------------------------------------------------------------------------------
// sum_i x[i] * y[i] accumulated in fp64 (products of two floats are exact in fp64), i < n. More accurate than the
// reference's fp32 row sum, so the fast result stays within the reference's own error of the fp64 oracle.

inline double dot_f64(const float* __restrict x, const float* __restrict y, int64_t n) {
  int64_t i = 0;
  double acc = 0.0;
#ifdef EMSEDIT_FAST_AVX2
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  for (; i + 8 <= n; i += 8) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(y + i);
    acc0 =
        _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(a)), _mm256_cvtps_pd(_mm256_castps256_ps128(b)), acc0);
    acc1 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)), _mm256_cvtps_pd(_mm256_extractf128_ps(b, 1)),
                           acc1);
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(acc0, acc1));
  acc = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
#endif
  for (; i < n; ++i) {
    acc += static_cast<double>(x[i]) * static_cast<double>(y[i]);
  }
  return acc;
}

}  // namespace emsedit_fast::cpu
