// resnet_fused_C::conv_bias_act — the eval path of the CUDA backend: a convolution whose
// BatchNorm is folded into (weight, bias), plus an optional residual, then ReLU, as one cuDNN
// fused call (ATen's cudnn_convolution_relu / cudnn_convolution_add_relu: cuDNN's runtime
// fusion of conv -> add -> bias -> ReLU, one write of the output).
//
// Cases cuDNN is not asked for, or refuses, run as ATen's convolution followed by our epilogue
// kernel (bn_apply: fp32 bias, residual, ReLU):
//   * no ReLU (the downsample branch): cuDNN has no fused conv + bias without an activation
//     in ATen; ATen's own bias add would be the same second pass, in the activation dtype;
//   * float64; cuDNN disabled by the user; torch.use_deterministic_algorithms(True) (ATen's
//     fused entry points do not take the deterministic flag);
//   * a geometry or dtype for which cuDNN finds no fused engine: the first refusal of a
//     signature is remembered, so the failed plan search is paid once per signature.
// Without a bias, a residual or a ReLU (the eval downsample branch, whose BatchNorm shift the
// models add to the block's last conv instead) it is the convolution alone, no epilogue pass.
// The second output says which path ran (0: cuDNN fused, 1: conv + epilogue, 2: conv alone), for
// tests and resnet_fused.explain().
#include <mutex>
#include <set>
#include <vector>

#include <ATen/Context.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/cudnn_convolution_add_relu.h>
#include <ATen/ops/cudnn_convolution_relu.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "bn.h"
#include "common.h"

namespace resnet_fused {
namespace {

constexpr const char* kOp = "resnet_fused_C::conv_bias_act";

std::mutex g_mutex;
std::set<std::vector<int64_t>> g_refused;  // signatures cuDNN found no fused engine for

std::vector<int64_t> signature(const at::Tensor& x, const at::Tensor& w, bool has_res, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool tf32) {
  std::vector<int64_t> s{static_cast<int64_t>(x.scalar_type()), x.get_device(), has_res, tf32, groups};
  for (auto r : {x.sizes(), x.strides(), w.sizes(), stride, padding, dilation}) s.insert(s.end(), r.begin(), r.end());
  return s;
}

std::tuple<at::Tensor, int64_t> conv_bias_act(const at::Tensor& x, const at::Tensor& w,
                                              const std::optional<at::Tensor>& bias_in,
                                              const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                              bool relu, const std::optional<at::Tensor>& bias_lowp) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, kOp, ": x must be a 4-D CUDA tensor, got ", x.dim(), "-D on ", x.device());
  TORCH_CHECK(w.dim() == 4 && w.device() == x.device() && w.scalar_type() == x.scalar_type(), kOp,
              ": weight must be 4-D, on x's device, of x's dtype");
  const int64_t K = w.size(0);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool has_res = residual.has_value() && residual->defined();
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, kOp,
              ": stride, padding and dilation must have two entries");
  if (has_res)
    TORCH_CHECK(residual->scalar_type() == x.scalar_type() && residual->device() == x.device(), kOp,
                ": residual must have x's dtype and device");
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const auto dt = x.scalar_type();
  // bias_lowp: the bias already cast to x's dtype, which cuDNN's fused graph takes (the models
  // cache it per layer); checked here, outside the fused attempt, whose failures count as
  // cuDNN refusing the signature
  const bool has_lowp = bias_lowp.has_value() && bias_lowp->defined();
  TORCH_CHECK(!has_lowp || (has_bias && bias_lowp->scalar_type() == dt && bias_lowp->dim() == 1 &&
                            bias_lowp->size(0) == K && bias_lowp->is_contiguous() &&
                            bias_lowp->device() == x.device()),
              kOp, ": bias_lowp must be a contiguous [", K, "] ", dt, " tensor on x's device, given with bias");
  if (!has_bias && !relu && !has_res) {  // the convolution alone
    c10::cuda::CUDAGuard guard(x.device());
    return {at::convolution(x, w, std::nullopt, stride, padding, dilation, false, {0, 0}, groups)
                .contiguous(at::MemoryFormat::ChannelsLast),
            2};
  }
  const at::Tensor bias = has_bias ? *bias_in : at::zeros({K}, x.options().dtype(acc));
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == K && bias.is_contiguous() && bias.scalar_type() == acc &&
                  bias.device() == x.device(),
              kOp, ": bias must be a contiguous [", K, "] ", acc, " tensor on x's device");
  c10::cuda::CUDAGuard guard(x.device());
  auto& ctx = at::globalContext();
  const bool lowp_or_f32 = dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16;
  if (relu && lowp_or_f32 && ctx.userEnabledCuDNN() && !ctx.deterministicAlgorithms()) {
    const auto sig = signature(x, w, has_res, stride, padding, dilation, groups, ctx.allowTF32CuDNN());
    bool refused;
    {
      std::lock_guard<std::mutex> lock(g_mutex);
      refused = g_refused.count(sig) > 0;
    }
    if (!refused) {
      try {
        // cuDNN's fused graph takes the bias in the activation dtype (ATen's default bias is
        // zeros of the output dtype); the accumulation and the epilogue run in fp32. Without the
        // caller's cast it is made here: one small kernel per call (per layer of a batch-1 graph).
        const at::Tensor b = has_lowp ? *bias_lowp : bias.to(dt);
        at::Tensor out = has_res ? at::cudnn_convolution_add_relu(x, w, *residual, at::Scalar(1.0), b, stride, padding,
                                                                  dilation, groups)
                                 : at::cudnn_convolution_relu(x, w, b, stride, padding, dilation, groups);
        return {out, 0};
      } catch (const c10::OutOfMemoryError&) {
        throw;  // transient: not a refusal of this signature
      } catch (const std::exception&) {
        std::lock_guard<std::mutex> lock(g_mutex);
        g_refused.insert(sig);
      }
    }
  }
  at::Tensor z = at::convolution(x, w, std::nullopt, stride, padding, dilation, false, {0, 0}, groups)
                     .contiguous(at::MemoryFormat::ChannelsLast);
  std::optional<at::Tensor> res;
  if (has_res) res = residual->contiguous(at::MemoryFormat::ChannelsLast);
  return {bn_apply(z, at::ones({K}, bias.options()), bias, res, relu), 1};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(resnet_fused_C, m) {
  // bias_lowp: bias already cast to x's dtype (what cuDNN's fused graph takes), to save the cast
  m.def("conv_bias_act(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, int[] stride, int[] padding, "
        "int[] dilation, int groups, bool relu, Tensor? bias_lowp=None) -> (Tensor, int)");
}

TORCH_LIBRARY_IMPL(resnet_fused_C, CUDA, m) { m.impl("conv_bias_act", &conv_bias_act); }

}  // namespace resnet_fused
