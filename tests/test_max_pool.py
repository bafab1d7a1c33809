"""resnet_fused.functional.max_pool2d (the stem's pool in training): the values, the chosen maxima
and the gradient of F.max_pool2d, one byte kept per output, on every backend; the calls our kernels
do not run go to F.max_pool2d itself."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused import _triton
from resnet_fused.functional import max_pool2d
from resnet_fused.ops import max_pool as mp

from conftest import NO_CUDA, BACKEND_DEVICE, FUSED_BACKEND_DEVICE

CL = torch.channels_last
# (kernel, stride, padding): torchvision's stem pool first
GEOMETRIES = [((3, 3), (2, 2), (1, 1)), ((2, 2), (2, 2), (0, 0)), ((3, 2), (1, 2), (1, 0)), ((1, 1), (1, 1), (0, 0)),
              ((3, 3), (3, 3), (1, 1))]
SHAPES = [(2, 8, 9, 10), (1, 3, 7, 7), (2, 24, 12, 11)]


def _dtypes(device):
    return [torch.float32, torch.float64, torch.bfloat16] + ([torch.float16] if device == "cuda" else [])


def _input(shape, dtype, device, seed=0):
    """Values on a grid of 1/4 (ties inside windows), some NaN and -inf, and one window that holds
    -inf alone (then the first element inside the input is its maximum); channels_last."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 4).round() / 4
    flat = x.view(-1)
    flat[::13] = float("nan")
    flat[5::17] = float("-inf")
    x[0, :, :2, :2] = float("-inf")
    return x.to(device=device, dtype=dtype).contiguous(memory_format=CL)


def _run(backend, fn):
    with resnet_fused.use_backend(backend), resnet_fused.dispatch_trace() as trace:
        out = fn()
    return out, trace


def _code_from_indices(idx, W, k, s, p):
    """PyTorch's flat input indices as window positions kh * KW + kw."""
    P, Q = idx.shape[2:]
    h0 = (torch.arange(P, device=idx.device) * s[0] - p[0]).view(1, 1, P, 1)
    w0 = (torch.arange(Q, device=idx.device) * s[1] - p[1]).view(1, 1, 1, Q)
    return (idx // W - h0) * k[1] + (idx % W - w0)


@pytest.mark.parametrize("case", BACKEND_DEVICE)
@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: f"k{g[0][0]}{g[0][1]}s{g[1][0]}{g[1][1]}p{g[2][0]}{g[2][1]}")
def test_values_and_chosen_maxima_are_max_pool2d_s(case, geo):
    """Bit for bit F.max_pool2d's values (NaN propagating, -inf windows), and as the window position
    of each maximum exactly the index F.max_pool2d returns: ties go to the first in window order."""
    backend, device = case
    k, s, p = geo
    for shape in SHAPES:
        for dtype in _dtypes(device):
            x = _input(shape, dtype, device)
            (out, code), trace = _run(backend, lambda: torch.ops.resnet_fused.max_pool2d_fwd(x, k, s, p, backend))
            assert trace == [("max_pool2d", backend)], trace
            # (on the CPU: PyTorch's channels_last CUDA kernel points a window of -inf alone at pixel (0, 0))
            ref, idx = F.max_pool2d(x.cpu(), k, s, p, return_indices=True)
            torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0, equal_nan=True)
            assert code.dtype == torch.uint8 and code.is_contiguous(memory_format=CL)
            assert out.is_contiguous(memory_format=CL)
            assert torch.equal(code.cpu().long(), _code_from_indices(idx, shape[3], k, s, p)), (shape, dtype)


def _truth_grad(x, g, k, s, p):
    """F.max_pool2d's gradient in float64 on the CPU (whose kernel treats a window of -inf alone as
    ours do, see test_values_and_chosen_maxima_are_max_pool2d_s), on x's device."""
    x64 = x.detach().double().cpu().requires_grad_()
    F.max_pool2d(x64, k, s, p).backward(g.double().cpu())
    return x64.grad.to(x.device)


