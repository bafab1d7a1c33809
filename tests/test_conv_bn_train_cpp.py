"""The CUDA backend's C++ training path (csrc/conv_bn_train.cpp), run on the CPU.

``resnet_fused_C::conv_bn_train`` / ``conv_bn_train_backward`` do in C++ what the Python
orchestration of conv_bn_relu does for a training layer (conv, statistics, finalize, scale /
shift, apply; backward sums, coefficients, elementwise gradient, conv gradients). They reach the
BatchNorm kernels through the dispatcher, so here, without a GPU, CPU implementations of the
``resnet_fused_C::bn_*`` ops are registered for the duration of a test: the reference backend's
primitives, partials honouring the ``rows`` the C++ code asks for. What this proves: the C++
orchestration (shapes, layouts, dtypes, output masks, the per-channel arithmetic, the conv
gradients) against the eager composite and by gradcheck in float64, and that the public
``conv_bn_relu`` on the ``cuda`` backend takes it. The kernels themselves are tested by
test_cuda_kernels_emulated.py (on the CPU) and test_bn_kernels.py (GPU); the whole path on a
GPU by test_conv_bn_relu.py's cuda-cuda cases.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import resnet_fused
from resnet_fused import _backends, _ext
from resnet_fused.functional import conv_bn_relu
from resnet_fused.ops import _common
from resnet_fused.ops.conv_bn_relu import conv_bn_relu_reference
from resnet_fused.ops.conv_bn_relu import cuda as cuda_impl
from resnet_fused.ops.conv_bn_relu import reference as R

from conftest import REQUIRE_EXT, assert_close
from test_conv_bn_relu import make

pytestmark = pytest.mark.skipif(not _ext.LOADED and not REQUIRE_EXT, reason=f"CUDA extension not loaded: {_ext.ERROR}")


# The stand-ins check their arguments as the CUDA ops do (bn.cpp): activations channels_last-dense
# of one shape and dtype, per-channel vectors contiguous [K] in the accumulator dtype, so that an
# argument the GPU would refuse fails here too.
def _acc(t):
    return R.acc_dtype(t.dtype)


def _nhwc(t, like, name):
    assert t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last), f"{name}: not NHWC-dense {t.stride()}"
    assert t.shape == like.shape and t.dtype == like.dtype, f"{name}: {t.shape} {t.dtype} vs {like.shape} {like.dtype}"


def _vec(v, K, dtype, name):
    assert v.dim() == 1 and v.shape[0] == K and v.is_contiguous(), f"{name}: not a contiguous [{K}] vector"
    assert v.dtype == dtype, f"{name}: {v.dtype}, expected {dtype}"


def _stats(z, rows):
    _nhwc(z, z, "z")
    zm = R._mk(z).to(_acc(z))
    M, K = zm.shape
    G = max(1, -(-M // rows))
    pm, pm2 = zm.new_empty(G, K), zm.new_empty(G, K)
    for g in range(G):
        chunk = zm[g * rows:(g + 1) * rows]
        pm[g] = chunk.mean(0)
        pm2[g] = ((chunk - pm[g]) ** 2).sum(0)
    return pm, pm2


def _finalize_affine(pm, pm2, rows, M, rm, rv, gamma, beta, momentum, eps):
    K = pm.shape[1]
    for v, name in ((gamma, "gamma"), (beta, "beta")):
        if v is not None:
            _vec(v, K, pm.dtype, name)
    if rm is not None:
        _vec(rm, K, rm.dtype, "running_mean")
        _vec(rv, K, rm.dtype, "running_var")
    mean, invstd, nrm, nrv = R.bn_finalize(pm, pm2, rows, M, rm, rv, momentum, eps)
    scale = invstd * (gamma if gamma is not None else 1)
    shift = (beta if beta is not None else 0) - mean * scale
    e = pm.new_empty(0)
    return mean, invstd, scale, shift, (e if nrm is None else nrm), (e.clone() if nrv is None else nrv)


def _finalize(pm, pm2, rows, M, rm, rv, momentum, eps):  # the Python orchestration's
    mean, invstd, _, _, nrm, nrv = _finalize_affine(pm, pm2, rows, M, rm, rv, None, None, momentum, eps)
    return mean, invstd, nrm, nrv


def _apply(z, scale, shift, residual, relu):
    _nhwc(z, z, "z")
    _vec(scale, z.shape[1], _acc(z), "scale")
    _vec(shift, z.shape[1], _acc(z), "shift")
    if residual is not None:
        _nhwc(residual, z, "residual")
    return R.bn_apply(z, scale, shift, residual, relu)


def _bwd_reduce(grad, out, z, mean, relu):
    for t, name in ((grad, "grad"), (out, "out"), (z, "z")):
        _nhwc(t, grad, name)
    _vec(mean, grad.shape[1], _acc(grad), "mean")
    return R.bn_bwd_reduce(grad, out, z, mean, relu)


def _bwd_reduce_coef(grad, out, z, mean, invstd, gamma, relu):
    K = grad.shape[1]
    _vec(invstd, K, _acc(grad), "invstd")
    if gamma is not None:
        _vec(gamma, K, _acc(grad), "gamma")
    sum_gy, sum_gyz = _bwd_reduce(grad, out, z, mean, relu)
    M = grad.numel() // K
    dgamma = sum_gyz * invstd
    a = invstd * (gamma if gamma is not None else 1)
    return dgamma, sum_gy, a, -a / M * dgamma, -a / M * sum_gy


def _bwd_apply(grad, out, z, mean, invstd, a, b, c, relu, store_gres):
    K = grad.shape[1]
    _nhwc(grad, grad, "grad")
    if relu:
        _nhwc(out, grad, "out")
    _vec(a, K, _acc(grad), "a")
    if b is not None:
        _nhwc(z, grad, "z")
        for v, name in ((b, "b"), (c, "c"), (mean, "mean"), (invstd, "invstd")):
            _vec(v, K, _acc(grad), name)
    dz, gres = R.bn_bwd_apply(grad, out, z, mean, invstd, a, b, c, relu, store_gres)
    return dz, (grad.new_empty(0) if gres is None else gres)


_CPU_KERNELS = {"bn_stats": _stats, "bn_finalize_affine": _finalize_affine, "bn_finalize": _finalize,
                "bn_apply": _apply, "bn_bwd_reduce": _bwd_reduce, "bn_bwd_reduce_coef": _bwd_reduce_coef,
                "bn_bwd_apply": _bwd_apply}


@contextlib.contextmanager
def cpu_bn_kernels():
    """CPU implementations of the resnet_fused_C::bn_* ops for the block; yields the calls made."""
    calls: list[str] = []
    lib = torch.library.Library("resnet_fused_C", "IMPL")

    def counted(name, fn):
        def k(*args):
            calls.append(name)
            return fn(*args)
        return k

    try:
        for name, fn in _CPU_KERNELS.items():
            lib.impl(name, counted(name, fn), "CPU")
        yield calls
    finally:
        lib._destroy()


@pytest.fixture
def cuda_backend_on_cpu(monkeypatch):
    """conv_bn_relu on the 'cuda' backend with CPU tensors, over the CPU bn kernels."""
    monkeypatch.setattr(_backends, "available_backends", lambda: ["reference", "triton", "cuda"])
    monkeypatch.setattr(_backends, "resolve", lambda op, t, **kw: "cuda")
    with cpu_bn_kernels() as calls:
        yield calls


def _op_args(x, w, bn, res, conv, relu=True, momentum=0.1, eps=1e-5):
    return (x, w, bn["bn_weight"], bn["bn_bias"], bn["running_mean"], bn["running_var"], res, [conv["stride"]] * 2,
            [conv["padding"]] * 2, [conv["dilation"]] * 2, conv["groups"], momentum, eps, relu)


def _cl_strides(t):
    N, C, H, W = t.shape
    return (H * W * C, 1, W * C, C)


# M = N * P * Q above 256 in the first: two statistics partials (rows >= 256), the last one short
@pytest.mark.parametrize("geom", [(8, 16, 12, 12, 1, 1, 0, 1, 1), "3x3s2", "3x3g8s2", "7x7s2-stem", "3x3d2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", ["residual", "plain", "no-relu", "no-affine", "no-running"])
def test_forward_op_matches_eager_composite(geom, dtype, variant):
    x, w, bn, res, conv = make(geom, "cpu", dtype, N=2, residual=variant == "residual", affine=variant != "no-affine")
    if variant == "no-running":
        bn = dict(bn, running_mean=None, running_var=None)
    relu = variant != "no-relu"
    mine = {k: (v.clone() if v is not None else None) for k, v in bn.items()}
    with cpu_bn_kernels() as calls:
        out, z, mean, invstd, nrm, nrv = torch.ops.resnet_fused_C.conv_bn_train(*_op_args(x, w, mine, res, conv, relu))
    assert calls == ["bn_stats", "bn_finalize_affine", "bn_apply"]
    theirs = {k: (v.clone() if v is not None else None) for k, v in bn.items()}
    exp = conv_bn_relu_reference(x, w, theirs["bn_weight"], theirs["bn_bias"], theirs["running_mean"],
                                 theirs["running_var"], residual=res, training=True, relu=relu, **conv)
    atol, rtol = (1e-10, 1e-10) if dtype == torch.float64 else (1e-4, 1e-4)
    assert_close(out, exp, atol, rtol, "out")
    assert out.stride() == _cl_strides(out) and z.stride() == _cl_strides(z)
    zr = torch.nn.functional.conv2d(x, w, None, **conv)
    assert_close(z, zr, atol, rtol, "z")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    var = zr.to(acc).var((0, 2, 3), unbiased=False)
    assert_close(mean, zr.to(acc).mean((0, 2, 3)), atol, rtol, "mean")
    assert_close(invstd, torch.rsqrt(var + 1e-5), atol, rtol, "invstd")
    if variant == "no-running":
        # two distinct empty tensors of x's dtype (one tensor returned twice would be one Python object)
        assert nrm.numel() == 0 and nrv.numel() == 0 and nrm is not nrv and nrm.dtype == nrv.dtype == dtype
    else:  # the op is functional: the new statistics come back, the given ones are untouched
        assert_close(nrm, theirs["running_mean"], atol, rtol, "running_mean")
        assert_close(nrv, theirs["running_var"], atol, rtol, "running_var")
        assert torch.equal(mine["running_mean"], bn["running_mean"])


@pytest.mark.parametrize("geom", [(8, 16, 12, 12, 1, 1, 0, 1, 1), "3x3g8s2", "7x7s2-stem"])
@pytest.mark.parametrize("direct", [True, False], ids=["fast-path", "custom-op"])
def test_public_op_on_the_cuda_backend_takes_the_cpp_path(cuda_backend_on_cpu, geom, direct, monkeypatch):
    monkeypatch.setattr(_common, "DIRECT", [direct])
    x, w, bn, res, conv = make(geom, "cpu", torch.float32)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, bn["bn_weight"], bn["bn_bias"], res)]
    gout = torch.randn(res.shape)
    rm, rv = bn["running_mean"].clone(), bn["running_var"].clone()
    with resnet_fused.use_backend("cuda"), resnet_fused.dispatch_trace() as trace:
        out = conv_bn_relu(leaves[0], leaves[1], leaves[2], leaves[3], rm, rv, residual=leaves[4], training=True,
                           **conv)
        got = torch.autograd.grad(out, leaves, gout)
    assert (cuda_impl.TRAIN_PATH, "c++") in trace and (cuda_impl.TRAIN_PATH + "_backward", "c++") in trace, trace
    assert cuda_backend_on_cpu == ["bn_stats", "bn_finalize_affine", "bn_apply", "bn_bwd_reduce_coef",
                                   "bn_bwd_apply"]
    erm, erv = bn["running_mean"].clone(), bn["running_var"].clone()
    exp_out = conv_bn_relu_reference(*leaves[:4], erm, erv, residual=leaves[4], training=True, **conv)
    exp = torch.autograd.grad(exp_out, leaves, gout)
    assert_close(out, exp_out, 1e-4, 1e-4, "out")
    assert_close(rm, erm, 1e-5, 1e-5, "running_mean")
    assert_close(rv, erv, 1e-5, 1e-5, "running_var")
    for name, a, e in zip(["x", "weight", "bn_weight", "bn_bias", "residual"], got, exp):
        assert_close(a, e, 1e-4, 1e-3, msg=f"grad {name}")
    # the Python path's layouts: x's and weight's gradients laid out as x and weight, the residual's
    # channels_last (as the op's output)
    assert got[0].stride() == leaves[0].stride() and got[1].stride() == leaves[1].stride()
    assert got[4].stride() == _cl_strides(got[4])


@pytest.mark.parametrize("relu,residual", [(True, True), (False, False)])
def test_gradcheck_float64_through_the_cpp_path(cuda_backend_on_cpu, relu, residual):
    geom = (4, 4, 4, 4, 3, 2, 1, 1, 2)  # grouped, strided, padded
    x, w, bn, res, conv = make(geom, "cpu", torch.float64, N=2, residual=residual)
    rm, rv = bn["running_mean"], bn["running_var"]

    def f(x, w, g, b, *r):
        return conv_bn_relu(x, w, g, b, rm.clone(), rv.clone(), residual=r[0] if r else None, training=True,
                            relu=relu, **conv)

    inputs = [t.detach().clone().requires_grad_() for t in (x, w, bn["bn_weight"], bn["bn_bias"])]
    inputs += [res.detach().clone().requires_grad_()] if residual else []
    with resnet_fused.use_backend("cuda"), resnet_fused.dispatch_trace() as trace:
        assert torch.autograd.gradcheck(f, inputs, atol=1e-6, rtol=1e-5)
    assert (cuda_impl.TRAIN_PATH + "_backward", "c++") in trace


@pytest.mark.parametrize("mask", [[True, False, False, False, False], [False, True, True, False, False],
                                  [False, False, False, True, True], [False] * 5])
def test_backward_op_output_mask(mask):
    x, w, bn, res, conv = make("3x3s2", "cpu", torch.float64)
    args = _op_args(x, w, bn, res, conv)
    with cpu_bn_kernels():
        out, z, mean, invstd, _, _ = torch.ops.resnet_fused_C.conv_bn_train(*args)
        gout = torch.randn_like(out)
        got = torch.ops.resnet_fused_C.conv_bn_train_backward(gout, x, w, bn["bn_weight"], z, out, mean, invstd,
                                                              *args[7:11], True, mask)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, bn["bn_weight"], bn["bn_bias"], res)]
    exp_out = conv_bn_relu_reference(*leaves[:4], bn["running_mean"].clone(), bn["running_var"].clone(),
                                     residual=leaves[4], training=True, **conv)
    exp = torch.autograd.grad(exp_out, leaves, gout)
    for need, a, e in zip(mask, got, exp):
        if need:
            assert_close(a, e, 1e-10, 1e-9)
        else:
            assert a.numel() == 0
    assert len({id(a) for a in got}) == 5  # five distinct tensors (outputs may not alias)
    assert len({a.data_ptr() for a in got if a.numel()}) == sum(mask)


def test_bad_input_and_missing_kernels_raise_clearly():
    x, w, bn, res, conv = make("3x3s2", "cpu", torch.float32)
    args = list(_op_args(x, w, bn, res, conv))
    with cpu_bn_kernels():
        with pytest.raises(RuntimeError, match="x and weight must be 4-D"):
            torch.ops.resnet_fused_C.conv_bn_train(x[0], *args[1:])
        with pytest.raises(RuntimeError, match="weight must have x's device and dtype"):
            torch.ops.resnet_fused_C.conv_bn_train(x, w.double(), *args[2:])
        with pytest.raises(RuntimeError, match="more than 1 value per channel"):
            torch.ops.resnet_fused_C.conv_bn_train(x[:1, :, :1, :1], w[:, :, 1:2, 1:2], *args[2:6], None,
                                                   [1, 1], [0, 0], [1, 1], *args[10:])
        out, z, mean, invstd, _, _ = torch.ops.resnet_fused_C.conv_bn_train(*args)
        with pytest.raises(RuntimeError, match="needs the conv output"):
            torch.ops.resnet_fused_C.conv_bn_train_backward(out, x, w, None, z.new_empty(0), out, mean, invstd,
                                                            *args[7:11], True, [True] * 5)
    # without CPU BatchNorm kernels (as in production): the dispatcher names the missing one
    with pytest.raises(NotImplementedError, match="bn_stats"):
        torch.ops.resnet_fused_C.conv_bn_train(*args)


# name: (x dtype, BatchNorm parameter / running-statistic dtype, variant)
_PARITY = {
    "fp32": (torch.float32, torch.float32, ""),
    "fp64": (torch.float64, torch.float64, ""),
    "fp64-fp32-params": (torch.float64, torch.float32, ""),
    "bf16-bf16-params": (torch.bfloat16, torch.bfloat16, ""),  # model.to(bfloat16)
    "bf16-fp32-params": (torch.bfloat16, torch.float32, ""),  # autocast
    "fp16": (torch.float16, torch.float16, ""),
    "fp32-no-affine": (torch.float32, torch.float32, "no-affine"),
    "fp32-weight-only": (torch.float32, torch.float32, "weight-only"),
    "fp32-no-running": (torch.float32, torch.float32, "no-running"),
    "fp32-nchw-x-cl-weight": (torch.float32, torch.float32, "nchw"),
    "fp32-1x1-output-nchw": (torch.float32, torch.float32, "1x1-out"),  # canonical_cl's re-view
}


@pytest.mark.parametrize("case", list(_PARITY))
@pytest.mark.parametrize("relu,residual", [(True, True), (False, False)], ids=["relu-res", "plain"])
def test_cpp_and_python_orchestration_agree(case, relu, residual, monkeypatch):
    """The same layer through the C++ calls and through the Python orchestration they replace (both
    over the stand-ins): the same values, dtypes and strides in all eleven outputs, none aliasing."""
    from resnet_fused.ops import conv_bn_relu as CBR

    dt, pdt, variant = _PARITY[case]
    geom = (8, 8, 3, 3, 3, 1, 0, 1, 1) if variant == "1x1-out" else (8, 16, 5, 6, 3, 2, 1, 1, 2)
    x, w, bn, res, conv = make(geom, "cpu", torch.float64, N=3, residual=residual)
    bn = {k: (v.to(pdt) if v is not None else None) for k, v in bn.items()}
    if variant == "no-affine":
        bn.update(bn_weight=None, bn_bias=None)
    if variant == "weight-only":
        bn.update(bn_bias=None)
    if variant == "no-running":
        bn.update(running_mean=None, running_var=None)
    x, w = x.to(dt), w.to(dt)
    res = res.to(dt) if res is not None else None  # NCHW-contiguous, as make() builds it
    if variant in ("nchw", "1x1-out"):
        x, w = x.contiguous(), w.contiguous(memory_format=torch.channels_last)
    s, p, d, g = ([conv["stride"]] * 2, [conv["padding"]] * 2, [conv["dilation"]] * 2, conv["groups"])
    gout = None
    results = {}
    with cpu_bn_kernels():
        for cpp in (True, False):
            monkeypatch.setattr(cuda_impl, "CPP_TRAIN", [cpp])
            c = {k: (v.clone() if v is not None else None) for k, v in bn.items()}
            with resnet_fused.dispatch_trace() as trace:
                f = CBR._forward(x, w, c["bn_weight"], c["bn_bias"], c["running_mean"], c["running_var"], res, s, p,
                                 d, g, True, 0.1, 1e-5, relu, True, False, "cuda", 0)
                if gout is None:
                    gout = torch.randn(f[0].shape, generator=torch.Generator().manual_seed(3)).to(dt)
                    if variant == "1x1-out":
                        gout = gout.contiguous()  # an NCHW gradient of a 1x1 output
                mask = [True, True, bn["bn_weight"] is not None, bn["bn_bias"] is not None, residual]
                b = CBR._backward_impl(gout, x, w, c["bn_weight"], f[1], f[0], f[2], f[3], s, p, d, g, True, relu, mask,
                                       "cuda", 0)
            assert ((cuda_impl.TRAIN_PATH, "c++") in trace) == cpp
            results[cpp] = list(f) + list(b)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dt, 1e-2)
    names = ["out", "z", "mean", "invstd", "new_rm", "new_rv", "dx", "dw", "dgamma", "dbeta", "dres"]
    for name, a, e in zip(names, results[True], results[False]):
        assert (a.shape, a.dtype) == (e.shape, e.dtype), (name, a.shape, a.dtype, e.shape, e.dtype)
        assert a.stride() == e.stride(), (name, a.stride(), e.stride())
        assert_close(a, e, tol, tol, name)
    for outs in (results[True][:6], results[True][6:]):
        live = [t.data_ptr() for t in outs if t.numel()]
        assert len(set(live)) == len(live), "outputs share memory"
