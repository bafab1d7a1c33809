"""conv + BatchNorm (+ residual) + ReLU as one operator.

``conv_bn_relu(x, weight, bn_weight, bn_bias, running_mean, running_var, ...)`` returns
``relu?(batch_norm(conv2d(x, weight)) + residual?)`` and, when training, updates the running
statistics in place exactly as ``F.batch_norm`` does. Same contract on every backend.

Forward, per backend (see triton_kernels.py, cuda.py, reference.py):
  eval      conv with the BatchNorm folded into a per-channel (scale, shift) in fp32 and the
            residual add and ReLU applied to the accumulator: one write of the output.
  training  conv whose epilogue also emits per-tile channel statistics -> finalize (Chan
            merge, running-stat update) -> one elementwise normalize + residual + ReLU.
Backward: one reduction pass (sum gy, sum gy*(z-mean), with the ReLU mask applied on the
fly), one elementwise pass (BatchNorm input gradient and the residual gradient), then the
conv data / weight gradients through ATen's convolution_backward (cuDNN on CUDA) on every
backend; through conv_bn_relu_fork, a 1x1 conv's data gradient is a GEMM accumulating into the
shortcut's gradient instead. What is saved: x, weight, the raw conv output z, the output (ReLU mask) and two
[K] vectors.

Precision: fp32 inputs use TF32 products exactly when PyTorch's convolutions do
(``torch.backends.cudnn.allow_tf32``, CUDA only); statistics are accumulated in fp32
(fp64 for fp64 inputs).
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import torch
from torch import Tensor

from ... import _backends, _select
from ..._triton import HAS_TRITON
from . import cuda as _cuda_impl
from . import reference as _ref_impl
from . import sync as _sync
from .._common import autocast_dtype, conv_allows_tf32, device_guard, direct_ok, pad_channels_for_cudnn
from .reference import CL, acc_dtype, aten_conv, conv_bn_relu_reference

if HAS_TRITON:
    from . import triton_kernels as _triton_impl
else:  # pragma: no cover
    _triton_impl = None

OP = "conv_bn_relu"
_IMPLS = {"reference": _ref_impl, "triton": _triton_impl, "cuda": _cuda_impl}
# auto on CUDA chooses per call signature between these (the fixed rule: the first)
_backends.declare_candidates(OP, ("triton", "cuda"))

__all__ = ["conv_bn_relu", "conv_bn_relu_fork", "conv_bn_relu_reference"]


def _pair(v, name):
    if isinstance(v, int):
        return [v, v]
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return list(v)
    raise TypeError(f"{OP}: {name} must be an int or a pair of ints, got {v!r}")


def _in_layout(t: Tensor, shape, memory_format=None, like: Optional[Tensor] = None) -> Tensor:
    """``t`` in a fixed layout (channels_last, or that of empty_like(like)), copying only
    when its strides differ, so that real and fake kernels agree on output strides. The
    wanted strides are computed, not allocated, where they are known (a hot path: several
    calls per layer)."""
    if like is None and memory_format is CL and len(shape) == 4:
        N, C, H, W = shape
        if tuple(t.shape) == tuple(shape) and t.stride() == (H * W * C, 1, W * C, C):
            return t
    elif (like is not None and t.shape == like.shape and t.stride() == like.stride()
          and (like.is_contiguous() or like.is_contiguous(memory_format=CL))):
        return t  # a dense like: empty_like keeps its strides
    want = torch.empty_like(like) if like is not None else torch.empty(
        shape, dtype=t.dtype, device=t.device, memory_format=memory_format)
    if t.stride() == want.stride():
        return t
    return want.copy_(t)


def _affine(bn_weight, bn_bias, mean, invstd):
    """The BatchNorm as a per-channel (scale, shift) in the statistics' dtype."""
    K, acc = mean.shape[0], mean.dtype
    gamma = bn_weight.to(acc) if bn_weight is not None else torch.ones(K, device=mean.device, dtype=acc)
    beta = bn_bias.to(acc) if bn_bias is not None else torch.zeros(K, device=mean.device, dtype=acc)
    scale = gamma * invstd
    return scale, torch.addcmul(beta, mean, scale, value=-1)


def _mask_from_z(backend, training, relu, residual, recompute):
    """Whether the backward recomputes the ReLU mask from z (the Triton training apply's scale and
    shift, _bn_affine) instead of reading the output, which the forward then does not keep: a
    training layer with a ReLU and no residual, whose z the backward reads as the forward wrote it
    (not recomputed: ATen's conv need not give Triton's bits). The CUDA backend's C++ node does the
    same in C++ (csrc/conv_bn_train_node.cpp)."""
    return backend == "triton" and training and relu and residual is None and not recompute


