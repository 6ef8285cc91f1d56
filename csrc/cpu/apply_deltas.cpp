// apply_deltas_ / apply_deltas_dense_ on the CPU (reference: emsedit_fast/reference/apply_deltas.py).
//
//   low rank:  W_l <- round(W_l + alpha_l * M_l^T K_l)     M_l (n_l, d_out), K_l (n_l, d_in) fp32
//   dense:     W_l <- round(W_l + alpha_l * S_l^T)         S_l (d_in, d_out) fp32
//
// W_l is (d_out, d_in) (nn.Linear) or (d_in, d_out) with transposed=True (GPT-2 Conv1D); fp32, bf16 or fp16.
// Both layouts are one case: W is (R, C) row-major and its delta is X^T Y with X (n, R), Y (n, C):
//   Linear:  X = M, Y = K   (R = d_out, C = d_in)
//   Conv1D:  X = K, Y = M   (R = d_in,  C = d_out)
//
// The reference materialises a dense fp32 delta, casts and adds (about 16-20 B of traffic per bf16 weight element).
// Here W is cut into tiles of kTileRows x kTileCols; one parallel region runs over the tiles of ALL layers, and each
// thread computes its tile of X^T Y with one BLAS call into a small thread-local fp32 buffer (L2-resident) and adds
// it into W with one rounding. W is read once and written once (4 B per bf16 element); the extra memory is one tile
// per thread. The reduction over n happens inside one single-threaded GEMM per tile: no split-n, no atomics, so
// replay with the same inputs is exact.
//
// fp32 weights need no buffer and no rounding: the update is one GEMM accumulating into W (beta = 1), which is
// exactly `W.addmm_(X^T, Y, alpha)`, and the op calls that, one layer at a time with ATen's own threading. Running the
// same GEMMs as tiles of one parallel region (whole layers or row slices, single-threaded BLAS per tile) lost to it:
// 0.75x on six GPT-2-XL Conv1D layers, 0.91x on eleven SmolLM2 layers (full benchmark run before the change). The
// dense fp32 Conv1D update (S has W's layout) is likewise ATen's contiguous `W.add_(S, alpha)`; the dense fp32
// Linear update W += alpha S^T takes the blocked transpose below, as the bf16 one does: ATen's add_ on the strided
// view S^T, and also torch.compile's, lost to it. `python -m emsedit_fast.info` lists the CPU ops that hand work to
// ATen.

#include <torch/extension.h>

#include <algorithm>
#include <optional>
#include <utility>
#include <vector>

#include "emsedit_fast/checks.h"
#include "emsedit_fast/cpu_kernels.h"

