// Scalar helpers shared by the .cu files (CUDA headers only).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace resnet_fused {

// Arithmetic ("opmath") type: half and bfloat16 compute in fp32, as PyTorch does.
template <typename T> struct OpMath { using type = T; };
template <> struct OpMath<__half> { using type = float; };
template <> struct OpMath<__nv_bfloat16> { using type = float; };

template <typename A, typename T> __device__ __forceinline__ A load_as(const T* p) { return static_cast<A>(*p); }
template <> __device__ __forceinline__ float load_as<float, __half>(const __half* p) { return __half2float(*p); }
template <> __device__ __forceinline__ double load_as<double, __half>(const __half* p) { return __half2float(*p); }
template <> __device__ __forceinline__ float load_as<float, __nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}
template <> __device__ __forceinline__ double load_as<double, __nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}

template <typename T, typename A> __device__ __forceinline__ T cast_to(A v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half cast_to<__half, float>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __half cast_to<__half, double>(double v) { return __double2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 cast_to<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 cast_to<__nv_bfloat16, double>(double v) {
  return __float2bfloat16_rn(static_cast<float>(v));
}
template <typename A, typename T> __device__ __forceinline__ A to_acc(T v) { return load_as<A, T>(&v); }

}  // namespace resnet_fused
