// resnet_fused_C::bn_* — the BatchNorm / residual / ReLU kernels of the CUDA backend of
// conv_bn_relu (the convolution itself is ATen's, called from Python). Activations must be
// NHWC-dense 4-D tensors; per-channel vectors are float32 (float64 for float64 activations).
#include <limits>

#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "bn.h"
#include "common.h"

namespace resnet_fused {
namespace {

constexpr const char* kOp = "resnet_fused_C::bn";

void check_nhwc(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), kOp, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 4, kOp, ": ", name, " must be 4-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), kOp, ": ", name, " must be channels_last-dense");
  TORCH_CHECK(t.sizes() == like.sizes(), kOp, ": ", name, " has shape ", t.sizes(), ", expected ", like.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), kOp, ": ", name, " has dtype ", t.scalar_type(), ", expected ",
              like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), kOp, ": ", name, " is on ", t.device(), ", expected ", like.device());
}

at::ScalarType acc_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_vec(const at::Tensor& v, const char* name, int64_t K, at::ScalarType acc, const at::Tensor& like) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == K && v.is_contiguous(), kOp, ": ", name, " must be a contiguous [", K,
              "] vector, got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == acc, kOp, ": ", name, " must be ", acc, ", got ", v.scalar_type());
  TORCH_CHECK(v.device() == like.device(), kOp, ": ", name, " is on ", v.device(), ", expected ", like.device());
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

std::tuple<at::Tensor, at::Tensor> bn_stats(const at::Tensor& z, int64_t rows) {
  check_nhwc(z, "z", z);
  TORCH_CHECK(rows > 0, kOp, "_stats: rows must be positive");
  c10::cuda::CUDAGuard guard(z.device());
  const int64_t K = z.size(1), M = K ? z.numel() / K : 0;
  const int64_t G = std::max<int64_t>(1, (M + rows - 1) / rows);
  TORCH_CHECK(G <= std::numeric_limits<int32_t>::max(), kOp, "_stats: ", G,
              " partials exceed the kernel's grid; use more rows per partial");
  auto opts = z.options().dtype(acc_type(z)).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor pm = at::empty({G, K}, opts), pm2 = at::empty({G, K}, opts);
  check_launch(launch_bn_stats(z.const_data_ptr(), pm.mutable_data_ptr(), pm2.mutable_data_ptr(), M, K, rows,
                               kernel_dtype(z, kOp), stream()),
               "resnet_fused_C::bn_stats");
  return {pm, pm2};
}

