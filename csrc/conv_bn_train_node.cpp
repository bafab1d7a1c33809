// resnet_fused_C::conv_bn_relu_train — a training layer of the CUDA backend as one operator
// with its own autograd node, both in C++.
//
// conv_bn_train / conv_bn_train_backward (conv_bn_train.cpp) made each direction one C++ call,
// but the autograd around them was still Python: an autograd.Function's apply, its context, the
// backward's argument handling, and two copies of the running statistics from Python. In a
// training step every conv layer paid that on the host (docs/perf.md, lead 9). Here the forward
// runs the layer, updates the running statistics in place and records a C++ node; the engine
// calls the node's backward without entering Python.
//
// Same arithmetic as the Python orchestration (it calls the same two functions); same contract as
// resnet_fused/ops/conv_bn_relu/__init__.py's _DirectFn, which it replaces on the eager fast path
// of the CUDA backend: the output kept for the backward only as the ReLU's mask (and not even that
// without a residual: the backward kernels recompute the mask from z and the [K] scale / shift),
// the conv output not kept with recompute (the backward convolves again), gradients only where
// asked, the bias gradient in the bias's dtype, the running statistics' version counters bumped as
// copy_ bumps them, no double backward (as @once_differentiable: the first backward may build a
// graph, differentiating its result raises).
//
// Registered for CPU as well as CUDA: on the CPU it runs over test stand-ins of the bn_* kernels
// (tests/test_conv_bn_train_cpp.py).
#include <optional>
#include <string>

#include <ATen/core/grad_mode.h>
#include <ATen/ops/alias.h>
#include <ATen/ops/convolution.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "conv_bn_train.h"

namespace resnet_fused {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr const char* kOp = "resnet_fused_C::conv_bn_relu_train";

// The layer's forward: (out, z, mean, invstd, scale, shift), the running statistics updated in
// place by the finalize.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> layer_forward(
    const Tensor& x, const Tensor& w, const OptTensor& bn_weight, const OptTensor& bn_bias,
    const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& residual, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, double momentum, double eps, bool relu) {
  TORCH_CHECK(defined(running_mean) == defined(running_var), kOp,
              ": running_mean and running_var must both be given or both be None");
  if (defined(running_mean)) {
    // (the finalize reads each old value before writing the new one, per statistic: one buffer for both
    // would mix them)
    TORCH_CHECK(!running_mean->is_alias_of(*running_var), kOp,
                ": running_mean and running_var must not share memory");
    // an in-place update as copy_ records it (saved-tensor checks; inference tensors outside
    // inference mode raise here, before anything is written)
    running_mean->unsafeGetTensorImpl()->bump_version();
    running_var->unsafeGetTensorImpl()->bump_version();
  }
  // (the finalize writes the new running statistics over the old ones: no copies)
  auto r = conv_bn_train(x, w, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding, dilation,
                         groups, momentum, eps, relu, /*update_in_place=*/true);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<6>(r), std::get<7>(r)};
}

// The CPU / CUDA kernel: reached without autograd (inference mode, or below the Autograd key).
Tensor conv_bn_relu_train(const Tensor& x, const Tensor& w, const OptTensor& bn_weight, const OptTensor& bn_bias,
                          const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& residual,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                          double momentum, double eps, bool relu, bool /*recompute*/) {
  return std::get<0>(layer_forward(x, w, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding,
                                   dilation, groups, momentum, eps, relu));
}

// The fork's CPU / CUDA kernel (conv_bn_relu_train_fork without autograd): x's alias as the second output.
std::tuple<Tensor, Tensor> conv_bn_relu_train_fork(const Tensor& x, const Tensor& w, const OptTensor& bn_weight,
                                                   const OptTensor& bn_bias, const OptTensor& running_mean,
                                                   const OptTensor& running_var, const OptTensor& residual,
                                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                                   at::IntArrayRef dilation, int64_t groups, double momentum,
                                                   double eps, bool relu, bool recompute) {
  return {conv_bn_relu_train(x, w, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding, dilation,
                             groups, momentum, eps, relu, recompute),
          at::alias(x)};
}

// The forward's arguments, in order: x, weight, bn_weight, bn_bias, running_mean, running_var,
// residual, then nine non-tensor ones. The backward returns one entry per argument; the
// context's needs_input_grad counts only the tensors given (its edges).
constexpr int kArgs = 16;