@pytest.mark.parametrize("case", BACKEND_DEVICE)
@pytest.mark.parametrize("geo", GEOMETRIES[:3], ids=["stem", "k2s2", "k32s12"])
def test_gradient_against_float64(case, geo):
    """The input's gradient (through autograd) against float64 truth on the same values: exact up to
    the order of at most ceil(KH / SH) * ceil(KW / SW) additions in float32 / float64; in 16 bits
    within one unit in the last place (one rounding of the float32 sum; the Triton interpreter
    truncates to bfloat16 where a GPU rounds to nearest)."""
    backend, device = case
    k, s, p = geo
    for shape in SHAPES:
        for dtype in _dtypes(device):
            x = _input(shape, dtype, device).requires_grad_()
            g = torch.randn(F.max_pool2d(x.detach(), k, s, p).shape, dtype=torch.float64).to(device, dtype)
            out, trace = _run(backend, lambda: max_pool2d(x, k, s, p))
            out.backward(g)
            assert ("max_pool2d", backend) in trace
            assert x.grad.is_contiguous(memory_format=CL) and x.grad.dtype == dtype
            truth = _truth_grad(x, g, k, s, p)
            got = x.grad.double()
            if dtype in (torch.float32, torch.float64):
                tol = 1e-6 if dtype == torch.float32 else 1e-13
                torch.testing.assert_close(got, truth, rtol=tol, atol=tol)
            else:
                ulp = torch.finfo(dtype).eps * truth.abs().clamp_min(torch.finfo(dtype).tiny)
                bad = (got - truth).abs() > ulp * 1.0001
                assert not bad.any(), (shape, dtype, (got - truth)[bad][:4].tolist(), truth[bad][:4].tolist())


@pytest.mark.parametrize("case", [c for c in BACKEND_DEVICE if c.values[0][1] == "cpu"])
def test_gradcheck_float64(case):
    backend, device = case
    # distinct values (no ties: a finite difference must not move the maximum)
    x = (torch.randperm(2 * 2 * 6 * 5, generator=torch.Generator().manual_seed(1)).double() / 10).view(2, 2, 6, 5)
    x = x.contiguous(memory_format=CL).requires_grad_()
    with resnet_fused.use_backend(backend):
        assert torch.autograd.gradcheck(lambda t: max_pool2d(t, 3, 2, 1), (x,), eps=1e-3, atol=1e-9)


@pytest.mark.parametrize("case", BACKEND_DEVICE)
def test_keeps_one_byte_per_output_for_the_backward(case):
    """What autograd keeps is the uint8 window position alone: not the input, not an int64 index
    (F.max_pool2d keeps both)."""
    backend, device = case
    x = _input((2, 16, 10, 10), torch.float32, device).requires_grad_()
    y = x * 1.0  # (a leaf's own memory would be kept anyway: pool a computed tensor)
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape), t.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), resnet_fused.use_backend(backend):
        out = max_pool2d(y, 3, 2, 1)
    assert saved == [(torch.uint8, tuple(out.shape), saved[0][2])], saved
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ref = F.max_pool2d(y, 3, 2, 1)
    assert {(d, sh) for d, sh, _ in saved} == {(torch.float32, tuple(y.shape)), (torch.int64, tuple(ref.shape))}


@pytest.mark.parametrize("case", FUSED_BACKEND_DEVICE + [p for p in BACKEND_DEVICE if p.values[0][0] == "reference"])
def test_opcheck(case):
    backend, device = case
    x = _input((2, 8, 9, 7), torch.float32, device).nan_to_num(0.0, 0.0, 0.0)
    x = (x + torch.arange(x.numel(), device=device).view(x.shape) * 1e-3).contiguous(memory_format=CL)
    torch.library.opcheck(torch.ops.resnet_fused.max_pool2d_fwd.default, (x.requires_grad_(), [3, 3], [2, 2], [1, 1],
                                                                          backend))
    out, code = torch.ops.resnet_fused.max_pool2d_fwd(x.detach(), [3, 3], [2, 2], [1, 1], backend)
    g = torch.randn_like(out)
    torch.library.opcheck(torch.ops.resnet_fused.max_pool2d_bwd.default, (g, code, 9, 7, [3, 3], [2, 2], [1, 1],
                                                                          backend))


