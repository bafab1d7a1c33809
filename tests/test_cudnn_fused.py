"""The CUDA backend's eval path: conv + bias (+ residual) + ReLU as one cuDNN fused call
(csrc/conv_fused.cpp, resnet_fused_C::conv_bias_act), with ATen conv + our epilogue where
cuDNN is not asked (no ReLU, float64, deterministic mode) or refuses.

Parity is judged against float64 truth relative to PyTorch's own error in the same precision
(F.conv2d in that dtype, then the bias, residual and ReLU): max|ours - truth| <= 2 max|torch -
truth| + 1e-3 max|truth|. Which path ran is read from dispatch_trace (the note
"conv_affine_act/cuda": "cudnn-fused" or "conv+epilogue").
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused.ops.conv_bn_relu.cuda import FUSED_PATH
from resnet_fused.ops.conv_bn_relu.inference import conv_affine_act

from conftest import NO_CUDA

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(NO_CUDA, reason="no CUDA GPU")]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
# name: (N, C, K, H, kernel, stride, groups, residual)
CASES = {
    "3x3": (4, 32, 64, 14, 3, 1, 1, False),
    "1x1+res": (4, 64, 128, 14, 1, 1, 1, True),
    "3x3s2": (4, 32, 64, 15, 3, 2, 1, False),
    "3x3s2+res": (4, 32, 64, 15, 3, 2, 1, True),
    "3x3g4": (4, 64, 64, 14, 3, 1, 4, False),
    "odd": (3, 24, 40, 9, 3, 1, 1, True),
}


def _skip_without_ext():
    if "cuda" not in resnet_fused.available_backends():
        pytest.skip("CUDA extension not loaded")


def make(case, dtype, seed=0):
    N, C, K, H, k, s, g, res = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, H, generator=gen)
    w = torch.randn(K, C // g, k, k, generator=gen) * (C // g * k * k) ** -0.5
    bias = torch.randn(K, generator=gen) * 0.5
    P = (H + 2 * (k // 2) - k) // s + 1
    r = torch.randn(N, K, P, P, generator=gen) if res else None
    cl = torch.channels_last
    dev = "cuda"
    t = lambda v: v.to(dev, dtype).to(memory_format=cl) if v is not None else None  # noqa: E731
    conv = dict(stride=(s, s), padding=(k // 2, k // 2), dilation=(1, 1), groups=g)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return t(x), t(w), bias.to(dev, acc), t(r), conv


def eager(x, w, bias, r, conv, relu, dtype):
    y = F.conv2d(x.to(dtype), w.to(dtype), None, conv["stride"], conv["padding"], conv["dilation"], conv["groups"])
    y = y.to(bias.dtype) + bias.view(1, -1, 1, 1)
    if r is not None:
        y = y + r.to(y.dtype)
    return (torch.relu(y) if relu else y).to(dtype)


def ours(x, w, bias, r, conv, relu):
    with resnet_fused.use_backend("cuda"), resnet_fused.dispatch_trace() as trace:
        out = conv_affine_act(x, w, None, bias, r, conv["stride"], conv["padding"], conv["dilation"], conv["groups"],
                              relu)
    paths = [b for op, b in trace if op == FUSED_PATH]
    assert ("conv_affine_act", "cuda") in trace and len(paths) == 1, trace
    return out, paths[0]


def check(out, x, w, bias, r, conv, relu, dtype):
    truth = eager(x.double(), w.double(), bias.double(), r.double() if r is not None else None, conv, relu,
                  torch.float64)
    torch_out = eager(x, w, bias, r, conv, relu, dtype)
    assert out.dtype == dtype and out.shape == truth.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    scale = truth.abs().max().item()
    e_ours = (out.double() - truth).abs().max().item()
    e_torch = (torch_out.double() - truth).abs().max().item()
    assert e_ours <= 2 * e_torch + 1e-3 * scale, f"ours {e_ours} vs PyTorch's {e_torch} (scale {scale})"


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_cudnn_fused_eval_parity(case, dtype):
    _skip_without_ext()
    dt = DTYPES[dtype]
    x, w, bias, r, conv = make(case, dt)
    out, path = ours(x, w, bias, r, conv, relu=True)
    assert path in ("cudnn-fused", "conv+epilogue")
    check(out, x, w, bias, r, conv, True, dt)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_cudnn_fused_path_runs_for_resnet_layers(dtype):
    # the point of the path: cuDNN takes ResNet's plain 3x3 and 1x1 + residual layers in half precision
    _skip_without_ext()
    for case in ("3x3", "1x1+res", "3x3s2"):
        x, w, bias, r, conv = make(case, DTYPES[dtype])
        _, path = ours(x, w, bias, r, conv, relu=True)
        assert path == "cudnn-fused", (case, path)


def test_without_relu_and_in_float64_conv_then_epilogue():
    _skip_without_ext()
    for dtype, relu in ((torch.bfloat16, False), (torch.float64, True)):
        x, w, bias, r, conv = make("3x3s2+res", dtype)
        out, path = ours(x, w, bias, r, conv, relu=relu)
        assert path == "conv+epilogue"
        check(out, x, w, bias, r, conv, relu, dtype)


def test_deterministic_mode_takes_the_conv_then_epilogue_path():
    _skip_without_ext()
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        x, w, bias, r, conv = make("1x1+res", torch.bfloat16)
        out, path = ours(x, w, bias, r, conv, relu=True)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert path == "conv+epilogue"
    check(out, x, w, bias, r, conv, True, torch.bfloat16)


def test_bad_input_to_the_compiled_op():
    _skip_without_ext()
    x, w, bias, r, conv = make("3x3", torch.bfloat16)
    op = torch.ops.resnet_fused_C.conv_bias_act
    with pytest.raises(RuntimeError, match="bias must be a contiguous"):
        op(x, w, bias[:-1], None, [1, 1], [1, 1], [1, 1], 1, True)
    with pytest.raises(RuntimeError, match="weight must be 4-D"):
        op(x, w.float(), bias, None, [1, 1], [1, 1], [1, 1], 1, True)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_without_bias_residual_or_relu_the_conv_alone(dtype):
    # the eval downsample branch (its BatchNorm shift goes to the block's last conv): cuDNN's conv,
    # no epilogue pass; with a residual or ReLU but no bias, a zero bias
    _skip_without_ext()
    dt = DTYPES[dtype]
    x, w, bias, r, conv = make("3x3s2+res", dt)
    zero = torch.zeros_like(bias)
    with resnet_fused.use_backend("cuda"), resnet_fused.dispatch_trace() as trace:
        out = conv_affine_act(x, w, None, None, None, conv["stride"], conv["padding"], conv["dilation"],
                              conv["groups"], False)
        out_r = conv_affine_act(x, w, None, None, r, conv["stride"], conv["padding"], conv["dilation"],
                                conv["groups"], True)
    assert [b for op, b in trace if op == FUSED_PATH][0] == "conv-only", trace
    check(out, x, w, zero, None, conv, False, dt)
    check(out_r, x, w, zero, r, conv, True, dt)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_resnet50_eval_downsample_runs_as_the_conv_alone(backend):
    # the model's eval path: each of ResNet-50's four downsample convs without a bias pass (cuda:
    # "conv-only"), the logits as torchvision's in bf16 (relative to PyTorch's own error)
    _skip_without_ext()
    import torchvision

    torch.manual_seed(0)
    theirs = torchvision.models.resnet50().cuda().eval().to(memory_format=torch.channels_last)
    for m in theirs.modules():  # non-trivial running statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    ours = resnet_fused.fuse(__import__("copy").deepcopy(theirs))
    x = torch.randn(2, 3, 96, 96, device="cuda").to(memory_format=torch.channels_last)
    with torch.no_grad():
        truth = theirs.double()(x.double())
        theirs.float()
        with torch.autocast("cuda", torch.bfloat16):
            ref = theirs(x).float()
            with resnet_fused.use_backend(backend), resnet_fused.dispatch_trace() as trace:
                got = ours(x).float()
    if backend == "cuda":
        assert [b for op, b in trace if op == FUSED_PATH].count("conv-only") == 4, trace
    e_ours, e_torch = (got.double() - truth).abs().max().item(), (ref.double() - truth).abs().max().item()
    assert e_ours <= 2 * e_torch + 1e-3 * truth.abs().max().item(), (e_ours, e_torch)


def test_a_given_bias_cast_is_used_and_checked():
    # bias_lowp: the bias already in x's dtype (the models keep it per layer): the same output as the
    # op's own cast, bit for bit; a wrong one refused by name
    _skip_without_ext()
    x, w, bias, r, conv = make("1x1+res", torch.bfloat16)
    op = torch.ops.resnet_fused_C.conv_bias_act
    args = (x, w, bias, r, list(conv["stride"]), list(conv["padding"]), list(conv["dilation"]), conv["groups"], True)
    own, path = op(*args)
    given, path2 = op(*args, bias.to(torch.bfloat16))
    assert path == path2 and torch.equal(own, given)  # (path 0, cuDNN's fused graph, reads the cast)
    with pytest.raises(RuntimeError, match="bias_lowp must be a contiguous"):
        op(*args, bias.to(torch.float16))


def test_resnet50_eval_casts_no_bias_after_the_first_forward():
    # the eval path of the models on the CUDA backend: the folded biases' casts to bf16 are kept with
    # them, so a second forward launches no cast (a kernel per layer in a batch-1 CUDA graph)
    _skip_without_ext()
    import torchvision

    torch.manual_seed(0)
    m = resnet_fused.fuse(torchvision.models.resnet50()).cuda().eval().to(torch.bfloat16)
    m = m.to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 64, 64, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    with torch.no_grad(), resnet_fused.use_backend("cuda"):
        first = m(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, \
                resnet_fused.dispatch_trace() as trace:
            second = m(x)
    paths = [b for op, b in trace if op == FUSED_PATH]
    assert len(paths) == 53 and paths.count("conv-only") == 4, paths  # 49 convs with a bias and ReLU
    casts = [e for e in prof.events() if e.name == "aten::_to_copy"]
    assert casts == [], [(e.name, e.input_shapes) for e in casts][:5]
    assert torch.equal(first, second)
