"""CUDA C++ backend of conv + BatchNorm (+ residual) + ReLU: the convolution is ATen's
(cuDNN, channels_last), every BatchNorm / residual / ReLU kernel is ours (csrc/bn_kernels.cu),
registered as resnet_fused_C::* operators; in eval with the BatchNorm folded into the weight,
conv + bias (+ residual) + ReLU is one cuDNN fused call (csrc/conv_fused.cpp) where cuDNN
takes it."""
from __future__ import annotations

import os

import torch

from ... import _backends
from . import reference

_ops = None


def _C():
    global _ops
    if _ops is None:
        _ops = torch.ops.resnet_fused_C
    return _ops


# The eval path with the BatchNorm folded into the weight runs as one cuDNN fused call where
# cuDNN takes it, as the conv alone without a bias, residual or ReLU (csrc/conv_fused.cpp); which
# path ran is noted under this name.
FUSED_PATH = "conv_affine_act/cuda"


# cuDNN's fused conv + bias (+ residual) + ReLU takes the bias in the activation dtype. The eval
# biases the models pass are their fold caches' tensors, never written in place (a change of the
# BatchNorm or conv makes new ones): marked with this attribute (inference.owned_bias), they keep
# their casts per dtype, so the cast runs once per layer instead of once per call (a kernel per
# layer in a batch-1 CUDA graph). Any other bias is cast by the C++ op, each call.
LOWP_CACHE = "_resnet_fused_lowp"


def _bias_lowp(shift, dt):
    if shift is None or shift.dtype == dt:
        return None
    cache = getattr(shift, LOWP_CACHE, None)
    if cache is None:
        return None
    t = cache.get(dt)
    if t is None:
        t = cache[dt] = shift.to(dt)
    return t


def conv_fwd(x, weight, K, P, Q, stride, padding, dilation, groups, *, training, scale=None, shift=None,
             residual=None, relu=True, store_z=False, ieee=True):
    if not training and scale is None and not store_z:
        out, path = _C().conv_bias_act(x, weight, shift, residual, list(stride), list(padding), list(dilation),
                                       groups, relu, _bias_lowp(shift, x.dtype))
        _backends.note(FUSED_PATH, ("cudnn-fused", "conv+epilogue", "conv-only")[path])
        return out, None, None, None, 0
    return reference.conv_fwd(x, weight, K, P, Q, stride, padding, dilation, groups, training=training, scale=scale,
                              shift=shift, residual=residual, relu=relu, store_z=store_z, ieee=ieee, stats=_stats,
                              apply=bn_apply)


# The training path: one C++ call per direction (csrc/conv_bn_train.cpp) runs the conv, the
# statistics, the finalize, the per-channel arithmetic and the apply (backward: the sums, the
# coefficients, the elementwise gradient and the conv gradients), in the same order as the
# Python orchestration in __init__.py, whose host time it saves. Noted under this name.
TRAIN_PATH = "conv_bn_train/cuda"
# Off (scripts/host_overhead.py compares the two): the Python orchestration, as the other backends.
CPP_TRAIN = [True]


# On the eager fast path (_common.direct_ok) the whole training layer is one operator with a C++
# autograd node (csrc/conv_bn_train_node.cpp): the same two calls, without the Python
# autograd.Function around them; the running statistics are updated in place by the operator.
# Its backward runs without Python, so only the forward is noted (the node's name says the rest).
# Off (RESNET_FUSED_CPP_NODE=0): the autograd.Function over the two calls (the path torch.compile's
# custom op also takes), whose backward, when a dispatch mode is active around backward(), runs as
# the backward custom op; the C++ node's backward always runs the ops inside it.
CPP_NODE = [os.environ.get("RESNET_FUSED_CPP_NODE", "1") != "0"]


def train_layer(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding, dilation, groups,
                momentum, eps, relu, recompute):
    _backends.note(TRAIN_PATH, "c++ node")
    return _C().conv_bn_relu_train(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, stride,
                                   padding, dilation, groups, momentum, eps, relu, recompute)


def train_layer_fork(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding, dilation,
                     groups, momentum, eps, relu, recompute):
    """train_layer, and x as a second output of its node for a residual block's shortcut
    (conv_bn_relu_fork): the node's backward adds the gradient reaching it to x's."""
    _backends.note(TRAIN_PATH, "c++ node, fork")
    return tuple(_C().conv_bn_relu_train_fork(x, weight, bn_weight, bn_bias, running_mean, running_var, residual,
                                              stride, padding, dilation, groups, momentum, eps, relu, recompute))


def train_forward(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding, dilation,
                  groups, momentum, eps, relu):
    _backends.note(TRAIN_PATH, "c++")
    return tuple(_C().conv_bn_train(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, stride,
                                    padding, dilation, groups, momentum, eps, relu))


def train_backward(grad, x, weight, bn_weight, z, out, mean, invstd, stride, padding, dilation, groups, relu,
                   output_mask):
    _backends.note(TRAIN_PATH + "_backward", "c++")
    return tuple(_C().conv_bn_train_backward(grad, x, weight, bn_weight, z, out, mean, invstd, stride, padding,
                                             dilation, groups, relu, output_mask))


def _stats(z):
    # At least 256 rows (output pixels) per statistics partial, and at most 512 partials:
    # enough blocks to fill the GPU, few enough that the finalize's loop over them is short
    # (csrc/bn.h partial_rows: the same rule on the C++ side).
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
