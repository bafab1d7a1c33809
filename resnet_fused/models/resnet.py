"""torchvision's ResNet family, with every conv + BatchNorm (+ residual) + ReLU run as one
fused operator.

The classes subclass torchvision's ``ResNet``, ``BasicBlock`` and ``Bottleneck`` and only
replace ``forward``: constructor arguments, module names, parameters, buffers and hence the
state_dict are torchvision's own, and :func:`fuse` converts an existing torchvision model
in place by switching the classes of its blocks (sharing every parameter).

Per conv + BatchNorm pair:
  * training, or eval with gradients needed: ``conv_bn_relu`` (batch statistics and
    running-stat updates exactly as ``nn.BatchNorm2d``, including ``momentum=None``).
  * eval without gradients: the BatchNorm folded into the conv weight once, in fp32, and
    cached on the conv module; refreshed when any of the tensors involved changes (version
    counters, storage, dtype), so a forward does no host work but launching kernels.
A block whose norm layer is not ``nn.BatchNorm2d`` / ``FrozenBatchNorm2d``, or whose convs
are not plain bias-free zero-padded convs, runs torchvision's own forward instead.
"""
from __future__ import annotations

import contextlib
import os
import weakref
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor
from torchvision import models as tvm
from torchvision.models import resnet as tvr
from torchvision.ops.misc import FrozenBatchNorm2d

from .. import _select
from ..ops._common import autocast_dtype
from ..ops.conv_bn_relu import conv_bn_relu, conv_bn_relu_fork
from ..ops.conv_bn_relu.inference import conv_affine_act, conv_affine_act_maxpool, fold_bn, owned_bias
from ..ops.max_pool import max_pool2d

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "SyncBatchNorm2d", "fuse", "convert_sync_batchnorm",
           "clear_fold_cache", "set_recompute", "get_recompute", "use_recompute"]


# --- which conv outputs a training step recomputes instead of keeping ---------------------------
RECOMPUTE_POLICIES = ("none", "expansion", "all")


def _check_policy(policy, source):
    if not isinstance(policy, str) or policy.strip().lower() not in RECOMPUTE_POLICIES:
        raise ValueError(f"{source}: unknown recompute policy {policy!r}; expected one of "
                         f"{', '.join(RECOMPUTE_POLICIES)}")
    return policy.strip().lower()


_recompute = [_check_policy(os.environ.get("RESNET_FUSED_RECOMPUTE", "expansion"), "RESNET_FUSED_RECOMPUTE")]


def set_recompute(policy: str) -> None:
    """Which conv outputs the fused models' training steps recompute in the backward instead of
    keeping from the forward (``conv_bn_relu(recompute=True)``):

    * ``"expansion"`` (default): the 1x1 stride-1 convs that widen the channels 4x or more (a
      Bottleneck's last conv, ResNet-50's first downsample): their outputs are the largest
      activations and the cheapest to recompute (a memory-bound GEMM from a quarter of the bytes);
      for ResNet-50 at batch 256 in bf16 about 3.2 GB of saved activations for one more 1x1 conv
      per block in the backward;
    * ``"all"``: every conv (the most memory saved, one more convolution per layer);
    * ``"none"``: keep every conv output (the fastest backward).

    Also the environment variable ``RESNET_FUSED_RECOMPUTE``. Inference is not affected."""
    _recompute[0] = _check_policy(policy, "set_recompute")


def get_recompute() -> str:
    """The recompute policy in force (see :func:`set_recompute`)."""
    return _recompute[0]


@contextlib.contextmanager
def use_recompute(policy: str):
    """Context manager: :func:`set_recompute` for the enclosed calls, then restore."""
    prev = _recompute[0]
    _recompute[0] = _check_policy(policy, "use_recompute")
    try:
        yield
    finally:
        _recompute[0] = prev


def _recomputes(conv) -> bool:
    p = _recompute[0]
    if p == "expansion":
        return (tuple(conv.kernel_size) == (1, 1) and tuple(conv.stride) == (1, 1) and conv.groups == 1
                and conv.out_channels >= 4 * conv.in_channels)
    return p == "all"