def _fwd_shape(x, weight, stride, padding, dilation):
    N, _, H, W = x.shape
    K, _, R, S = weight.shape
    return (N, K, *_out_size(H, W, R, S, stride, padding, dilation))


def _out_size(H, W, R, S, stride, padding, dilation):
    P = (H + 2 * padding[0] - dilation[0] * (R - 1) - 1) // stride[0] + 1
    Q = (W + 2 * padding[1] - dilation[1] * (S - 1) - 1) // stride[1] + 1
    return P, Q


# --- forward operator -----------------------------------------------------------------------
# Functional (no in-place mutation, so that it can carry an autograd formula): the updated
# running statistics come back as outputs and the public function copies them into the
# buffers (two [K]-element copies).
@torch.library.custom_op("resnet_fused::conv_bn_fwd", mutates_args=())
def _fwd_op(x: Tensor, weight: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
            running_mean: Optional[Tensor], running_var: Optional[Tensor], residual: Optional[Tensor],
            stride: list[int], padding: list[int], dilation: list[int], groups: int, training: bool,
            momentum: float, eps: float, relu: bool, store_z: bool, allow_tf32: bool,
            backend: str, sync_group: int = 0, recompute: bool = False
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, z, mean, invstd, new_running_mean, new_running_var): z is the raw conv
    output (empty unless training or store_z); mean/invstd are the batch statistics
    (training) or the running ones (eval); the new running statistics are empty unless
    training with running statistics. ``recompute`` is read by the autograd formula only: the
    backward recomputes z instead of the forward keeping it."""
    with device_guard(x):
        return _forward(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding,
                        dilation, groups, training, momentum, eps, relu, store_z, allow_tf32, backend, sync_group)


def _forward(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding, dilation, groups,
             training, momentum, eps, relu, store_z, allow_tf32, backend, sync_group):
    _backends.note(OP, backend)
    if training and running_mean is not None and not (running_mean.is_contiguous() and running_var.is_contiguous()):
        # the kernels read [K] vectors as ptr + k: strided running statistics as dense copies (the new
        # ones are outputs, copied into the buffers by the caller)
        running_mean, running_var = running_mean.contiguous(), running_var.contiguous()
    if training and backend == "cuda" and not sync_group and _cuda_impl.CPP_TRAIN[0]:
        return _cuda_impl.train_forward(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, stride,
                                        padding, dilation, groups, momentum, eps, relu)
    B = _IMPLS[backend]
    N, C, H, W = x.shape
    K, _, R, S = weight.shape
    P, Q = _out_size(H, W, R, S, stride, padding, dilation)
    M = N * P * Q
    acc = acc_dtype(x.dtype)
    if residual is not None:
        residual = _in_layout(residual, residual.shape, CL)
    # The Triton kernel reads the weight as [K, R, S, C/groups] (free for channels_last weights).
    w = weight.permute(0, 2, 3, 1).contiguous() if backend == "triton" else weight
    common = dict(ieee=not allow_tf32)
    if training:
        _, z, pm, pm2, rows = B.conv_fwd(x, w, K, P, Q, stride, padding, dilation, groups, training=True, **common)
        if sync_group:
            mean, invstd, new_rm, new_rv = _sync.finalize(pm, pm2, rows, M, running_mean, running_var, momentum, eps,
                                                          sync_group)
        else:
            mean, invstd, new_rm, new_rv = B.bn_finalize(pm, pm2, rows, M, running_mean, running_var, momentum, eps)
        if backend == "triton":
            # scale and shift computed in the kernel, as the backward recomputes them for the ReLU
            # mask (_mask_from_z): no [K] arithmetic here
            out = B.bn_apply_stats(z, bn_weight, bn_bias, mean, invstd, residual, relu)
        else:
            scale, shift = _affine(bn_weight, bn_bias, mean, invstd)
            out = B.bn_apply(z, scale, shift, residual, relu)
    else:
        new_rm = new_rv = None
        mean = running_mean.to(acc, copy=True)
        invstd = torch.rsqrt(running_var.to(acc) + eps)
        scale, shift = _affine(bn_weight, bn_bias, mean, invstd)
        out, z, _, _, _ = B.conv_fwd(x, w, K, P, Q, stride, padding, dilation, groups, training=False, scale=scale,
                                     shift=shift, residual=residual, relu=relu, store_z=store_z, **common)
    out = _in_layout(out, (N, K, P, Q), CL)
    # (Outputs may not alias each other: a fresh empty tensor for each missing one.)
    z = _in_layout(z, (N, K, P, Q), CL) if z is not None else x.new_empty(0)
    return (out, z, mean, invstd, new_rm if new_rm is not None else x.new_empty(0),
            new_rv if new_rv is not None else x.new_empty(0))


@_fwd_op.register_fake
def _(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding, dilation, groups,
      training, momentum, eps, relu, store_z, allow_tf32, backend, sync_group=0, recompute=False):
    N, C, H, W = x.shape
    K, _, R, S = weight.shape
    P, Q = _out_size(H, W, R, S, stride, padding, dilation)
    out = torch.empty((N, K, P, Q), dtype=x.dtype, device=x.device, memory_format=CL)
    z = torch.empty_like(out) if (training or store_z) else x.new_empty(0)
    acc = acc_dtype(x.dtype)
    upd = training and running_mean is not None
    new_rm = running_mean.new_empty(K) if upd else x.new_empty(0)
    new_rv = running_var.new_empty(K) if upd else x.new_empty(0)
    return out, z, x.new_empty(K, dtype=acc), x.new_empty(K, dtype=acc), new_rm, new_rv


# --- backward operator ------------------------------------------------------------------------
@torch.library.custom_op("resnet_fused::conv_bn_bwd", mutates_args=())
def _bwd_op(grad: Tensor, x: Tensor, weight: Tensor, bn_weight: Optional[Tensor], z: Tensor, out: Tensor,
            mean: Tensor, invstd: Tensor, stride: list[int], padding: list[int], dilation: list[int], groups: int,
            training: bool, relu: bool, output_mask: list[bool],
            backend: str, sync_group: int = 0, bn_bias: Optional[Tensor] = None,
            mask_from_z: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (x, weight, bn_weight, bn_bias, residual); entries not asked for in
    output_mask come back empty. ``mask_from_z`` (Triton, training): the ReLU mask is recomputed
    from z, bn_weight, bn_bias and the statistics; ``out`` is not read."""
    with device_guard(x):
        return _backward_impl(grad, x, weight, bn_weight, z, out, mean, invstd, stride, padding, dilation, groups,
                              training, relu, output_mask, backend, sync_group, bn_bias, mask_from_z)


