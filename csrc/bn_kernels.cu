// BatchNorm statistics, finalize, apply (+ residual + ReLU) and backward kernels for the
// CUDA backend of conv_bn_relu. Activations are NHWC: an [M, K] row-major matrix.
//
// Reductions are two-level and atomic-free, so results do not depend on scheduling:
// a block of (channel packs x row-threads, 256 threads) reduces a chunk of rows into one
// partial row; partials are merged in a fixed order.
#include "launchers.h"
#include "type_utils.cuh"

namespace resnet_fused {
namespace {

// The per-channel kernels over [G, K] partials (finalize, backward coefficients): a block of TX
// consecutive channels (a 32-byte row segment in fp32: whole sectors) by TY partial-row threads,
// each summing every TY-th partial. Few channels per block and many row-threads: at K = 64 and
// G = 512 partials that is 8 blocks and 16 loads per thread, not 2 blocks and 64 dependent loads
// (the first H100 profile: 17.9 µs per finalize with 32 x 8).
constexpr int TX = 8;
constexpr int TY = 32;

// ---- channel packs ---------------------------------------------------------------------
// The statistics, apply and backward kernels walk the [M, K] matrix as rows of K / W packs of
// W consecutive channels (W * sizeof(T) = 16 bytes on the vector path: one 16-byte load per
// pack; W = 1 when K is not a multiple of the vector width or a pointer is not 16-byte
// aligned). A thread keeps the same pack of channels for all the rows it visits: its
// per-channel coefficients live in registers, and no index is divided by K.
template <typename T, int W>
struct alignas(sizeof(T) * W) Pack {
  T v[W];
};
template <typename T> constexpr int kVec = 16 / sizeof(T);

// The normalize, z * scale + shift, as one fused multiply-add, spelled out: the forward's apply
// and the backward's mask-from-z compute the same bits whatever the compiler would contract.
template <typename A> __device__ __forceinline__ A affine(A z, A scale, A shift) { return fma(z, scale, shift); }

// The ReLU's mask where the output was not kept: out = cast<T>(relu(affine(z))) without a
// residual, so out <= 0 exactly when this holds (NaN passes, as threshold_backward's).
template <typename T, typename A> __device__ __forceinline__ bool masked_from_z(A z, A scale, A shift) {
  return to_acc<A>(cast_to<T>(affine(z, scale, shift))) <= A(0);
}

template <typename T, int W> __device__ __forceinline__ Pack<T, W> ld(const T* p) {
  return *reinterpret_cast<const Pack<T, W>*>(p);
}
template <typename T, int W> __device__ __forceinline__ void st(T* p, const Pack<T, W>& v) {
  *reinterpret_cast<Pack<T, W>*>(p) = v;
}

constexpr int kThreads = 256;  // per block, for every kernel below but the finalize

// The block shape for KP packs per row: TXP packs (threadIdx.x) by RY rows (threadIdx.y),
// TXP * RY <= kThreads; blockIdx.y picks a chunk of TXP packs.
struct PackGrid {
  int txp, ry;
  unsigned chunks;
};
inline PackGrid pack_grid(int64_t KP, int64_t max_txp) {
  const int64_t txp = KP < max_txp ? KP : max_txp;
  return {static_cast<int>(txp), static_cast<int>(kThreads / txp), static_cast<unsigned>((KP + txp - 1) / txp)};
}

// Adds each thread's W sums a[] and b[] over the blockDim.y row-threads of its channel pack, as
// a pairwise tree in shared memory: a fixed order (no dependence on scheduling; the bits do
// depend on the block shape, so on the vector or scalar path), log2(rows) barrier steps, stored
// channel-major (consecutive threads in consecutive banks). Every thread of the block calls it;
// the totals land in the threads of row 0.
template <typename A, int W>
__device__ __forceinline__ void sum_over_rows(A (&a)[W], A (&b)[W], A* sh_a, A* sh_b) {
  const int nx = blockDim.x, ny = blockDim.y, ty = threadIdx.y;
  const int t = ty * nx + threadIdx.x;
#pragma unroll
  for (int j = 0; j < W; ++j) {
    sh_a[j * kThreads + t] = a[j];
    sh_b[j * kThreads + t] = b[j];
  }
  __syncthreads();
  int span = 1;
  while (span < ny) span <<= 1;
  for (int step = span >> 1; step > 0; step >>= 1) {
    if (ty < step && ty + step < ny) {
      const int u = t + step * nx;
#pragma unroll
      for (int j = 0; j < W; ++j) {
        sh_a[j * kThreads + t] += sh_a[j * kThreads + u];
        sh_b[j * kThreads + t] += sh_b[j * kThreads + u];
      }
    }
    __syncthreads();
  }
  if (ty == 0) {
#pragma unroll
    for (int j = 0; j < W; ++j) {
      a[j] = sh_a[j * kThreads + t];
      b[j] = sh_b[j * kThreads + t];
    }
  }
}

// ---- statistics -------------------------------------------------------------------------
// Sums of (v - shift) and (v - shift)^2 with shift = the chunk's first value of the
// channel: exact merging inside the chunk, and no E[z^2] - E[z]^2 cancellation.
// Block: (txp packs) x (ry rows); blockIdx.x = chunk g of `rows` rows, blockIdx.y = packs.
template <typename T, typename A, int W>
__global__ void __launch_bounds__(kThreads) bn_stats_kernel(const T* __restrict__ z, A* __restrict__ pmean,
                                                            A* __restrict__ pm2, int64_t M, int64_t K, int64_t rows) {
  __shared__ A sh_s[kThreads * W], sh_ss[kThreads * W];
  const int64_t g = blockIdx.x;
  const int64_t p = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t k0 = p * W;
  const bool active = k0 < K;
  const int64_t r0 = g * rows;
  const int64_t r1 = (r0 + rows < M) ? r0 + rows : M;
  A s[W], ss[W], shift[W];
#pragma unroll
  for (int j = 0; j < W; ++j) s[j] = ss[j] = shift[j] = 0;
  if (active) {
    const Pack<T, W> first = ld<T, W>(z + r0 * K + k0);
#pragma unroll
    for (int j = 0; j < W; ++j) shift[j] = to_acc<A>(first.v[j]);
    for (int64_t r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
      const Pack<T, W> v = ld<T, W>(z + r * K + k0);
#pragma unroll
      for (int j = 0; j < W; ++j) {
        const A d = to_acc<A>(v.v[j]) - shift[j];
        s[j] += d;
        ss[j] += d * d;
      }
    }
  }
  sum_over_rows<A, W>(s, ss, sh_s, sh_ss);
  if (threadIdx.y == 0 && active) {
    const A n = static_cast<A>(r1 - r0);
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const A mean_d = s[j] / n;
      pmean[g * K + k0 + j] = shift[j] + mean_d;
      const A m2 = ss[j] - s[j] * mean_d;
      pm2[g * K + k0 + j] = m2 > A(0) ? m2 : A(0);
    }
  }
}

// ---- finalize ----------------------------------------------------------------------------
template <typename A, typename R>
__global__ void bn_finalize_kernel(const A* __restrict__ pmean, const A* __restrict__ pm2, int64_t G, int64_t K,
                                   int64_t M, int64_t rows, A* __restrict__ mean_out, A* __restrict__ invstd_out,
                                   const R* rm, const R* rv, R* nrm, R* nrv, A momentum, A eps, const A* __restrict__ gamma,
                                   const A* __restrict__ beta, A* __restrict__ scale, A* __restrict__ shift) {
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
    const A istd = A(1) / sqrt(var + eps);
    mean_out[k] = mean;
    invstd_out[k] = istd;
    if (scale != nullptr) {  // the apply's coefficients: scale = gamma * invstd, shift = beta - mean * scale
      const A sc = (gamma != nullptr ? gamma[k] : A(1)) * istd;
      scale[k] = sc;
      shift[k] = (beta != nullptr ? beta[k] : A(0)) - mean * sc;
    }
    if (nrm != nullptr) {
      // As F.batch_norm: running = (1 - momentum) * running + momentum * batch (unbiased var).
      // (nrm may be rm, nrv rv: the running statistics updated in place; each element is read
      // and then written by one thread, so the four pointers are not __restrict__.)
      const A unbiased = var * static_cast<A>(M) / static_cast<A>(M - 1);
      nrm[k] = cast_to<R>((A(1) - momentum) * load_as<A>(rm + k) + momentum * mean);
      nrv[k] = cast_to<R>((A(1) - momentum) * load_as<A>(rv + k) + momentum * unbiased);
    }
  }
}

