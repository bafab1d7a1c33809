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

from conftest import NO_CUDA, REQUIRE_EXT, assert_close, cpu_max_pool_kernels, route_to_cuda_backend
from test_conv_bn_relu import check_batchnorm_vectors_as_views, make

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


def _finalize_affine_(pm, pm2, rows, M, rm, rv, gamma, beta, momentum, eps):  # the C++ node's: in place
    mean, invstd, scale, shift, nrm, nrv = _finalize_affine(pm, pm2, rows, M, rm, rv, gamma, beta, momentum, eps)
    if rm is not None:
        rm.copy_(nrm)
        rv.copy_(nrv)
    return mean, invstd, scale, shift


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


# Calls of the backward stand-ins that took the ReLU's mask from z (mask_scale / mask_shift: the C++
# node, for an output without a residual) instead of from the output.
MASK_FROM_Z: list[str] = []


def _mask_out(name, grad, out, z, relu, msc, msh):
    """The output whose mask the kernel uses: the given one, or (mask from z) the forward apply's
    output recomputed from z, as the CUDA kernels compute the mask (the same function, same bits)."""
    if msc is None and msh is None:
        return out
    assert relu and msc is not None and msh is not None, f"{name}: mask_scale / mask_shift without a ReLU or alone"
    _vec(msc, grad.shape[1], _acc(grad), "mask_scale")
    _vec(msh, grad.shape[1], _acc(grad), "mask_shift")
    MASK_FROM_Z.append(name)
    return _apply(z, msc, msh, None, True)


def _bwd_reduce_coef(grad, out, z, mean, invstd, gamma, relu, mask_scale=None, mask_shift=None):
    K = grad.shape[1]
    _vec(invstd, K, _acc(grad), "invstd")
    if gamma is not None:
        _vec(gamma, K, _acc(grad), "gamma")
    out = _mask_out("bn_bwd_reduce_coef", grad, out, z, relu, mask_scale, mask_shift)
    sum_gy, sum_gyz = _bwd_reduce(grad, out, z, mean, relu)
    M = grad.numel() // K
    dgamma = sum_gyz * invstd
    a = invstd * (gamma if gamma is not None else 1)
    return dgamma, sum_gy, a, -a / M * dgamma, -a / M * sum_gy


def _bwd_apply(grad, out, z, mean, invstd, a, b, c, relu, store_gres, mask_scale=None, mask_shift=None):
    K = grad.shape[1]
    _nhwc(grad, grad, "grad")
    out = _mask_out("bn_bwd_apply", grad, out, z, relu, mask_scale, mask_shift)
    if relu:
        _nhwc(out, grad, "out")
    _vec(a, K, _acc(grad), "a")
    if b is not None:
        _nhwc(z, grad, "z")
        for v, name in ((b, "b"), (c, "c"), (mean, "mean"), (invstd, "invstd")):
            _vec(v, K, _acc(grad), name)
    dz, gres = R.bn_bwd_apply(grad, out, z, mean, invstd, a, b, c, relu, store_gres)
    return dz, (grad.new_empty(0) if gres is None else gres)


_CPU_KERNELS = {"bn_stats": _stats, "bn_finalize_affine": _finalize_affine, "bn_finalize_affine_": _finalize_affine_,
                "bn_finalize": _finalize,
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
    route_to_cuda_backend(monkeypatch)
    with cpu_bn_kernels() as calls, cpu_max_pool_kernels():
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


def _node_name(t):
    return t.grad_fn.name() if t.grad_fn is not None else None


@pytest.mark.parametrize("geom", [(8, 16, 12, 12, 1, 1, 0, 1, 1), "3x3g8s2", "7x7s2-stem"])
@pytest.mark.parametrize("direct,node", [(True, True), (True, False), (False, True)],
                         ids=["fast-path", "fast-path-python-node", "custom-op"])
def test_public_op_on_the_cuda_backend_takes_the_cpp_path(cuda_backend_on_cpu, geom, direct, node, monkeypatch):
    monkeypatch.setattr(_common, "DIRECT", [direct])
    monkeypatch.setattr(cuda_impl, "CPP_NODE", [node])
    x, w, bn, res, conv = make(geom, "cpu", torch.float32)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, bn["bn_weight"], bn["bn_bias"], res)]
    gout = torch.randn(res.shape)
    rm, rv = bn["running_mean"].clone(), bn["running_var"].clone()
    with resnet_fused.use_backend("cuda"), resnet_fused.dispatch_trace() as trace:
        out = conv_bn_relu(leaves[0], leaves[1], leaves[2], leaves[3], rm, rv, residual=leaves[4], training=True,
                           **conv)
        got = torch.autograd.grad(out, leaves, gout)
    if direct and node:  # one operator with a C++ autograd node: its backward runs without Python (no note)
        assert trace == [("conv_bn_relu", "cuda"), (cuda_impl.TRAIN_PATH, "c++ node")], trace
        assert "ConvBnReluTrain" in _node_name(out), _node_name(out)
    else:
        assert (cuda_impl.TRAIN_PATH, "c++") in trace and (cuda_impl.TRAIN_PATH + "_backward", "c++") in trace, trace
    # (the C++ node's finalize updates the running statistics in place)
    assert cuda_backend_on_cpu == ["bn_stats", "bn_finalize_affine_" if direct and node else "bn_finalize_affine",
                                   "bn_apply", "bn_bwd_reduce_coef", "bn_bwd_apply"]
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