def _backward_impl(grad, x, weight, bn_weight, z, out, mean, invstd, stride, padding, dilation, groups, training,
                   relu, output_mask, backend, sync_group, bn_bias=None, mask_from_z=False, shortcut=None,
                   shortcut_owned=False):
    """``shortcut`` (the eager fast path of a fork, see conv_bn_relu_fork): the gradient of the
    input's alias, added to x's gradient (in the dgrad GEMM where _join_gemm_ok: in place when
    ``shortcut_owned``, see _owned, else into a copy)."""
    _backends.note(OP + "_backward", backend)
    if training and backend == "cuda" and not sync_group and _cuda_impl.CPP_TRAIN[0]:
        res = _cuda_impl.train_backward(grad, x, weight, bn_weight, z, out, mean, invstd, stride, padding, dilation,
                                        groups, relu, output_mask)
        if shortcut is not None and output_mask[0]:  # (the C++ node joins in its GEMM; this path adds)
            _backends.note(OP + "_backward/shortcut", "dgrad + add")
            res[0].add_(shortcut)
        return res
    B = _IMPLS[backend]
    need_dx, need_dw, need_dg, need_db, need_dr = output_mask
    K = weight.shape[0]
    acc = mean.dtype
    grad = _in_layout(grad, grad.shape, CL)
    if not relu:
        out = grad  # (not read without a ReLU, and not saved by the forward: a stand-in of its layout)
    M = grad.numel() // K if K else 0
    if (training or need_dg or need_db) and z.numel() != grad.numel():
        raise RuntimeError(f"{OP}: backward needs the conv output, which the forward did not save")
    mask = None
    if mask_from_z:
        if backend != "triton" or not (training and relu):
            raise RuntimeError(f"{OP}: the ReLU mask from z is the Triton training backward's, got backend "
                               f"{backend!r}, training={training}, relu={relu}")
        mask = (bn_weight, bn_bias, invstd)
    if backend == "triton":
        _backends.note(OP + "_backward/triton",
                       "mask from z" if mask is not None else "mask from out" if relu else "no mask")
    if training and backend == "triton" and not sync_group:
        # the sums and the per-channel terms in two launches (triton_kernels.bn_bwd_reduce_coef)
        dgamma, dbeta, a, b, c = B.bn_bwd_reduce_coef(grad, out, z, mean, invstd, bn_weight, relu, mask)
        dz, gres = B.bn_bwd_apply(grad, out, z, mean, invstd, a, b, c, relu, need_dr, mask)
        return _conv_grads(dz, gres, x, weight, bn_weight, dgamma, dbeta, grad, stride, padding, dilation, groups,
                           output_mask, shortcut, shortcut_owned)
    kw = {"mask": mask} if mask is not None else {}  # (synchronized BatchNorm on Triton)
    gamma = bn_weight.to(acc) if bn_weight is not None else torch.ones(K, device=x.device, dtype=acc)
    a = gamma * invstd
    b = c = None
    dgamma = dbeta = None
    if training or need_dg or need_db:
        sum_gy, sum_gyz = B.bn_bwd_reduce(grad, out, z, mean, relu, **kw)
        dbeta, dgamma = sum_gy, sum_gyz * invstd  # sum(gy), sum(gy * xhat)
        if training:
            if sync_group:
                # SyncBatchNorm: the input gradient needs the sums and count over all ranks; the
                # parameter gradients stay local (DistributedDataParallel averages them), as in
                # nn.SyncBatchNorm.
                g_gy, g_gyz, M = _sync.reduce_grad_sums(sum_gy, sum_gyz, M, sync_group)
                coef = a * (-1.0 / M)
                b, c = coef * (g_gyz * invstd), coef * g_gy
            else:
                coef = a * (-1.0 / M)  # (few launches: this runs per layer, on [K] vectors)
                b, c = coef * dgamma, coef * dbeta
    dz, gres = B.bn_bwd_apply(grad, out, z, mean, invstd, a, b, c, relu, need_dr, **kw)
    return _conv_grads(dz, gres, x, weight, bn_weight, dgamma, dbeta, grad, stride, padding, dilation, groups,
                       output_mask, shortcut, shortcut_owned)


