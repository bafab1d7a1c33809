// resnet_fused_C::max_pool2d_fwd / max_pool2d_bwd — schema and CUDA registration of the max pooling
// with a one-byte argmax (csrc/max_pool_kernel.cu). The Python side (resnet_fused/ops/max_pool.py)
// decides which calls come here (channels_last inputs, supported geometry); here it is checked.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common.h"

namespace resnet_fused {
namespace {

constexpr const char* kFwd = "resnet_fused_C::max_pool2d_fwd";
constexpr const char* kBwd = "resnet_fused_C::max_pool2d_bwd";

// kernel, stride, padding as {h, w}, within the kernels' range (the code byte holds kh * KW + kw)
void geometry(c10::IntArrayRef kernel, c10::IntArrayRef stride, c10::IntArrayRef padding, int* k, int* s, int* p,
              const char* op) {
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2, op,
              ": kernel, stride and padding must have two entries each");
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(kernel[i] >= 1 && stride[i] >= 1 && padding[i] >= 0 && 2 * padding[i] <= kernel[i], op,
                ": unsupported geometry: kernel ", kernel, ", stride ", stride, ", padding ", padding);
    k[i] = static_cast<int>(kernel[i]);
    s[i] = static_cast<int>(stride[i]);
    p[i] = static_cast<int>(padding[i]);
  }
  TORCH_CHECK(k[0] * k[1] <= 256, op, ": a ", k[0], "x", k[1], " window has more positions than one byte can name");
}

bool dense_nhwc(const at::Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// with_code false (inference): the pooled values alone; the code comes back empty
std::tuple<at::Tensor, at::Tensor> max_pool2d_fwd_cuda(const at::Tensor& x, c10::IntArrayRef kernel,
                                                       c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                       bool with_code) {
  TORCH_CHECK(x.is_cuda(), kFwd, ": expected a CUDA tensor, got ", x.device());
  TORCH_CHECK(dense_nhwc(x), kFwd, ": expected a dense channels_last 4-D tensor, got sizes ", x.sizes(),
              " and strides ", x.strides());
  int k[2], s[2], p[2];
  geometry(kernel, stride, padding, k, s, p, kFwd);
  const DType dt = kernel_dtype(x, kFwd);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t P = (H + 2 * p[0] - k[0]) / s[0] + 1, Q = (W + 2 * p[1] - k[1]) / s[1] + 1;
  TORCH_CHECK(P >= 1 && Q >= 1, kFwd, ": output size ", P, "x", Q, " is too small for input ", x.sizes());
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({N, C, P, Q}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor code = with_code ? at::empty({N, C, P, Q},
                                           x.options().dtype(at::kByte).memory_format(at::MemoryFormat::ChannelsLast))
                              : at::empty({0}, x.options().dtype(at::kByte));
  check_launch(launch_max_pool_fwd(x.const_data_ptr(), out.mutable_data_ptr(),
                                   with_code ? code.mutable_data_ptr() : nullptr, N, H, W, C, P, Q, k, s, p, dt,
                                   c10::cuda::getCurrentCUDAStream().stream()),
               kFwd);
  return {out, code};
}

at::Tensor max_pool2d_bwd_cuda(const at::Tensor& grad, const at::Tensor& code, int64_t H, int64_t W,
                               c10::IntArrayRef kernel, c10::IntArrayRef stride, c10::IntArrayRef padding) {
  TORCH_CHECK(grad.is_cuda() && code.device() == grad.device(), kBwd, ": expected CUDA tensors on one device, got ",
              grad.device(), " and ", code.device());
  TORCH_CHECK(dense_nhwc(grad) && dense_nhwc(code), kBwd, ": expected dense channels_last 4-D tensors");
  TORCH_CHECK(code.scalar_type() == at::kByte && code.sizes() == grad.sizes(), kBwd,
              ": code must be uint8 of grad's shape ", grad.sizes(), ", got ", code.scalar_type(), " ", code.sizes());
  int k[2], s[2], p[2];
  geometry(kernel, stride, padding, k, s, p, kBwd);
  const DType dt = kernel_dtype(grad, kBwd);
  const int64_t N = grad.size(0), C = grad.size(1), P = grad.size(2), Q = grad.size(3);
  TORCH_CHECK(H >= 1 && W >= 1 && (H + 2 * p[0] - k[0]) / s[0] + 1 == P && (W + 2 * p[1] - k[1]) / s[1] + 1 == Q,
              kBwd, ": an input of ", H, "x", W, " does not pool to ", P, "x", Q);
  c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor dx = at::empty({N, C, H, W}, grad.options().memory_format(at::MemoryFormat::ChannelsLast));
  check_launch(launch_max_pool_bwd(grad.const_data_ptr(), code.const_data_ptr(), dx.mutable_data_ptr(), N, H, W, C, P,
                                   Q, k, s, p, dt, c10::cuda::getCurrentCUDAStream().stream()),
               kBwd);
  return dx;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(resnet_fused_C, m) {
  m.def("max_pool2d_fwd(Tensor x, int[2] kernel, int[2] stride, int[2] padding, bool with_code=True) -> "
        "(Tensor, Tensor)");
  m.def("max_pool2d_bwd(Tensor grad, Tensor code, int H, int W, int[2] kernel, int[2] stride, int[2] padding) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(resnet_fused_C, CUDA, m) {
  m.impl("max_pool2d_fwd", &max_pool2d_fwd_cuda);
  m.impl("max_pool2d_bwd", &max_pool2d_bwd_cuda);
}

}  // namespace resnet_fused