@pytest.mark.parametrize("node", [True, False], ids=["cpp-node", "python-node"])
@pytest.mark.parametrize("relu,residual", [(True, True), (False, False)])
def test_gradcheck_float64_through_the_cpp_path(cuda_backend_on_cpu, relu, residual, node, monkeypatch):
    monkeypatch.setattr(cuda_impl, "CPP_NODE", [node])
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
        out = f(*inputs)
    assert ("ConvBnReluTrain" in _node_name(out)) == node, _node_name(out)
    assert ((cuda_impl.TRAIN_PATH + "_backward", "c++") in trace) == (not node)


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


def _layer(case, residual):
    """A layer's tensors for a _PARITY case (the residual NCHW-contiguous, as make() builds it)."""
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
    res = res.to(dt) if res is not None else None
    if variant in ("nchw", "1x1-out"):
        x, w = x.contiguous(), w.contiguous(memory_format=torch.channels_last)
    return x, w, bn, res, conv


@pytest.mark.parametrize("case", list(_PARITY))
@pytest.mark.parametrize("relu,residual", [(True, True), (False, False)], ids=["relu-res", "plain"])
def test_cpp_and_python_orchestration_agree(case, relu, residual, monkeypatch):
    """The same layer through the C++ calls and through the Python orchestration they replace (both
    over the stand-ins): the same values, dtypes and strides in all eleven outputs, none aliasing."""
    from resnet_fused.ops import conv_bn_relu as CBR

    dt, _, variant = _PARITY[case]
    x, w, bn, res, conv = _layer(case, residual)
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


# --- the C++ autograd node (csrc/conv_bn_train_node.cpp) ---------------------------------------
def _run_layer(node, x, w, bn, res, conv, need, relu=True, recompute=False, create_graph=False, seed=3):
    """conv_bn_relu on the cuda backend (fast path) with the C++ node or the Python one; need: which of
    (x, weight, bn_weight, bn_bias, residual) require gradients. Returns (out, running stats, grads, out's node)."""
    cuda_impl.CPP_NODE[0] = node
    try:
        ts = [x, w, bn["bn_weight"], bn["bn_bias"], res]
        leaves = [t.detach().clone().requires_grad_(n) if t is not None else None for t, n in zip(ts, need)]
        rm = bn["running_mean"].clone() if bn["running_mean"] is not None else None
        rv = bn["running_var"].clone() if bn["running_var"] is not None else None
        with resnet_fused.use_backend("cuda"):
            out = conv_bn_relu(leaves[0], leaves[1], leaves[2], leaves[3], rm, rv, residual=leaves[4],
                               training=True, relu=relu, recompute=recompute, **conv)
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
        wrt = [t for t, n in zip(leaves, need) if t is not None and n]
        grads = torch.autograd.grad(out, wrt, gout, create_graph=create_graph) if wrt else ()
        return out, (rm, rv), grads, _node_name(out)
    finally:
        cuda_impl.CPP_NODE[0] = True


_NEEDS = {"all": (True,) * 5, "x": (True, False, False, False, False), "w": (False, True, False, False, False),
          "bias-res": (False, False, False, True, True), "gamma-res": (False, False, True, False, True)}


@pytest.mark.parametrize("need", list(_NEEDS))
@pytest.mark.parametrize("case", list(_PARITY))
@pytest.mark.parametrize("relu,residual", [(True, True), (True, False), (False, False)],
                         ids=["relu-res", "relu", "plain"])