// The backward's per-channel coefficients from bn_bwd_reduce's G partial sums (fixed order): with
// sum_gy = sum(gy), sum_gyz = sum(gy * (z - mean)) over all M rows,
//   dbeta = sum_gy, dgamma = sum_gyz * invstd, a = gamma * invstd, b = -a / M * dgamma, c = -a / M * dbeta
// (dz = a * gy + b * (z - mean) * invstd + c: the BatchNorm input gradient with batch statistics).
template <typename A>
__global__ void bn_bwd_coef_kernel(const A* __restrict__ ps, const A* __restrict__ psz, int64_t G, int64_t K,
                                   int64_t M, const A* __restrict__ gamma, const A* __restrict__ invstd,
                                   A* __restrict__ dgamma, A* __restrict__ dbeta, A* __restrict__ a_out,
                                   A* __restrict__ b_out, A* __restrict__ c_out) {
  __shared__ A sh_s[TY][TX];
  __shared__ A sh_z[TY][TX];
  const int64_t k = static_cast<int64_t>(blockIdx.x) * TX + threadIdx.x;
  A s = 0, sz = 0;
  if (k < K)
    for (int64_t g = threadIdx.y; g < G; g += TY) {
      s += ps[g * K + k];
      sz += psz[g * K + k];
    }
  sh_s[threadIdx.y][threadIdx.x] = s;
  sh_z[threadIdx.y][threadIdx.x] = sz;
  __syncthreads();
  if (threadIdx.y == 0 && k < K) {
    A t = 0, tz = 0;
    for (int i = 0; i < TY; ++i) {
      t += sh_s[i][threadIdx.x];
      tz += sh_z[i][threadIdx.x];
    }
    const A istd = invstd[k];
    const A dg = tz * istd;
    const A a = (gamma != nullptr ? gamma[k] : A(1)) * istd;
    const A coef = a * (A(-1) / static_cast<A>(M));
    dbeta[k] = t;
    dgamma[k] = dg;
    a_out[k] = a;
    b_out[k] = coef * dg;
    c_out[k] = coef * t;
  }
}

