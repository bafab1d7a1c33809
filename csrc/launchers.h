// Launchers for the CUDA kernels. Deliberately free of torch headers so that the
// .cu files compile with the CUDA headers alone (seconds per architecture instead of
// minutes); the .cpp files do the tensor checks and registration.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace resnet_fused {

// Scalar types the kernels are instantiated for.
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// out[i] = max(x[i] + residual[i], 0) over n elements of dense, identically laid out
// storage. Returns the launch status (cudaSuccess or the error).
cudaError_t launch_add_relu(const void* x, const void* residual, void* out, int64_t n, DType dtype,
                            cudaStream_t stream);

}  // namespace resnet_fused
