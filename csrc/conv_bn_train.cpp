// resnet_fused_C::conv_bn_train / conv_bn_train_backward — the training path of the CUDA
// backend of conv_bn_relu, one call per direction instead of about fifteen Python-level steps.
//
// The Python orchestration of a training layer (conv, statistics, finalize, the per-channel
// scale / shift, apply; in the backward the two sums, the per-channel coefficients, the
// elementwise gradient and ATen's convolution_backward) costs a Python call, argument handling and
// a dispatcher round trip per step: the first profiled fused-cuda training step on an H100 was
// host-bound (docs/perf.md, lead 9). Here the same steps run in C++, in the same order and the
// same arithmetic as resnet_fused/ops/conv_bn_relu/__init__.py (_forward / _backward_impl, whose
// other branches remain the contract: eval, synchronized BatchNorm, the other backends).
//
// The BatchNorm kernels are reached through the dispatcher (resnet_fused_C::bn_*), not called
// directly, and the ops are registered for CPU as well as CUDA: on the CPU our kernels do not
// exist, but a test registers CPU implementations of the bn_* ops (the reference's), which lets
// CI run this orchestration — shapes, layouts, dtypes, masks, gradients — without a GPU
// (tests/test_conv_bn_train_cpp.py). Called on the CPU without them, the bn_* call fails with
// the dispatcher's "could not run ... with the 'CPU' backend".
#include <array>
#include <optional>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/DeviceGuard.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "bn.h"
#include "conv_bn_train.h"

namespace resnet_fused {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
constexpr const char* kOp = "resnet_fused_C::conv_bn_train";

template <typename Sig>
c10::TypedOperatorHandle<Sig> bn_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

const auto& stats_op() {
  static const auto h = bn_op<std::tuple<Tensor, Tensor>(const Tensor&, int64_t)>("resnet_fused_C::bn_stats");
  return h;
}
const auto& finalize_op() {
  static const auto h =
      bn_op<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
          const Tensor&, const Tensor&, int64_t, int64_t, const OptTensor&, const OptTensor&, const OptTensor&,
          const OptTensor&, double, double)>("resnet_fused_C::bn_finalize_affine");
  return h;
}
const auto& finalize_inplace_op() {
  static const auto h =
      bn_op<std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, int64_t, int64_t,
                                                       const OptTensor&, const OptTensor&, const OptTensor&,
                                                       const OptTensor&, double, double)>(
          "resnet_fused_C::bn_finalize_affine_");
  return h;
}
const auto& apply_op() {
  static const auto h =
      bn_op<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, bool)>("resnet_fused_C::bn_apply");
  return h;
}
const auto& bwd_reduce_op() {
  static const auto h =
      bn_op<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                               const Tensor&, const Tensor&, const OptTensor&, bool,
                                                               const OptTensor&, const OptTensor&)>(
          "resnet_fused_C::bn_bwd_reduce_coef");
  return h;
}
const auto& bwd_apply_op() {
  static const auto h =
      bn_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                       const Tensor&, const OptTensor&, const OptTensor&, bool, bool,
                                       const OptTensor&, const OptTensor&)>("resnet_fused_C::bn_bwd_apply");
  return h;
}

at::ScalarType acc_type(const Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// t (4-D) as channels_last with exactly the strides torch.empty(..., memory_format=channels_last)
// gives, as the Python path's outputs have (and its fake implementation promises). A
// channels_last-contiguous tensor differs from those only in the strides of size-1 dimensions,
// which address nothing: it is re-viewed, not copied.
Tensor canonical_cl(const Tensor& t) {
  const Tensor d = t.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t C = d.size(1), H = d.size(2), W = d.size(3);
  const std::array<int64_t, 4> want{H * W * C, 1, W * C, C};
  if (d.strides() == at::IntArrayRef(want)) return d;
  return d.as_strided(d.sizes(), want, d.storage_offset());
}

// t with like's strides, as empty_like(like) lays a gradient out (a copy only when they differ).
Tensor like_layout(const Tensor& t, const Tensor& like) {
  if (t.strides() == like.strides()) return t;
  Tensor want = at::empty_like(like);
  if (t.strides() == want.strides()) return t;
  return want.copy_(t);
}

void check_args(const Tensor& x, const Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
                at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4, kOp, ": x and weight must be 4-D, got ", x.dim(), "-D and ", w.dim(),
              "-D");
  TORCH_CHECK(w.device() == x.device() && w.scalar_type() == x.scalar_type(), kOp,
              ": weight must have x's device and dtype");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, kOp,
              ": stride, padding and dilation must have two entries");
}

// A BatchNorm parameter as the kernels take it: contiguous, in the accumulator dtype (no copy when it is
// already); absent stays absent (the kernels read 1 for gamma, 0 for beta).
OptTensor as_acc(const OptTensor& t, at::ScalarType acc) {
  if (!defined(t)) return std::nullopt;
  return t->to(acc).contiguous();
}

