"""Property-based tests: random geometries, dtypes, strides and memory formats, every
available backend against the reference composite. Few examples per run under the
interpreter (slow); the GPU run draws more (HYPOTHESIS_PROFILE=gpu)."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import resnet_fused
from resnet_fused.functional import add_relu, conv_bn_relu
from resnet_fused.ops.conv_bn_relu import conv_bn_relu_reference

from conftest import BACKEND_DEVICE

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("gpu", max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@st.composite
def conv_problems(draw):
    groups = draw(st.sampled_from([1, 1, 2, 4]))
    cg = draw(st.sampled_from([1, 2, 3, 5, 6, 16, 17]))  # < 16: packed (r, s, c) reduction; >= 16: per (r, s)
    kg = draw(st.integers(1, 6))
    k = draw(st.sampled_from([1, 3, 5, 7]))
    stride = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.integers(0, k // 2 * dilation))
    span = dilation * (k - 1) + 1
    h = draw(st.integers(max(1, span - 2 * padding), span + 6))
    w = draw(st.integers(max(1, span - 2 * padding), span + 6))
    n = draw(st.integers(1, 3))
    training = draw(st.booleans())
    P = (h + 2 * padding - span) // stride + 1
    Q = (w + 2 * padding - span) // stride + 1
    if training and n * P * Q < 2:
        n = 2
    return dict(N=n, C=cg * groups, K=kg * groups, H=h, W=w, k=k, stride=stride, padding=padding,
                dilation=dilation, groups=groups, training=training,
                residual=draw(st.booleans()), relu=draw(st.booleans()),
                layout=draw(st.sampled_from(["nchw", "channels_last", "strided"])),
                dtype=draw(st.sampled_from(["fp32", "fp64"])), seed=draw(st.integers(0, 2 ** 16)))


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a non-contiguous view with the same values
        big = torch.zeros(t.shape[0], t.shape[1], t.shape[2], 2 * t.shape[3], dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]
    return t.contiguous()


@pytest.mark.parametrize("case", BACKEND_DEVICE)
@given(p=conv_problems())
def test_conv_bn_relu_random_problems(case, p, ieee_fp32):
    # ieee_fp32: on a GPU both sides would otherwise run fp32 in TF32 (PyTorch's default for
    # convolutions, which the fused ops follow), each rounding differently (seen on an H100:
    # 2.5e-3 relative on a single product); TF32 parity has its own tests.
    backend, device = case
    dt = torch.float64 if p["dtype"] == "fp64" else torch.float32
    g = torch.Generator().manual_seed(p["seed"])
    x = torch.randn(p["N"], p["C"], p["H"], p["W"], generator=g, dtype=dt)
    w = torch.randn(p["K"], p["C"] // p["groups"], p["k"], p["k"], generator=g, dtype=dt)
    gamma, beta = torch.rand(p["K"], generator=g, dtype=dt) + 0.5, torch.randn(p["K"], generator=g, dtype=dt)
    rm, rv = torch.randn(p["K"], generator=g, dtype=dt) * 0.1, torch.rand(p["K"], generator=g, dtype=dt) + 0.5
    conv = dict(stride=p["stride"], padding=p["padding"], dilation=p["dilation"], groups=p["groups"])
    P = (p["H"] + 2 * p["padding"] - p["dilation"] * (p["k"] - 1) - 1) // p["stride"] + 1
    Q = (p["W"] + 2 * p["padding"] - p["dilation"] * (p["k"] - 1) - 1) // p["stride"] + 1
    res = torch.randn(p["N"], p["K"], P, Q, generator=g, dtype=dt) if p["residual"] else None
    x, w, gamma, beta, rm, rv = (t.to(device) for t in (x, w, gamma, beta, rm, rv))
    res = _layout(res.to(device), p["layout"]) if res is not None else None
    x = _layout(x, p["layout"])
    kw = dict(training=p["training"], residual=res, relu=p["relu"], **conv)
    rm1, rv1, rm2, rv2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    with resnet_fused.use_backend(backend), resnet_fused.dispatch_trace() as trace:
        out = conv_bn_relu(x, w, gamma, beta, rm1, rv1, **kw)
    assert trace[0] == ("conv_bn_relu", backend)
    exp = conv_bn_relu_reference(x, w, gamma, beta, rm2, rv2, **kw)
    # fp32 (IEEE products): summation order over up to 6*49 terms, amplified by 1/std in training.
    tol = 1e-9 if dt == torch.float64 else 2e-4
    torch.testing.assert_close(out, exp, atol=tol, rtol=tol)
    torch.testing.assert_close(rm1, rm2, atol=tol, rtol=tol)
    torch.testing.assert_close(rv1, rv2, atol=tol, rtol=tol)


@pytest.mark.parametrize("case", BACKEND_DEVICE)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4), layout=st.sampled_from(["c", "t", "s"]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]), seed=st.integers(0, 2 ** 16))
def test_add_relu_random_problems(case, shape, layout, dtype, seed):
    backend, device = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(device, dtype)
    r = torch.randn(*shape, generator=g).to(device, dtype)
    if layout == "t" and x.dim() > 1:
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    elif layout == "s":
        x = torch.cat([x, x], dim=-1)[..., ::2]
    with resnet_fused.use_backend(backend):
        out = add_relu(x, r)
    assert torch.equal(out, torch.relu(x + r))