def test_cpp_node_matches_the_python_node_bit_for_bit(cuda_backend_on_cpu, case, relu, residual, need):
    """The C++ node against the autograd.Function it replaces, over the same C++ calls: identical outputs,
    running statistics and gradients (values, dtypes, strides) for every subset of inputs needing a
    gradient, with BatchNorm parameters or the residual absent (the node's inputs shift then). With a
    ReLU and no residual the node's backward takes the ReLU's mask from z (not from the output)."""
    x, w, bn, res, conv = _layer(case, residual)
    MASK_FROM_Z.clear()
    runs = {node: _run_layer(node, x, w, bn, res, conv, _NEEDS[need], relu=relu) for node in (True, False)}
    if runs[True][3] is not None and relu and not residual:
        assert MASK_FROM_Z == ["bn_bwd_reduce_coef", "bn_bwd_apply"]
    else:
        assert MASK_FROM_Z == []
    if any(t is not None and n for t, n in zip((x, w, bn["bn_weight"], bn["bn_bias"], res), _NEEDS[need])):
        assert "ConvBnReluTrain" in runs[True][3] and "ConvBnReluTrain" not in runs[False][3]
    else:  # nothing to differentiate: no node on either path
        assert runs[True][3] is None and runs[False][3] is None
    (o1, s1, g1, _), (o2, s2, g2, _) = runs[True], runs[False]
    assert o1.stride() == o2.stride() and torch.equal(o1, o2)
    for a, e in zip(s1, s2):
        assert (a is None and e is None) or (a.dtype == e.dtype and torch.equal(a, e))
    assert len(g1) == len(g2)
    for a, e in zip(g1, g2):
        assert (a.dtype, a.shape, a.stride()) == (e.dtype, e.shape, e.stride())
        assert torch.equal(a, e)


@pytest.mark.parametrize("relu,residual", [(True, True), (True, False), (False, True)],
                         ids=["relu-res", "relu", "res"])
def test_cpp_node_keeps_what_the_python_node_keeps(cuda_backend_on_cpu, relu, residual):
    """Saved for the backward: x, weight, gamma, z (unless recompute), the output only as the ReLU's mask,
    mean and invstd; with recompute the backward convolves again, to the same gradients. The C++ node
    keeps the apply's [K] scale and shift instead of the output where the mask comes from z (a ReLU, no
    residual, no recompute)."""
    x, w, bn, res, conv = _layer("fp32", residual)
    for recompute in (False, True):
        shapes = {}
        for node in (True, False):
            saved = []

            def pack(t):
                saved.append(tuple(t.shape))
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                runs = _run_layer(node, x, w, bn, res, conv, (True,) * 5, relu=relu, recompute=recompute)
            shapes[node] = sorted(saved)
            if node:
                base = runs
            else:
                for a, e in zip(base[2], runs[2]):
                    assert torch.equal(a, e)
        out_shape, K = tuple(base[0].shape), base[0].shape[1]
        assert shapes[False].count(out_shape) == (0 if recompute else 1) + (1 if relu else 0), shapes[False]
        if relu and not residual and not recompute:  # the mask from z: two [K] vectors for the output
            want = sorted([s for s in shapes[False] if s != out_shape] + [out_shape, (K,), (K,)])
            assert shapes[True] == want, (shapes[True], want)
        else:
            assert shapes[True] == shapes[False], shapes
        if recompute:
            kept = _run_layer(True, x, w, bn, res, conv, (True,) * 5, relu=relu)
            for a, e in zip(base[2], kept[2]):
                assert torch.equal(a, e)


def test_cpp_node_recomputes_z_in_the_layout_the_kernels_take(cuda_backend_on_cpu):
    """NCHW input and weight: the conv output recomputed in the backward comes NCHW; the node lays it out
    channels_last for the kernels (the stand-ins refuse anything else), to the Python node's gradients."""
    x, w, bn, res, conv = _layer("fp64", True)
    x, w, res = x.contiguous(), w.contiguous(), res.contiguous()
    assert torch.nn.functional.conv2d(x, w, None, **conv).is_contiguous()  # NCHW, as cuDNN for fp64
    runs = {node: _run_layer(node, x, w, bn, res, conv, (True,) * 5, recompute=True) for node in (True, False)}
    assert "ConvBnReluTrain" in runs[True][3]
    for a, e in zip(runs[True][2], runs[False][2]):
        assert a.stride() == e.stride() and torch.equal(a, e)


