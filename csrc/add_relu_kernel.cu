// residual add + ReLU: one read of each input, one write, 16-byte vector accesses.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launchers.h"

namespace resnet_fused {
namespace {

// Arithmetic type: half and bfloat16 add in fp32 and round once, as PyTorch's
// "opmath" does; ReLU commutes with that rounding.
template <typename T> struct OpMath { using type = T; };
template <> struct OpMath<__half> { using type = float; };
template <> struct OpMath<__nv_bfloat16> { using type = float; };

template <typename T> __device__ __forceinline__ typename OpMath<T>::type to_op(T v) { return v; }
template <> __device__ __forceinline__ float to_op(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_op(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_op(typename OpMath<T>::type v) { return v; }
template <> __device__ __forceinline__ __half from_op<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_op<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__device__ __forceinline__ T add_relu1(T a, T b) {
  auto s = to_op(a) + to_op(b);
  // `s < 0` is false for NaN, so NaN propagates as torch.relu does.
  return from_op<T>(s < decltype(s)(0) ? decltype(s)(0) : s);
}

template <typename T>
struct alignas(16) Vec {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

// Grid-stride over 16-byte vectors (64-bit indices: tensors may exceed 2^31 elements),
// then a scalar tail. `aligned` is false when any pointer is not 16-byte aligned.
template <typename T>
__global__ void add_relu_kernel(const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ out,
                                int64_t n, bool aligned) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t done = 0;
  if (aligned) {
    constexpr int N = Vec<T>::N;
    const int64_t nvec = n / N;
    const auto* xv = reinterpret_cast<const Vec<T>*>(x);
    const auto* rv = reinterpret_cast<const Vec<T>*>(r);
    auto* ov = reinterpret_cast<Vec<T>*>(out);
    for (int64_t i = tid; i < nvec; i += stride) {
      Vec<T> a = xv[i], b = rv[i], c;
#pragma unroll
      for (int k = 0; k < N; ++k) c.v[k] = add_relu1(a.v[k], b.v[k]);
      ov[i] = c;
    }
    done = nvec * N;
  }
  for (int64_t i = done + tid; i < n; i += stride) out[i] = add_relu1(x[i], r[i]);
}

template <typename T>
cudaError_t launch_typed(const void* x, const void* r, void* out, int64_t n, cudaStream_t stream) {
  constexpr int threads = 256;
  const bool aligned = ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(r) |
                         reinterpret_cast<uintptr_t>(out)) % 16) == 0;
  const int64_t per_thread = aligned ? Vec<T>::N : 1;
  int64_t blocks = (n + per_thread * threads - 1) / (per_thread * threads);
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  // Enough blocks to fill every SM several times over; the grid-stride loop does the rest.
  const int64_t cap = static_cast<int64_t>(sms > 0 ? sms : 128) * 16;
  if (blocks > cap) blocks = cap;
  if (blocks < 1) blocks = 1;
  add_relu_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(r), static_cast<T*>(out), n, aligned);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_add_relu(const void* x, const void* r, void* out, int64_t n, DType dtype, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32: return launch_typed<float>(x, r, out, n, stream);
    case DType::Float64: return launch_typed<double>(x, r, out, n, stream);
    case DType::Float16: return launch_typed<__half>(x, r, out, n, stream);
    case DType::BFloat16: return launch_typed<__nv_bfloat16>(x, r, out, n, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace resnet_fused