# conv_bn_relu_fork's join (off: RESNET_FUSED_SHORTCUT_JOIN=0, the fork's alias is x and autograd
# sums; scripts/gpu_proof.sh profiles a training step both ways)
SHORTCUT_JOIN = [os.environ.get("RESNET_FUSED_SHORTCUT_JOIN", "1") != "0"]


def _join_gemm_ok(x, weight, stride, padding, groups) -> bool:
    """Whether x's gradient of this conv is one GEMM, dz [M, K] @ W [K, C], that can accumulate the
    shortcut's gradient (a 1x1, stride-1, unpadded, ungrouped conv: a Bottleneck's first), in a
    dtype whose GEMM has the conv's precision: 16-bit on CUDA (fp32 accumulation either way; an fp32
    GEMM would not follow cuDNN's TF32 setting), any on the CPU."""
    return (weight.shape[2] == 1 and weight.shape[3] == 1 and tuple(stride) == (1, 1)
            and tuple(padding) == (0, 0) and groups == 1
            and (x.device.type == "cpu" or x.dtype in (torch.float16, torch.bfloat16)))


def _sole_storage(t) -> bool:
    # no other tensor (a view) shares t's memory: its own TensorImpl and the storage wrapper this
    # call makes
    return t._base is None and torch._C._storage_Use_Count(t.untyped_storage()._cdata) <= 2


# The Python references and TensorImpl uses a fork's shortcut gradient has in _DirectFn.backward
# when the autograd engine hands it over with no other holder: measured once (_calibrate_refs) by
# a probe node whose backward has the same shape, so that the count does not depend on the
# interpreter's or PyTorch's version.
_REFS: list = [None]


class _RefProbe(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.set_materialize_grads(False)
        return x.clone(), x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout, *rest):
        refs = sys.getrefcount(rest[0])  # (as _DirectFn.backward: first, from the varargs tuple)
        _REFS[0] = (refs, rest[0]._use_count())
        return gout + rest[0]


def _calibrate_refs():
    with torch.enable_grad():
        x = torch.zeros(2, requires_grad=True)
        a, b = _RefProbe.apply(x)
        (a.sum() + (b * 2.0).sum()).backward()  # b's gradient: MulBackward's fresh tensor, no other holder


def _owned(g, refs) -> bool:
    """Whether the shortcut's gradient ``g`` (with ``refs`` Python references counted as the
    probe's were) is held by this backward alone: no extra Python reference (a hook that kept it,
    the caller's own gradient tensor), no other C++ holder (another branch the engine handed the
    same tensor to, a retained .grad), no view or shared storage. Only then may the join
    accumulate into it in place."""
    base_refs, base_uses = _REFS[0]
    return refs <= base_refs and g._use_count() <= base_uses and _sole_storage(g)


def _dgrad_join(dz, x, weight, shortcut, owned):
    """x's gradient of a conv for which _join_gemm_ok, plus ``shortcut``: the GEMM accumulates into
    the shortcut's gradient in place (cuBLAS's beta = 1 on CUDA: one read of it, where autograd's
    accumulation reads the dgrad's output and the shortcut's gradient and writes their sum) where
    this backward is its only holder (``owned``: _owned) and it is a dense channels_last tensor;
    into a copy of it otherwise."""
    N, C, H, W = x.shape
    K = weight.shape[0]
    g = shortcut
    if not (owned and g.dtype == x.dtype and g.stride() == (H * W * C, 1, W * C, C)):
        g = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=CL).copy_(shortcut)
    dz = _in_layout(dz, dz.shape, CL)
    g.permute(0, 2, 3, 1).reshape(N * H * W, C).addmm_(dz.permute(0, 2, 3, 1).reshape(N * H * W, K),
                                                       weight.reshape(K, C))
    return g


