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

namespace resnet_fused {

// BatchNorm kernels over NHWC activations seen as [M, K] row-major matrices (K = channels,
// contiguous). "acc" buffers are float64 when the activations are float64, else float32.
// Each returns the launch status.

// Per-chunk statistics: for chunk g (rows [g*rows, (g+1)*rows)), the channel mean and M2
// (sum of squared deviations from that mean), G = ceil(M / rows) chunks.
cudaError_t launch_bn_stats(const void* z, void* pmean, void* pm2, int64_t M, int64_t K, int64_t rows, DType dtype,
                            cudaStream_t stream);

// Chan merge of the partials into mean and 1/sqrt(var + eps); when running_mean is not
// null also writes the updated running statistics (momentum, unbiased variance) to new_* (which
// may be running_* themselves: an update in place); when
// scale is not null also the apply's scale = gamma * invstd and shift = beta - mean * scale
// (gamma / beta: acc-typed [K], null for 1 / 0).
cudaError_t launch_bn_finalize(const void* pmean, const void* pm2, int64_t G, int64_t K, int64_t M, int64_t rows,
                               void* mean, void* invstd, const void* running_mean, const void* running_var,
                               void* new_running_mean, void* new_running_var, DType run_dtype, double momentum,
                               double eps, bool acc_f64, const void* gamma, const void* beta, void* scale,
                               void* shift, cudaStream_t stream);

// out = relu?(z * scale[k] + shift[k] + residual?)
cudaError_t launch_bn_apply(const void* z, const void* scale, const void* shift, const void* residual, void* out,
                            int64_t M, int64_t K, bool relu, DType dtype, cudaStream_t stream);

// Per-chunk sums of gy and gy * (z - mean[k]), gy = relu ? grad * (out > 0) : grad. With
// mask_scale / mask_shift (acc-typed [K], the forward apply's scale / shift; only for an output
// without a residual) the ReLU's mask is recomputed from z instead: out is not read (may be null).
cudaError_t launch_bn_bwd_reduce(const void* grad, const void* out, const void* z, const void* mean, void* psum,
                                 void* psumz, int64_t M, int64_t K, int64_t rows, bool relu, DType dtype,
                                 cudaStream_t stream, const void* mask_scale = nullptr,
                                 const void* mask_shift = nullptr);

// The backward's per-channel terms from bn_bwd_reduce's G partials (acc-typed, gamma null for 1):
// dbeta = sum(gy), dgamma = sum(gy * (z - mean)) * invstd, a = gamma * invstd,
// b = -a / M * dgamma, c = -a / M * dbeta.
cudaError_t launch_bn_bwd_coef(const void* psum, const void* psumz, int64_t G, int64_t K, int64_t M, const void* gamma,
                               const void* invstd, void* dgamma, void* dbeta, void* a, void* b, void* c, bool acc_f64,
                               cudaStream_t stream);

// dz = a[k] * gy + (b ? b[k] * (z - mean[k]) * invstd[k] + c[k] : 0); gres = gy when not null;
// the ReLU's mask from out, or from z with mask_scale / mask_shift (as launch_bn_bwd_reduce).
cudaError_t launch_bn_bwd_apply(const void* grad, const void* out, const void* z, const void* mean,
                                const void* invstd, const void* a, const void* b, const void* c, void* dz, void* gres,
                                int64_t M, int64_t K, bool relu, DType dtype, cudaStream_t stream,
                                const void* mask_scale = nullptr, const void* mask_shift = nullptr);

}  // namespace resnet_fused

namespace resnet_fused {

// Max pooling over NHWC [N, H, W, C] (dense, channels innermost) into out [N, P, Q, C] and code
// [N, P, Q, C] (uint8: kh * KW + kw of each window's maximum, as max_pool2d chooses it; null: not
// written, inference); kernel, stride, padding: {h, w}. The backward writes dx [N, H, W, C] from
// grad and code (every element).
cudaError_t launch_max_pool_fwd(const void* x, void* out, void* code, int64_t N, int64_t H, int64_t W, int64_t C,
                                int64_t P, int64_t Q, const int* kernel, const int* stride, const int* padding,
                                DType dtype, cudaStream_t stream);
cudaError_t launch_max_pool_bwd(const void* grad, const void* code, void* dx, int64_t N, int64_t H, int64_t W,
                                int64_t C, int64_t P, int64_t Q, const int* kernel, const int* stride,
                                const int* padding, DType dtype, cudaStream_t stream);

}  // namespace resnet_fused