namespace {

using emsedit_fast::cpu::add_scaled_row;
using emsedit_fast::cpu::parallel_grain;
using emsedit_fast::cpu::sgemm;
using emsedit_fast::cpu::transpose8x8_f32;

// bf16/fp16 weights: 64 x 1024 fp32 = 256 KiB, the tile buffer, plus the Y panel it reads (n x 1024), stays in a
// 1-2 MiB L2. 64 rows also keep enough tiles per layer to balance threads even for a handful of small layers.
// (Measured on Zen 4 for 12 x 1536 x 576, n = 64: tiles from 64 x 512 to 256 x 4096 are within 5% of each other.)
// A layer with at most kWholeRowCols columns takes whole rows per tile, as many as fill 4 MiB (all of a SmolLM2
// layer): every tile is one BLAS call whose fixed cost (dispatch, packing the Y panel) a 64-row tile of a narrow layer
// does not amortise. With 64 x 1024 tiles SmolLM2's 576- and 1536-wide bf16 layers lost to one ATen addmm_ per layer
// (0.76-0.96x, one thread, a loaded machine); with whole rows, idle, 1.00-1.14x, and GPT-2 XL's 1600-wide layers
// 1.42x side by side with the competent update (BENCHMARKS.md).
constexpr int64_t kTileRows = 64;
constexpr int64_t kTileCols = 1024;
constexpr int64_t kWholeRowCols = 2048;
constexpr int64_t kWholeRowFloats = int64_t{1} << 20;
// The dense Conv1D add works on tiles of kBlock x kTileCols; the dense Linear transpose-add on tiles of
// kDenseRows x kDenseCols (a 16 KiB fp32 buffer, L1-resident; 16 rows = one 64-byte line of S per column).
constexpr int64_t kBlock = 64;
constexpr int64_t kDenseRows = 16;
constexpr int64_t kDenseCols = 256;

struct Tile {
  int64_t layer;
  int64_t r0, rows;  // rows [r0, r0 + rows) of W
  int64_t c0, cols;  // columns [c0, c0 + cols) of W
};

// All tiles of all layers, in layer order; layer l is (R_l, C_l), cut into tiles of shape[l] = (rows, cols).
std::vector<Tile> make_tiles(const std::vector<std::pair<int64_t, int64_t>>& dims,
                             const std::vector<std::pair<int64_t, int64_t>>& shape) {
  std::vector<Tile> tiles;
  for (size_t l = 0; l < dims.size(); ++l) {
    const auto [R, C] = dims[l];
    const auto [tile_rows, tile_cols] = shape[l];
    for (int64_t r0 = 0; r0 < R; r0 += tile_rows) {
      for (int64_t c0 = 0; c0 < C; c0 += tile_cols) {
        tiles.push_back({static_cast<int64_t>(l), r0, std::min(tile_rows, R - r0), c0, std::min(tile_cols, C - c0)});
      }
    }
  }
  return tiles;
}

std::vector<float> alpha_values(const std::optional<at::Tensor>& alpha, size_t n_layers, const char* op) {
  std::vector<float> out(n_layers, 1.0f);
  if (alpha.has_value()) {
    const at::Tensor& a = *alpha;
    EMS_CHECK_CPU(a);
    EMS_CHECK_F32(a);
    EMS_CHECK(a.dim() == 1 && a.size(0) == static_cast<int64_t>(n_layers), op, ": alpha must be (", n_layers,
              ",), got ", a.sizes());
    const at::Tensor ac = a.contiguous();
    std::copy(ac.data_ptr<float>(), ac.data_ptr<float>() + n_layers, out.begin());
  }
  return out;
}

void check_weight(const at::Tensor& w, size_t layer, const char* op) {
  EMS_CHECK(w.device().is_cpu(), op, ": weights[", layer, "] must be a CPU tensor, got ", w.device());
  EMS_CHECK(w.dim() == 2, op, ": weights[", layer, "] must be 2-D, got ", w.sizes());
  EMS_CHECK(w.is_contiguous(), op, ": weights[", layer, "] must be contiguous");
  const auto st = w.scalar_type();
  EMS_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op, ": weights[", layer,
            "] must be fp32, bf16 or fp16, got ", st);
}

void check_factor(const at::Tensor& f, const char* name, size_t layer, int64_t rows, int64_t cols, const char* op) {
  EMS_CHECK(f.device().is_cpu(), op, ": ", name, "[", layer, "] must be a CPU tensor, got ", f.device());
  EMS_CHECK(f.scalar_type() == at::kFloat, op, ": ", name, "[", layer, "] must be fp32, got ", f.scalar_type());
  EMS_CHECK(f.is_contiguous(), op, ": ", name, "[", layer, "] must be contiguous");
  EMS_CHECK(f.dim() == 2 && (rows < 0 || f.size(0) == rows) && f.size(1) == cols, op, ": ", name, "[", layer,
            "] must be (", rows < 0 ? "n" : std::to_string(rows), ", ", cols, "), got ", f.sizes());
}

// W[r, c] <- round(W[r, c] + alpha * T[r, c]) over a (rows x cols) tile; T has row stride ldt.
template <typename scalar_t>
void add_tile(scalar_t* w, int64_t ldw, const float* t, int64_t ldt, int64_t rows, int64_t cols, float alpha) {
  for (int64_t r = 0; r < rows; ++r) {
    add_scaled_row(w + r * ldw, t + r * ldt, alpha, cols);
  }
}

