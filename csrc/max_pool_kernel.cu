// Max pooling over NHWC activations with a one-byte argmax: the forward writes the pooled values
// and, per pooled value, the position of its maximum inside the window (kh * KW + kw, one byte);
// the backward gathers: each input pixel sums the gradients of the windows whose maximum it is
// (at most ceil(KH / SH) * ceil(KW / SW) of them), so it writes every input gradient once, with no
// zero-fill and no atomics. 16-byte channel packs where the channels and pointers allow.
#include "launchers.h"
#include "type_utils.cuh"

namespace resnet_fused {
namespace {

// V consecutive values, loaded and stored as one access of V * sizeof(E) bytes
template <typename E, int V>
struct alignas(V * sizeof(E)) Pack {
  E v[V];
};

// Item i of a walk over [N, Y, X, C / V] (channel packs innermost): its n, y, x and first channel
struct Item {
  int64_t n, y, x, c;
};
__device__ __forceinline__ Item item_of(int64_t i, int64_t CV, int V, int64_t Y, int64_t X) {
  Item it;
  it.c = (i % CV) * V;
  int64_t pix = i / CV;
  it.x = pix % X;
  pix /= X;
  it.y = pix % Y;
  it.n = pix / Y;
  return it;
}

struct Geometry {
  int64_t N, H, W, C, P, Q;
  int KH, KW, SH, SW, PH, PW;
};

// One thread per (pooled pixel, pack of V channels), grid-stride. As PyTorch's max_pool2d: the
// window's elements in (kh, kw) order, a value replaces the maximum when it is greater or NaN (the
// first of equal maxima is kept; NaN propagates), and the first element inside the input is the
// maximum to begin with (so a window of -inf points at it). FK / FS: the window and stride fixed at
// compile time (the stem's 3 / 2: loops unrolled, every load of the window issued at once), 0: read
// from g.
template <typename T, int V, int FK, int FS>
__global__ void max_pool_fwd_kernel(const T* __restrict__ x, T* __restrict__ out, uint8_t* __restrict__ code,
                                    Geometry g) {
  using A = typename OpMath<T>::type;
  const int KH = FK ? FK : g.KH, KW = FK ? FK : g.KW, SH = FS ? FS : g.SH, SW = FS ? FS : g.SW;
  const int64_t CV = g.C / V;
  const int64_t items = g.N * g.P * g.Q * CV;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < items;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Item it = item_of(i, CV, V, g.P, g.Q);
    const int64_t n = it.n, p = it.y, q = it.x, c = it.c;
    const int64_t h0 = p * SH - g.PH, w0 = q * SW - g.PW;
    A best[V];
    int k_best[V];
#pragma unroll
    for (int j = 0; j < V; ++j) k_best[j] = -1;
    auto consider = [&](const Pack<T, V>& v, int k) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A a = to_acc<A>(v.v[j]);
        // (a != a: NaN)
        if (k_best[j] < 0 || a > best[j] || a != a) {
          best[j] = a;
          k_best[j] = k;
        }
      }
    };
    auto at_in = [&](int64_t h, int64_t w) { return x + ((n * g.H + h) * g.W + w) * g.C + c; };
    if constexpr (FK > 0) {
      // every load of the window first, from clamped addresses (always inside x), then the compares of
      // the ones inside the input: FK * FK independent loads in flight per thread
      Pack<T, V> v[FK * FK];
#pragma unroll
      for (int k = 0; k < FK * FK; ++k) {
        const int64_t h = h0 + k / FK, w = w0 + k % FK;
        v[k] = *reinterpret_cast<const Pack<T, V>*>(
            at_in(h < 0 ? 0 : (h >= g.H ? g.H - 1 : h), w < 0 ? 0 : (w >= g.W ? g.W - 1 : w)));
      }
#pragma unroll
      for (int k = 0; k < FK * FK; ++k) {
        const int64_t h = h0 + k / FK, w = w0 + k % FK;
        if (h >= 0 && h < g.H && w >= 0 && w < g.W) consider(v[k], k);
      }
    } else {
      for (int kh = 0; kh < KH; ++kh) {
        const int64_t h = h0 + kh;
        if (h < 0 || h >= g.H) continue;
        for (int kw = 0; kw < KW; ++kw) {
          const int64_t w = w0 + kw;
          if (w < 0 || w >= g.W) continue;
          consider(*reinterpret_cast<const Pack<T, V>*>(at_in(h, w)), kh * KW + kw);
        }
      }
    }
    Pack<T, V> o;
    Pack<uint8_t, V> kc;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      o.v[j] = cast_to<T>(best[j]);
      kc.v[j] = static_cast<uint8_t>(k_best[j]);
    }
    const int64_t at = ((n * g.P + p) * g.Q + q) * g.C + c;
    *reinterpret_cast<Pack<T, V>*>(out + at) = o;
    if (code != nullptr) *reinterpret_cast<Pack<uint8_t, V>*>(code + at) = kc;
  }
}

