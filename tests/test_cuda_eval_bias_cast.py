"""The CUDA backend's eval path keeps the bias cast that cuDNN's fused conv + bias + ReLU takes.

cuDNN's fused graph takes the bias in the activation dtype; the models' folded biases are fp32
(the accumulator dtype). ``resnet_fused_C::conv_bias_act`` casts when it is not given the cast
(``bias_lowp``): one small kernel per layer and call, a kernel per layer in a batch-1 CUDA graph.
The models' fold caches mark their biases (``inference.owned_bias``) and the cast is kept with
them (``cuda.LOWP_CACHE``). Run on the CPU over a stand-in of the op that records what it was
given (the op itself is CUDA-only: its GPU tests are in test_cudnn_fused.py).
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused import _ext
from resnet_fused.ops.conv_bn_relu import cuda as cuda_impl
from resnet_fused.ops.conv_bn_relu.inference import conv_affine_act

from conftest import REQUIRE_EXT, cpu_max_pool_kernels, route_to_cuda_backend

pytestmark = pytest.mark.skipif(not _ext.LOADED and not REQUIRE_EXT, reason=f"CUDA extension not loaded: {_ext.ERROR}")


@contextlib.contextmanager
def conv_bias_act_on_cpu():
    """A CPU conv_bias_act (the op's arithmetic: bias in x's dtype on the fused path, the given
    cast when there is one); yields the calls as (bias, bias_lowp)."""
    calls = []
    lib = torch.library.Library("resnet_fused_C", "IMPL")

    def impl(x, w, bias, residual, stride, padding, dilation, groups, relu, bias_lowp=None):
        calls.append((bias, bias_lowp))
        y = F.conv2d(x, w, None, stride, padding, dilation, groups)
        if bias is not None:
            b = bias_lowp if bias_lowp is not None else bias.to(x.dtype)
            assert b.dtype == x.dtype and b.shape == (w.shape[0],)
            y = y + b.view(1, -1, 1, 1)
        if residual is not None:
            y = y + residual
        if relu:
            y = torch.relu(y)
        return y.contiguous(memory_format=torch.channels_last), 0 if bias is not None and relu else 2

    try:
        lib.impl("conv_bias_act", impl, "CPU")
        yield calls
    finally:
        lib._destroy()


@pytest.fixture
def cuda_eval_on_cpu(monkeypatch):
    route_to_cuda_backend(monkeypatch)
    with conv_bias_act_on_cpu() as calls, cpu_max_pool_kernels():
        yield calls


def _model():
    torch.manual_seed(0)
    m = resnet_fused.resnet18(num_classes=10).eval()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
            mod.bias.data.normal_(0, 0.1)
    return m.to(torch.bfloat16).to(memory_format=torch.channels_last)


def test_models_cast_each_bias_once(cuda_eval_on_cpu):
    calls = cuda_eval_on_cpu
    m = _model()
    x = torch.randn(2, 3, 32, 32).to(torch.bfloat16).to(memory_format=torch.channels_last)
    with torch.no_grad(), resnet_fused.use_backend("cuda"):
        first = m(x)
        seen = list(calls)
        calls.clear()
        second = m(x)
    with_bias = [(b, lp) for b, lp in seen if b is not None]
    # ResNet-18: 20 convs, 3 downsample shortcuts run as the conv alone (their shift joins the block's bias)
    assert len(seen) == 20 and len(with_bias) == 17
    assert all(lp is not None and lp.dtype == torch.bfloat16 and torch.equal(lp, b.to(torch.bfloat16))
               for b, lp in with_bias)
    # the second forward: the same cast tensors, none made again
    assert [id(lp) for b, lp in calls if b is not None] == [id(lp) for _, lp in with_bias]
    assert torch.equal(first, second)
    # the same logits as with the cast made by the op on every call
    with torch.no_grad(), resnet_fused.use_backend("cuda"):
        resnet_fused.clear_fold_cache(m)
        cuda_impl_lowp = cuda_impl._bias_lowp
        try:
            cuda_impl._bias_lowp = lambda shift, dt: None
            calls.clear()
            uncached = m(x)
        finally:
            cuda_impl._bias_lowp = cuda_impl_lowp
    assert all(lp is None for _, lp in calls)
    assert torch.equal(uncached, first)


def test_a_changed_batchnorm_gets_a_new_cast(cuda_eval_on_cpu):
    calls = cuda_eval_on_cpu
    m = _model()
    x = torch.randn(2, 3, 32, 32).to(torch.bfloat16).to(memory_format=torch.channels_last)
    with torch.no_grad(), resnet_fused.use_backend("cuda"):
        m(x)
        before = [lp for b, lp in calls if b is not None]
        m.bn1.bias.add_(1.0)  # the stem's BatchNorm: an in-place change (version counter)
        calls.clear()
        m(x)
        after = [lp for b, lp in calls if b is not None]
        ref = copy.deepcopy(m)
        resnet_fused.clear_fold_cache(ref)
        calls.clear()
        ref(x)
    assert after[0] is not before[0] and all(a is b for a, b in zip(after[1:], before[1:]))
    assert torch.equal(after[0], [lp for b, lp in calls if b is not None][0])


def test_a_callers_bias_is_cast_by_the_op(cuda_eval_on_cpu):
    """A bias the caller owns (they may write it through .data, which no version counter sees) is
    never cached: the op casts it on each call."""
    calls = cuda_eval_on_cpu
    x = torch.randn(2, 8, 6, 6).to(torch.bfloat16).to(memory_format=torch.channels_last)
    w = torch.randn(16, 8, 3, 3).to(torch.bfloat16).to(memory_format=torch.channels_last)
    bias = torch.randn(16)
    with torch.no_grad(), resnet_fused.use_backend("cuda"):
        a = conv_affine_act(x, w, None, bias, None, (1, 1), (1, 1), (1, 1), 1, True)
        bias.data.add_(1.0)
        b = conv_affine_act(x, w, None, bias, None, (1, 1), (1, 1), (1, 1), 1, True)
    assert [lp for _, lp in calls] == [None, None]
    assert not hasattr(bias, cuda_impl.LOWP_CACHE)
    assert not torch.equal(a, b)


def test_the_eval_stem_pools_with_our_kernel_without_codes(monkeypatch):
    """The CUDA backend's inference stem: cuDNN's conv (a CPU stand-in here), then our pool kernel
    asked for the values alone (PyTorch's CUDA pool would also write int64 indices)."""
    route_to_cuda_backend(monkeypatch)
    m = _model()
    x = torch.randn(2, 3, 32, 32).to(torch.bfloat16).to(memory_format=torch.channels_last)
    with conv_bias_act_on_cpu(), cpu_max_pool_kernels() as pool:
        with torch.no_grad(), resnet_fused.use_backend("cuda"), resnet_fused.dispatch_trace() as trace:
            m(x)
    assert pool == [("fwd", False)]
    assert ("conv_affine_act/maxpool", "max_pool2d") in trace


@pytest.mark.parametrize("pad", [4, 8])
def test_the_stem_padded_for_cudnn_gives_the_same_result(monkeypatch, pad):
    """RESNET_FUSED_CUDNN_STEM_PAD (docs/perf.md lead 17): the CUDA backend's stem conv sees 4 or 8
    channels (zeros added to the input and the weight), with the unpadded result; other convs as
    they are. Eval (the folded stem and its pool), over the CPU stand-ins."""
    from resnet_fused.ops import _common

    route_to_cuda_backend(monkeypatch)
    m = _model().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64).to(memory_format=torch.channels_last)
    outs = {}
    for p in (0, pad):
        monkeypatch.setattr(_common, "CUDNN_STEM_PAD", [p])
        with conv_bias_act_on_cpu() as calls, cpu_max_pool_kernels():
            with torch.no_grad(), resnet_fused.use_backend("cuda"), resnet_fused.dispatch_trace() as trace:
                outs[p] = m(x)
        padded = [t for op, t in trace if op == "conv_affine_act/cudnn_pad"]
        assert padded == ([str(pad)] if p else []), trace
        assert len(calls) == 20
    torch.testing.assert_close(outs[pad], outs[0], rtol=1e-12, atol=1e-12)


def test_a_bad_stem_pad_setting_is_refused():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "import resnet_fused"], capture_output=True, text=True, timeout=120,
                       env=dict(__import__("os").environ, RESNET_FUSED_CUDNN_STEM_PAD="3"))
    assert r.returncode != 0 and "RESNET_FUSED_CUDNN_STEM_PAD: expected 0 (off), 4 or 8" in r.stderr
