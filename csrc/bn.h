// BatchNorm pieces of the CUDA backend that other operators reuse.
#pragma once
#include <algorithm>
#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>

namespace resnet_fused {

// Rows of the [M, K] activation per partial of the two-level reductions (statistics, backward
// sums): at least 256 and at most 512 partials, enough blocks to fill the GPU and few enough that
// the per-channel pass over the partials is short (the Python orchestration: cuda.py's _stats).
inline int64_t partial_rows(int64_t M) { return std::max<int64_t>(256, (M + 511) / 512); }

// out = relu?(z * scale[k] + shift[k] + residual?) over a channels_last-dense z; scale and shift
// are contiguous [K] vectors in the accumulator dtype (float64 for float64 z, else float32).
at::Tensor bn_apply(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                    const std::optional<at::Tensor>& residual, bool relu);

}  // namespace resnet_fused