void apply_deltas_cpu(at::TensorList weights, at::TensorList coeffs, at::TensorList keys,
                      const std::optional<at::Tensor>& alpha, bool transposed) {
  const char* op = "apply_deltas_";
  const size_t L = weights.size();
  EMS_CHECK(coeffs.size() == L && keys.size() == L, op, ": need one coeffs and one keys tensor per weight, got ", L,
            " weights, ", coeffs.size(), " coeffs, ", keys.size(), " keys");
  const std::vector<float> scale = alpha_values(alpha, L, op);

  // Per layer: W (R, C), X (n, R), Y (n, C); see the header comment.
  std::vector<std::pair<int64_t, int64_t>> dims(L);
  std::vector<const float*> xs(L), ys(L);
  std::vector<int64_t> ns(L);
  std::vector<std::pair<int64_t, int64_t>> shape(L);  // tile shape per layer: by the weight's dtype
  int64_t work = 0;  // multiply-adds plus the read-modify-write of W, for the parallel grain
  for (size_t l = 0; l < L; ++l) {
    const at::Tensor& w = weights[l];
    check_weight(w, l, op);
    const int64_t d_out = transposed ? w.size(1) : w.size(0);
    const int64_t d_in = transposed ? w.size(0) : w.size(1);
    check_factor(coeffs[l], "coeffs", l, -1, d_out, op);
    check_factor(keys[l], "keys", l, coeffs[l].size(0), d_in, op);
    const float* m = coeffs[l].data_ptr<float>();
    const float* k = keys[l].data_ptr<float>();
    dims[l] = {w.size(0), w.size(1)};
    shape[l] = w.size(1) <= kWholeRowCols
                   ? std::pair<int64_t, int64_t>{std::max<int64_t>(kTileRows, kWholeRowFloats / w.size(1)), w.size(1)}
                   : std::pair<int64_t, int64_t>{kTileRows, kTileCols};
    xs[l] = transposed ? k : m;
    ys[l] = transposed ? m : k;
    ns[l] = coeffs[l].size(0);
    // n = 0 adds nothing (the reference still round-trips W through fp32, which is the identity); fp32 layers are
    // updated by ATen below, outside the tiles.
    if (ns[l] == 0 || w.scalar_type() == at::kFloat) {
      dims[l] = {0, 0};
    }
    work += dims[l].first * dims[l].second * (ns[l] + 1);
  }

  const std::vector<Tile> tiles = make_tiles(dims, shape);
  const int64_t n_tiles = static_cast<int64_t>(tiles.size());
  at::parallel_for(0, n_tiles, parallel_grain(work / std::max<int64_t>(n_tiles, 1)), [&](int64_t begin, int64_t end) {
    // One fp32 tile buffer per thread (the largest tile it meets); only the low-precision layers use it.
    std::vector<float> buf;
    for (int64_t i = begin; i < end; ++i) {
      const Tile& tile = tiles[i];
      const at::Tensor& w = weights[tile.layer];
      const int64_t R = dims[tile.layer].first, C = dims[tile.layer].second, n = ns[tile.layer];
      // op(A) = X[:, r0:r0+rows]^T (rows x n), op(B) = Y[:, c0:c0+cols] (n x cols)
      const float* a = xs[tile.layer] + tile.r0;
      const float* b = ys[tile.layer] + tile.c0;
      const float alpha_l = scale[tile.layer];
      buf.resize(std::max(buf.size(), static_cast<size_t>(tile.rows * tile.cols)));
      sgemm(true, false, tile.rows, tile.cols, n, 1.0f, a, R, b, C, 0.0f, buf.data(), tile.cols);
      AT_DISPATCH_REDUCED_FLOATING_TYPES(w.scalar_type(), "apply_deltas_cpu", [&] {
        add_tile(w.data_ptr<scalar_t>() + tile.r0 * C + tile.c0, C, buf.data(), tile.cols, tile.rows, tile.cols,
                 alpha_l);
      });
    }
  });
  // fp32 layers: W (R, C) += alpha X^T Y, one GEMM per layer (Linear: M^T K; Conv1D: K^T M)
  for (size_t l = 0; l < L; ++l) {
    if (weights[l].scalar_type() == at::kFloat && ns[l] > 0) {
      const at::Tensor& x = transposed ? keys[l] : coeffs[l];
      const at::Tensor& y = transposed ? coeffs[l] : keys[l];
      weights[l].addmm_(x.t(), y, /*beta=*/1.0, /*alpha=*/scale[l]);
    }
  }
}

