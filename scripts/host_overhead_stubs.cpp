// CPU stand-ins for the CUDA extension's kernels, for `scripts/host_overhead.py --device cpu`:
// each resnet_fused_C kernel op gets a CPU implementation that only allocates its outputs, in
// C++ (as the real ones are), so that the host path around them — Python or the C++ training
// path of csrc/conv_bn_train.cpp — is timed without a GPU and without Python-level stubs.
// Loaded with torch.utils.cpp_extension.load(..., is_python_module=False).
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

std::tuple<Tensor, Tensor> bn_stats(const Tensor& z, int64_t rows) {
  const int64_t K = z.size(1), M = K ? z.numel() / K : 0;
  const int64_t G = std::max<int64_t>(1, (M + rows - 1) / rows);
  auto o = z.options().dtype(at::kFloat);
  return {at::empty({G, K}, o), at::empty({G, K}, o)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_finalize(const Tensor& pm, const Tensor&, int64_t, int64_t,
                                                       const OptTensor& rm, const OptTensor&, double, double) {
  const int64_t K = pm.size(1);
  const bool upd = rm.has_value() && rm->defined();
  return {at::empty({K}, pm.options()), at::empty({K}, pm.options()), at::empty({upd ? K : 0}, pm.options()),
          at::empty({upd ? K : 0}, pm.options())};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bn_finalize_affine(
    const Tensor& pm, const Tensor& pm2, int64_t rows, int64_t M, const OptTensor& rm, const OptTensor& rv,
    const OptTensor&, const OptTensor&, double momentum, double eps) {
  auto [mean, invstd, nrm, nrv] = bn_finalize(pm, pm2, rows, M, rm, rv, momentum, eps);
  return {mean, invstd, at::empty_like(mean), at::empty_like(mean), nrm, nrv};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_finalize_affine_(const Tensor& pm, const Tensor&, int64_t, int64_t,
                                                                const OptTensor&, const OptTensor&, const OptTensor&,
                                                                const OptTensor&, double, double) {
  const int64_t K = pm.size(1);
  return {at::empty({K}, pm.options()), at::empty({K}, pm.options()), at::empty({K}, pm.options()),
          at::empty({K}, pm.options())};
}

Tensor bn_apply(const Tensor& z, const Tensor&, const Tensor&, const OptTensor&, bool) { return at::empty_like(z); }

std::tuple<Tensor, Tensor> bn_bwd_reduce(const Tensor& g, const Tensor&, const Tensor&, const Tensor& mean, bool) {
  return {at::empty_like(mean), at::empty_like(mean)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bn_bwd_reduce_coef(const Tensor& g, const Tensor&, const Tensor&,
                                                                       const Tensor& mean, const Tensor&,
                                                                       const OptTensor&, bool, const OptTensor&,
                                                                       const OptTensor&) {
  return {at::empty_like(mean), at::empty_like(mean), at::empty_like(mean), at::empty_like(mean),
          at::empty_like(mean)};
}

std::tuple<Tensor, Tensor> bn_bwd_apply(const Tensor& g, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                        const Tensor&, const OptTensor&, const OptTensor&, bool, bool store,
                                        const OptTensor&, const OptTensor&) {
  return {at::empty_like(g), store ? at::empty_like(g) : at::empty({0}, g.options())};
}

std::tuple<Tensor, int64_t> conv_bias_act(const Tensor& x, const Tensor& w, const OptTensor&, const OptTensor&,
                                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                          int64_t, bool, const OptTensor&) {
  const int64_t P = (x.size(2) + 2 * padding[0] - dilation[0] * (w.size(2) - 1) - 1) / stride[0] + 1;
  const int64_t Q = (x.size(3) + 2 * padding[1] - dilation[1] * (w.size(3) - 1) - 1) / stride[1] + 1;
  return {at::empty({x.size(0), w.size(0), P, Q}, x.options().memory_format(at::MemoryFormat::ChannelsLast)), 0};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused_C, CPU, m) {
  m.impl("bn_stats", &bn_stats);
  m.impl("bn_finalize", &bn_finalize);
  m.impl("bn_finalize_affine", &bn_finalize_affine);
  m.impl("bn_finalize_affine_", &bn_finalize_affine_);
  m.impl("bn_apply", &bn_apply);
  m.impl("bn_bwd_reduce", &bn_bwd_reduce);
  m.impl("bn_bwd_reduce_coef", &bn_bwd_reduce_coef);
  m.impl("bn_bwd_apply", &bn_bwd_apply);
  m.impl("conv_bias_act", &conv_bias_act);
}