@pytest.mark.parametrize("case", BACKEND_DEVICE)
def test_eager_calls_skip_the_custom_ops_and_give_their_bits(case, monkeypatch):
    """A plain eager call runs the kernels through the fast path (no custom op: counted), a call
    under a dispatch mode or with the fast path off through the custom ops; the same values and
    gradients bit for bit, and a double backward through either reaches the custom backward op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from resnet_fused.ops import _common

    backend, device = case
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = mp._fwd_op, mp._bwd_op

    def fwd_counted(*a):
        calls["fwd"] += 1
        return fwd(*a)

    def bwd_counted(*a):
        calls["bwd"] += 1
        return bwd(*a)

    monkeypatch.setattr(mp, "_fwd_op", fwd_counted)
    monkeypatch.setattr(mp, "_bwd_op", bwd_counted)
    x = _input((2, 8, 9, 9), torch.float32, device).requires_grad_()
    g = torch.randn(2, 8, 5, 5, device=device)

    def run():
        xi = x.detach().clone().requires_grad_()
        with resnet_fused.use_backend(backend):
            out = max_pool2d(xi, 3, 2, 1)
        out.backward(g)
        return out, xi.grad

    fast = run()
    assert calls == {"fwd": 0, "bwd": 0}
    # without a backward to read them, no codes are written (the kernel is asked for the values alone)
    asked = []
    impl = mp._FWD[backend]
    monkeypatch.setitem(mp._FWD, backend, lambda *a: asked.append(a[-1]) or impl(*a))
    with torch.no_grad(), resnet_fused.use_backend(backend):
        out = max_pool2d(x, 3, 2, 1)
    assert asked == [False]
    assert torch.equal(out.nan_to_num(7.0), fast[0].nan_to_num(7.0))
    monkeypatch.setitem(mp._FWD, backend, impl)
    assert calls == {"fwd": 0, "bwd": 0}

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        moded = run()
    assert calls == {"fwd": 1, "bwd": 1}
    monkeypatch.setattr(_common, "DIRECT", [False])
    off = run()
    assert calls == {"fwd": 2, "bwd": 2}
    for a, b in zip(fast, moded):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    for a, b in zip(fast, off):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    monkeypatch.setattr(_common, "DIRECT", [True])
    xi = x.detach().nan_to_num(0.0, 0.0, 0.0).requires_grad_()
    with resnet_fused.use_backend(backend):
        torch.autograd.grad(max_pool2d(xi, 3, 2, 1), xi, g.requires_grad_(), create_graph=True)
    assert calls == {"fwd": 2, "bwd": 3}


def _aten_calls():
    """(name, base, view of the base that is pooled, (kernel, stride, padding), keywords)"""
    g = torch.Generator().manual_seed(3)
    cl = torch.randn(2, 4, 9, 9, generator=g).contiguous(memory_format=CL)
    same = lambda t: t  # noqa: E731
    return [
        ("NCHW", torch.randn(2, 4, 9, 9, generator=g), same, (3, 2, 1), {}),
        ("ceil_mode", cl, same, (3, 2, 1), {"ceil_mode": True}),
        ("dilation", cl, same, (3, 2, 1), {"dilation": 2}),
        ("3-D", torch.randn(4, 9, 9, generator=g), same, (3, 2, 1), {}),
        ("sliced", cl, lambda t: t[:, :, :, ::2], (3, 2, 1), {}),
        ("17x17 window", torch.randn(1, 2, 20, 20, generator=g).contiguous(memory_format=CL), same, (17, 1, 0), {}),
        ("integer", torch.randint(-5, 5, (1, 2, 6, 6), generator=g).contiguous(memory_format=CL), same, (3, 2, 1), {}),
        ("1x1 pixels", torch.randn(2, 4, 1, 1, generator=g), same, (2, 1, 1), {}),  # both layouts: F's is NCHW
    ]


@pytest.mark.parametrize("backend", ["reference"] + (["triton"] if _triton.interpreting() else []))
def test_what_the_kernels_do_not_run_is_max_pool2d_s(backend):
    for name, base, view, (k, s, p), kw in _aten_calls():
        grad = base.is_floating_point()
        xr = base.clone().requires_grad_(grad)
        out, trace = _run(backend, lambda: max_pool2d(view(xr), k, s, p, **kw))
        assert trace == [("max_pool2d", "aten")], (name, trace)
        xe = base.clone().requires_grad_(grad)
        ref = F.max_pool2d(view(xe), k, s, p, **kw)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        assert out.stride() == ref.stride(), name
        if grad:
            g = torch.randn_like(ref)
            out.backward(g)
            ref.backward(g)
            torch.testing.assert_close(xr.grad, xe.grad, rtol=0, atol=0)


def test_bad_input_raises_max_pool2d_s_errors():
    x = torch.randn(1, 2, 8, 8).contiguous(memory_format=CL)
    with pytest.raises(RuntimeError, match="pad should be at most half"):
        max_pool2d(x, 3, 2, 2)
    with pytest.raises(RuntimeError, match="too small|Output size"):
        max_pool2d(torch.randn(1, 2, 2, 2).contiguous(memory_format=CL), 5, 1, 0)
    with pytest.raises(TypeError, match="kernel_size must be an int or a pair"):
        max_pool2d(x, "3")
    with pytest.raises(TypeError, match="stride must be an int or a pair"):
        max_pool2d(x, 3, 2.0)
    import numpy as np

    torch.testing.assert_close(max_pool2d(x, np.int64(3), (np.int32(2),), 1), F.max_pool2d(x, 3, 2, 1))


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="no CUDA GPU")
def test_the_extension_checks_what_it_is_given():
    if "cuda" not in resnet_fused.available_backends():
        pytest.skip("CUDA extension not loaded")
    x = torch.randn(1, 2, 8, 8, device="cuda").contiguous(memory_format=CL)
    op = torch.ops.resnet_fused_C
    with pytest.raises(RuntimeError, match="max_pool2d_fwd: unsupported geometry"):
        op.max_pool2d_fwd(x, [3, 3], [2, 2], [2, 2])
    with pytest.raises(RuntimeError, match="max_pool2d_fwd: expected a dense channels_last"):
        op.max_pool2d_fwd(x.contiguous(), [3, 3], [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match="more positions than one byte"):
        op.max_pool2d_fwd(torch.randn(1, 2, 20, 20, device="cuda").contiguous(memory_format=CL), [17, 17], [1, 1],
                          [0, 0])
    out, code = op.max_pool2d_fwd(x, [3, 3], [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match="does not pool to"):
        op.max_pool2d_bwd(out, code, 9, 12, [3, 3], [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match="code must be uint8"):
        op.max_pool2d_bwd(out, code.float(), 8, 8, [3, 3], [2, 2], [1, 1])


@pytest.mark.parametrize("case", [c for c in BACKEND_DEVICE if c.values[0][1] == "cpu"])
def test_double_backward_float64(case):
    """The gradient's gradient (in the output's gradient: the backward is linear in it) as
    gradgradcheck sees it, and equal to F.max_pool2d's."""
    backend, device = case
    x = (torch.randperm(1 * 2 * 7 * 6, generator=torch.Generator().manual_seed(2)).double() / 10).view(1, 2, 7, 6)
    x = x.contiguous(memory_format=CL).requires_grad_()
    with resnet_fused.use_backend(backend):
        assert torch.autograd.gradgradcheck(lambda t: max_pool2d(t * 1.0, 3, 2, 1), (x,), eps=1e-3, atol=1e-9)
        g = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)
        (gx,) = torch.autograd.grad(max_pool2d(x * 1.0, 3, 2, 1), x, g, create_graph=True)
    w = torch.randn_like(gx)
    (gg,) = torch.autograd.grad((gx * w).sum(), g)
    (gx_ref,) = torch.autograd.grad(F.max_pool2d(x * 1.0, 3, 2, 1), x, g, create_graph=True)
    (gg_ref,) = torch.autograd.grad((gx_ref * w).sum(), g)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=0)
    torch.testing.assert_close(gg, gg_ref, rtol=0, atol=0)