// x's gradient of a conv for which join_gemm_ok, plus the shortcut's gradient g: the GEMM
// accumulates into g (beta = 1: one read of it, where autograd's accumulation reads the dgrad's
// output and g and writes their sum). In place when g is a dense channels_last tensor that no one
// else holds (the autograd engine's own test before it accumulates into a gradient in place: the
// caller moves its only reference in); a copy first otherwise.
Tensor dgrad_join(const Tensor& dz_in, const Tensor& x, const Tensor& w, Tensor g) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = w.size(0);
  const std::array<int64_t, 4> want{H * W * C, 1, W * C, C};
  const bool own = g.scalar_type() == x.scalar_type() && g.sizes() == x.sizes() && g.strides() == at::IntArrayRef(want) &&
                   !g.is_view() && g.use_count() == 1 && g.has_storage() && g.storage().use_count() == 1;
  if (!own) g = canonical_cl(at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::ChannelsLast)).copy_(g));
  const Tensor dz = canonical_cl(dz_in);
  g.permute({0, 2, 3, 1}).reshape({N * H * W, C}).addmm_(dz.permute({0, 2, 3, 1}).reshape({N * H * W, K}),
                                                         w.reshape({K, C}));
  return g;
}

}  // namespace

bool join_gemm_ok(const Tensor& x, const Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding, int64_t groups) {
  const auto dt = x.scalar_type();
  return w.dim() == 4 && w.size(2) == 1 && w.size(3) == 1 && stride.size() == 2 && stride[0] == 1 && stride[1] == 1 &&
         padding.size() == 2 && padding[0] == 0 && padding[1] == 0 && groups == 1 &&
         (x.device().is_cpu() || dt == at::kHalf || dt == at::kBFloat16);
}

// Returns (out, z, mean, invstd, new_running_mean, new_running_var, scale, shift), as _forward in
// training: z the raw conv output, (mean, invstd) the batch statistics, the new running
// statistics empty when none were given, (scale, shift) the apply's. update_in_place: the
// finalize updates the given running statistics themselves, which come back as the new ones (the
// operator conv_bn_train is functional: false).
TrainForward conv_bn_train(
    const Tensor& x, const Tensor& w, const OptTensor& bn_weight, const OptTensor& bn_bias,
    const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& residual, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, double momentum, double eps, bool relu,
    bool update_in_place) {
  check_args(x, w, stride, padding, dilation);
  at::OptionalDeviceGuard guard(at::device_of(x));
  const auto acc = acc_type(x);
  const int64_t K = w.size(0);
  const Tensor z =
      canonical_cl(at::convolution(x, w, std::nullopt, stride, padding, dilation, false, {0, 0}, groups));
  const int64_t M = K ? z.numel() / K : 0;
  TORCH_CHECK(M > 1, kOp, ": expected more than 1 value per channel when training, got input size ", z.sizes());
  const int64_t rows = partial_rows(M);
  auto [pm, pm2] = stats_op().call(z, rows);
  // the finalize also writes the apply's scale = gamma * invstd and shift = beta - mean * scale
  Tensor mean, invstd, scale, shift, nrm, nrv;
  if (update_in_place) {
    std::tie(mean, invstd, scale, shift) = finalize_inplace_op().call(
        pm, pm2, rows, M, running_mean, running_var, as_acc(bn_weight, acc), as_acc(bn_bias, acc), momentum, eps);
    if (defined(running_mean)) {
      nrm = *running_mean;
      nrv = *running_var;
    }
  } else {
    std::tie(mean, invstd, scale, shift, nrm, nrv) = finalize_op().call(
        pm, pm2, rows, M, running_mean, running_var, as_acc(bn_weight, acc), as_acc(bn_bias, acc), momentum, eps);
  }
  OptTensor res;
  if (defined(residual)) res = canonical_cl(*residual);
  Tensor out = canonical_cl(apply_op().call(z, scale, shift, res, relu));
  if (!defined(running_mean)) {  // (outputs may not alias: a fresh empty tensor for each)
    nrm = at::empty({0}, x.options());
    nrv = at::empty({0}, x.options());
  }
  return {out, z, mean, invstd, nrm, nrv, scale, shift};
}