// Passes tensors through; differentiating them raises (what @once_differentiable's DelayedError does,
// built as a Function so that the node is created as each torch version wants it).
struct RefuseDoubleBackward : public torch::autograd::Function<RefuseDoubleBackward> {
  static variable_list forward(AutogradContext*, at::TensorList xs) { return xs.vec(); }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, kOp, ": double backward is not supported (the backward is once differentiable)");
    return {};
  }
};

// fork (conv_bn_relu_train_fork): x itself is a second output (autograd makes it a view of x), for a
// residual block's shortcut; the gradient reaching it is added to x's in the backward, accumulated
// by the dgrad GEMM where join_gemm_ok (conv_bn_train.cpp).
struct ConvBnReluTrain : public torch::autograd::Function<ConvBnReluTrain> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& w, const OptTensor& bn_weight,
                               const OptTensor& bn_bias, const OptTensor& running_mean, const OptTensor& running_var,
                               const OptTensor& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups, double momentum, double eps, bool relu,
                               bool recompute, bool fork) {
    auto [out, z, mean, invstd, scale, shift] = layer_forward(
        x, w, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding, dilation, groups, momentum,
        eps, relu);
    // The ReLU's mask: without a residual, out <= 0 exactly where the normalize of z is (the backward
    // kernels recompute it from z, which they read anyway, and the apply's scale / shift: one pass
    // over the activation fewer in each); with a residual from the output, kept for it. Without a
    // ReLU nothing is kept (a downsample's output is freed once the next op has read it). With
    // recompute the conv output is not kept either, and the mask comes from the output: a
    // recomputed z need not have the forward's bits (cuDNN may pick another algorithm).
    const bool mask_from_z = relu && !defined(residual) && !recompute;
    ctx->save_for_backward({x, w, defined(bn_weight) ? *bn_weight : Tensor(), recompute ? Tensor() : z,
                            relu && !mask_from_z ? out : Tensor(), mean, invstd, mask_from_z ? scale : Tensor(),
                            mask_from_z ? shift : Tensor()});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["fork"] = fork;
    // edge index of each differentiable argument (x, weight, bn_weight, bn_bias, residual); -1: not given
    int64_t e = 2;
    const auto edge = [&e](const OptTensor& t) -> int64_t { return defined(t) ? e++ : -1; };
    const int64_t eg = edge(bn_weight), eb = edge(bn_bias);
    edge(running_mean);
    edge(running_var);
    ctx->saved_data["edges"] = std::vector<int64_t>{0, 1, eg, eb, edge(residual)};
    if (defined(bn_bias)) ctx->saved_data["bias_dtype"] = bn_bias->scalar_type();
    // no zero-filled output gradient when the output is unused
    ctx->set_materialize_grads(false);
    if (fork) return {out, x};
    return {out};
  }

  // grad_outputs by reference: the engine moves each gradient into the list it passes, so a fork's
  // shortcut gradient moved out of it has no other owner unless someone kept it (dgrad_join checks)
  static variable_list backward(AutogradContext* ctx, variable_list& grad_outputs) {
    variable_list grads(kArgs);
    const Tensor& gout = grad_outputs[0];
    Tensor shortcut;
    if (ctx->saved_data["fork"].toBool() && grad_outputs.size() > 1) shortcut = std::move(grad_outputs[1]);
    const auto edges = ctx->saved_data["edges"].toIntVector();
    std::array<bool, 5> mask{};
    for (size_t i = 0; i < 5; ++i) mask[i] = edges[i] >= 0 && ctx->needs_input_grad(edges[i]);
    if (!gout.defined()) {  // nothing flows back but the shortcut's gradient
      if (shortcut.defined() && mask[0]) grads[0] = shortcut;
      return grads;
    }
    if (!(mask[0] || mask[1] || mask[2] || mask[3] || mask[4])) return grads;
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w = saved[1];
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const bool relu = ctx->saved_data["relu"].toBool();
    // create_graph: these gradients depend on the inputs, whether gout requires grad or not
    const bool create_graph = at::GradMode::is_enabled();
    std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> r;
    {
      at::AutoGradMode no_grad(false);
      // the conv output again where it was not kept (cuDNN on CUDA: the values the forward had)
      const Tensor z = saved[3].defined()
                           ? saved[3]
                           : at::convolution(x, w, std::nullopt, stride, padding, dilation, false, {0, 0}, groups);
      // without a ReLU, or with its mask from z, the kernels do not read the output: any tensor of its
      // shape stands in
      const Tensor& out = saved[4].defined() ? saved[4] : gout;
      const OptTensor bn_weight = saved[2].defined() ? OptTensor(saved[2]) : std::nullopt;
      const OptTensor msc = saved[7].defined() ? OptTensor(saved[7]) : std::nullopt;
      const OptTensor msh = saved[8].defined() ? OptTensor(saved[8]) : std::nullopt;
      r = conv_bn_train_backward(gout, x, w, bn_weight, z, out, saved[5], saved[6], stride, padding, dilation,
                                 groups, relu, mask, msc, msh, mask[0] ? std::move(shortcut) : Tensor());
    }
    auto& [dx, dw, dg, db, dr] = r;
    if (mask[3] && ctx->saved_data.count("bias_dtype")) db = db.to(ctx->saved_data["bias_dtype"].toScalarType());
    const std::array<int, 5> slot{0, 1, 2, 3, 6};
    const std::array<Tensor*, 5> g{&dx, &dw, &dg, &db, &dr};
    for (size_t i = 0; i < 5; ++i)
      if (mask[i]) grads[slot[i]] = *g[i];
    if (create_graph) {
      // as @once_differentiable, stricter (it wraps only when gout requires grad): the gradients
      // join a graph whose backward raises, instead of silently lacking their second-order terms
      std::vector<Tensor> fake;
      std::vector<int> where;
      for (int i = 0; i < kArgs; ++i)
        if (grads[i].defined()) {
          fake.push_back(grads[i].detach().requires_grad_(true));
          where.push_back(i);
        }
      const variable_list wrapped = RefuseDoubleBackward::apply(at::TensorList(fake));
      for (size_t j = 0; j < where.size(); ++j) grads[where[j]] = wrapped[j];
    }
    return grads;
  }
};