def test_cpp_node_running_statistics_updated_as_copy_would(cuda_backend_on_cpu):
    """The in-place update bumps the buffers' version counters (as copy_ does), refuses inference tensors
    outside inference mode and running statistics sharing memory, before writing anything."""
    x, w, bn, res, conv = _layer("fp32", True)
    xr = x.detach().clone().requires_grad_()

    def call(rm, rv):
        with resnet_fused.use_backend("cuda"), resnet_fused.dispatch_trace() as trace:
            conv_bn_relu(xr, w, bn["bn_weight"], bn["bn_bias"], rm, rv, residual=res, training=True, **conv)
        assert (cuda_impl.TRAIN_PATH, "c++ node") in trace

    rm, rv = bn["running_mean"].clone(), bn["running_var"].clone()
    v0 = (rm._version, rv._version)
    call(rm, rv)
    assert rm._version > v0[0] and rv._version > v0[1]
    with torch.inference_mode():
        irm, irv = bn["running_mean"].clone(), bn["running_var"].clone()
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        call(irm, irv)
    assert torch.equal(irm, bn["running_mean"]) and torch.equal(irv, bn["running_var"])
    both = bn["running_var"].clone()
    with pytest.raises(RuntimeError, match="running_mean and running_var must not share memory"):
        call(both, both)
    assert torch.equal(both, bn["running_var"])