// Gradients (x, weight, bn_weight, bn_bias, residual) of conv_bn_train's out, as _backward_impl
// in training; entries not asked for in output_mask come back empty. With mask_scale / mask_shift
// (the forward's scale / shift; an output without a residual) the ReLU's mask is recomputed from
// z and out is not read.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> conv_bn_train_backward(
    const Tensor& grad_in, const Tensor& x, const Tensor& w, const OptTensor& bn_weight, const Tensor& z_in,
    const Tensor& out_in, const Tensor& mean, const Tensor& invstd, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu, std::array<bool, 5> mask, const OptTensor& mask_scale,
    const OptTensor& mask_shift, Tensor shortcut) {
  check_args(x, w, stride, padding, dilation);
  at::OptionalDeviceGuard guard(at::device_of(x));
  const auto [need_dx, need_dw, need_dg, need_db, need_dr] = mask;
  const auto acc = mean.scalar_type();
  const Tensor grad = canonical_cl(grad_in);
  // out is the ReLU's mask; without a ReLU, or with the mask from z, the forward's caller need not
  // keep it (nor is it read)
  const Tensor& out = relu && !defined(mask_scale) ? out_in : grad;
  TORCH_CHECK(z_in.numel() == grad.numel() && z_in.numel() > 0, kOp,
              "_backward: needs the conv output, which the forward did not save");
  // (a conv output recomputed in the backward comes as cuDNN lays it out: NCHW for float64, for
  // NCHW inputs and weights, or without cuDNN)
  const Tensor z = canonical_cl(z_in);
  // dbeta = sum(gy), dgamma = sum(gy * xhat); dz = a * gy + b * xhat + c (a = gamma * invstd,
  // b = -a / M * dgamma, c = -a / M * dbeta): the reduction and one small kernel
  auto [dgamma, dbeta, a, b, c] =
      bwd_reduce_op().call(grad, out, z, mean, invstd, as_acc(bn_weight, acc), relu, mask_scale, mask_shift);
  auto [dz, gres] = bwd_apply_op().call(grad, out, z, mean, invstd, a, b, c, relu, need_dr, mask_scale, mask_shift);
  Tensor dx, dw;
  // a fork's shortcut gradient: joined in the dgrad GEMM, or added to ATen's dgrad
  const bool join = need_dx && shortcut.defined();
  const bool gemm = join && join_gemm_ok(x, w, stride, padding, groups);
  if (gemm) dx = dgrad_join(dz, x, w, std::move(shortcut));
  if ((need_dx && !gemm) || need_dw) {
    auto r = at::convolution_backward(dz, x, w, std::nullopt, stride, padding, dilation, false, {0, 0}, groups,
                                      {need_dx && !gemm, need_dw, false});
    if (need_dx && !gemm) dx = join ? std::get<0>(r).add_(shortcut) : std::get<0>(r);
    dw = std::get<1>(r);
  }
  auto e = [&] { return at::empty({0}, x.options()); };  // a fresh one each: outputs may not alias
  const bool dg = need_dg && defined(bn_weight);
  return {need_dx ? like_layout(dx, x) : e(),
          need_dw ? like_layout(dw, w) : e(),
          dg ? dgamma.to(bn_weight->scalar_type()) : e(),
          need_db ? dbeta.to(defined(bn_weight) ? bn_weight->scalar_type() : x.scalar_type()) : e(),
          need_dr ? canonical_cl(gres) : e()};
}

TORCH_LIBRARY_FRAGMENT(resnet_fused_C, m) {
  m.def("conv_bn_train(Tensor x, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, Tensor? running_mean, "
        "Tensor? running_var, Tensor? residual, int[] stride, int[] padding, int[] dilation, int groups, "
        "float momentum, float eps, bool relu) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("conv_bn_train_backward(Tensor grad, Tensor x, Tensor weight, Tensor? bn_weight, Tensor z, Tensor out, "
        "Tensor mean, Tensor invstd, int[] stride, int[] padding, int[] dilation, int groups, bool relu, "
        "bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace {
// the operator: functional (the new running statistics are outputs)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> conv_bn_train_op(
    const Tensor& x, const Tensor& w, const OptTensor& bn_weight, const OptTensor& bn_bias,
    const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& residual, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, double momentum, double eps, bool relu) {
  auto r = conv_bn_train(x, w, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding, dilation,
                         groups, momentum, eps, relu, false);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r), std::get<5>(r)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> conv_bn_train_backward_op(
    const Tensor& grad, const Tensor& x, const Tensor& w, const OptTensor& bn_weight, const Tensor& z,
    const Tensor& out, const Tensor& mean, const Tensor& invstd, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu, std::array<bool, 5> mask) {
  return conv_bn_train_backward(grad, x, w, bn_weight, z, out, mean, invstd, stride, padding, dilation, groups, relu,
                                mask, std::nullopt, std::nullopt);
}
}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused_C, CUDA, m) {
  m.impl("conv_bn_train", &conv_bn_train_op);
  m.impl("conv_bn_train_backward", &conv_bn_train_backward_op);
}

// Device-generic orchestration: runs on the CPU where CPU bn_* kernels are registered (tests).
TORCH_LIBRARY_IMPL(resnet_fused_C, CPU, m) {
  m.impl("conv_bn_train", &conv_bn_train_op);
  m.impl("conv_bn_train_backward", &conv_bn_train_backward_op);
}

}  // namespace resnet_fused