def _conv_grads(dz, gres, x, weight, bn_weight, dgamma, dbeta, grad, stride, padding, dilation, groups, output_mask,
                shortcut=None, shortcut_owned=False):
    need_dx, need_dw, need_dg, need_db, need_dr = output_mask
    dx = dw = None
    join = shortcut is not None and need_dx
    gemm = join and _join_gemm_ok(x, weight, stride, padding, groups)
    if join:
        _backends.note(OP + "_backward/shortcut", "dgrad gemm" if gemm else "dgrad + add")
    if gemm:
        dx = _dgrad_join(dz, x, weight, shortcut, shortcut_owned)
    if (need_dx and not gemm) or need_dw:
        dx_, dw, _ = torch.ops.aten.convolution_backward(dz, x, weight, None, stride, padding, dilation, False,
                                                         [0, 0], groups, [need_dx and not gemm, need_dw, False])
        if need_dx and not gemm:
            dx = dx_.add_(shortcut) if join else dx_
    e = lambda: x.new_empty(0)  # noqa: E731  (a fresh one each: outputs may not alias)
    return (
        _in_layout(dx, x.shape, like=x) if need_dx else e(),
        _in_layout(dw, weight.shape, like=weight) if need_dw else e(),
        dgamma.to(bn_weight.dtype) if need_dg else e(),
        dbeta.to(bn_weight.dtype if bn_weight is not None else x.dtype) if need_db else e(),
        _in_layout(gres, grad.shape, CL) if need_dr else e(),
    )


@_bwd_op.register_fake
def _(grad, x, weight, bn_weight, z, out, mean, invstd, stride, padding, dilation, groups, training, relu,
      output_mask, backend, sync_group=0, bn_bias=None, mask_from_z=False):
    e = lambda: x.new_empty(0)  # noqa: E731
    K = weight.shape[0]
    need_dx, need_dw, need_dg, need_db, need_dr = output_mask
    return (
        torch.empty_like(x) if need_dx else e(),
        torch.empty_like(weight) if need_dw else e(),
        x.new_empty(K, dtype=bn_weight.dtype) if need_dg else e(),
        x.new_empty(K, dtype=bn_weight.dtype if bn_weight is not None else x.dtype) if need_db else e(),
        torch.empty(grad.shape, dtype=grad.dtype, device=grad.device, memory_format=CL) if need_dr else e(),
    )


def _setup_context(ctx, inputs, output):
    (x, weight, bn_weight, bn_bias, _rm, _rv, residual, stride, padding, dilation, groups, training, _mom, _eps,
     relu, _store_z, _tf32, backend, sync_group, recompute) = inputs
    out, z, mean, invstd, new_rm, new_rv = output
    # the output only as the ReLU's mask: without a ReLU it is not kept (a downsample's output,
    # the next op's residual, is then freed as soon as that op has run, as in eager PyTorch), nor
    # where the backward recomputes the mask from z (then bn_bias is kept: a parameter)
    # with recompute, not the conv output either: the backward recomputes it from x and weight
    mask_z = _mask_from_z(backend, training, relu, residual, recompute)
    ctx.save_for_backward(x, weight, bn_weight, None if recompute else z, out if relu and not mask_z else None, mean,
                          invstd, bn_bias if mask_z else None)
    ctx.conf = (stride, padding, dilation, groups, training, relu, backend, sync_group, recompute, mask_z)
    ctx.bias_dtype = bn_bias.dtype if bn_bias is not None else None
    ctx.mark_non_differentiable(z, mean, invstd, new_rm, new_rv)