# --- the model: the stem's pool in training ---------------------------------------------------
def _model_pair(device, dtype):
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10)
    fused = resnet_fused.resnet18(num_classes=10)
    fused.load_state_dict(tv.state_dict())
    return (tv.to(device, dtype).to(memory_format=CL).train(),
            fused.to(device, dtype).to(memory_format=CL).train())


@pytest.mark.parametrize("case", BACKEND_DEVICE)
def test_training_stem_pools_through_the_op(case):
    """The training stem (conv_bn_maxpool: the fused layer, then max_pool2d on the backend, not the
    nn.MaxPool2d module) against torchvision's conv -> bn -> relu -> maxpool in float64: output,
    running statistics and every gradient."""
    from resnet_fused.models.resnet import conv_bn_maxpool

    backend, device = case
    tv, fused = _model_pair(device, torch.float64)
    x = torch.randn(2, 3, 30, 30, dtype=torch.float64, device=device).contiguous(memory_format=CL)
    out, trace = _run(backend, lambda: conv_bn_maxpool(fused.conv1, fused.bn1, x, fused.maxpool))
    assert ("max_pool2d", backend) in trace, trace
    ref = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fused.bn1.running_var, tv.bn1.running_var, rtol=1e-9, atol=1e-9)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    for a, b in ((fused.conv1.weight, tv.conv1.weight), (fused.bn1.weight, tv.bn1.weight),
                 (fused.bn1.bias, tv.bn1.bias)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-9)