// One thread per (input pixel, pack of V channels): the sum, in fp32 for 16-bit types (in the
// windows' (p, q) order, as PyTorch's NHWC backward), of the gradients of the windows that contain
// the pixel and chose it; written once. The candidate windows per dimension are the NP = ceil(KH / SH)
// ones ending at p = (h + PH) / SH (each checked against the edges and the window's extent).
template <typename T, int V, int FK, int FS>
__global__ void max_pool_bwd_kernel(const T* __restrict__ grad, const uint8_t* __restrict__ code, T* __restrict__ dx,
                                    Geometry g) {
  using A = typename OpMath<T>::type;
  const int KH = FK ? FK : g.KH, KW = FK ? FK : g.KW, SH = FS ? FS : g.SH, SW = FS ? FS : g.SW;
  const int NP = (KH + SH - 1) / SH, NQ = (KW + SW - 1) / SW;
  const int64_t CV = g.C / V;
  const int64_t items = g.N * g.H * g.W * CV;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < items;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Item it = item_of(i, CV, V, g.H, g.W);
    const int64_t n = it.n, h = it.y, w = it.x, c = it.c;
    const int64_t hp = h + g.PH, wp = w + g.PW;
    A acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = A(0);
    if constexpr (FK > 0) {
      // the NP * NQ candidate windows' loads first, from clamped addresses, then the sums of the valid ones
      constexpr int NPF = (FK + FS - 1) / FS;
      Pack<uint8_t, V> kc[NPF * NPF];
      Pack<T, V> gv[NPF * NPF];
      bool ok[NPF * NPF];
      int kk[NPF * NPF];
#pragma unroll
      for (int a = 0; a < NPF * NPF; ++a) {
        const int64_t p = hp / FS - (NPF - 1 - a / NPF), q = wp / FS - (NPF - 1 - a % NPF);  // ascending (p, q)
        const int64_t kh = hp - p * FS, kw = wp - q * FS;
        ok[a] = p >= 0 && p < g.P && kh < FK && q >= 0 && q < g.Q && kw < FK;
        kk[a] = static_cast<int>(kh * FK + kw);
        const int64_t at = ((n * g.P + (p < 0 ? 0 : (p >= g.P ? g.P - 1 : p))) * g.Q +
                            (q < 0 ? 0 : (q >= g.Q ? g.Q - 1 : q))) * g.C + c;
        kc[a] = *reinterpret_cast<const Pack<uint8_t, V>*>(code + at);
        gv[a] = *reinterpret_cast<const Pack<T, V>*>(grad + at);
      }
#pragma unroll
      for (int a = 0; a < NPF * NPF; ++a)
#pragma unroll
        for (int j = 0; j < V; ++j)
          if (ok[a] && kc[a].v[j] == kk[a]) acc[j] += to_acc<A>(gv[a].v[j]);
    } else {
      for (int a = 0; a < NP; ++a) {
        const int64_t p = hp / SH - (NP - 1 - a);  // ascending p
        const int64_t kh = hp - p * SH;
        if (p < 0 || p >= g.P || kh >= KH) continue;
        for (int b = 0; b < NQ; ++b) {
          const int64_t q = wp / SW - (NQ - 1 - b);
          const int64_t kw = wp - q * SW;
          if (q < 0 || q >= g.Q || kw >= KW) continue;
          const int k = static_cast<int>(kh * KW + kw);
          const int64_t at = ((n * g.P + p) * g.Q + q) * g.C + c;
          const Pack<uint8_t, V> kc = *reinterpret_cast<const Pack<uint8_t, V>*>(code + at);
          const Pack<T, V> gv = *reinterpret_cast<const Pack<T, V>*>(grad + at);
#pragma unroll
          for (int j = 0; j < V; ++j)
            if (kc.v[j] == k) acc[j] += to_acc<A>(gv.v[j]);
        }
      }
    }
    Pack<T, V> o;
#pragma unroll
    for (int j = 0; j < V; ++j) o.v[j] = cast_to<T>(acc[j]);
    *reinterpret_cast<Pack<T, V>*>(dx + ((n * g.H + h) * g.W + w) * g.C + c) = o;
  }
}

int64_t blocks_for(int64_t items, int threads) {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  int64_t blocks = (items + threads - 1) / threads;
  // enough blocks to fill every SM several times over; the grid-stride loop does the rest
  const int64_t cap = static_cast<int64_t>(sms > 0 ? sms : 128) * 16;
  if (blocks > cap) blocks = cap;
  return blocks < 1 ? 1 : blocks;
}

