// restore_ on the CPU: weights[l] <- snapshots[l], bit for bit (reference: emsedit_fast/reference/restore.py).
// One parallel region over all layers' bytes, so many small layers do not each pay a thread start-up.

#include <torch/extension.h>

#include <cstring>
#include <tuple>
#include <vector>

#include "emsedit_fast/checks.h"
#include "emsedit_fast/cpu_kernels.h"

namespace {

using emsedit_fast::cpu::parallel_grain;

void restore_cpu(at::TensorList weights, at::TensorList snapshots) {
  EMS_CHECK(weights.size() == snapshots.size(), "restore_: ", weights.size(), " weights but ", snapshots.size(),
            " snapshots");
  // Cut every layer into ~1 MiB chunks and copy the chunks in parallel: a grouped memcpy.
  constexpr int64_t kChunk = int64_t{1} << 20;
  std::vector<std::tuple<char*, const char*, int64_t>> chunks;
  int64_t bytes_total = 0;
  for (size_t l = 0; l < weights.size(); ++l) {
    const at::Tensor& w = weights[l];
    const at::Tensor& s = snapshots[l];
    EMS_CHECK_CPU(w);
    EMS_CHECK_CPU(s);
    EMS_CHECK(w.sizes() == s.sizes() && w.scalar_type() == s.scalar_type(), "restore_: layer ", l,
              " snapshot does not match its weight");
    EMS_CHECK(w.is_contiguous() && s.is_contiguous(), "restore_: layer ", l, " tensors must be contiguous");
    char* dst = static_cast<char*>(w.data_ptr());
    const char* src = static_cast<const char*>(s.data_ptr());
    const int64_t bytes = w.numel() * w.element_size();
    bytes_total += bytes;
    for (int64_t off = 0; off < bytes; off += kChunk) {
      chunks.emplace_back(dst + off, src + off, std::min(kChunk, bytes - off));
    }
  }
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  // work unit: 4 bytes (one fp32 element), so the grain matches the other kernels'
  const int64_t grain = parallel_grain(bytes_total / 4 / std::max<int64_t>(n_chunks, 1));
  at::parallel_for(0, n_chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      auto [dst, src, n] = chunks[i];
      std::memcpy(dst, src, static_cast<size_t>(n));
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(emsedit_fast, CPU, m) {
  m.impl("restore_", &restore_cpu);
}