// ---- elementwise ----------------------------------------------------------------------------
inline bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int64_t max_blocks() {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  // two waves of 8 resident blocks of 256 threads per SM; a grid-stride loop over the rows does the rest
  return static_cast<int64_t>(sms > 0 ? sms : 128) * 16;
}

// blockIdx.x strides over rows (ry rows per block step), blockIdx.y picks the chunk of packs.
inline dim3 rows_grid(int64_t M, const PackGrid& pg) {
  int64_t bx = (M + pg.ry - 1) / pg.ry;
  int64_t cap = max_blocks() / pg.chunks;
  cap = cap < 1 ? 1 : cap;
  bx = bx < 1 ? 1 : (bx > cap ? cap : bx);
  return dim3(static_cast<unsigned>(bx), pg.chunks);
}

template <typename T, typename A, int W>
__global__ void __launch_bounds__(kThreads) bn_apply_kernel(const T* __restrict__ z, const A* __restrict__ scale,
                                                            const A* __restrict__ shift, const T* __restrict__ res,
                                                            T* __restrict__ out, int64_t M, int64_t K, bool relu) {
  const int64_t k0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * W;
  if (k0 >= K) return;
  A sc[W], sh[W];
#pragma unroll
  for (int j = 0; j < W; ++j) {
    sc[j] = scale[k0 + j];
    sh[j] = shift[k0 + j];
  }
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < M; r += step) {
    const int64_t i0 = r * K + k0;
    const Pack<T, W> zv = ld<T, W>(z + i0);
    Pack<T, W> rv, ov;
    if (res) rv = ld<T, W>(res + i0);
#pragma unroll
    for (int j = 0; j < W; ++j) {
      A y = affine(to_acc<A>(zv.v[j]), sc[j], sh[j]);
      if (res) y += to_acc<A>(rv.v[j]);
      if (relu) y = y < A(0) ? A(0) : y;  // NaN stays NaN
      ov.v[j] = cast_to<T>(y);
    }
    st<T, W>(out + i0, ov);
  }
}