Tensor conv_bn_relu_train_autograd(const Tensor& x, const Tensor& w, const OptTensor& bn_weight,
                                   const OptTensor& bn_bias, const OptTensor& running_mean,
                                   const OptTensor& running_var, const OptTensor& residual, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, double momentum,
                                   double eps, bool relu, bool recompute) {
  return ConvBnReluTrain::apply(x, w, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding,
                                dilation, groups, momentum, eps, relu, recompute, false)[0];
}

std::tuple<Tensor, Tensor> conv_bn_relu_train_fork_autograd(
    const Tensor& x, const Tensor& w, const OptTensor& bn_weight, const OptTensor& bn_bias,
    const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& residual, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, double momentum, double eps, bool relu,
    bool recompute) {
  auto r = ConvBnReluTrain::apply(x, w, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding,
                                  dilation, groups, momentum, eps, relu, recompute, true);
  return {r[0], r[1]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(resnet_fused_C, m) {
  m.def("conv_bn_relu_train(Tensor x, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, Tensor? residual, int[] stride, int[] padding, int[] dilation, int groups, "
        "float momentum, float eps, bool relu, bool recompute) -> Tensor");
  // the same layer, with x (a view of it) as a second output for a residual block's shortcut
  m.def("conv_bn_relu_train_fork(Tensor(a) x, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, "
        "Tensor(b!)? running_mean, Tensor(c!)? running_var, Tensor? residual, int[] stride, int[] padding, "
        "int[] dilation, int groups, float momentum, float eps, bool relu, bool recompute) -> (Tensor, Tensor(a))");
}

TORCH_LIBRARY_IMPL(resnet_fused_C, CUDA, m) {
  m.impl("conv_bn_relu_train", &conv_bn_relu_train);
  m.impl("conv_bn_relu_train_fork", &conv_bn_relu_train_fork);
}
TORCH_LIBRARY_IMPL(resnet_fused_C, CPU, m) {
  m.impl("conv_bn_relu_train", &conv_bn_relu_train);
  m.impl("conv_bn_relu_train_fork", &conv_bn_relu_train_fork);
}
TORCH_LIBRARY_IMPL(resnet_fused_C, Autograd, m) {
  m.impl("conv_bn_relu_train", &conv_bn_relu_train_autograd);
  m.impl("conv_bn_relu_train_fork", &conv_bn_relu_train_fork_autograd);
}

}  // namespace resnet_fused