# --- one conv + norm pair ---------------------------------------------------------------------
def _fusable_conv(conv) -> bool:
    return (type(conv) is nn.Conv2d and conv.bias is None and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple))


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose batch statistics are merged across ``process_group`` (None: the
    default group) in training, on any device — the CPU (gloo) included, where torch's
    ``nn.SyncBatchNorm`` refuses to run (and DistributedDataParallel refuses CPU modules that
    hold one). Same parameters, buffers and state_dict as ``nn.BatchNorm2d``.

    Inside a fused block it is fused with its conv; standing alone it runs as the fused
    operator with an identity depthwise 1x1 conv (exact: every product is by 1.0)."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or x.dim() != 4:
            return super().forward(x)
        use_batch, momentum, rm, rv = _bn_state(self)
        C = x.shape[1]
        eye = torch.ones(C, 1, 1, 1, dtype=x.dtype, device=x.device)
        with _no_autocast(x):  # a BatchNorm: it runs in the input's dtype, not the autocast dtype
            return conv_bn_relu(x, eye, self.weight, self.bias, rm, rv, groups=C, training=use_batch,
                                momentum=momentum, eps=self.eps, relu=False, process_group=_group_of(self))


def _group_of(bn):
    return bn.process_group if bn.process_group is not None else True  # True: the default group


_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm, SyncBatchNorm2d, FrozenBatchNorm2d)


def _hooked(m) -> bool:
    # Hooks (forward, pre-forward, pruning's reparametrisation) must see the module run: such
    # a pair runs torchvision's own forward.
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _global_hooks() -> bool:
    from torch.nn.modules import module as _m

    return bool(_m._global_forward_hooks or _m._global_forward_pre_hooks or _m._global_backward_hooks
                or getattr(_m, "_global_backward_pre_hooks", None))


def _fusable(conv, bn) -> bool:
    return _fusable_conv(conv) and type(bn) in _NORMS and not (_hooked(conv) or _hooked(bn))


def _bn_state(bn):
    """(use batch statistics, momentum factor, running_mean, running_var) as nn.BatchNorm2d's
    forward computes them, including its num_batches_tracked side effect."""
    if isinstance(bn, FrozenBatchNorm2d):
        return False, 0.0, bn.running_mean, bn.running_var
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return use_batch, factor, (bn.running_mean if track else None), (bn.running_var if track else None)


def _bn_weight(bn):
    return getattr(bn, "weight", None), getattr(bn, "bias", None)


def _grad_needed(x, conv, bn, residual=None) -> bool:
    if not torch.is_grad_enabled():
        return False
    g, b = _bn_weight(bn)
    return any(t is not None and t.requires_grad for t in (x, conv.weight, g, b, residual))


# Folded weights per conv module, outside the module so that they are neither pickled nor
# saved with it, and dropped with it.
_FOLD_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def clear_fold_cache(model: Optional[nn.Module] = None) -> None:
    """Forget the cached folded weights (of ``model``'s convs, or of every model).

    The cache is refreshed automatically when a parameter or buffer changes through PyTorch
    (optimizer steps, ``load_state_dict``, in-place ops under ``no_grad``: version counters),
    is moved or is replaced. Writes through ``.data`` (and ``vector_to_parameters``) bypass
    the version counters: call this after them."""
    if model is None:
        _FOLD_CACHE.clear()
        _SUM_CACHE.clear()
        return
    for m in model.modules():
        _FOLD_CACHE.pop(m, None)
        _SUM_CACHE.pop(m, None)


def _folded(conv, bn, dtype):
    """The cached (weight', bias) for this conv + BatchNorm in ``dtype``."""
    g, b = _bn_weight(bn)
    srcs = [conv.weight, g, b, bn.running_mean, bn.running_var]
    if torch.compiler.is_compiling() or any(t is not None and t.is_inference() for t in srcs):
        # compiled: let the compiler fold (and fuse) it in the graph; inference tensors carry
        # no version counter, so nothing could tell when a cache went stale
        return fold_bn(conv.weight, g, b, bn.running_mean, bn.running_var, bn.eps, dtype)
    key = (dtype, bn.eps) + tuple((t._version, t.data_ptr(), t.dtype, t.device) if t is not None else None
                                  for t in srcs)
    cache = _FOLD_CACHE.get(conv)
    # the same tensor objects too (a new tensor could reuse a freed address with version 0)
    if cache is None or cache[0] != key or any(r() is not t for r, t in zip(cache[1], srcs) if t is not None):
        refs = [weakref.ref(t) if t is not None else None for t in srcs]
        w, bias = fold_bn(conv.weight, g, b, bn.running_mean, bn.running_var, bn.eps, dtype)
        cache = (key, refs, w, owned_bias(bias))
        _FOLD_CACHE[conv] = cache
    return cache[2], cache[3]