// Per-chunk sums of gy and gy * (z - mean); the block shape of bn_stats_kernel. The ReLU's mask
// comes from out, or (FromZ: relu, msc / msh given) from z and the forward's scale / shift
// (masked_from_z). A template parameter, not a branch: the other variant keeps its registers.
template <typename T, typename A, int W, bool FromZ>
__global__ void __launch_bounds__(kThreads) bn_bwd_reduce_kernel(const T* __restrict__ grad,
                                                                 const T* __restrict__ out, const T* __restrict__ z,
                                                                 const A* __restrict__ mean, A* __restrict__ psum,
                                                                 A* __restrict__ psumz, int64_t M, int64_t K,
                                                                 int64_t rows, bool relu, const A* __restrict__ msc,
                                                                 const A* __restrict__ msh) {
  __shared__ A sh_s[kThreads * W], sh_sz[kThreads * W];
  const int64_t g = blockIdx.x;
  const int64_t k0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * W;
  const bool active = k0 < K;
  const int64_t r0 = g * rows;
  const int64_t r1 = (r0 + rows < M) ? r0 + rows : M;
  A s[W], sz[W], mk[W], fs[W], fh[W];
  const bool from_out = relu && !FromZ;
  constexpr bool from_z = FromZ;
#pragma unroll
  for (int j = 0; j < W; ++j) s[j] = sz[j] = mk[j] = fs[j] = fh[j] = 0;
  if (active) {
#pragma unroll
    for (int j = 0; j < W; ++j) {
      mk[j] = mean[k0 + j];
      if (from_z) {
        fs[j] = msc[k0 + j];
        fh[j] = msh[k0 + j];
      }
    }
    for (int64_t r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
      const int64_t i = r * K + k0;
      const Pack<T, W> gv = ld<T, W>(grad + i);
      const Pack<T, W> zv = ld<T, W>(z + i);
      Pack<T, W> ov;
      if (from_out) ov = ld<T, W>(out + i);
#pragma unroll
      for (int j = 0; j < W; ++j) {
        A gy = to_acc<A>(gv.v[j]);
        if (from_out && to_acc<A>(ov.v[j]) <= A(0)) gy = 0;  // as threshold_backward: NaN passes
        if (from_z && masked_from_z<T>(to_acc<A>(zv.v[j]), fs[j], fh[j])) gy = 0;
        s[j] += gy;
        sz[j] += gy * (to_acc<A>(zv.v[j]) - mk[j]);
      }
    }
  }
  sum_over_rows<A, W>(s, sz, sh_s, sh_sz);
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int j = 0; j < W; ++j) {
      psum[g * K + k0 + j] = s[j];
      psumz[g * K + k0 + j] = sz[j];
    }
  }
}

