"""CUDA C++ backend of conv + BatchNorm (+ residual) + ReLU: the convolution is ATen's
(cuDNN, channels_last), every BatchNorm / residual / ReLU kernel is ours (csrc/bn_kernels.cu),
registered as resnet_fused_C::* operators."""
from __future__ import annotations

import torch

from . import reference

_ops = None


def _C():
    global _ops
    if _ops is None:
        _ops = torch.ops.resnet_fused_C
    return _ops


def conv_fwd(x, weight, K, P, Q, stride, padding, dilation, groups, **kw):
    return reference.conv_fwd(x, weight, K, P, Q, stride, padding, dilation, groups,
                              stats=_stats, apply=bn_apply, **kw)


def _stats(z):
    # At least 256 rows (output pixels) per statistics partial, and at most 512 partials:
    # enough blocks to fill the GPU, few enough that the finalize's loop over them is short.
    M = z.numel() // z.shape[1] if z.shape[1] else 0
    rows = max(256, -(-M // 512))
    pm, pm2 = _C().bn_stats(z, rows)
    return pm, pm2, rows


def bn_finalize(pmean, pm2, rows, M, running_mean, running_var, momentum, eps):
    return tuple(_C().bn_finalize(pmean, pm2, rows, M, running_mean, running_var, momentum, eps))


def bn_apply(z, scale, shift, residual, relu):
    return _C().bn_apply(z, scale, shift, residual, relu)


def bn_bwd_reduce(grad, out, z, mean, relu):
    return tuple(_C().bn_bwd_reduce(grad, out, z, mean, relu))


def bn_bwd_apply(grad, out, z, mean, invstd, a, b, c, relu, store_gres):
    dz, gres = _C().bn_bwd_apply(grad, out, z, mean, invstd, a, b, c, relu, store_gres)
    return dz, (gres if store_gres else None)
