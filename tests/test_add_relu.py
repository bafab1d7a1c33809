"""resnet_fused.functional.add_relu on every backend against the reference."""
from __future__ import annotations

import pytest
import torch

import resnet_fused
from resnet_fused import _triton
from resnet_fused.functional import add_relu
from resnet_fused.ops.add_relu import add_relu_reference

from conftest import NO_CUDA, BACKEND_DEVICE, FUSED_BACKEND_DEVICE, assert_close

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _dtypes_for(device):
    # The interpreter computes bf16 through numpy, which has no bf16: fp32/fp64/fp16 there.
    if device == "cpu" and _triton.interpreting():
        return [torch.float32, torch.float64, torch.float16]
    return DTYPES


def _layouts(shape, dtype, device):
    """(name, x, residual): contiguous, channels_last, non-contiguous views, mixed formats."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

    n, c, h, w = shape
    yield "contiguous", rnd(*shape), rnd(*shape)
    yield "channels_last", rnd(*shape).to(memory_format=torch.channels_last), rnd(*shape).to(
        memory_format=torch.channels_last)
    yield "sliced", rnd(n, c, h, 2 * w)[..., ::2], rnd(n, c, h, 2 * w)[..., 1::2]
    yield "transposed", rnd(n, c, w, h).transpose(2, 3), rnd(*shape)
    yield "mixed", rnd(*shape).to(memory_format=torch.channels_last), rnd(*shape)
    yield "expanded-residual", rnd(*shape), rnd(1, c, 1, 1).expand(shape)


def _run(backend, x, r):
    with resnet_fused.use_backend(backend), resnet_fused.dispatch_trace() as trace:
        out = add_relu(x, r)
    assert trace == [("add_relu", backend)], f"expected the {backend} path to run, trace={trace}"
    return out


@pytest.mark.parametrize("case", BACKEND_DEVICE)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 1, 1), (3, 17, 11, 13)])
def test_matches_reference_exactly(case, shape):
    # One rounding of the exact sum on both sides (fp16/bf16 add in fp32, as PyTorch's
    # opmath does; ReLU commutes with rounding), so the results must be bitwise equal.
    backend, device = case
    for dtype in _dtypes_for(device):
        for name, x, r in _layouts(shape, dtype, device):
            out = _run(backend, x, r)
            ref = add_relu_reference(x, r)
            assert_close(out, ref, atol=0, rtol=0, msg=f"{backend}/{dtype}/{name}:")
            # Layout: like torch.empty_like(x) (channels_last stays channels_last).
            assert out.stride() == torch.empty_like(x).stride(), name


@pytest.mark.parametrize("case", BACKEND_DEVICE)
def test_large_odd_flat(case):
    # Several programs / blocks plus a ragged tail and an unaligned start.
    backend, device = case
    base = torch.randn(100_003 + 1, device=device)
    x, r = base[1:], torch.randn(100_003, device=device)  # x starts 4 bytes past alignment
    assert_close(_run(backend, x, r), add_relu_reference(x, r), atol=0, rtol=0)


@pytest.mark.parametrize("case", BACKEND_DEVICE)
def test_nan_inf_propagate(case):
    backend, device = case
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0, -1.0, float("inf")], device=device)
    r = torch.tensor([1.0, 1.0, 1.0, float("nan"), 0.5, -float("inf")], device=device)
    assert_close(_run(backend, x, r), torch.relu(x + r), atol=0, rtol=0)


@pytest.mark.parametrize("case", BACKEND_DEVICE)
def test_empty(case):
    backend, device = case
    x = torch.empty(0, 3, 4, 4, device=device)
    out = _run(backend, x, x.clone())
    assert out.shape == x.shape


@pytest.mark.parametrize("case", BACKEND_DEVICE)
def test_gradcheck_float64(case):
    backend, device = case
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    r = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    fast = device == "cpu" and backend == "triton"  # the interpreter is slow
    with resnet_fused.use_backend(backend):
        assert torch.autograd.gradcheck(add_relu, (x, r), fast_mode=fast)


@pytest.mark.parametrize("case", BACKEND_DEVICE)
def test_backward_matches_reference(case):
    backend, device = case
    x = torch.randn(2, 4, 3, 3, device=device).to(memory_format=torch.channels_last).requires_grad_()
    r = torch.randn(2, 4, 3, 3, device=device, requires_grad=True)
    g = torch.randn(2, 4, 3, 3, device=device)
    with resnet_fused.use_backend(backend):
        gx, gr = torch.autograd.grad(add_relu(x, r), (x, r), g)
    ex, er = torch.autograd.grad(add_relu_reference(x, r), (x, r), g)
    assert_close(gx, ex, atol=0, rtol=0)
    assert_close(gr, er, atol=0, rtol=0)


@pytest.mark.parametrize("case", BACKEND_DEVICE)
def test_opcheck(case):
    backend, device = case
    x = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    r = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    xc = torch.randn(2, 3, 4, 5, device=device).to(memory_format=torch.channels_last)
    for args in [(x, r, backend), (xc, xc.clone(), backend)]:
        torch.library.opcheck(torch.ops.resnet_fused.add_relu.default, args)


@pytest.mark.parametrize("case", FUSED_BACKEND_DEVICE)
def test_torch_compile_fullgraph(case):
    backend, device = case
    torch._dynamo.reset()

    def f(a, b):
        return add_relu(a * 2, b) - 1

    x = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    r = torch.randn(2, 3, 4, 5, device=device)
    with resnet_fused.use_backend(backend):
        cf = torch.compile(f, fullgraph=True)
        with resnet_fused.dispatch_trace() as trace:
            out = cf(x, r)
        out.sum().backward()
    assert ("add_relu", backend) in trace
    expected = add_relu_reference(x.detach() * 2, r) - 1
    assert_close(out.detach(), expected, atol=1e-6, rtol=1e-6)
    assert_close(x.grad, 2 * (expected > -1).float(), atol=0, rtol=0)


# --- bad input ----------------------------------------------------------------------------
def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"add_relu: x has shape \(2, 3\) but residual has shape \(3, 2\)"):
        add_relu(torch.ones(2, 3), torch.ones(3, 2))


def test_dtype_mismatch():
    with pytest.raises(TypeError, match="x has dtype torch.float32 but residual has dtype torch.float64"):
        add_relu(torch.ones(2), torch.ones(2, dtype=torch.float64))


def test_integer_input():
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        add_relu(torch.ones(2, dtype=torch.long), torch.ones(2, dtype=torch.long))


def test_not_a_tensor():
    with pytest.raises(TypeError, match="residual must be a Tensor"):
        add_relu(torch.ones(2), 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="no CUDA GPU")
def test_device_mismatch():
    with pytest.raises(ValueError, match="x is on cpu but residual is on cuda"):
        add_relu(torch.ones(2), torch.ones(2, device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_runs_on_current_stream(backend):
    if backend not in resnet_fused.available_backends() or _triton.interpreting():
        pytest.skip(f"{backend} not runnable here")
    x = torch.randn(1 << 20, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s), resnet_fused.use_backend(backend):
        torch.cuda._sleep(10_000_000)  # if the kernel ignored the stream it would race this
        r = x * 3
        out = add_relu(x, r)
    s.synchronize()
    assert_close(out, torch.relu(x * 4), atol=1e-6, rtol=1e-6)