// dz = a * gy + b * invstd * (z - mean) + c (training; eval: a * gy), gres = gy. The ReLU's mask
// as in bn_bwd_reduce_kernel.
template <typename T, typename A, int W, bool FromZ>
__global__ void __launch_bounds__(kThreads) bn_bwd_apply_kernel(
    const T* __restrict__ grad, const T* __restrict__ out, const T* __restrict__ z, const A* __restrict__ mean,
    const A* __restrict__ invstd, const A* __restrict__ a, const A* __restrict__ b, const A* __restrict__ c,
    T* __restrict__ dz, T* __restrict__ gres, int64_t M, int64_t K, bool relu, const A* __restrict__ msc,
    const A* __restrict__ msh) {
  const int64_t k0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * W;
  if (k0 >= K) return;
  const bool from_out = relu && !FromZ;
  constexpr bool from_z = FromZ;
  A ak[W], bk[W], ck[W], mk[W], fs[W], fh[W];
#pragma unroll
  for (int j = 0; j < W; ++j) {
    ak[j] = a[k0 + j];
    bk[j] = b ? b[k0 + j] * invstd[k0 + j] : A(0);
    ck[j] = b ? c[k0 + j] : A(0);
    mk[j] = b ? mean[k0 + j] : A(0);
    fs[j] = from_z ? msc[k0 + j] : A(0);
    fh[j] = from_z ? msh[k0 + j] : A(0);
  }
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < M; r += step) {
    const int64_t i0 = r * K + k0;
    const Pack<T, W> gv = ld<T, W>(grad + i0);
    Pack<T, W> ov, zv, dv, rv;
    if (from_out) ov = ld<T, W>(out + i0);
    if (b || from_z) zv = ld<T, W>(z + i0);
#pragma unroll
    for (int j = 0; j < W; ++j) {
      A gy = to_acc<A>(gv.v[j]);
      if (from_out && to_acc<A>(ov.v[j]) <= A(0)) gy = 0;  // as threshold_backward: NaN passes
      if (from_z && masked_from_z<T>(to_acc<A>(zv.v[j]), fs[j], fh[j])) gy = 0;
      rv.v[j] = cast_to<T>(gy);
      A d = ak[j] * gy;
      if (b) d += bk[j] * (to_acc<A>(zv.v[j]) - mk[j]) + ck[j];
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
    auto go = [&](auto kernel, int w) {
      const PackGrid pg = pack_grid(K / w, 32);
      dim3 grid(static_cast<unsigned>((M + rows - 1) / rows), pg.chunks);
      kernel<<<grid, dim3(pg.txp, pg.ry), 0, stream>>>(static_cast<const T*>(z), static_cast<A*>(pmean),
                                                        static_cast<A*>(pm2), M, K, rows);
    };
    constexpr int V = kVec<T>;
    if (K % V == 0 && aligned16(z)) go(bn_stats_kernel<T, A, V>, V);
    else go(bn_stats_kernel<T, A, 1>, 1);
    return cudaGetLastError();
  });
}

cudaError_t launch_bn_finalize(const void* pmean, const void* pm2, int64_t G, int64_t K, int64_t M, int64_t rows,
                               void* mean, void* invstd, const void* rm, const void* rv, void* nrm, void* nrv,
                               DType run_dtype, double momentum, double eps, bool acc_f64, const void* gamma,
                               const void* beta, void* scale, void* shift, cudaStream_t stream) {
  if (K == 0) return cudaSuccess;
  auto go = [&](auto a) {
    using A = decltype(a);
    return dispatch(run_dtype, [&](auto r) {
      using R = decltype(r);
      bn_finalize_kernel<A, R><<<static_cast<unsigned>((K + TX - 1) / TX), dim3(TX, TY), 0, stream>>>(
          static_cast<const A*>(pmean), static_cast<const A*>(pm2), G, K, M, rows, static_cast<A*>(mean),
          static_cast<A*>(invstd), static_cast<const R*>(rm), static_cast<const R*>(rv), static_cast<R*>(nrm),
          static_cast<R*>(nrv), static_cast<A>(momentum), static_cast<A>(eps), static_cast<const A*>(gamma),
          static_cast<const A*>(beta), static_cast<A*>(scale), static_cast<A*>(shift));
      return cudaGetLastError();
    });
  };
  return acc_f64 ? go(double{}) : go(float{});
}

cudaError_t launch_bn_bwd_coef(const void* ps, const void* psz, int64_t G, int64_t K, int64_t M, const void* gamma,
                               const void* invstd, void* dgamma, void* dbeta, void* a, void* b, void* c, bool acc_f64,
                               cudaStream_t stream) {
  if (K == 0) return cudaSuccess;
  auto go = [&](auto t) {
    using A = decltype(t);
    bn_bwd_coef_kernel<A><<<static_cast<unsigned>((K + TX - 1) / TX), dim3(TX, TY), 0, stream>>>(
        static_cast<const A*>(ps), static_cast<const A*>(psz), G, K, M, static_cast<const A*>(gamma),
        static_cast<const A*>(invstd), static_cast<A*>(dgamma), static_cast<A*>(dbeta), static_cast<A*>(a),
        static_cast<A*>(b), static_cast<A*>(c));
    return cudaGetLastError();
  };
  return acc_f64 ? go(double{}) : go(float{});
}