// (mean, invstd, scale, shift, new_running_mean, new_running_var); scale / shift (the apply's
// coefficients) only when affine, else empty; in_place: the running statistics themselves are
// updated and come back as the new ones.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> finalize(
    const at::Tensor& pm, const at::Tensor& pm2, int64_t rows, int64_t M, const std::optional<at::Tensor>& rm,
    const std::optional<at::Tensor>& rv, const std::optional<at::Tensor>& gamma,
    const std::optional<at::Tensor>& beta, double momentum, double eps, bool affine, bool in_place = false) {
  TORCH_CHECK(pm.is_cuda() && pm.dim() == 2 && pm.is_contiguous() && pm2.sizes() == pm.sizes() &&
                  pm2.is_contiguous() && pm2.scalar_type() == pm.scalar_type(),
              "resnet_fused_C::bn_finalize: partials must be two contiguous [G, K] CUDA tensors of one dtype");
  TORCH_CHECK(pm.scalar_type() == at::kFloat || pm.scalar_type() == at::kDouble,
              "resnet_fused_C::bn_finalize: partials must be float32 or float64, got ", pm.scalar_type());
  TORCH_CHECK(pm2.device() == pm.device(), "resnet_fused_C::bn_finalize: partials on different devices");
  TORCH_CHECK(M > 1, "resnet_fused_C::bn_finalize: need more than 1 value per channel, got ", M);
  TORCH_CHECK(rows > 0 && pm.size(0) == (M + rows - 1) / rows, "resnet_fused_C::bn_finalize: ", pm.size(0),
              " partials do not cover ", M, " rows in chunks of ", rows);
  const bool update = rm.has_value() && rm->defined();
  TORCH_CHECK(update == (rv.has_value() && rv->defined()),
              "resnet_fused_C::bn_finalize: running_mean and running_var go together");
  c10::cuda::CUDAGuard guard(pm.device());
  const int64_t G = pm.size(0), K = pm.size(1);
  at::Tensor mean = at::empty({K}, pm.options()), invstd = at::empty({K}, pm.options());
  const bool has_g = gamma.has_value() && gamma->defined(), has_b = beta.has_value() && beta->defined();
  if (has_g) check_vec(*gamma, "gamma", K, pm.scalar_type(), pm);
  if (has_b) check_vec(*beta, "beta", K, pm.scalar_type(), pm);
  at::Tensor scale = at::empty({affine ? K : 0}, pm.options()), shift = at::empty({affine ? K : 0}, pm.options());
  at::Tensor nrm, nrv;
  DType run_dt = DType::Float32;
  if (update) {
    for (const auto* t : {&*rm, &*rv})
      TORCH_CHECK(t->is_cuda() && t->dim() == 1 && t->size(0) == K && t->is_contiguous() &&
                      t->scalar_type() == rm->scalar_type() && t->device() == pm.device(),
                  "resnet_fused_C::bn_finalize: running statistics must be contiguous [", K,
                  "] CUDA tensors of one dtype on the partials' device");
    run_dt = kernel_dtype(*rm, "resnet_fused_C::bn_finalize");
    nrm = in_place ? *rm : at::empty_like(*rm);
    nrv = in_place ? *rv : at::empty_like(*rv);
  } else {
    nrm = at::empty({0}, pm.options());
    nrv = at::empty({0}, pm.options());
  }
  check_launch(launch_bn_finalize(pm.const_data_ptr(), pm2.const_data_ptr(), G, K, M, rows, mean.mutable_data_ptr(),
                                  invstd.mutable_data_ptr(), update ? rm->const_data_ptr() : nullptr,
                                  update ? rv->const_data_ptr() : nullptr, update ? nrm.mutable_data_ptr() : nullptr,
                                  update ? nrv.mutable_data_ptr() : nullptr, run_dt, momentum, eps,
                                  pm.scalar_type() == at::kDouble, has_g ? gamma->const_data_ptr() : nullptr,
                                  has_b ? beta->const_data_ptr() : nullptr, affine ? scale.mutable_data_ptr() : nullptr,
                                  affine ? shift.mutable_data_ptr() : nullptr, stream()),
               "resnet_fused_C::bn_finalize");
  return {mean, invstd, scale, shift, nrm, nrv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_finalize(
    const at::Tensor& pm, const at::Tensor& pm2, int64_t rows, int64_t M, const std::optional<at::Tensor>& rm,
    const std::optional<at::Tensor>& rv, double momentum, double eps) {
  auto r = finalize(pm, pm2, rows, M, rm, rv, std::nullopt, std::nullopt, momentum, eps, false);
  return {std::get<0>(r), std::get<1>(r), std::get<4>(r), std::get<5>(r)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_finalize_affine(
    const at::Tensor& pm, const at::Tensor& pm2, int64_t rows, int64_t M, const std::optional<at::Tensor>& rm,
    const std::optional<at::Tensor>& rv, const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta,
    double momentum, double eps) {
  return finalize(pm, pm2, rows, M, rm, rv, gamma, beta, momentum, eps, true);
}

// bn_finalize_affine with the running statistics updated in place (the C++ autograd node's
// forward: no copies after it); returns (mean, invstd, scale, shift).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_finalize_affine_(
    const at::Tensor& pm, const at::Tensor& pm2, int64_t rows, int64_t M, const std::optional<at::Tensor>& rm,
    const std::optional<at::Tensor>& rv, const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta,
    double momentum, double eps) {
  auto r = finalize(pm, pm2, rows, M, rm, rv, gamma, beta, momentum, eps, true, true);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r)};
}

}  // namespace

at::Tensor bn_apply(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                    const std::optional<at::Tensor>& residual, bool relu) {
  check_nhwc(z, "z", z);
  const int64_t K = z.size(1), M = K ? z.numel() / K : 0;
  const auto acc = acc_type(z);
  check_vec(scale, "scale", K, acc, z);
  check_vec(shift, "shift", K, acc, z);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) check_nhwc(*residual, "residual", z);
  c10::cuda::CUDAGuard guard(z.device());
  at::Tensor out = at::empty_like(z);
  check_launch(launch_bn_apply(z.const_data_ptr(), scale.const_data_ptr(), shift.const_data_ptr(),
                               has_res ? residual->const_data_ptr() : nullptr, out.mutable_data_ptr(), M, K, relu,
                               kernel_dtype(z, kOp), stream()),
               "resnet_fused_C::bn_apply");
  return out;
}

