// A CPU emulation of the slice of the CUDA runtime that csrc/*.cu uses, so that their kernels
// run (slowly, exactly as written) on a machine without a GPU: tests/test_cuda_kernels_emulated.py.
//
// A launch runs its blocks one after another on one OS thread per CUDA thread of a block:
// __syncthreads is a std::barrier of the block, a thread that returns leaves the barrier (as
// an exited GPU thread does), __shared__ variables are function statics (one block at a time
// uses them). The launch configuration is checked as the GPU would: an invalid one is reported
// by cudaGetLastError(), as on the device. No warp-level primitives, atomics or streams.
#pragma once
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

typedef int cudaError_t;
typedef void* cudaStream_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(unsigned a, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint3 {
  unsigned x, y, z;
};

namespace emu {
extern int sms;             // what cudaDevAttrMultiProcessorCount reports
extern int max_threads;     // the kernels' __launch_bounds__ (all 256 in csrc)
extern int last_error;      // cudaGetLastError's
extern thread_local std::barrier<>* block_barrier;
}  // namespace emu

extern thread_local uint3 threadIdx, blockIdx;
extern thread_local dim3 blockDim, gridDim;

inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  *v = emu::sms;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() {
  const int e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}
inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace emu {

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  template <typename... A>
  void operator()(A... args) const {
    const unsigned long long n = 1ull * block.x * block.y * block.z;
    if (n == 0 || n > static_cast<unsigned long long>(max_threads) || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
        grid.y > 65535 || grid.z > 65535 || block.z > 64) {
      last_error = cudaErrorInvalidConfiguration;
      return;
    }
    const unsigned long long blocks = 1ull * grid.x * grid.y * grid.z;
    std::vector<std::unique_ptr<std::barrier<>>> bars;  // one per block: exited threads drop out
    for (unsigned long long b = 0; b < blocks; ++b) bars.emplace_back(new std::barrier<>(static_cast<ptrdiff_t>(n)));
    std::barrier<> between(static_cast<ptrdiff_t>(n));  // a block starts when the previous one is done
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < n; ++t)
      threads.emplace_back([&, t] {
        threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
        blockDim = block;
        gridDim = grid;
        unsigned long long b = 0;
        for (unsigned bz = 0; bz < grid.z; ++bz)
          for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx, ++b) {
              blockIdx = {bx, by, bz};
              block_barrier = bars[b].get();
              kernel(args...);
              bars[b]->arrive_and_drop();
              between.arrive_and_wait();
            }
      });
    for (auto& th : threads) th.join();
  }
};

template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t = 0, cudaStream_t = nullptr) {
  return {kernel, grid, block};
}

}  // namespace emu
