"""The ResNet stem in inference: conv + folded BatchNorm + ReLU + max_pool2d(3, 2, 1) as one
operator (conv_affine_act_maxpool), pooled in the Triton conv's epilogue (docs/perf.md lead 4).

Oracles: PyTorch's max_pool2d over the same backend's unpooled output (the pooled epilogue must
give those values to the last place or two: the same kernel and reduction order, and rounding
commutes with max), and float64 truth (F.conv2d -> relu -> max_pool2d) with a tolerance per dtype. The trace
proves which path ran: ("conv_affine_act/maxpool", "epilogue") and the kernel's "-maxpool" path
for Triton, "max_pool2d" for the other backends.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models import resnet as tvr

import resnet_fused
from resnet_fused import models as rfm
from resnet_fused.models.resnet import conv_bn_maxpool
from resnet_fused.ops.conv_bn_relu.inference import conv_affine_act, conv_affine_act_maxpool

from conftest import BACKEND_DEVICE, NO_CUDA, assert_close

pytestmark = pytest.mark.usefixtures("ieee_fp32")

# (N, C, H, W, K, kernel, stride, padding): the stem's geometry on small images (3 channels,
# padded to 4 by the Triton backend), odd and even conv outputs, a plain 3x3 stride-1 conv, and
# sizes whose conv output * K exceeds the interpreter's small-tile threshold (64-row tiles:
# 3 x 3 pooled pixels each, where 16-row tiles keep one)
GEOMS = [
    (2, 3, 20, 18, 16, 7, 2, 3),   # conv 10 x 9 -> pooled 5 x 5
    (1, 3, 33, 31, 8, 7, 2, 3),    # conv 17 x 16 -> pooled 9 x 8
    (2, 16, 9, 12, 24, 3, 1, 1),   # conv 9 x 12 -> pooled 5 x 6
    (2, 16, 21, 19, 40, 3, 1, 1),  # conv 21 x 19 -> pooled 11 x 10, M * K = 31,920: large tiles
]


def _ids(g):
    return "x{}x{}x{}x{}-k{}-{}x{}s{}".format(*g[:5], g[5], g[5], g[6])


def _problem(geom, device, dtype, seed=0):
    N, C, H, W, K, R, st, pd = geom
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(K, C, R, R, generator=g, dtype=torch.float64) / (C * R * R) ** 0.5
    bias = torch.randn(K, generator=g, dtype=torch.float64) * 0.5
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (x.to(device, dtype).contiguous(memory_format=torch.channels_last), w.to(device, dtype),
            bias.to(device, acc), (st, st), (pd, pd))


def _truth(x, w, bias, stride, padding, relu=True):
    z = F.conv2d(x.double().cpu(), w.double().cpu(), bias.double().cpu(), stride, padding)
    return F.max_pool2d(torch.relu(z) if relu else z, 3, 2, 1)


def _tol(dtype):
    return {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]


def _paths(trace):
    return {b for op, b in trace if op == "conv_affine_act/maxpool"}, {b for op, b in trace if op == "triton_conv"}


@pytest.mark.parametrize("case", BACKEND_DEVICE)
@pytest.mark.parametrize("geom,relu", [(g, True) for g in GEOMS] + [(GEOMS[1], False)],
                         ids=[_ids(g) for g in GEOMS] + [_ids(GEOMS[1]) + "-no-relu"])
def test_stem_maxpool_against_the_pool_of_the_conv_and_float64(case, geom, relu):
    backend, device = case
    if device == "cpu":  # (float64 once: the interpreter's time)
        dtypes = [torch.float32] + ([torch.float64] if geom is GEOMS[0] else [])
    else:
        dtypes = [torch.bfloat16, torch.float32]
    for dtype in dtypes:
        x, w, bias, st, pd = _problem(geom, device, dtype)
        with torch.no_grad(), resnet_fused.use_backend(backend):
            with resnet_fused.dispatch_trace() as trace:
                out = conv_affine_act_maxpool(x, w, None, bias, st, pd, (1, 1), 1, relu)
            unpooled = conv_affine_act(x, w, None, bias, None, st, pd, (1, 1), 1, relu)
        pool_path, kernels = _paths(trace)
        if backend == "triton":
            assert pool_path == {"epilogue"} and len(kernels) == 1 and next(iter(kernels)).endswith("-maxpool"), trace
        else:
            assert pool_path == {"max_pool2d"} and not kernels, trace
        ref = F.max_pool2d(unpooled, 3, 2, 1)
        assert out.is_contiguous(memory_format=torch.channels_last)
        # the same kernel's sums (the pooled tile is another block of rows: the matmul under the
        # interpreter, or another tile shape on the GPU, may round the last place differently)
        tight = {torch.float64: 1e-13, torch.float32: 2e-6}.get(dtype, _tol(dtype))
        assert_close(out, ref, tight, tight, "pooled epilogue vs max_pool2d of the conv")
        truth = _truth(x, w, bias, st, pd, relu)
        err = (out.double().cpu() - truth).abs().max().item()
        eager = F.max_pool2d(F.relu(F.conv2d(x, w, bias.to(dtype), st, pd)) if relu
                             else F.conv2d(x, w, bias.to(dtype), st, pd), 3, 2, 1)
        eager_err = (eager.double().cpu() - truth).abs().max().item()
        assert err <= max(4 * eager_err, _tol(dtype) * truth.abs().max().item()), (dtype, err, eager_err)
        if not relu:  # the pool's padding is -inf, not 0: negative maxima on the border survive
            assert (truth[..., 0, 0] < 0).any()


@pytest.mark.parametrize("case", BACKEND_DEVICE)
@pytest.mark.parametrize("pool_in_acc", [None, True, False], ids=["default", "pool-fp32", "pool-rounded"])
def test_stem_maxpool_propagates_nan_and_inf(case, pool_in_acc, monkeypatch):
    backend, device = case
    if pool_in_acc is not None:  # both orders of pooling and rounding (_POOL_IN_ACC: per Triton version)
        if backend != "triton" or device != "cpu":
            pytest.skip("the Triton kernel's two pooling orders, forced under the interpreter")
        from resnet_fused._triton import tl
        from resnet_fused.ops.conv_bn_relu import triton_kernels as tk

        monkeypatch.setattr(tk, "_POOL_IN_ACC", tl.constexpr(pool_in_acc))
    dtype = torch.float32 if pool_in_acc is None else torch.float16
    x, w, bias, st, pd = _problem(GEOMS[0], device, dtype)
    x[1, 0, 7, 4] = float("nan")  # NaN in every channel of the conv outputs that see this pixel
    bias[3] = float("inf")  # channel 3: +inf everywhere
    bias[5] = float("-inf")  # channel 5: 0 after the ReLU
    with torch.no_grad(), resnet_fused.use_backend(backend):
        out = conv_affine_act_maxpool(x, w, None, bias, st, pd, (1, 1), 1, True)
    truth = _truth(x, w, bias, st, pd)
    assert torch.equal(out.isnan().cpu(), truth.isnan()) and truth.isnan().any()
    nan = out.isnan()
    assert (torch.isposinf(out[:, 3]) | nan[:, 3]).all() and ((out[:, 5] == 0) | nan[:, 5]).all()
    ok = ~truth.isnan()
    assert_close(out.double().cpu()[ok], truth[ok], _tol(dtype), _tol(dtype), "finite values")
    if pool_in_acc is not None:  # either order: exactly the pool of the unpooled kernel's output
        with torch.no_grad(), resnet_fused.use_backend(backend):
            unpooled = conv_affine_act(x, w, None, bias, None, st, pd, (1, 1), 1, True)
        assert torch.equal(out.isnan(), F.max_pool2d(unpooled, 3, 2, 1).isnan())
        assert torch.equal(out.nan_to_num(0.0), F.max_pool2d(unpooled, 3, 2, 1).nan_to_num(0.0))


def test_stem_maxpool_opcheck():
    x, w, bias, st, pd = _problem(GEOMS[0], "cpu", torch.float32)
    for backend in ("reference",) + (("triton",) if resnet_fused._triton.interpreting() else ()):
        torch.library.opcheck(torch.ops.resnet_fused.conv_affine_act_maxpool.default,
                              (x, w, None, bias, list(st), list(pd), [1, 1], 1, True, False, backend),
                              test_utils=("test_schema", "test_faketensor"))


# --- the model ---------------------------------------------------------------------------------
def _stem_net(device, seed=0):
    """torchvision's ResNet-18 stem, pool and head, the residual stages taken out (so that the
    Triton interpreter runs the model in seconds), and the fused class over a copy of it."""
    torch.manual_seed(seed)
    theirs = torchvision.models.resnet18(num_classes=4)
    theirs.layer1 = theirs.layer2 = theirs.layer3 = theirs.layer4 = nn.Identity()
    theirs.fc = nn.Linear(64, 4)
    with torch.no_grad():
        theirs.bn1.running_mean.normal_(0, 0.2)
        theirs.bn1.running_var.uniform_(0.5, 1.5)
        theirs.bn1.bias.normal_(0, 0.3)
    theirs.eval()
    ours = resnet_fused.fuse(copy.deepcopy(theirs))
    assert type(ours) is rfm.ResNet
    return ours.to(device), theirs.to(device)


@pytest.mark.parametrize("case", BACKEND_DEVICE)
def test_model_eval_takes_the_pooled_stem(case):
    backend, device = case
    ours, theirs = _stem_net(device)
    x = torch.randn(2, 3, 30, 26, device=device)
    with torch.no_grad(), resnet_fused.use_backend(backend), resnet_fused.dispatch_trace() as trace:
        out = ours(x)
    assert _paths(trace)[0] == {"epilogue" if backend == "triton" else "max_pool2d"}, trace
    with torch.no_grad():
        ref = theirs(x)
    assert_close(out, ref, 1e-4, 1e-4 * ref.abs().max().item(), "logits")


@pytest.mark.parametrize("case", BACKEND_DEVICE)
def test_model_stem_keeps_the_pool_module_where_it_must(case):
    backend, device = case
    ours, theirs = _stem_net(device)
    x = torch.randn(2, 3, 24, 24, device=device)

    def run(model, grad=False):
        with torch.set_grad_enabled(grad), resnet_fused.use_backend(backend), resnet_fused.dispatch_trace() as tr:
            y = model(x)
        return y, tr

    # a forward hook on the pool sees it run, with torchvision's input
    seen = []
    h = ours.maxpool.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    out, trace = run(ours)
    h.remove()
    assert seen == [(2, 64, 12, 12)] and not _paths(trace)[0]
    assert_close(out, theirs(x).detach(), 1e-4, 1e-4, "hooked pool")
    # another pool (a 2x2 one): the module runs after the fused conv
    ours2, theirs2 = copy.deepcopy(ours), copy.deepcopy(theirs)
    ours2.maxpool = theirs2.maxpool = nn.MaxPool2d(2)
    out, trace = run(ours2)
    assert not _paths(trace)[0] and ("conv_affine_act", backend) in trace
    assert_close(out, theirs2(x).detach(), 1e-4, 1e-4, "2x2 pool")
    # a gradient needed: conv_bn_relu, then the pool module (its backward)
    out, trace = run(ours, grad=True)
    assert not _paths(trace)[0] and ("conv_bn_relu", backend) in trace
    out.sum().backward()
    assert ours.conv1.weight.grad is not None
    # training mode: batch statistics, the pool module
    ours.train()
    theirs.train()
    out, trace = run(ours)
    assert not _paths(trace)[0] and ("conv_bn_relu", backend) in trace
    assert_close(out, theirs(x).detach(), 1e-4, 1e-4, "training mode")


@pytest.mark.skipif(NO_CUDA, reason="no CUDA GPU")
@pytest.mark.gpu
def test_resnet50_bf16_stem_on_the_gpu_against_float64():
    """The full-size stem (224 x 224, batch 8) under bf16 autocast on every backend: within twice
    eager's own bf16 error of the float64 truth (eager: the stem modules in bf16)."""
    torch.manual_seed(0)
    ours = resnet_fused.resnet50().cuda().eval()
    with torch.no_grad():  # a BatchNorm that does something
        ours.bn1.running_mean.normal_(0, 0.2)
        ours.bn1.running_var.uniform_(0.5, 1.5)
        ours.bn1.bias.normal_(0, 0.3)
    x = torch.randn(8, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    stem = nn.Sequential(ours.conv1, ours.bn1, ours.relu, ours.maxpool)
    with torch.no_grad():
        truth = copy.deepcopy(stem).double()(x.double())
        eager = copy.deepcopy(stem).to(torch.bfloat16)(x.to(torch.bfloat16)).double()
        eager_err = (eager - truth).abs().max().item()
        for backend in ("triton", "cuda", "auto"):
            if backend == "cuda" and "cuda" not in resnet_fused.available_backends():
                continue
            with resnet_fused.use_backend(backend), resnet_fused.dispatch_trace() as trace, \
                    torch.autocast("cuda", torch.bfloat16):
                out = conv_bn_maxpool(ours.conv1, ours.bn1, x, ours.maxpool)
            paths = _paths(trace)[0]
            assert paths == {"epilogue"} if backend == "triton" else len(paths) == 1, trace
            assert out.dtype == torch.bfloat16 and out.shape == truth.shape
            err = (out.double() - truth).abs().max().item()
            assert err <= 2 * eager_err + 1e-3, (backend, err, eager_err)


@pytest.mark.skipif(not resnet_fused._triton.interpreting(), reason="TRITON_INTERPRET=1 not set")
@pytest.mark.parametrize("block_m", [16, 32, 64, 128, 256])
def test_pooled_tiles_of_every_tile_height(block_m, monkeypatch):
    """Every BLOCK_M the configs (and fp64's 32) can give the pooled kernel, forced under the
    interpreter: its tile shape (4 x 4 up to 16 x 16 conv pixels), ragged last tiles, pooled
    outputs of one pixel, groups (16 and 4 channels per group), NCHW input, with and without
    ReLU, against float64 truth."""
    from resnet_fused.ops.conv_bn_relu import triton_kernels as tk

    cfg = dict(BLOCK_M=block_m, BLOCK_N=16, BLOCK_C=16)
    monkeypatch.setattr(tk, "_INTERP_SMALL", cfg)
    monkeypatch.setattr(tk, "_INTERP_LARGE", cfg)
    g = torch.Generator().manual_seed(block_m)
    cases = [  # N, C, H, W, K, kernel, stride, padding, groups, channels_last
        (1, 3, 33, 29, 8, 7, 2, 3, 1, True),  # conv 17 x 15 -> pooled 9 x 8
        (1, 16, 9, 14, 24, 3, 1, 1, 1, False),  # NCHW
        (1, 32, 11, 13, 32, 3, 1, 1, 2, True),  # 2 groups of 16 channels
        (1, 16, 7, 9, 16, 3, 1, 1, 4, True),  # 4 groups of 4 (packed)
        (1, 4, 2, 1, 4, 1, 1, 0, 1, True),  # conv 2 x 1 -> pooled 1 x 1
    ]
    for i, (N, C, H, W, K, R, st, pd, groups, cl) in enumerate(cases):
        x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
        x = x.contiguous(memory_format=torch.channels_last) if cl else x
        w = torch.randn(K, C // groups, R, R, generator=g, dtype=torch.float64) / (C * R * R / groups) ** 0.5
        shift = torch.randn(K, generator=g, dtype=torch.float64) - 1.0
        P, Q = (H + 2 * pd - R) // st + 1, (W + 2 * pd - R) // st + 1
        for relu in (True, False) if i == 0 else (True,):
            with resnet_fused.dispatch_trace() as trace:
                out = tk.conv_fwd(x.float(), w.float().permute(0, 2, 3, 1).contiguous(), K, P, Q, (st, st), (pd, pd),
                                  (1, 1), groups, training=False, shift=shift.float(), relu=relu, pool=True)[0]
            assert all(b.endswith("-maxpool") for op, b in trace if op == "triton_conv"), trace
            z = F.conv2d(x, w, shift, st, pd, 1, groups)
            ref = F.max_pool2d(torch.relu(z) if relu else z, 3, 2, 1)
            assert_close(out.double(), ref, 1e-4, 1e-4, f"BLOCK_M={block_m} {(N, C, H, W, K, R, groups)} relu={relu}")