namespace {

std::tuple<at::Tensor, at::Tensor> bn_bwd_reduce(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& z,
                                                 const at::Tensor& mean, bool relu) {
  check_nhwc(grad, "grad", grad);
  check_nhwc(out, "out", grad);
  check_nhwc(z, "z", grad);
  const int64_t K = grad.size(1), M = K ? grad.numel() / K : 0;
  check_vec(mean, "mean", K, acc_type(grad), grad);
  c10::cuda::CUDAGuard guard(grad.device());
  const int64_t rows = partial_rows(M);
  const int64_t G = std::max<int64_t>(1, (M + rows - 1) / rows);
  auto opts = mean.options();
  // every partial is written by the kernel; with no rows (M == 0) there is one, of zeros
  at::Tensor ps = M ? at::empty({G, K}, opts) : at::zeros({G, K}, opts);
  at::Tensor psz = M ? at::empty({G, K}, opts) : at::zeros({G, K}, opts);
  check_launch(launch_bn_bwd_reduce(grad.const_data_ptr(), out.const_data_ptr(), z.const_data_ptr(),
                                    mean.const_data_ptr(), ps.mutable_data_ptr(), psz.mutable_data_ptr(), M, K,
                                    rows, relu, kernel_dtype(grad, kOp), stream()),
               "resnet_fused_C::bn_bwd_reduce");
  // A fixed-order reduction over the partials: deterministic.
  return {at::sum(ps, {0}), at::sum(psz, {0})};
}

// The reduction, then the per-channel backward terms in one small kernel (no at::sum, no [K]
// arithmetic launches): (dgamma, dbeta, a, b, c), acc-typed (see launch_bn_bwd_coef).
// The ReLU's mask from z and the forward's scale / shift instead of out (the C++ autograd node, for
// an output without a residual): whether they are given, checked.
bool mask_from_z(const std::optional<at::Tensor>& msc, const std::optional<at::Tensor>& msh, bool relu, int64_t K,
                 at::ScalarType acc, const at::Tensor& like) {
  const bool given = msc.has_value() && msc->defined();
  TORCH_CHECK(given == (msh.has_value() && msh->defined()), kOp, ": mask_scale and mask_shift go together");
  if (!given) return false;
  TORCH_CHECK(relu, kOp, ": mask_scale / mask_shift given without a ReLU");
  check_vec(*msc, "mask_scale", K, acc, like);
  check_vec(*msh, "mask_shift", K, acc, like);
  return true;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_bwd_reduce_coef(
    const at::Tensor& grad, const at::Tensor& out, const at::Tensor& z, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& gamma, bool relu,
    const std::optional<at::Tensor>& mask_scale, const std::optional<at::Tensor>& mask_shift) {
  check_nhwc(grad, "grad", grad);
  check_nhwc(z, "z", grad);
  const int64_t K = grad.size(1), M = K ? grad.numel() / K : 0;
  TORCH_CHECK(M > 0, kOp, "_bwd_reduce_coef: needs at least one row");
  const auto acc = acc_type(grad);
  const bool from_z = mask_from_z(mask_scale, mask_shift, relu, K, acc, grad);
  if (relu && !from_z) check_nhwc(out, "out", grad);
  check_vec(mean, "mean", K, acc, grad);
  check_vec(invstd, "invstd", K, acc, grad);
  const bool has_g = gamma.has_value() && gamma->defined();
  if (has_g) check_vec(*gamma, "gamma", K, acc, grad);
  c10::cuda::CUDAGuard guard(grad.device());
  const int64_t rows = partial_rows(M);
  const int64_t G = (M + rows - 1) / rows;
  auto opts = mean.options();
  at::Tensor ps = at::empty({G, K}, opts), psz = at::empty({G, K}, opts);
  check_launch(launch_bn_bwd_reduce(grad.const_data_ptr(), relu && !from_z ? out.const_data_ptr() : nullptr,
                                    z.const_data_ptr(), mean.const_data_ptr(), ps.mutable_data_ptr(),
                                    psz.mutable_data_ptr(), M, K, rows, relu, kernel_dtype(grad, kOp), stream(),
                                    from_z ? mask_scale->const_data_ptr() : nullptr,
                                    from_z ? mask_shift->const_data_ptr() : nullptr),
               "resnet_fused_C::bn_bwd_reduce_coef");
  at::Tensor dgamma = at::empty({K}, opts), dbeta = at::empty({K}, opts), a = at::empty({K}, opts),
             b = at::empty({K}, opts), c = at::empty({K}, opts);
  check_launch(launch_bn_bwd_coef(ps.const_data_ptr(), psz.const_data_ptr(), G, K, M,
                                  has_g ? gamma->const_data_ptr() : nullptr, invstd.const_data_ptr(),
                                  dgamma.mutable_data_ptr(), dbeta.mutable_data_ptr(), a.mutable_data_ptr(),
                                  b.mutable_data_ptr(), c.mutable_data_ptr(), acc == at::kDouble, stream()),
               "resnet_fused_C::bn_bwd_reduce_coef");
  return {dgamma, dbeta, a, b, c};
}

std::tuple<at::Tensor, at::Tensor> bn_bwd_apply(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& z,
                                                const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& a,
                                                const std::optional<at::Tensor>& b,
                                                const std::optional<at::Tensor>& c, bool relu, bool store_gres,
                                                const std::optional<at::Tensor>& mask_scale,
                                                const std::optional<at::Tensor>& mask_shift) {
  check_nhwc(grad, "grad", grad);
  const int64_t K = grad.size(1), M = K ? grad.numel() / K : 0;
  const auto acc = acc_type(grad);
  const bool from_z = mask_from_z(mask_scale, mask_shift, relu, K, acc, grad);
  if (relu && !from_z) check_nhwc(out, "out", grad);
  check_vec(a, "a", K, acc, grad);
  const bool use_z = b.has_value() && b->defined();
  TORCH_CHECK(use_z == (c.has_value() && c->defined()), "resnet_fused_C::bn_bwd_apply: b and c go together");
  if (use_z || from_z) check_nhwc(z, "z", grad);
  if (use_z) {
    check_vec(*b, "b", K, acc, grad);
    check_vec(*c, "c", K, acc, grad);
    check_vec(mean, "mean", K, acc, grad);
    check_vec(invstd, "invstd", K, acc, grad);
  }
  c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor dz = at::empty_like(grad);
  at::Tensor gres = store_gres ? at::empty_like(grad) : at::empty({0}, grad.options());
  check_launch(launch_bn_bwd_apply(grad.const_data_ptr(), relu && !from_z ? out.const_data_ptr() : nullptr,
                                   use_z || from_z ? z.const_data_ptr() : nullptr,
                                   use_z ? mean.const_data_ptr() : nullptr,
                                   use_z ? invstd.const_data_ptr() : nullptr, a.const_data_ptr(),
                                   use_z ? b->const_data_ptr() : nullptr, use_z ? c->const_data_ptr() : nullptr,
                                   dz.mutable_data_ptr(), store_gres ? gres.mutable_data_ptr() : nullptr, M, K, relu,
                                   kernel_dtype(grad, kOp), stream(),
                                   from_z ? mask_scale->const_data_ptr() : nullptr,
                                   from_z ? mask_shift->const_data_ptr() : nullptr),
               "resnet_fused_C::bn_bwd_apply");
  return {dz, gres};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(resnet_fused_C, m) {
  m.def("bn_stats(Tensor z, int rows) -> (Tensor, Tensor)");
  m.def("bn_finalize(Tensor pmean, Tensor pm2, int rows, int M, Tensor? running_mean, Tensor? running_var, "
        "float momentum, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("bn_finalize_affine(Tensor pmean, Tensor pm2, int rows, int M, Tensor? running_mean, Tensor? running_var, "
        "Tensor? gamma, Tensor? beta, float momentum, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("bn_finalize_affine_(Tensor pmean, Tensor pm2, int rows, int M, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, Tensor? gamma, Tensor? beta, float momentum, float eps) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("bn_apply(Tensor z, Tensor scale, Tensor shift, Tensor? residual, bool relu) -> Tensor");
  m.def("bn_bwd_reduce(Tensor grad, Tensor out, Tensor z, Tensor mean, bool relu) -> (Tensor, Tensor)");
  // mask_scale / mask_shift (the forward apply's scale / shift, an output without a residual): the
  // ReLU's mask recomputed from z, out not read
  m.def("bn_bwd_reduce_coef(Tensor grad, Tensor out, Tensor z, Tensor mean, Tensor invstd, Tensor? gamma, "
        "bool relu, Tensor? mask_scale=None, Tensor? mask_shift=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("bn_bwd_apply(Tensor grad, Tensor out, Tensor z, Tensor mean, Tensor invstd, Tensor a, Tensor? b, "
        "Tensor? c, bool relu, bool store_gres, Tensor? mask_scale=None, Tensor? mask_shift=None) -> "
        "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(resnet_fused_C, CUDA, m) {
  m.impl("bn_stats", &bn_stats);
  m.impl("bn_finalize", &bn_finalize);
  m.impl("bn_finalize_affine", &bn_finalize_affine);
  m.impl("bn_finalize_affine_", &bn_finalize_affine_);
  m.impl("bn_apply", &bn_apply);
  m.impl("bn_bwd_reduce", &bn_bwd_reduce);
  m.impl("bn_bwd_reduce_coef", &bn_bwd_reduce_coef);
  m.impl("bn_bwd_apply", &bn_bwd_apply);
}

}  // namespace resnet_fused
