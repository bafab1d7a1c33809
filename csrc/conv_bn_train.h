// The CUDA backend's training layer (csrc/conv_bn_train.cpp), for the operators built on it.
#pragma once
#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace resnet_fused {

// An optional tensor that is given and defined.
inline bool defined(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// (out, z, mean, invstd, new_running_mean, new_running_var, scale, shift): z the raw conv output,
// (mean, invstd) the batch statistics, the new running statistics empty when none were given,
// (scale, shift) the normalize's per-channel coefficients (out = relu?(z * scale + shift + residual?)).
using TrainForward =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// update_in_place: the given running statistics are updated and come back as the new ones.
TrainForward conv_bn_train(
    const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, double momentum, double eps, bool relu,
    bool update_in_place);

// Gradients (x, weight, bn_weight, bn_bias, residual) of conv_bn_train's out; entries not asked
// for in mask come back empty. mask_scale / mask_shift: the forward's scale / shift, for an
// output without a residual: the ReLU's mask is recomputed from z (out is not read). shortcut
// (undefined: none): a gradient to add to x's, a fork's (conv_bn_relu_train_fork); where
// join_gemm_ok the dgrad GEMM accumulates into it, in place when no one else holds it.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_train_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bn_weight,
    const at::Tensor& z, const at::Tensor& out, const at::Tensor& mean, const at::Tensor& invstd,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu,
    std::array<bool, 5> mask, const std::optional<at::Tensor>& mask_scale,
    const std::optional<at::Tensor>& mask_shift, at::Tensor shortcut = at::Tensor());

// Whether x's gradient of this conv is one GEMM (dz [M, K] @ W [K, C]) that can accumulate a
// shortcut's gradient: 1x1, stride 1, unpadded, ungrouped; 16-bit on CUDA, any dtype on the CPU
// (resnet_fused/ops/conv_bn_relu/__init__.py, _join_gemm_ok: the same rule).
bool join_gemm_ok(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
                  int64_t groups);

}  // namespace resnet_fused
