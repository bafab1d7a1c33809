// BatchNorm statistics, finalize, apply (+ residual + ReLU) and backward kernels for the
// CUDA backend of conv_bn_relu. Activations are NHWC: an [M, K] row-major matrix.
//
// Reductions are two-level and atomic-free, so results do not depend on scheduling:
// a block of (32 channels x 8 row-threads) reduces a chunk of rows into one partial
// row; partials are merged in a fixed order.
#include "launchers.h"
#include "type_utils.cuh"

namespace resnet_fused {
namespace {

constexpr int TX = 32;  // channels per block (consecutive: coalesced row segments)
constexpr int TY = 8;   // row-threads per block

// Adds a and b over the TY row-threads of each channel column (a block of TX x TY threads);
// the totals land in the threads with threadIdx.y == 0. Every thread of the block must call it.
template <typename A>
__device__ __forceinline__ void sum_over_rows(A& a, A& b) {
  __shared__ A sh_a[TY][TX], sh_b[TY][TX];
  sh_a[threadIdx.y][threadIdx.x] = a;
  sh_b[threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y == 0) {
    for (int i = 1; i < TY; ++i) {
      a += sh_a[i][threadIdx.x];
      b += sh_b[i][threadIdx.x];
    }
  }
}

// ---- statistics -------------------------------------------------------------------------
// Sums of (v - shift) and (v - shift)^2 with shift = the chunk's first value of the
// channel: exact merging inside the chunk, and no E[z^2] - E[z]^2 cancellation.
template <typename T, typename A>
__global__ void bn_stats_kernel(const T* __restrict__ z, A* __restrict__ pmean, A* __restrict__ pm2, int64_t M,
                                int64_t K, int64_t rows) {
  const int64_t g = blockIdx.x;
  const int64_t k = static_cast<int64_t>(blockIdx.y) * TX + threadIdx.x;
  const int64_t r0 = g * rows;
  const int64_t r1 = (r0 + rows < M) ? r0 + rows : M;
  A s = 0, ss = 0, shift = 0;
  if (k < K) {
    shift = load_as<A>(z + r0 * K + k);
    for (int64_t r = r0 + threadIdx.y; r < r1; r += TY) {
      const A d = load_as<A>(z + r * K + k) - shift;
      s += d;
      ss += d * d;
    }
  }
  sum_over_rows(s, ss);
  if (threadIdx.y == 0 && k < K) {
    const A n = static_cast<A>(r1 - r0);
    const A mean_d = s / n;
    pmean[g * K + k] = shift + mean_d;
    const A m2 = ss - s * mean_d;
    pm2[g * K + k] = m2 > A(0) ? m2 : A(0);
  }
}

// ---- finalize ----------------------------------------------------------------------------
template <typename A, typename R>
__global__ void bn_finalize_kernel(const A* __restrict__ pmean, const A* __restrict__ pm2, int64_t G, int64_t K,
                                   int64_t M, int64_t rows, A* __restrict__ mean_out, A* __restrict__ invstd_out,
                                   const R* __restrict__ rm, const R* __restrict__ rv, R* __restrict__ nrm,
                                   R* __restrict__ nrv, A momentum, A eps) {
  __shared__ A sh[TY][TX];
  __shared__ A sh_mean[TX];
  const int64_t k = static_cast<int64_t>(blockIdx.x) * TX + threadIdx.x;
  // Chan: mean = sum(n_g mean_g) / M; M2 = sum(M2_g + n_g (mean_g - mean)^2).
  A s = 0;
  if (k < K)
    for (int64_t g = threadIdx.y; g < G; g += TY) {
      const A n = static_cast<A>((M - g * rows) < rows ? (M - g * rows) : rows);
      s += n * pmean[g * K + k];
    }
  sh[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0) {
    A t = 0;
    for (int i = 0; i < TY; ++i) t += sh[i][threadIdx.x];
    sh_mean[threadIdx.x] = t / static_cast<A>(M);
  }
  __syncthreads();
  const A mean = sh_mean[threadIdx.x];
  A s2 = 0;
  if (k < K)
    for (int64_t g = threadIdx.y; g < G; g += TY) {
      const A n = static_cast<A>((M - g * rows) < rows ? (M - g * rows) : rows);
      const A d = pmean[g * K + k] - mean;
      s2 += pm2[g * K + k] + n * d * d;
    }
  __syncthreads();
  sh[threadIdx.y][threadIdx.x] = s2;
  __syncthreads();
  if (threadIdx.y == 0 && k < K) {
    A t = 0;
    for (int i = 0; i < TY; ++i) t += sh[i][threadIdx.x];
    const A var = t / static_cast<A>(M);  // biased: used to normalise
    mean_out[k] = mean;
    invstd_out[k] = A(1) / sqrt(var + eps);
    if (nrm != nullptr) {
      // As F.batch_norm: running = (1 - momentum) * running + momentum * batch (unbiased var).
      const A unbiased = var * static_cast<A>(M) / static_cast<A>(M - 1);
      nrm[k] = cast_to<R>((A(1) - momentum) * load_as<A>(rm + k) + momentum * mean);
      nrv[k] = cast_to<R>((A(1) - momentum) * load_as<A>(rv + k) + momentum * unbiased);
    }
  }
}

// ---- elementwise: 16-byte vectors when K is a multiple of the vector width -------------------
// W consecutive elements of one row, loaded and stored as one access (W * sizeof(T) = 16
// bytes on the vector path, so the pack is 16-byte aligned; W = 1 otherwise).
template <typename T, int W>
struct alignas(sizeof(T) * W) Pack {
  T v[W];
};
template <typename T> constexpr int kVec = 16 / sizeof(T);

inline bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int64_t grid_for(int64_t work, int threads) {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  int64_t blocks = (work + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(sms > 0 ? sms : 128) * 32;
  return blocks < 1 ? 1 : (blocks > cap ? cap : blocks);
}

template <typename T, int W> __device__ __forceinline__ Pack<T, W> ld(const T* p) {
  return *reinterpret_cast<const Pack<T, W>*>(p);
}
template <typename T, int W> __device__ __forceinline__ void st(T* p, const Pack<T, W>& v) {
  *reinterpret_cast<Pack<T, W>*>(p) = v;
}

// Each item is W consecutive elements of one row (K % W == 0).
template <typename T, typename A, int W>
__global__ void bn_apply_kernel(const T* __restrict__ z, const A* __restrict__ scale, const A* __restrict__ shift,
                                const T* __restrict__ res, T* __restrict__ out, int64_t items, int64_t K, bool relu) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t it = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; it < items; it += stride) {
    const int64_t i0 = it * W;
    const int64_t k0 = i0 % K;
    const Pack<T, W> zv = ld<T, W>(z + i0);
    Pack<T, W> rv, ov;
    if (res) rv = ld<T, W>(res + i0);
#pragma unroll
    for (int j = 0; j < W; ++j) {
      A y = to_acc<A>(zv.v[j]) * scale[k0 + j] + shift[k0 + j];
      if (res) y += to_acc<A>(rv.v[j]);
      if (relu) y = y < A(0) ? A(0) : y;  // NaN stays NaN
      ov.v[j] = cast_to<T>(y);
    }
    st<T, W>(out + i0, ov);
  }
}

template <typename T, typename A>
__global__ void bn_bwd_reduce_kernel(const T* __restrict__ grad, const T* __restrict__ out, const T* __restrict__ z,
                                     const A* __restrict__ mean, A* __restrict__ psum, A* __restrict__ psumz,
                                     int64_t M, int64_t K, int64_t rows, bool relu) {
  const int64_t g = blockIdx.x;
  const int64_t k = static_cast<int64_t>(blockIdx.y) * TX + threadIdx.x;
  const int64_t r0 = g * rows;
  const int64_t r1 = (r0 + rows < M) ? r0 + rows : M;
  A s = 0, sz = 0;
  if (k < K) {
    const A mk = mean[k];
    for (int64_t r = r0 + threadIdx.y; r < r1; r += TY) {
      const int64_t i = r * K + k;
      A gy = load_as<A>(grad + i);
      if (relu && load_as<A>(out + i) <= A(0)) gy = 0;  // as threshold_backward: NaN passes
      s += gy;
      sz += gy * (load_as<A>(z + i) - mk);
    }
  }
  sum_over_rows(s, sz);
  if (threadIdx.y == 0 && k < K) {
    psum[g * K + k] = s;
    psumz[g * K + k] = sz;
  }
}

template <typename T, typename A, int W>
__global__ void bn_bwd_apply_kernel(const T* __restrict__ grad, const T* __restrict__ out, const T* __restrict__ z,
                                    const A* __restrict__ mean, const A* __restrict__ invstd, const A* __restrict__ a,
                                    const A* __restrict__ b, const A* __restrict__ c, T* __restrict__ dz,
                                    T* __restrict__ gres, int64_t items, int64_t K, bool relu) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t it = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; it < items; it += stride) {
    const int64_t i0 = it * W;
    const int64_t k0 = i0 % K;
    const Pack<T, W> gv = ld<T, W>(grad + i0);
    Pack<T, W> ov, zv, dv, rv;
    if (relu) ov = ld<T, W>(out + i0);
    if (b) zv = ld<T, W>(z + i0);
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const int64_t k = k0 + j;
      A gy = to_acc<A>(gv.v[j]);
      if (relu && to_acc<A>(ov.v[j]) <= A(0)) gy = 0;  // as threshold_backward: NaN passes
      rv.v[j] = cast_to<T>(gy);
      A d = a[k] * gy;
      if (b) d += b[k] * (to_acc<A>(zv.v[j]) - mean[k]) * invstd[k] + c[k];
      dv.v[j] = cast_to<T>(d);
    }
    st<T, W>(dz + i0, dv);
    if (gres) st<T, W>(gres + i0, rv);
  }
}