def test_training_model_pools_through_the_op():
    tv, fused = _model_pair("cpu", torch.float64)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=CL)
    out, trace = _run("reference", lambda: fused(x))
    assert ("max_pool2d", "reference") in trace, trace
    torch.testing.assert_close(out, tv(x), rtol=1e-9, atol=1e-9)


def test_a_hooked_or_other_pool_runs_as_the_module():
    _, fused = _model_pair("cpu", torch.float64)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    seen = []
    h = fused.maxpool.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with resnet_fused.use_backend("reference"), resnet_fused.dispatch_trace() as trace:
        fused(x)
    h.remove()
    assert seen and all(op != "max_pool2d" for op, _ in trace), trace
    fused.maxpool = torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True)
    with resnet_fused.use_backend("reference"), resnet_fused.dispatch_trace() as trace:
        fused(x)
    assert all(op != "max_pool2d" for op, _ in trace), trace


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_resnet50_stem_pool_bf16_on_the_gpu(backend):
    """The ResNet-50 stem pool's size at batch 8 in bf16 (16-byte packs), and channel counts and
    offsets that take the one-channel path, against F.max_pool2d and float64 truth."""
    if backend not in resnet_fused.available_backends():
        pytest.skip(f"{backend} not available")
    if _triton.interpreting() and backend == "triton":
        pytest.skip("TRITON_INTERPRET=1: Triton runs on the CPU")
    for shape, offset in (((8, 64, 112, 112), 0), ((2, 7, 33, 31), 0), ((2, 8, 20, 20), 1)):
        N, C, H, W = shape
        base = torch.randn(N * C * H * W + offset, device="cuda", dtype=torch.bfloat16)
        x = base[offset:].view(N, H, W, C).permute(0, 3, 1, 2).relu()  # channels_last; offset: misaligned
        x.requires_grad_()
        out, trace = _run(backend, lambda: max_pool2d(x, 3, 2, 1))
        assert trace == [("max_pool2d", backend)]
        ref, idx = F.max_pool2d(x.detach(), 3, 2, 1, return_indices=True)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        g = torch.randn_like(out)
        out.backward(g)
        truth = _truth_grad(x, g, (3, 3), (2, 2), (1, 1))
        ulp = torch.finfo(torch.bfloat16).eps * truth.abs()
        assert ((x.grad.double() - truth).abs() <= ulp / 2 * 1.0001).all()
