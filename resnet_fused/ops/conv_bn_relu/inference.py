"""Inference-only conv + per-channel affine (+ residual) + ReLU: the eval path of the
fused ResNet blocks, with the BatchNorm already folded (see :func:`fold_bn`).

No autograd: the models call it only when no gradient is needed; anything else goes
through the differentiable ``conv_bn_relu``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import _backends, _select
from .reference import CL, acc_dtype

OP = "conv_affine_act"
# auto on CUDA chooses per call signature between these (the fixed rule: the first). "cuda" is
# cuDNN's fused conv + bias (+ residual) + ReLU (csrc/conv_fused.cpp).
_backends.declare_candidates(OP, ("triton", "cuda"))


def fold_bn(weight: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], running_mean: Tensor,
            running_var: Tensor, eps: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """BatchNorm folded into the conv, computed in fp32 (fp64 for fp64):
    ``w' = w * gamma / sqrt(var + eps)`` (in ``dtype``, channels_last) and
    ``bias = beta - mean * gamma / sqrt(var + eps)`` (accumulator dtype)."""
    acc = acc_dtype(dtype)
    K = weight.shape[0]
    with torch.no_grad():
        scale = torch.rsqrt(running_var.to(acc) + eps)
        if bn_weight is not None:
            scale = scale * bn_weight.to(acc)
        bias = -running_mean.to(acc) * scale
        if bn_bias is not None:
            bias = bias + bn_bias.to(acc)
        w = (weight.to(acc) * scale.view(K, 1, 1, 1)).to(dtype).contiguous(memory_format=CL)
    return w, bias.contiguous()


def owned_bias(bias: Tensor) -> Tensor:
    """Mark an eval bias that no one writes in place (a model's fold cache holds it; a change of
    the BatchNorm or conv makes a new one): the CUDA backend may keep its cast to the activation
    dtype with it (cuda.LOWP_CACHE)."""
    from .cuda import LOWP_CACHE

    setattr(bias, LOWP_CACHE, {})
    return bias


def _run(x: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], residual: Optional[Tensor],
         stride: list[int], padding: list[int], dilation: list[int], groups: int, relu: bool, allow_tf32: bool,
         backend: str, pool: bool = False) -> Tensor:
    from . import _IMPLS, _in_layout, _out_size
    from .._common import device_guard, pad_channels_for_cudnn

    with device_guard(x):
        _backends.note(OP, backend)
        if backend == "cuda":  # (RESNET_FUSED_CUDNN_STEM_PAD, docs/perf.md lead 17; off by default)
            xp, weight = pad_channels_for_cudnn(x, weight, groups)
            if xp is not x:
                _backends.note(OP + "/cudnn_pad", str(xp.shape[1]))
                x = xp
        N, C, H, W = x.shape
        K, _, R, S = weight.shape
        P, Q = _out_size(H, W, R, S, stride, padding, dilation)
        if residual is not None:
            residual = _in_layout(residual, residual.shape, CL)
        w = weight.permute(0, 2, 3, 1).contiguous() if backend == "triton" else weight
        if shift is None and backend == "triton":  # (the kernel's epilogue always adds one)
            shift = torch.zeros(K, dtype=acc_dtype(x.dtype), device=x.device)
        kw = {"pool": True} if pool and backend == "triton" else {}
        out, _, _, _, _ = _IMPLS[backend].conv_fwd(x, w, K, P, Q, stride, padding, dilation, groups, training=False,
                                                   scale=scale, shift=shift, residual=residual, relu=relu,
                                                   ieee=not allow_tf32, **kw)
        if not pool:
            return _in_layout(out, (N, K, P, Q), CL)
        _backends.note(POOL_PATH, "epilogue" if kw else "max_pool2d")
        if not kw and backend == "cuda":  # the conv's output, then our pool kernel without its codes
            # (PyTorch's CUDA max_pool2d writes an int64 index per output even in inference: 411 MB at
            # ResNet-50's stem, batch 256; this writes the 103 MB of values alone)
            out = torch.ops.resnet_fused_C.max_pool2d_fwd(_in_layout(out, (N, K, P, Q), CL), [3, 3], [2, 2], [1, 1],
                                                          False)[0]
        elif not kw:  # the conv's output, then PyTorch's pool
            out = torch.nn.functional.max_pool2d(_in_layout(out, (N, K, P, Q), CL), 3, 2, 1)
        return _in_layout(out, (N, K, _pooled(P), _pooled(Q)), CL)


POOL_PATH = OP + "/maxpool"  # dispatch_trace(): "epilogue" (Triton: pooled in the conv's epilogue) or "max_pool2d"


def _pooled(P: int) -> int:
    return (P - 1) // 2 + 1  # max_pool2d(kernel 3, stride 2, padding 1), floor mode


@torch.library.custom_op("resnet_fused::conv_affine_act", mutates_args=())
def conv_affine_act_op(x: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                       residual: Optional[Tensor],
                       stride: list[int], padding: list[int], dilation: list[int], groups: int, relu: bool,
                       allow_tf32: bool, backend: str) -> Tensor:
    """relu?(conv(x, weight) * scale? + shift? + residual?), output channels_last."""
    return _run(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu, allow_tf32, backend)


@conv_affine_act_op.register_fake
def _(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu, allow_tf32, backend):
    from . import _out_size

    N, C, H, W = x.shape
    K, _, R, S = weight.shape
    P, Q = _out_size(H, W, R, S, stride, padding, dilation)
    return torch.empty((N, K, P, Q), dtype=x.dtype, device=x.device, memory_format=CL)


def conv_affine_act(x: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                    residual: Optional[Tensor], stride, padding, dilation, groups: int, relu: bool) -> Tensor:
    """Inference-only fused conv; arguments as :func:`conv_bn_relu` after :func:`fold_bn`
    (callers validate shapes: the models do so through the module structure). ``shift`` None:
    no bias (with no residual and no ReLU, the convolution alone)."""
    return _dispatch(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu, False)


def _dispatch(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu, pool):
    """conv_affine_act's (``pool``: conv_affine_act_maxpool's) backend choice and call: the op's
    own implementation on the eager fast path, else its custom op."""
    from .._common import conv_allows_tf32, direct_ok

    stride, padding, dilation = list(stride), list(padding), list(dilation)
    allow_tf32 = conv_allows_tf32() and x.device.type == "cuda"
    key = runner = None
    if (x.device.type in _backends._SELECT_DEVICES and _backends.get_backend() == "auto") or _select.RECORDER is not None:
        # (without a bias, or with the pool, the candidates do different work: a signature of its own)
        key = _select.conv_key(OP + (":maxpool" if pool else "") + ("" if shift is not None else ":no-bias"), x,
                               weight, stride, padding, dilation, groups, residual is not None, relu, False, allow_tf32)

        def runner(b):  # this call on backend b (a fresh output each run)
            return lambda: _run(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu,
                                allow_tf32, b, pool)
    backend = _backends.resolve(OP, x, key=key, runner=runner, weight=weight)
    if direct_ok(x, weight, scale, shift, residual) and not (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, scale, shift, residual))):
        # the eager fast path (see _common.direct_ok): the op's own implementation, called directly
        return _run(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu, allow_tf32, backend,
                    pool)
    if pool:
        return conv_affine_act_maxpool_op(x, weight, scale, shift, stride, padding, dilation, groups, relu,
                                          allow_tf32, backend)
    return conv_affine_act_op(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu, allow_tf32,
                              backend)


@torch.library.custom_op("resnet_fused::conv_affine_act_maxpool", mutates_args=())
def conv_affine_act_maxpool_op(x: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                               stride: list[int], padding: list[int], dilation: list[int], groups: int, relu: bool,
                               allow_tf32: bool, backend: str) -> Tensor:
    """max_pool2d(relu?(conv(x, weight) * scale? + shift?), 3, 2, 1), output channels_last."""
    return _run(x, weight, scale, shift, None, stride, padding, dilation, groups, relu, allow_tf32, backend, True)


@conv_affine_act_maxpool_op.register_fake
def _(x, weight, scale, shift, stride, padding, dilation, groups, relu, allow_tf32, backend):
    from . import _out_size

    N, C, H, W = x.shape
    K, _, R, S = weight.shape
    P, Q = _out_size(H, W, R, S, stride, padding, dilation)
    return torch.empty((N, K, _pooled(P), _pooled(Q)), dtype=x.dtype, device=x.device, memory_format=CL)


def conv_affine_act_maxpool(x: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], stride,
                            padding, dilation, groups: int, relu: bool) -> Tensor:
    """:func:`conv_affine_act` (no residual) followed by ``max_pool2d(kernel_size=3, stride=2,
    padding=1)``: the ResNet stem in inference. On the Triton backend the pool runs in the conv's
    epilogue and the conv's own output is never written; the CUDA backend runs our pool kernel
    (values only, csrc/max_pool_kernel.cu) after cuDNN's conv, the reference PyTorch's pool. ``auto`` chooses between the two per call signature, as for the conv alone."""
    return _dispatch(x, weight, scale, shift, None, stride, padding, dilation, groups, relu, True)
