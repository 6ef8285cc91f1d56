// restore_ on CUDA: weights[l] <- snapshots[l], bit for bit (reference: emsedit_fast/reference/restore.py).
// One cudaMemcpyAsync per layer on the current stream: a byte copy is exact by construction, and the copy engine
// runs at device bandwidth without a kernel. (Cross-device snapshots never get here: the ops layer sends them to
// the reference path.)

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "emsedit_fast/checks.h"

namespace {

void restore_cuda(at::TensorList weights, at::TensorList snapshots) {
  EMS_CHECK(weights.size() == snapshots.size(), "restore_: ", weights.size(), " weights but ", snapshots.size(),
            " snapshots");
  if (weights.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(weights[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (size_t l = 0; l < weights.size(); ++l) {
    const at::Tensor& w = weights[l];
    const at::Tensor& s = snapshots[l];
    EMS_CHECK(w.device() == s.device() && w.is_cuda(), "restore_: layer ", l, " weight (", w.device(),
              ") and snapshot (", s.device(), ") must be on the same CUDA device");
    EMS_CHECK(w.sizes() == s.sizes() && w.scalar_type() == s.scalar_type(), "restore_: layer ", l,
              " snapshot does not match its weight");
    EMS_CHECK(w.is_contiguous() && s.is_contiguous(), "restore_: layer ", l, " tensors must be contiguous");
    const size_t bytes = static_cast<size_t>(w.numel()) * w.element_size();
    if (bytes > 0) {
      C10_CUDA_CHECK(cudaMemcpyAsync(w.data_ptr(), s.data_ptr(), bytes, cudaMemcpyDeviceToDevice, stream));
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(emsedit_fast, CUDA, m) {
  m.impl("restore_", &restore_cuda);
}