def test_cpp_node_backward_under_a_dispatch_mode_runs_its_ops(cuda_backend_on_cpu):
    """The documented difference from the Python node: a dispatch mode active around backward() alone
    sees the ops inside the C++ node's backward (they run, to the same gradients)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x, w, bn, res, conv = _layer("fp32", True)
    plain = _run_layer(True, x, w, bn, res, conv, (True,) * 5)
    xr = x.detach().clone().requires_grad_()
    with resnet_fused.use_backend("cuda"):
        out = conv_bn_relu(xr, w, bn["bn_weight"], bn["bn_bias"], bn["running_mean"].clone(),
                           bn["running_var"].clone(), residual=res, training=True, **conv)
    assert "ConvBnReluTrain" in _node_name(out)
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    with Seen() as mode:
        (gx,) = torch.autograd.grad(out, xr, gout)
    assert any("convolution_backward" in o for o in mode.ops) and any("bn_bwd_apply" in o for o in mode.ops)
    assert torch.equal(gx, plain[2][0])


def test_cpp_node_refuses_double_backward(cuda_backend_on_cpu):
    x, w, bn, res, conv = _layer("fp64", True)
    out, _, grads, _ = _run_layer(True, x, w, bn, res, conv, (True,) * 5, create_graph=True)
    # the first backward may build a graph (a gradient penalty's first step); differentiating it raises
    assert all(g.requires_grad for g in grads)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        sum(g.sum() for g in grads).backward()
    # an output gradient that itself requires grad (the gradient of out.square().sum())
    xr = x.detach().clone().requires_grad_()
    with resnet_fused.use_backend("cuda"):
        out = conv_bn_relu(xr, w, bn["bn_weight"], bn["bn_bias"], bn["running_mean"].clone(),
                           bn["running_var"].clone(), residual=res, training=True, **conv)
    assert "ConvBnReluTrain" in _node_name(out)
    (gx,) = torch.autograd.grad(out.square().sum(), xr, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        gx.sum().backward()


def test_cpp_node_under_compiled_autograd(cuda_backend_on_cpu):
    """Compiled autograd calls the C++ node as an opaque function: the gradients of the plain backward."""
    from torch._dynamo import compiled_autograd

    x, w, bn, res, conv = _layer("fp32", True)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, bn["bn_weight"], bn["bn_bias"], res)]
    with resnet_fused.use_backend("cuda"):
        out = conv_bn_relu(*leaves[:4], bn["running_mean"].clone(), bn["running_var"].clone(), residual=leaves[4],
                           training=True, **conv)
    assert "ConvBnReluTrain" in _node_name(out)
    exp = torch.autograd.grad(out.square().sum(), leaves, retain_graph=True)
    with compiled_autograd._enable(torch.compile(backend="eager")):
        out.square().sum().backward()
    for leaf, e in zip(leaves, exp):
        assert_close(leaf.grad, e, 1e-6, 1e-6)


def test_cpp_node_without_gradients_updates_the_running_statistics(cuda_backend_on_cpu):
    """Under no_grad and inference_mode (the operator's CPU kernel, below the Autograd key) the layer
    runs with no node and updates the running statistics in place, as with gradients."""
    x, w, bn, res, conv = _layer("fp32", True)
    exp, (erm, erv), _, _ = _run_layer(True, x, w, bn, res, conv, (False,) * 5)
    for ctx in (torch.no_grad, torch.inference_mode):
        rm, rv = bn["running_mean"].clone(), bn["running_var"].clone()
        with ctx(), resnet_fused.use_backend("cuda"), resnet_fused.dispatch_trace() as trace:
            out = conv_bn_relu(x, w, bn["bn_weight"], bn["bn_bias"], rm, rv, residual=res, training=True, **conv)
        assert (cuda_impl.TRAIN_PATH, "c++ node") in trace and out.grad_fn is None
        assert torch.equal(out, exp) and torch.equal(rm, erm) and torch.equal(rv, erv)
        assert not torch.equal(rm, bn["running_mean"])


def test_cpp_node_under_activation_checkpointing(cuda_backend_on_cpu):
    """torch.utils.checkpoint (non-reentrant: saved-tensor hooks on the C++ node) gives the gradients of
    the plain run."""
    from torch.utils.checkpoint import checkpoint

    x, w, bn, res, conv = _layer("fp64", True)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, bn["bn_weight"], bn["bn_bias"], res)]

    def f(x, w, g, b, r):
        return conv_bn_relu(x, w, g, b, bn["running_mean"].clone(), bn["running_var"].clone(), residual=r,
                            training=True, **conv)

    with resnet_fused.use_backend("cuda"):
        plain = torch.autograd.grad(f(*leaves).square().sum(), leaves)
        ck = checkpoint(f, *leaves, use_reentrant=False)
        assert "ConvBnReluTrain" in _node_name(ck)  # (non-reentrant: the layer's own node, hooks on its saves)
        got = torch.autograd.grad(ck.square().sum(), leaves)
    for a, e in zip(got, plain):
        assert_close(a, e, 1e-12, 1e-12)


def test_cpp_node_not_taken_where_the_python_paths_must_run(cuda_backend_on_cpu):
    """Synchronized BatchNorm and calls that something may intercept (here a TorchFunctionMode) keep
    their paths; only plain eager training calls on the cuda backend take the node."""
    x, w, bn, res, conv = _layer("fp32", True)
    args = (x, w, bn["bn_weight"].clone().requires_grad_(), bn["bn_bias"], bn["running_mean"].clone(),
            bn["running_var"].clone())

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with resnet_fused.use_backend("cuda"), resnet_fused.dispatch_trace() as trace, Mode():
        out = conv_bn_relu(*args, residual=res, training=True, **conv)
    assert (cuda_impl.TRAIN_PATH, "c++") in trace and (cuda_impl.TRAIN_PATH, "c++ node") not in trace
    assert "ConvBnReluTrain" not in _node_name(out)
    with resnet_fused.use_backend("cuda"), resnet_fused.dispatch_trace() as trace:
        out = conv_bn_relu(*args, residual=res, training=False, **conv)
    assert (cuda_impl.TRAIN_PATH, "c++ node") not in trace


def test_model_training_step_through_the_cpp_node(cuda_backend_on_cpu):
    """A ResNet training step on the cuda backend: every conv layer through the C++ node, the same loss,
    gradients and running statistics as through the Python node."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64).to(memory_format=torch.channels_last)
    results = {}
    for node in (True, False):
        cuda_impl.CPP_NODE[0] = node
        try:
            torch.manual_seed(1)
            with resnet_fused.use_backend("cuda"):
                m = resnet_fused.resnet18(num_classes=10).double().to(memory_format=torch.channels_last).train()
                with resnet_fused.dispatch_trace() as trace:
                    loss = m(x).square().mean()
                loss.backward()
        finally:
            cuda_impl.CPP_NODE[0] = True
        assert trace.count((cuda_impl.TRAIN_PATH, "c++ node")) == (20 if node else 0)
        results[node] = (loss, {k: v.clone() for k, v in m.state_dict().items()},
                         {k: p.grad for k, p in m.named_parameters()})
    (l1, s1, g1), (l2, s2, g2) = results[True], results[False]
    assert torch.equal(l1, l2)
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
@pytest.mark.parametrize("variant", ["relu-res", "relu", "relu-recompute", "relu-nchw-recompute", "plain"])
def test_gpu_cpp_node_against_the_python_node(dtype, variant):
    """On a GPU, with the real kernels: the C++ node is the path a training layer takes, with the
    outputs, running statistics and gradients of the Python node over the same calls (up to the
    order of cuDNN's weight-gradient accumulation). "relu": the node's kernels take the ReLU's mask
    from z (FromZ variants), the Python node's from the output; "nchw-recompute": a recomputed conv
    output that cuDNN returns NCHW."""
    if "cuda" not in _backends.available_backends():
        pytest.skip("CUDA extension not loaded")
    residual = variant == "relu-res"
    x, w, bn, res, conv = make("3x3s2", "cuda", torch.float32, N=8, residual=residual)
    x, w = x.to(dtype), w.to(dtype)
    res = res.to(dtype) if residual else None
    if dtype == torch.float64:  # as model.double() leaves the BatchNorm
        bn = {k: v.double() for k, v in bn.items()}
    if "nchw" in variant:
        x, w = x.contiguous(), w.contiguous()
    kw = dict(relu=variant != "plain", recompute="recompute" in variant)
    runs = {node: _run_layer(node, x, w, bn, res, conv, (True,) * 5, **kw) for node in (True, False)}
    assert "ConvBnReluTrain" in runs[True][3] and "ConvBnReluTrain" not in runs[False][3]
    (o1, s1, g1, _), (o2, s2, g2, _) = runs[True], runs[False]
    assert torch.equal(o1, o2) and o1.stride() == o2.stride()
    for a, e in zip(s1, s2):
        assert torch.equal(a, e)
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}.get(dtype, 1e-5)
    for name, a, e in zip(["x", "weight", "bn_weight", "bn_bias", "residual"], g1, g2):
        assert (a.dtype, a.stride()) == (e.dtype, e.stride()), name
        assert_close(a, e, tol * e.abs().max().item(), tol, f"grad {name}")


