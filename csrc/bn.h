// BatchNorm pieces of the CUDA backend that other operators reuse.
#pragma once
#include <optional>

#include <ATen/core/Tensor.h>

namespace resnet_fused {

// out = relu?(z * scale[k] + shift[k] + residual?) over a channels_last-dense z; scale and shift
// are contiguous [K] vectors in the accumulator dtype (float64 for float64 z, else float32).
at::Tensor bn_apply(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                    const std::optional<at::Tensor>& residual, bool relu);

}  // namespace resnet_fused