def _grads(ctx, gout, bwd, shortcut=None, shortcut_owned=False):
    x, weight, bn_weight, z, out, mean, invstd, bn_bias = ctx.saved_tensors
    stride, padding, dilation, groups, training, relu, backend, sync_group, recompute, mask_z = ctx.conf
    nig = ctx.needs_input_grad
    if recompute:  # the conv output again, where the backward reads it (cuDNN on CUDA; the same values)
        z = aten_conv(x, weight, stride, padding, dilation, groups) if training or nig[2] or nig[3] else \
            x.new_empty(0)
    if out is None:  # no ReLU or the mask from z: the kernels do not read it (any tensor of its shape stands in)
        out = gout
    mask = [bool(nig[0]), bool(nig[1]), bool(nig[2]), bool(nig[3]), bool(nig[6])]
    grads = [None] * 20
    if any(mask):
        kw = {}
        if shortcut is not None and mask[0]:
            if bwd is _bwd_direct:  # joined in the dgrad (_conv_grads)
                kw, shortcut = {"shortcut": shortcut, "shortcut_owned": shortcut_owned}, None
        res = bwd(gout, x, weight, bn_weight, z, out, mean, invstd, stride, padding, dilation, groups, training, relu,
                  mask, backend, sync_group, bn_bias, mask_z, **kw)
        for slot, need, g in zip((0, 1, 2, 3, 6), mask, res):
            if need:
                grads[slot] = g.to(ctx.bias_dtype) if slot == 3 and ctx.bias_dtype is not None else g
    if shortcut is not None and nig[0]:  # (the backward custom op: autograd's sum, spelled out)
        grads[0] = shortcut if grads[0] is None else grads[0] + shortcut
    return tuple(grads)


def _backward(ctx, gout, *_unused):
    return _grads(ctx, gout, torch.ops.resnet_fused.conv_bn_bwd)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _bwd_direct(grad, x, *rest, **kw):
    with device_guard(x):
        return _backward_impl(grad, x, *rest, **kw)


class _DirectFn(torch.autograd.Function):
    """The eager fast path (see ``_common.direct_ok``): the same forward and backward as the
    custom ops, without their dispatch machinery. With ``fork`` (a 21st input, conv_bn_relu_fork)
    x itself is a seventh output (autograd makes it a view of x) whose gradient the backward adds
    to x's."""

    @staticmethod
    def forward(ctx, *inputs):
        with device_guard(inputs[0]):
            output = _forward(*inputs[:19])
        _setup_context(ctx, inputs[:20], output)
        ctx.fork = len(inputs) > 20 and inputs[20]
        # the other outputs are non-differentiable: no zero-filled gradients for them (and
        # gout stays None when the output itself is unused)
        ctx.set_materialize_grads(False)
        return output + (inputs[0],) if ctx.fork else output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout, *rest):
        # (first: the count of Python references to the shortcut's gradient, before any local names it)
        refs = sys.getrefcount(rest[5]) if ctx.fork and rest[5] is not None else 0
        n_in = 21 if ctx.fork else 20
        shortcut = rest[5] if ctx.fork else None
        # (someone else may hold this gradient: a hook, the caller, another branch of the graph;
        # then the join accumulates into a copy)
        owned = shortcut is not None and _owned(shortcut, refs)
        saved = ctx.saved_tensors
        if gout is None:
            if not (ctx.conf[4] and ctx.conf[7]):  # nothing flows back (but the shortcut's gradient)
                return (shortcut if ctx.needs_input_grad[0] else None,) + (None,) * (n_in - 1)
            # synchronized BatchNorm: every rank must join the backward's collective
            x = saved[0]
            gout = torch.empty(_fwd_shape(x, saved[1], *ctx.conf[:3]), dtype=x.dtype, device=x.device,
                               memory_format=CL).zero_()
        # the backward decides again: compiled autograd or a mode around backward() sees the op
        grads = _grads(ctx, gout, _bwd_direct if direct_ok(gout, shortcut, *saved)
                       else torch.ops.resnet_fused.conv_bn_bwd, shortcut, owned)
        return grads + (None,) if ctx.fork else grads


def _run_fwd(*args, fork=False, direct=None):
    """The forward operator: the custom op, or its fast path for plain eager calls (``fork``: that
    path's seventh output, see _DirectFn; the caller has checked that it is taken; ``direct``: the
    caller's direct_ok of the same tensors)."""
    x, weight, bn_weight, bn_bias, running_mean, running_var, residual = args[:7]
    if fork:
        return _DirectFn.apply(*args, True)
    if direct is None:
        direct = direct_ok(x, weight, bn_weight, bn_bias, running_mean, running_var, residual)
    if direct:
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x, weight, bn_weight, bn_bias, residual)):
            return _DirectFn.apply(*args)
        with device_guard(x):
            return _forward(*args[:19])
    return _fwd_op(*args)


# --- public function ------------------------------------------------------------------------
def _check_vec(name, t, K, x):
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{OP}: {name} must be a Tensor or None, got {type(t).__name__}")
    if t.shape != (K,):
        raise ValueError(f"{OP}: {name} must have shape ({K},) (one value per output channel), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{OP}: {name} must be floating point, got {t.dtype}")
    if t.device != x.device:
        raise RuntimeError(f"{OP}: {name} is on {t.device} but x is on {x.device}")


