// C entry points over csrc/launchers.h for the emulated kernels (ctypes), and the emulator's state.
#include "launchers.h"

thread_local uint3 threadIdx, blockIdx;
thread_local dim3 blockDim, gridDim;
namespace emu {
int sms = 1;
int max_threads = 256;
int last_error = cudaSuccess;
thread_local std::barrier<>* block_barrier = nullptr;
}  // namespace emu

using namespace resnet_fused;
extern "C" {
int emu_set_sms(int s) {
  emu::sms = s;
  return 0;
}
int emu_bn_stats(const void* z, void* pm, void* pm2, int64_t M, int64_t K, int64_t rows, int dt) {
  return launch_bn_stats(z, pm, pm2, M, K, rows, DType(dt), nullptr);
}
int emu_bn_finalize(const void* pm, const void* pm2, int64_t G, int64_t K, int64_t M, int64_t rows, void* mean,
                    void* invstd, const void* rm, const void* rv, void* nrm, void* nrv, int run_dt, double momentum,
                    double eps, int acc_f64, const void* gamma, const void* beta, void* scale, void* shift) {
  return launch_bn_finalize(pm, pm2, G, K, M, rows, mean, invstd, rm, rv, nrm, nrv, DType(run_dt), momentum, eps,
                            acc_f64 != 0, gamma, beta, scale, shift, nullptr);
}
int emu_bn_bwd_coef(const void* ps, const void* psz, int64_t G, int64_t K, int64_t M, const void* gamma,
                    const void* invstd, void* dgamma, void* dbeta, void* a, void* b, void* c, int acc_f64) {
  return launch_bn_bwd_coef(ps, psz, G, K, M, gamma, invstd, dgamma, dbeta, a, b, c, acc_f64 != 0, nullptr);
}
int emu_bn_apply(const void* z, const void* scale, const void* shift, const void* res, void* out, int64_t M,
                 int64_t K, int relu, int dt) {
  return launch_bn_apply(z, scale, shift, res, out, M, K, relu != 0, DType(dt), nullptr);
}
int emu_bn_bwd_reduce(const void* g, const void* out, const void* z, const void* mean, void* ps, void* psz,
                      int64_t M, int64_t K, int64_t rows, int relu, int dt, const void* msc, const void* msh) {
  return launch_bn_bwd_reduce(g, out, z, mean, ps, psz, M, K, rows, relu != 0, DType(dt), nullptr, msc, msh);
}
int emu_bn_bwd_apply(const void* g, const void* out, const void* z, const void* mean, const void* invstd,
                     const void* a, const void* b, const void* c, void* dz, void* gres, int64_t M, int64_t K, int relu,
                     int dt, const void* msc, const void* msh) {
  return launch_bn_bwd_apply(g, out, z, mean, invstd, a, b, c, dz, gres, M, K, relu != 0, DType(dt), nullptr, msc,
                             msh);
}
int emu_max_pool_fwd(const void* x, void* out, void* code, int64_t N, int64_t H, int64_t W, int64_t C, int64_t P,
                     int64_t Q, int kh, int kw, int sh, int sw, int ph, int pw, int dt) {
  const int k[2] = {kh, kw}, s[2] = {sh, sw}, p[2] = {ph, pw};
  return launch_max_pool_fwd(x, out, code, N, H, W, C, P, Q, k, s, p, DType(dt), nullptr);
}
int emu_max_pool_bwd(const void* g, const void* code, void* dx, int64_t N, int64_t H, int64_t W, int64_t C, int64_t P,
                     int64_t Q, int kh, int kw, int sh, int sw, int ph, int pw, int dt) {
  const int k[2] = {kh, kw}, s[2] = {sh, sw}, p[2] = {ph, pw};
  return launch_max_pool_bwd(g, code, dx, N, H, W, C, P, Q, k, s, p, DType(dt), nullptr);
}
int emu_add_relu(const void* x, const void* r, void* out, int64_t n, int dt) {
  return launch_add_relu(x, r, out, n, DType(dt), nullptr);
}
}
