"""Pure-PyTorch side of conv + BatchNorm (+ residual) + ReLU.

* :func:`conv_bn_relu_reference` is the oracle: the eager composite the fused operator
  must equal (``F.conv2d`` -> ``F.batch_norm`` -> add -> ReLU).
* The remaining functions are the ``"reference"`` backend's primitives: the same
  decomposition the Triton and CUDA backends implement as kernels (statistics partials,
  Chan merge, apply, backward reductions), written with torch ops, so that the op's
  orchestration is shared by all backends and runs on any device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CL = torch.channels_last


def conv_bn_relu_reference(x, weight, bn_weight, bn_bias, running_mean, running_var, *, stride=1, padding=0,
                           dilation=1, groups=1, training=False, momentum=0.1, eps=1e-5, residual=None, relu=True):
    y = F.batch_norm(F.conv2d(x, weight, None, stride, padding, dilation, groups), running_mean, running_var,
                     bn_weight, bn_bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def aten_conv(x, weight, stride, padding, dilation, groups):
    """The plain convolution (cuDNN on CUDA), output channels_last."""
    z = torch.ops.aten.convolution(x, weight, None, stride, padding, dilation, False, [0, 0], groups)
    return z.contiguous(memory_format=CL)


def acc_dtype(dt):
    return torch.float64 if dt == torch.float64 else torch.float32


def _mk(t):
    """[N, K, P, Q] channels_last-dense -> the [M, K] matrix view of its storage."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def bn_stats(z):
    """One partial (G = 1) of mean / M2 over all rows."""
    zm = _mk(z).to(acc_dtype(z.dtype))
    mean = zm.mean(0, keepdim=True) if zm.shape[0] else zm.new_zeros(1, zm.shape[1])
    m2 = ((zm - mean) ** 2).sum(0, keepdim=True)
    return mean, m2, max(zm.shape[0], 1)


def conv_fwd(x, weight, K, P, Q, stride, padding, dilation, groups, *, training, scale=None, shift=None,
             residual=None, relu=True, store_z=False, ieee=True, stats=bn_stats, apply=None):
    z = aten_conv(x, weight, stride, padding, dilation, groups)
    if training:
        pm, pm2, rows = stats(z)
        return None, z, pm, pm2, rows
    if shift is None and residual is None and not relu:  # the conv alone (no bias)
        return z, (z if store_z else None), None, None, 0
    if shift is None:
        shift = torch.zeros(K, dtype=acc_dtype(x.dtype), device=x.device)
    if scale is None:  # folded into the weight: shift is the bias
        scale = torch.ones_like(shift)
    out = (apply or bn_apply)(z, scale, shift, residual, relu)
    return out, (z if store_z else None), None, None, 0


def merge_partials(pmean, pm2, rows, M):
    """Chan's merge of G partial (mean, M2), each over ``rows`` rows (the last over the
    rest): the channel mean and M2 over all M rows."""
    G = pmean.shape[0]
    cnt = torch.clamp(M - torch.arange(G, device=pmean.device, dtype=pmean.dtype) * rows, max=rows)[:, None]
    mean = (cnt * pmean).sum(0) / M
    return mean, (pm2 + cnt * (pmean - mean) ** 2).sum(0)


def bn_finalize(pmean, pm2, rows, M, running_mean, running_var, momentum, eps):
    mean, m2 = merge_partials(pmean, pm2, rows, M)
    var = m2 / M
    invstd = torch.rsqrt(var + eps)
    if running_mean is None:
        return mean, invstd, None, None
    new_rm = ((1 - momentum) * running_mean.to(mean.dtype) + momentum * mean).to(running_mean.dtype)
    new_rv = ((1 - momentum) * running_var.to(var.dtype) + momentum * var * (M / (M - 1))).to(running_var.dtype)
    return mean, invstd, new_rm, new_rv


def _bc(v):
    return v.view(1, -1, 1, 1)


def bn_apply(z, scale, shift, residual, relu):
    y = z.to(scale.dtype) * _bc(scale) + _bc(shift)
    if residual is not None:
        y = y + residual.to(y.dtype)
    if relu:
        y = torch.relu(y)
    return y.to(z.dtype).contiguous(memory_format=CL)


def _gy(grad, out, relu):
    # As threshold_backward: zero where out <= 0 (a NaN output passes the gradient).
    return torch.where(out <= 0, torch.zeros((), dtype=grad.dtype, device=grad.device), grad) if relu else grad


def bn_bwd_reduce(grad, out, z, mean, relu):
    gy = _gy(grad, out, relu).to(mean.dtype)
    return gy.sum((0, 2, 3)), (gy * (z.to(mean.dtype) - _bc(mean))).sum((0, 2, 3))


def bn_bwd_apply(grad, out, z, mean, invstd, a, b, c, relu, store_gres):
    gy = _gy(grad, out, relu)
    dz = _bc(a) * gy.to(a.dtype)
    if b is not None:
        dz = dz + _bc(b) * (z.to(a.dtype) - _bc(mean)) * _bc(invstd) + _bc(c)
    dz = dz.to(grad.dtype).contiguous(memory_format=CL)
    if not store_gres:
        return dz, None
    # a fresh tensor: without ReLU gy is the incoming gradient itself (an op output may not alias it)
    return dz, (gy.clone(memory_format=CL) if gy is grad else gy.contiguous(memory_format=CL))