def _autocast_dtype(x):
    """The dtype autocast runs a conv on ``x`` in (it casts float32/16/bf16, never float64),
    or None when autocast leaves ``x`` as it is."""
    if x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return autocast_dtype(x.device.type)
    return None


def _no_autocast(x):
    import contextlib

    if autocast_dtype(x.device.type) is None:
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)


def _fold_dtype(conv: nn.Conv2d, bn: nn.Module, x: Tensor, residual: Optional[Tensor] = None):
    """The dtype in which this pair runs with its BatchNorm folded (eval, running statistics, no
    gradient needed), or None when it runs as ``conv_bn_relu``."""
    # (as _bn_state decides, without its side effect: it is only called in training)
    use_batch = not isinstance(bn, FrozenBatchNorm2d) and (
        bn.training or (bn.running_mean is None and bn.running_var is None))
    if use_batch or _grad_needed(x, conv, bn, residual):
        return None
    if x.dim() != 4 or x.shape[1] != conv.in_channels:
        return None
    dt = _autocast_dtype(x)
    if dt is None:  # no autocast: conv2d's own dtype rule
        dt = x.dtype
        if x.dtype != conv.weight.dtype and x.is_floating_point():
            raise RuntimeError(f"Input type ({x.dtype}) and weight type ({conv.weight.dtype}) should be the same")
    if dt not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        return None
    return dt


def _name_layer(conv):
    if _select.RECORDER is not None:  # resnet_fused.explain(): name the layer of the next decision
        _select.RECORDER.layer = _select.RECORDER.names.get(id(conv), "?")


def conv_bn(conv: nn.Conv2d, bn: nn.Module, x: Tensor, residual: Optional[Tensor] = None, relu: bool = True) -> Tensor:
    """``relu?(bn(conv(x)) + residual?)`` through the fused operators (the pair must be fusable)."""
    return _conv_bn(conv, bn, x, residual, relu, False)


def conv_bn_fork(conv: nn.Conv2d, bn: nn.Module, x: Tensor, relu: bool = True) -> tuple[Tensor, Tensor]:
    """``(relu?(bn(conv(x))), s)``, ``s`` the block's input for its shortcut: through
    ``conv_bn_relu_fork`` where a gradient flows, so that the shortcut's gradient is added to x's
    inside this layer's backward (in its dgrad GEMM for a 1x1 conv: a Bottleneck's first)."""
    return _conv_bn(conv, bn, x, None, relu, True)


def _conv_bn(conv, bn, x, residual, relu, fork):
    _name_layer(conv)
    dt = _fold_dtype(conv, bn, x, residual)
    if dt is not None:
        w, bias = _folded(conv, bn, dt)
        if residual is not None and residual.dtype != dt:
            residual = residual.to(dt)
        out = conv_affine_act(x if x.dtype == dt else x.to(dt), w, None, bias, residual, conv.stride, conv.padding,
                              conv.dilation, conv.groups, relu)
        return (out, x) if fork else out
    use_batch, momentum, rm, rv = _bn_state(bn)
    g, b = _bn_weight(bn)
    group = _group_of(bn) if use_batch and type(bn) in (nn.SyncBatchNorm, SyncBatchNorm2d) else None
    return (conv_bn_relu_fork if fork else conv_bn_relu)(
        x, conv.weight, g, b, rm, rv, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
        groups=conv.groups, training=use_batch, momentum=momentum, eps=bn.eps, residual=residual, relu=relu,
        process_group=group, recompute=_recomputes(conv))


def conv_bn_maxpool(conv: nn.Conv2d, bn: nn.Module, x: Tensor, maxpool: nn.Module) -> Tensor:
    """``maxpool(relu(bn(conv(x))))`` for the stem (``maxpool`` one that _stem_pool accepts): in
    inference with the BatchNorm folded, one operator whose Triton kernel pools in its epilogue
    (conv_affine_act_maxpool); otherwise (training) conv_bn, then ``functional.max_pool2d``, which
    keeps one byte per pooled value for the backward instead of the input and an int64 index."""
    dt = _fold_dtype(conv, bn, x)
    if dt is None:
        return max_pool2d(conv_bn(conv, bn, x, relu=True), 3, 2, 1)
    _name_layer(conv)
    w, bias = _folded(conv, bn, dt)
    return conv_affine_act_maxpool(x if x.dtype == dt else x.to(dt), w, None, bias, conv.stride, conv.padding,
                                   conv.dilation, conv.groups, True)