bool stem_window(const Geometry& g) { return g.KH == 3 && g.KW == 3 && g.SH == 2 && g.SW == 2; }

// 16-byte packs (and code packs of 16 / sizeof(T) bytes) where C and every pointer allow, else one
// channel per thread; the stem's 3x3 / 2 window compiled as constants, any other read at run time.
template <typename T, int V, int FK, int FS>
void fwd_launch(const void* x, void* out, void* code, const Geometry& g, cudaStream_t stream) {
  constexpr int threads = 256;
  const unsigned blocks = static_cast<unsigned>(blocks_for(g.N * g.P * g.Q * (g.C / V), threads));
  max_pool_fwd_kernel<T, V, FK, FS><<<blocks, threads, 0, stream>>>(static_cast<const T*>(x), static_cast<T*>(out),
                                                                    static_cast<uint8_t*>(code), g);
}

template <typename T, int V, int FK, int FS>
void bwd_launch(const void* grad, const void* code, void* dx, const Geometry& g, cudaStream_t stream) {
  constexpr int threads = 256;
  const unsigned blocks = static_cast<unsigned>(blocks_for(g.N * g.H * g.W * (g.C / V), threads));
  max_pool_bwd_kernel<T, V, FK, FS><<<blocks, threads, 0, stream>>>(
      static_cast<const T*>(grad), static_cast<const uint8_t*>(code), static_cast<T*>(dx), g);
}

template <typename T>
bool packs(const Geometry& g, const void* a, const void* b, const void* code) {
  constexpr int V = 16 / sizeof(T);
  return g.C % V == 0 && ((reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b)) % 16) == 0 &&
         reinterpret_cast<uintptr_t>(code) % V == 0;
}

template <typename T>
cudaError_t fwd_typed(const void* x, void* out, void* code, const Geometry& g, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = packs<T>(g, x, out, code), stem = stem_window(g);
  if (vec && stem) fwd_launch<T, V, 3, 2>(x, out, code, g, stream);
  else if (vec) fwd_launch<T, V, 0, 0>(x, out, code, g, stream);
  else if (stem) fwd_launch<T, 1, 3, 2>(x, out, code, g, stream);
  else fwd_launch<T, 1, 0, 0>(x, out, code, g, stream);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_typed(const void* grad, const void* code, void* dx, const Geometry& g, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = packs<T>(g, grad, dx, code), stem = stem_window(g);
  if (vec && stem) bwd_launch<T, V, 3, 2>(grad, code, dx, g, stream);
  else if (vec) bwd_launch<T, V, 0, 0>(grad, code, dx, g, stream);
  else if (stem) bwd_launch<T, 1, 3, 2>(grad, code, dx, g, stream);
  else bwd_launch<T, 1, 0, 0>(grad, code, dx, g, stream);
  return cudaGetLastError();
}

Geometry geometry(int64_t N, int64_t H, int64_t W, int64_t C, int64_t P, int64_t Q, const int* k, const int* s,
                  const int* pad) {
  return Geometry{N, H, W, C, P, Q, k[0], k[1], s[0], s[1], pad[0], pad[1]};
}

}  // namespace

cudaError_t launch_max_pool_fwd(const void* x, void* out, void* code, int64_t N, int64_t H, int64_t W, int64_t C,
                                int64_t P, int64_t Q, const int* kernel, const int* stride, const int* padding,
                                DType dtype, cudaStream_t stream) {
  const Geometry g = geometry(N, H, W, C, P, Q, kernel, stride, padding);
  if (N * P * Q * C == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32: return fwd_typed<float>(x, out, code, g, stream);
    case DType::Float64: return fwd_typed<double>(x, out, code, g, stream);
    case DType::Float16: return fwd_typed<__half>(x, out, code, g, stream);
    case DType::BFloat16: return fwd_typed<__nv_bfloat16>(x, out, code, g, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_max_pool_bwd(const void* grad, const void* code, void* dx, int64_t N, int64_t H, int64_t W,
                                int64_t C, int64_t P, int64_t Q, const int* kernel, const int* stride,
                                const int* padding, DType dtype, cudaStream_t stream) {
  const Geometry g = geometry(N, H, W, C, P, Q, kernel, stride, padding);
  if (N * H * W * C == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32: return bwd_typed<float>(grad, code, dx, g, stream);
    case DType::Float64: return bwd_typed<double>(grad, code, dx, g, stream);
    case DType::Float16: return bwd_typed<__half>(grad, code, dx, g, stream);
    case DType::BFloat16: return bwd_typed<__nv_bfloat16>(grad, code, dx, g, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace resnet_fused