def conv_bn_relu(x: Tensor, weight: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                 running_mean: Optional[Tensor], running_var: Optional[Tensor], *, stride=1, padding=0, dilation=1,
                 groups: int = 1, training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                 residual: Optional[Tensor] = None, relu: bool = True, process_group=None,
                 recompute: bool = False) -> Tensor:
    """Fused ``relu?(batch_norm(conv2d(x, weight)) + residual?)``.

    Equals ``F.batch_norm(F.conv2d(x, weight, None, stride, padding, dilation, groups),
    running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)``, plus
    ``residual`` when given, then ReLU when ``relu``; when ``training`` the running
    statistics (if given) are updated in place as ``F.batch_norm`` does. Differentiable in
    ``x``, ``weight``, ``bn_weight``, ``bn_bias`` and ``residual``. The output is
    channels_last. Under ``torch.autocast`` the convolution runs in the autocast dtype, as
    ``conv2d`` does (BatchNorm parameters stay as they are).

    ``process_group`` (training only): synchronized BatchNorm. The per-channel statistics
    from the conv epilogue are gathered across the group (one collective) and merged before
    the finalize, and the backward's two per-channel sums are all-reduced (one collective),
    as ``nn.SyncBatchNorm`` does; works on any device and backend, the CPU included.

    ``recompute`` (when a gradient is needed): the raw conv output is not kept for the
    backward, which computes it again from ``x`` and ``weight`` (one more convolution, ATen's):
    less memory for a little time, as activation checkpointing of the conv alone.
    """
    return _layer(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, groups,
                  training, momentum, eps, residual, relu, process_group, recompute, False)[0]


def conv_bn_relu_fork(x: Tensor, weight: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                      running_mean: Optional[Tensor], running_var: Optional[Tensor], *, stride=1, padding=0,
                      dilation=1, groups: int = 1, training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                      residual: Optional[Tensor] = None, relu: bool = True, process_group=None,
                      recompute: bool = False) -> tuple[Tensor, Tensor]:
    """``(conv_bn_relu(x, ...), s)`` where ``s`` holds x's values, for a residual block's shortcut
    (the models' Bottleneck: its first conv and its identity or downsample both read the block's
    input). Where it pays, ``s`` is an output of the layer's autograd node (a view of x) and the
    node adds the gradient reaching ``s`` to x's inside its backward: for a 1x1 stride-1 conv in
    16-bit on CUDA (any dtype on the CPU), the dgrad GEMM accumulates into the shortcut's gradient
    in place, one pass over that gradient instead of autograd's three (read both, write the sum).
    Otherwise (no gradient for x, another geometry or dtype, torch.compile or another path that is
    not the eager fast path, ``torch.use_deterministic_algorithms(True)``, or
    ``RESNET_FUSED_SHORTCUT_JOIN=0``) ``s`` is ``x`` itself and autograd sums the gradients as usual.

    The gradient reaching ``s`` is accumulated into in place only when the backward is its sole
    holder (no hook or caller kept it, no other branch of the graph got the same tensor, no view
    of it exists): otherwise into a copy, so that ``s`` can be used like any tensor. Under autocast
    a float32 ``x`` (converted for the conv) gives ``s = x``."""
    return _layer(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, groups,
                  training, momentum, eps, residual, relu, process_group, recompute, True)


