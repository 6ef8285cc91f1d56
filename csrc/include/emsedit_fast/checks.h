// Argument checks that name the offending argument (a failed check raises RuntimeError in Python).
#pragma once

#include <ATen/ATen.h>  // not torch/extension.h: these checks are also used from .cu files (nvcc)

#define EMS_CHECK(cond, ...) TORCH_CHECK((cond), "emsedit_fast: ", __VA_ARGS__)
#define EMS_CHECK_DIM(t, d) EMS_CHECK((t).dim() == (d), #t " must be ", (d), "-D, got ", (t).sizes())
#define EMS_CHECK_F32(t) EMS_CHECK((t).scalar_type() == at::kFloat, #t " must be fp32, got ", (t).scalar_type())
#define EMS_CHECK_CONTIG(t) EMS_CHECK((t).is_contiguous(), #t " must be contiguous")
#define EMS_CHECK_CPU(t) EMS_CHECK((t).device().is_cpu(), #t " must be a CPU tensor, got ", (t).device())
#define EMS_CHECK_CUDA(t) EMS_CHECK((t).device().is_cuda(), #t " must be a CUDA tensor, got ", (t).device())
