// resnet_fused_C::add_relu — schema and CUDA registration. Layout normalisation
// (making both inputs dense with the same strides) happens in Python, shared with the
// Triton backend; here it is checked, not assumed.
#include <torch/library.h>

#include "common.h"

namespace resnet_fused {

at::Tensor add_relu_cuda(const at::Tensor& x, const at::Tensor& residual) {
  constexpr const char* op = "resnet_fused_C::add_relu";
  TORCH_CHECK(x.is_cuda() && residual.is_cuda(), op, ": expected CUDA tensors, got ", x.device(), " and ",
              residual.device());
  TORCH_CHECK(x.device() == residual.device(), op, ": tensors on different devices: ", x.device(), " and ",
              residual.device());
  TORCH_CHECK(x.scalar_type() == residual.scalar_type(), op, ": dtype mismatch: ", x.scalar_type(), " and ",
              residual.scalar_type());
  TORCH_CHECK(x.sizes() == residual.sizes(), op, ": shape mismatch: ", x.sizes(), " and ", residual.sizes());
  const DType dt = kernel_dtype(x, op);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  TORCH_CHECK(x.strides() == out.strides() && residual.strides() == out.strides(), op,
              ": inputs must be dense with identical strides (got ", x.strides(), " and ", residual.strides(), ")");
  check_launch(launch_add_relu(x.const_data_ptr(), residual.const_data_ptr(), out.mutable_data_ptr(), x.numel(), dt,
                               c10::cuda::getCurrentCUDAStream().stream()),
               op);
  return out;
}

TORCH_LIBRARY_FRAGMENT(resnet_fused_C, m) { m.def("add_relu(Tensor x, Tensor residual) -> Tensor"); }

TORCH_LIBRARY_IMPL(resnet_fused_C, CUDA, m) { m.impl("add_relu", &add_relu_cuda); }

}  // namespace resnet_fused