def _layer(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, groups, training,
           momentum, eps, residual, relu, process_group, recompute, fork):
    """conv_bn_relu's checks and dispatch; returns (out, the fork's alias of x, or x)."""
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise TypeError(f"{OP}: x and weight must be Tensors")
    if x.dim() != 4:
        raise ValueError(f"{OP}: expected 4D input (got {x.dim()}D input)")
    if weight.dim() != 4:
        raise ValueError(f"{OP}: expected a 4D weight [K, C/groups, R, S] (got {weight.dim()}D)")
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"{OP}: stride and dilation must be >= 1 and padding >= 0, got stride={stride}, "
                         f"padding={padding}, dilation={dilation}")
    dev_type = x.device.type
    x_in = x  # (the fork's alias, or what it returns instead: the caller's x, not an autocast copy)
    dt = autocast_dtype(dev_type)
    if dt is not None and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        # as conv2d under autocast: float32/16/bf16 inputs run in the autocast dtype, float64 as is
        x, weight = x.to(dt), weight.to(dt)
        if residual is not None and residual.dtype in (torch.float32, torch.float16, torch.bfloat16):
            residual = residual.to(dt)
    if not x.is_floating_point() or x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise RuntimeError(f"{OP}: input must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise RuntimeError(f"{OP}: input type ({x.dtype}) and weight type ({weight.dtype}) should be the same")
    if weight.device != x.device:
        raise RuntimeError(f"{OP}: input is on {x.device} but weight is on {weight.device}")
    N, C, H, W = x.shape
    K, Cg, R, S = weight.shape
    if not isinstance(groups, int) or groups < 1 or C % groups or K % groups:
        raise ValueError(f"{OP}: groups={groups} must be a positive int dividing in ({C}) and out ({K}) channels")
    if Cg * groups != C:
        raise RuntimeError(f"{OP}: given groups={groups}, weight of size {list(weight.shape)}, expected input"
                           f"{list(x.shape)} to have {Cg * groups} channels, but got {C} channels instead")
    P, Q = _out_size(H, W, R, S, stride, padding, dilation)
    if P < 1 or Q < 1:
        raise RuntimeError(f"{OP}: calculated output size ({K}x{P}x{Q}) is too small for input {list(x.shape)}")
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        _check_vec(name, t, K, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{OP}: running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise ValueError(f"{OP}: running_mean and running_var must be defined in evaluation mode")
    if training and N * P * Q <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"torch.Size([{N}, {K}, {P}, {Q}])")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"{OP}: residual must be a Tensor or None")
        if tuple(residual.shape) != (N, K, P, Q):
            raise ValueError(f"{OP}: residual has shape {tuple(residual.shape)} but the conv output has shape "
                             f"{(N, K, P, Q)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"{OP}: residual has dtype {residual.dtype} but the input has dtype {x.dtype}")
        if residual.device != x.device:
            raise RuntimeError(f"{OP}: residual is on {residual.device} but x is on {x.device}")
    allow_tf32 = conv_allows_tf32() and dev_type == "cuda"
    key = runner = None
    if (dev_type in _backends._SELECT_DEVICES and _backends.get_backend() == "auto") or _select.RECORDER is not None:
        key = _select.conv_key(OP, x, weight, stride, padding, dilation, groups, residual is not None, relu,
                               bool(training), allow_tf32)

        def runner(b):  # this call on backend b, into scratch outputs (running statistics untouched)
            def run():
                with torch.no_grad(), device_guard(x):
                    return _forward(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, stride,
                                    padding, dilation, groups, bool(training), float(momentum), float(eps),
                                    bool(relu), False, allow_tf32, b, 0)
            return run
    backend = _backends.resolve(OP, x, key=key, runner=runner, weight=weight,
                                no_timing="synchronized BatchNorm" if training and process_group is not None else None)
    if backend == "cuda":  # (RESNET_FUSED_CUDNN_STEM_PAD, docs/perf.md lead 17; off by default)
        xp, weight = pad_channels_for_cudnn(x, weight, groups)
        if xp is not x:
            _backends.note(OP + "/cudnn_pad", str(xp.shape[1]))
            x = xp
    direct = direct_ok(x, weight, bn_weight, bn_bias, running_mean, running_var, residual)
    # the fork's join (conv_bn_relu_fork): on the eager fast path, where x's gradient is one GEMM
    # (not under torch.use_deterministic_algorithms: PyTorch refuses cuBLAS GEMMs there unless
    # CUBLAS_WORKSPACE_CONFIG is set, where cuDNN's dgrad and autograd's sum are deterministic as they are)
    # (and not where autocast converted x: the alias would be a converted copy, not x)
    fork = (fork and SHORTCUT_JOIN[0] and direct and torch.is_grad_enabled() and x.requires_grad and x is x_in
            and _join_gemm_ok(x, weight, stride, padding, groups)
            and not torch.are_deterministic_algorithms_enabled())
    if fork and _REFS[0] is None:
        _calibrate_refs()
    if (training and backend == "cuda" and process_group is None and _cuda_impl.CPP_TRAIN[0]
            and _cuda_impl.CPP_NODE[0] and direct
            and (running_mean is None or (running_mean.is_contiguous() and running_var.is_contiguous()))):
        # the eager fast path of the CUDA backend's training layer: one operator with a C++ autograd
        # node, running statistics updated in place (cuda.py, CPP_NODE; it sets the device itself)
        _backends.note(OP, backend)
        if fork:
            return _cuda_impl.train_layer_fork(x, weight, bn_weight, bn_bias, running_mean, running_var, residual,
                                               stride, padding, dilation, groups, float(momentum), float(eps),
                                               bool(relu), bool(recompute))
        return (_cuda_impl.train_layer(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, stride,
                                       padding, dilation, groups, float(momentum), float(eps), bool(relu),
                                       bool(recompute)), x_in)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bn_weight, bn_bias, residual))
    outs = _run_fwd(
        x, weight, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding, dilation, groups,
        bool(training), float(momentum), float(eps), bool(relu), needs_grad and not recompute, allow_tf32, backend,
        _sync.group_key(process_group) if training else 0, bool(recompute), fork=fork, direct=direct)
    out, _z, _mean, _invstd, new_rm, new_rv = outs[:6]
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(new_rm)
            running_var.copy_(new_rv)
    if fork:
        _backends.note(OP + "/fork", backend)
        return out, outs[6]
    return out, x_in