@pytest.mark.parametrize("layout", ["strided", "expanded"])
@pytest.mark.parametrize("with_res", [False, True], ids=["no-residual", "residual"])
def test_batchnorm_vectors_as_views_on_the_cuda_backend(cuda_backend_on_cpu, layout, with_res):
    """As test_conv_bn_relu.py's: strided or expanded BatchNorm vectors give the results of contiguous
    copies. Strided running statistics (which the C++ node would update in place through a pointer)
    take the Python node over the C++ calls, the others the C++ node."""
    def path(trace, as_view):
        node = ("conv_bn_train/cuda", "c++ node") in trace
        return node == (layout == "expanded" or not as_view) and (node or ("conv_bn_train/cuda", "c++") in trace)

    check_batchnorm_vectors_as_views("cuda", "cpu", layout, with_res, expect_trace=path)


@pytest.mark.parametrize("pad", [4, 8])
def test_training_stem_padded_for_cudnn_gives_the_same_result(cuda_backend_on_cpu, monkeypatch, pad):
    """RESNET_FUSED_CUDNN_STEM_PAD (docs/perf.md lead 17) in training on the CUDA backend: the layer
    (C++ node) sees the input and weight padded with zero channels; output, running statistics and
    the gradients of the 3-channel weight, the input and the BatchNorm are the unpadded ones."""
    x, w, bn, _, conv = make("7x7s2-stem", "cpu", torch.float64, N=2)
    results = {}
    for p in (0, pad):
        monkeypatch.setattr(_common, "CUDNN_STEM_PAD", [p])
        xi, wi = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        g, b = bn["bn_weight"].detach().clone().requires_grad_(), bn["bn_bias"].detach().clone().requires_grad_()
        rm, rv = bn["running_mean"].clone(), bn["running_var"].clone()
        with resnet_fused.use_backend("cuda"), resnet_fused.dispatch_trace() as trace:
            out = conv_bn_relu(xi, wi, g, b, rm, rv, training=True, **conv)
        assert [t for op, t in trace if op == "conv_bn_relu/cudnn_pad"] == ([str(pad)] if p else []), trace
        assert (cuda_impl.TRAIN_PATH, "c++ node") in trace
        gout = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(5))
        grads = torch.autograd.grad(out, (xi, wi, g, b), gout)
        assert grads[1].shape == w.shape
        results[p] = (out, rm, rv) + grads
    for a, e in zip(results[pad], results[0]):
        assert_close(a, e, 1e-10, 1e-10, "padded stem")