template <typename T>
using AccT = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// Calls f(T{}) for the activation dtype.
template <typename F>
cudaError_t dispatch(DType dt, F&& f) {
  switch (dt) {
    case DType::Float32: return f(float{});
    case DType::Float64: return f(double{});
    case DType::Float16: return f(__half{});
    case DType::BFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_bn_stats(const void* z, void* pmean, void* pm2, int64_t M, int64_t K, int64_t rows, DType dtype,
                            cudaStream_t stream) {
  if (M == 0 || K == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto t) {
    using T = decltype(t);
    using A = AccT<T>;
    dim3 grid(static_cast<unsigned>((M + rows - 1) / rows), static_cast<unsigned>((K + TX - 1) / TX));
    bn_stats_kernel<T, A><<<grid, dim3(TX, TY), 0, stream>>>(static_cast<const T*>(z), static_cast<A*>(pmean),
                                                             static_cast<A*>(pm2), M, K, rows);
    return cudaGetLastError();
  });
}

cudaError_t launch_bn_finalize(const void* pmean, const void* pm2, int64_t G, int64_t K, int64_t M, int64_t rows,
                               void* mean, void* invstd, const void* rm, const void* rv, void* nrm, void* nrv,
                               DType run_dtype, double momentum, double eps, bool acc_f64, cudaStream_t stream) {
  if (K == 0) return cudaSuccess;
  auto go = [&](auto a) {
    using A = decltype(a);
    return dispatch(run_dtype, [&](auto r) {
      using R = decltype(r);
      bn_finalize_kernel<A, R><<<static_cast<unsigned>((K + TX - 1) / TX), dim3(TX, TY), 0, stream>>>(
          static_cast<const A*>(pmean), static_cast<const A*>(pm2), G, K, M, rows, static_cast<A*>(mean),
          static_cast<A*>(invstd), static_cast<const R*>(rm), static_cast<const R*>(rv), static_cast<R*>(nrm),
          static_cast<R*>(nrv), static_cast<A>(momentum), static_cast<A>(eps));
      return cudaGetLastError();
    });
  };
  return acc_f64 ? go(double{}) : go(float{});
}

cudaError_t launch_bn_apply(const void* z, const void* scale, const void* shift, const void* res, void* out,
                            int64_t M, int64_t K, bool relu, DType dtype, cudaStream_t stream) {
  const int64_t n = M * K;
  if (n == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto t) {
    using T = decltype(t);
    using A = AccT<T>;
    constexpr int V = kVec<T>;
    const bool vec = K % V == 0 && aligned16(z) && aligned16(res) && aligned16(out);
    const int threads = 256;
    if (vec) {
      bn_apply_kernel<T, A, V><<<static_cast<unsigned>(grid_for(n / V, threads)), threads, 0, stream>>>(
          static_cast<const T*>(z), static_cast<const A*>(scale), static_cast<const A*>(shift),
          static_cast<const T*>(res), static_cast<T*>(out), n / V, K, relu);
    } else {
      bn_apply_kernel<T, A, 1><<<static_cast<unsigned>(grid_for(n, threads)), threads, 0, stream>>>(
          static_cast<const T*>(z), static_cast<const A*>(scale), static_cast<const A*>(shift),
          static_cast<const T*>(res), static_cast<T*>(out), n, K, relu);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_bn_bwd_reduce(const void* grad, const void* out, const void* z, const void* mean, void* psum,
                                 void* psumz, int64_t M, int64_t K, int64_t rows, bool relu, DType dtype,
                                 cudaStream_t stream) {
  if (M == 0 || K == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto t) {
    using T = decltype(t);
    using A = AccT<T>;
    dim3 grid(static_cast<unsigned>((M + rows - 1) / rows), static_cast<unsigned>((K + TX - 1) / TX));
    bn_bwd_reduce_kernel<T, A><<<grid, dim3(TX, TY), 0, stream>>>(
        static_cast<const T*>(grad), static_cast<const T*>(out), static_cast<const T*>(z),
        static_cast<const A*>(mean), static_cast<A*>(psum), static_cast<A*>(psumz), M, K, rows, relu);
    return cudaGetLastError();
  });
}

cudaError_t launch_bn_bwd_apply(const void* grad, const void* out, const void* z, const void* mean,
                                const void* invstd, const void* a, const void* b, const void* c, void* dz, void* gres,
                                int64_t M, int64_t K, bool relu, DType dtype, cudaStream_t stream) {
  const int64_t n = M * K;
  if (n == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto t) {
    using T = decltype(t);
    using A = AccT<T>;
    constexpr int V = kVec<T>;
    const bool vec = K % V == 0 && aligned16(grad) && aligned16(out) && aligned16(z) && aligned16(dz) &&
                     aligned16(gres);
    const int threads = 256;
    auto args = [&](auto kernel, int64_t items) {
      kernel<<<static_cast<unsigned>(grid_for(items, threads)), threads, 0, stream>>>(
          static_cast<const T*>(grad), static_cast<const T*>(out), static_cast<const T*>(z),
          static_cast<const A*>(mean), static_cast<const A*>(invstd), static_cast<const A*>(a),
          static_cast<const A*>(b), static_cast<const A*>(c), static_cast<T*>(dz), static_cast<T*>(gres), items, K,
          relu);
    };
    if (vec) args(bn_bwd_apply_kernel<T, A, V>, n / V);
    else args(bn_bwd_apply_kernel<T, A, 1>, n);
    return cudaGetLastError();
  });
}

}  // namespace resnet_fused