void apply_deltas_dense_cpu(at::TensorList weights, at::TensorList shifts, const std::optional<at::Tensor>& alpha,
                            bool transposed) {
  const char* op = "apply_deltas_dense_";
  const size_t L = weights.size();
  EMS_CHECK(shifts.size() == L, op, ": need one shift per weight, got ", L, " weights, ", shifts.size(), " shifts");
  const std::vector<float> scale = alpha_values(alpha, L, op);
  std::vector<std::pair<int64_t, int64_t>> dims(L);
  int64_t work = 0;  // elements of W, for the parallel grain
  for (size_t l = 0; l < L; ++l) {
    const at::Tensor& w = weights[l];
    check_weight(w, l, op);
    const int64_t d_out = transposed ? w.size(1) : w.size(0);
    const int64_t d_in = transposed ? w.size(0) : w.size(1);
    check_factor(shifts[l], "shifts", l, d_in, d_out, op);
    dims[l] = {w.size(0), w.size(1)};
    if (w.scalar_type() == at::kFloat && transposed) {
      dims[l] = {0, 0};  // updated by ATen below
    }
    work += dims[l].first * dims[l].second;
  }

  // Conv1D: W (d_in, d_out) and S (d_in, d_out) share a layout, so a tile is a plain row-wise add.
  // Linear: W (d_out, d_in) gets S^T. A tile is kDenseRows rows of W by kDenseCols columns; its part of S^T is built
  // in a thread-local buffer from 8 x 8 register transposes. Consecutive tiles walk along W's rows, so S is read in
  // runs of kDenseRows floats (one cache line) per row, down a band of columns, and every line is used whole. Reads S
  // once, reads and writes W once; the add rounds exactly as the reference does.
  const std::vector<Tile> tiles = make_tiles(
      dims, std::vector<std::pair<int64_t, int64_t>>(L, {transposed ? kBlock : kDenseRows,
                                                         transposed ? kTileCols : kDenseCols}));
  const int64_t n_tiles = static_cast<int64_t>(tiles.size());
  at::parallel_for(0, n_tiles, parallel_grain(work / std::max<int64_t>(n_tiles, 1)), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(transposed ? 0 : static_cast<size_t>(kDenseRows * kDenseCols));
    for (int64_t i = begin; i < end; ++i) {
      const Tile& tile = tiles[i];
      const at::Tensor& w = weights[tile.layer];
      const int64_t C = dims[tile.layer].second;
      const float* s = shifts[tile.layer].data_ptr<float>();
      const float* src;
      int64_t lds;
      if (transposed) {
        src = s + tile.r0 * C + tile.c0;  // S has W's layout (R, C)
        lds = C;
      } else {
        // S is (C, R) = (d_in, d_out): buf[r][c] = S[c0 + c][r0 + r]
        const int64_t R = dims[tile.layer].first;
        const float* corner = s + tile.c0 * R + tile.r0;
        const int64_t full_r = tile.rows / 8 * 8, full_c = tile.cols / 8 * 8;
        for (int64_t r = 0; r < full_r; r += 8) {
          for (int64_t c = 0; c < full_c; c += 8) {
            transpose8x8_f32(corner + c * R + r, R, buf.data() + r * kDenseCols + c, kDenseCols);
          }
        }
        for (int64_t r = 0; r < tile.rows; ++r) {  // the edges that do not fill an 8 x 8 block
          for (int64_t c = (r < full_r ? full_c : 0); c < tile.cols; ++c) {
            buf[r * kDenseCols + c] = corner[c * R + r];
          }
        }
        src = buf.data();
        lds = kDenseCols;
      }
      EMS_DISPATCH_WEIGHT_TYPES(w.scalar_type(), "apply_deltas_dense_cpu", [&] {
        add_tile(w.data_ptr<scalar_t>() + tile.r0 * C + tile.c0, C, src, lds, tile.rows, tile.cols, scale[tile.layer]);
      });
    }
  });
  for (size_t l = 0; l < L; ++l) {  // fp32 Conv1D layers: W += alpha S, the same layout (a contiguous add)
    if (transposed && weights[l].scalar_type() == at::kFloat) {
      weights[l].add_(shifts[l], scale[l]);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(emsedit_fast, CPU, m) {
  m.impl("apply_deltas_", &apply_deltas_cpu);
  m.impl("apply_deltas_dense_", &apply_deltas_dense_cpu);
}