def _stem_pool(m: nn.Module) -> bool:
    """torchvision's stem pool: nn.MaxPool2d(kernel_size=3, stride=2, padding=1), unhooked."""
    def two(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    return (type(m) is nn.MaxPool2d and two(m.kernel_size) == (3, 3) and two(m.stride) == (2, 2)
            and two(m.padding) == (1, 1) and two(m.dilation) == (1, 1) and not m.ceil_mode and not m.return_indices
            and not _hooked(m))


def _fusable_downsample(ds: Optional[nn.Module]) -> bool:
    # (hooks on the downsample Sequential itself must see it run, as on its conv and norm)
    return isinstance(ds, nn.Sequential) and len(ds) == 2 and _fusable(ds[0], ds[1]) and not _hooked(ds)


def _downsample(ds: Optional[nn.Module], x: Tensor) -> Tensor:
    if ds is None:
        return x
    if _fusable_downsample(ds):
        return conv_bn(ds[0], ds[1], x, relu=False)
    return ds(x)


# The eval bias of a block's last conv with its downsample's BatchNorm shift added, per last conv.
_SUM_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _summed_bias(conv, bias, ds_bias):
    if torch.compiler.is_compiling():
        return bias + ds_bias
    c = _SUM_CACHE.get(conv)
    if c is None or c[0]() is not bias or c[1]() is not ds_bias:  # (the folded biases are cached objects)
        c = (weakref.ref(bias), weakref.ref(ds_bias), owned_bias(bias + ds_bias))
        _SUM_CACHE[conv] = c
    return c[2]


def _block_tail(conv: nn.Conv2d, bn: nn.Module, out: Tensor, ds: Optional[nn.Module], x: Tensor) -> Tensor:
    """A block's last conv + BatchNorm + shortcut + ReLU. In eval without gradients, with a fusable
    downsample, the downsample conv runs without a bias and its BatchNorm shift joins the last
    conv's bias (``relu(conv(out) + b + conv_ds(x) + b_ds)``): on the CUDA backend the downsample
    is then cuDNN's conv alone instead of a conv and a bias pass over its output."""
    if _fusable_downsample(ds):
        dt = _fold_dtype(ds[0], ds[1], x)
        if dt is not None and _fold_dtype(conv, bn, out, x) == dt:
            w_ds, b_ds = _folded(ds[0], ds[1], dt)
            w, b = _folded(conv, bn, dt)
            c = ds[0]
            _name_layer(c)
            identity = conv_affine_act(x.to(dt), w_ds, None, None, None, c.stride, c.padding, c.dilation, c.groups,
                                       False)
            _name_layer(conv)
            return conv_affine_act(out.to(dt), w, None, _summed_bias(conv, b, b_ds), identity, conv.stride,
                                   conv.padding, conv.dilation, conv.groups, True)
    return conv_bn(conv, bn, out, residual=_downsample(ds, x), relu=True)


def _like_input(out: Tensor, x: Tensor) -> Tensor:
    """The fused ops write channels_last; a block fed a contiguous (NCHW) tensor returns one,
    as torchvision's would (``.view`` on it works). Inside a fused ResNet every block input
    is already channels_last (the stem writes it), so this costs nothing there."""
    if x.dim() == 4 and x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last):
        return out.contiguous()
    return out


# --- blocks -------------------------------------------------------------------------------------
class BasicBlock(tvr.BasicBlock):
    """torchvision's BasicBlock: conv-bn-relu, conv-bn (+identity) -relu, as two fused ops."""

    def forward(self, x: Tensor) -> Tensor:
        if not (_fusable(self.conv1, self.bn1) and _fusable(self.conv2, self.bn2)) or _global_hooks():
            return super().forward(x)
        out = conv_bn(self.conv1, self.bn1, x, relu=True)
        return _like_input(_block_tail(self.conv2, self.bn2, out, self.downsample, x), x)


class Bottleneck(tvr.Bottleneck):
    """torchvision's Bottleneck (stride on the 3x3, ResNet v1.5), as three fused ops."""

    def forward(self, x: Tensor) -> Tensor:
        if not (_fusable(self.conv1, self.bn1) and _fusable(self.conv2, self.bn2)
                and _fusable(self.conv3, self.bn3)) or _global_hooks():
            return super().forward(x)
        # the shortcut reads the block's input through conv1's fork: its gradient joins x's in conv1's
        # backward (the 1x1 dgrad GEMM accumulates it) instead of in an autograd sum
        out, shortcut = conv_bn_fork(self.conv1, self.bn1, x, relu=True)
        out = conv_bn(self.conv2, self.bn2, out, relu=True)
        return _like_input(_block_tail(self.conv3, self.bn3, out, self.downsample, shortcut), x)