cudaError_t launch_bn_apply(const void* z, const void* scale, const void* shift, const void* res, void* out,
                            int64_t M, int64_t K, bool relu, DType dtype, cudaStream_t stream) {
  if (M == 0 || K == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto t) {
    using T = decltype(t);
    using A = AccT<T>;
    auto go = [&](auto kernel, int w) {
      const PackGrid pg = pack_grid(K / w, kThreads);
      kernel<<<rows_grid(M, pg), dim3(pg.txp, pg.ry), 0, stream>>>(
          static_cast<const T*>(z), static_cast<const A*>(scale), static_cast<const A*>(shift),
          static_cast<const T*>(res), static_cast<T*>(out), M, K, relu);
    };
    constexpr int V = kVec<T>;
    if (K % V == 0 && aligned16(z) && aligned16(res) && aligned16(out)) go(bn_apply_kernel<T, A, V>, V);
    else go(bn_apply_kernel<T, A, 1>, 1);
    return cudaGetLastError();
  });
}

cudaError_t launch_bn_bwd_reduce(const void* grad, const void* out, const void* z, const void* mean, void* psum,
                                 void* psumz, int64_t M, int64_t K, int64_t rows, bool relu, DType dtype,
                                 cudaStream_t stream, const void* mask_scale, const void* mask_shift) {
  if (M == 0 || K == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto t) {
    using T = decltype(t);
    using A = AccT<T>;
    auto go = [&](auto kernel, int w) {
      const PackGrid pg = pack_grid(K / w, 32);
      dim3 grid(static_cast<unsigned>((M + rows - 1) / rows), pg.chunks);
      kernel<<<grid, dim3(pg.txp, pg.ry), 0, stream>>>(
          static_cast<const T*>(grad), static_cast<const T*>(out), static_cast<const T*>(z),
          static_cast<const A*>(mean), static_cast<A*>(psum), static_cast<A*>(psumz), M, K, rows, relu,
          static_cast<const A*>(mask_scale), static_cast<const A*>(mask_shift));
    };
    constexpr int V = kVec<T>;
    const bool vec = K % V == 0 && aligned16(grad) && aligned16(out) && aligned16(z);
    if (relu && mask_scale != nullptr) {
      if (vec) go(bn_bwd_reduce_kernel<T, A, V, true>, V);
      else go(bn_bwd_reduce_kernel<T, A, 1, true>, 1);
    } else {
      if (vec) go(bn_bwd_reduce_kernel<T, A, V, false>, V);
      else go(bn_bwd_reduce_kernel<T, A, 1, false>, 1);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_bn_bwd_apply(const void* grad, const void* out, const void* z, const void* mean,
                                const void* invstd, const void* a, const void* b, const void* c, void* dz, void* gres,
                                int64_t M, int64_t K, bool relu, DType dtype, cudaStream_t stream,
                                const void* mask_scale, const void* mask_shift) {
  if (M == 0 || K == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto t) {
    using T = decltype(t);
    using A = AccT<T>;
    auto go = [&](auto kernel, int w) {
      const PackGrid pg = pack_grid(K / w, kThreads);
      kernel<<<rows_grid(M, pg), dim3(pg.txp, pg.ry), 0, stream>>>(
          static_cast<const T*>(grad), static_cast<const T*>(out), static_cast<const T*>(z),
          static_cast<const A*>(mean), static_cast<const A*>(invstd), static_cast<const A*>(a),
          static_cast<const A*>(b), static_cast<const A*>(c), static_cast<T*>(dz), static_cast<T*>(gres), M, K,
          relu, static_cast<const A*>(mask_scale), static_cast<const A*>(mask_shift));
    };
    constexpr int V = kVec<T>;
    const bool vec = K % V == 0 && aligned16(grad) && aligned16(out) && aligned16(z) && aligned16(dz) &&
                     aligned16(gres);
    if (relu && mask_scale != nullptr) {
      if (vec) go(bn_bwd_apply_kernel<T, A, V, true>, V);
      else go(bn_bwd_apply_kernel<T, A, 1, true>, 1);
    } else {
      if (vec) go(bn_bwd_apply_kernel<T, A, V, false>, V);
      else go(bn_bwd_apply_kernel<T, A, 1, false>, 1);
    }
    return cudaGetLastError();
  });
}

}  // namespace resnet_fused