_BLOCKS = {tvr.BasicBlock: BasicBlock, tvr.Bottleneck: Bottleneck}


class ResNet(tvr.ResNet):
    """torchvision's ResNet with a fused stem (conv 7x7 + BN + ReLU); torchvision blocks
    passed as ``block`` are replaced by the fused ones."""

    def __init__(self, block, layers, *args, **kwargs):
        super().__init__(_BLOCKS.get(block, block), layers, *args, **kwargs)

    def _forward_impl(self, x: Tensor) -> Tensor:
        if _fusable(self.conv1, self.bn1) and isinstance(self.relu, nn.ReLU) and not _hooked(self.relu):
            if _stem_pool(self.maxpool) and not _global_hooks():
                x = conv_bn_maxpool(self.conv1, self.bn1, x, self.maxpool)
            else:
                x = self.maxpool(conv_bn(self.conv1, self.bn1, x, relu=True))
        else:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def fuse(model: nn.Module) -> nn.Module:
    """Convert, in place, a torchvision ResNet (or any module holding torchvision
    BasicBlock / Bottleneck modules) to the fused classes. Parameters are shared (nothing
    is copied), the state_dict is unchanged, and the same object is returned."""
    for m in model.modules():
        t = type(m)
        if t in _BLOCKS:
            m.__class__ = _BLOCKS[t]
        elif t is tvr.ResNet:
            m.__class__ = ResNet
    return model


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` with :class:`SyncBatchNorm2d` (sharing its
    parameters and buffers: the state_dict is unchanged) and fuse the blocks. In training the
    batch statistics are then merged across ``process_group`` (default: the whole world):
    one collective per BatchNorm layer in the forward (gathering each rank's count, mean
    and M2 from the conv epilogue) and one in the backward, on any device and backend, the
    CPU (gloo) included. Returns the model (a new object only if ``model`` itself is a
    BatchNorm2d, as torch's converter does)."""
    if type(model) is nn.BatchNorm2d:
        new = SyncBatchNorm2d(model.num_features, model.eps, model.momentum, model.affine,
                              model.track_running_stats, process_group=process_group)
        new.weight, new.bias = model.weight, model.bias
        new.running_mean, new.running_var = model.running_mean, model.running_var
        new.num_batches_tracked = model.num_batches_tracked
        new.train(model.training)
        return new
    for name, child in model.named_children():
        new = convert_sync_batchnorm(child, process_group)
        if new is not child:
            setattr(model, name, new)
    return fuse(model)


# --- constructors -----------------------------------------------------------------------------
def _is_path(weights) -> bool:
    return isinstance(weights, os.PathLike) or (isinstance(weights, str) and (
        os.path.sep in weights or weights.endswith((".pt", ".pth")) or os.path.exists(weights)))


def _build(tv_builder, weights, progress, kwargs):
    if weights is not None and _is_path(weights):
        model = tv_builder(weights=None, progress=progress, **kwargs)
        state = torch.load(os.fspath(weights), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        model.load_state_dict(state, strict=True)
    else:  # None, a torchvision weights enum, or its name: torchvision resolves (and downloads) it
        model = tv_builder(weights=weights, progress=progress, **kwargs)
    return fuse(model)


def _make(name):
    tv_builder = getattr(tvm, name)

    def builder(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
        return _build(tv_builder, weights, progress, kwargs)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (f"``torchvision.models.{name}`` on the fused operators. Same arguments: ``weights`` (a "
                       f"torchvision weights enum or its name, or a path to a saved state_dict), ``progress`` "
                       f"and ``**kwargs`` for :class:`ResNet` (num_classes, zero_init_residual, groups, "
                       f"width_per_group, replace_stride_with_dilation, norm_layer).")
    return builder


resnet18 = _make("resnet18")
resnet34 = _make("resnet34")
resnet50 = _make("resnet50")
resnet101 = _make("resnet101")
resnet152 = _make("resnet152")
resnext50_32x4d = _make("resnext50_32x4d")
resnext101_32x8d = _make("resnext101_32x8d")
resnext101_64x4d = _make("resnext101_64x4d")
wide_resnet50_2 = _make("wide_resnet50_2")
wide_resnet101_2 = _make("wide_resnet101_2")
