"""The eager fast path (``_common.direct_ok``): plain eager calls skip the torch.library custom
ops and run the same implementation through an ``autograd.Function``. It must be
indistinguishable from the custom-op path (bitwise: the same kernels run), must not be taken
where something intercepts the ops (dispatch / function modes, compile, fake and meta tensors),
and the tests prove which path ran by counting calls of the custom ops."""
from __future__ import annotations

import pytest
import torch

import resnet_fused
import resnet_fused.ops.conv_bn_relu as cbr
from resnet_fused.functional import conv_bn_relu
from resnet_fused.ops import _common
from resnet_fused.ops.conv_bn_relu import inference

from conftest import BACKEND_DEVICE
from test_conv_bn_relu import make

pytestmark = pytest.mark.usefixtures("ieee_fp32")


@pytest.fixture
def counted(monkeypatch):
    """Counts of calls of the custom ops the public functions and the models may use."""
    calls = {"conv_bn_fwd": 0, "conv_affine_act": 0, "conv_affine_act_maxpool": 0}
    fwd, aff, pool = cbr._fwd_op, inference.conv_affine_act_op, inference.conv_affine_act_maxpool_op

    def fwd_counted(*a):
        calls["conv_bn_fwd"] += 1
        return fwd(*a)

    def aff_counted(*a):
        calls["conv_affine_act"] += 1
        return aff(*a)

    def pool_counted(*a):
        calls["conv_affine_act_maxpool"] += 1
        return pool(*a)

    monkeypatch.setattr(cbr, "_fwd_op", fwd_counted)
    monkeypatch.setattr(inference, "conv_affine_act_op", aff_counted)
    monkeypatch.setattr(inference, "conv_affine_act_maxpool_op", pool_counted)
    return calls


MASKS = {  # which of (x, weight, bn_weight, bn_bias, residual) need a gradient
    "all": (True,) * 5, "x": (True, False, False, False, False), "weight": (False, True, False, False, False),
    "bn": (False, False, True, True, False), "residual": (False, False, False, False, True),
}


def _step(backend, x, w, bn, res, conv, training, mask, relu):
    """One forward (+ backward when anything needs a gradient); returns the output, the updated
    running stats and every gradient."""
    x, w, res = (t.detach().clone().requires_grad_(m) for t, m in zip((x, w, res), (mask[0], mask[1], mask[4])))
    bn = {k: v.clone() for k, v in bn.items()}
    g, b = bn["bn_weight"].requires_grad_(mask[2]), bn["bn_bias"].requires_grad_(mask[3])
    with resnet_fused.use_backend(backend):
        out = conv_bn_relu(x, w, g, b, bn["running_mean"], bn["running_var"], residual=res, training=training,
                           relu=relu, **conv)
    if any(mask):
        # a channels_last gradient, as the next fused layer's backward produces
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        out.backward(gout.to(out.device).contiguous(memory_format=torch.channels_last))
    return [out.detach(), bn["running_mean"], bn["running_var"], x.grad, w.grad, g.grad, b.grad, res.grad]


@pytest.mark.parametrize("case", BACKEND_DEVICE)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("mask", list(MASKS) + ["none"])
def test_direct_path_equals_the_custom_op_path_bitwise(case, training, relu, mask, counted, monkeypatch):
    backend, device = case
    mask = MASKS.get(mask, (False,) * 5)
    if device == "cuda":
        # atomics (cuDNN's weight gradient, the reductions' fast forms) would differ run to run
        prev = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
        monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
        try:
            return _compare_paths(backend, device, training, mask, relu, counted, monkeypatch)
        finally:
            torch.use_deterministic_algorithms(prev)
    _compare_paths(backend, device, training, mask, relu, counted, monkeypatch)


def _compare_paths(backend, device, training, mask, relu, counted, monkeypatch):
    x, w, bn, res, conv = make("3x3s2", device)
    direct = _step(backend, x, w, bn, res, conv, training, mask, relu)
    assert counted["conv_bn_fwd"] == 0  # the fast path ran
    monkeypatch.setattr(_common, "DIRECT", [False])
    via_op = _step(backend, x, w, bn, res, conv, training, mask, relu)
    assert counted["conv_bn_fwd"] == 1  # the custom op ran
    for name, a, e in zip(["out", "running_mean", "running_var", "dx", "dw", "dgamma", "dbeta", "dres"],
                          direct, via_op):
        assert (a is None) == (e is None), f"{backend} {name}: a gradient on one path only"
        if a is not None:
            assert a.dtype == e.dtype and a.stride() == e.stride(), f"{backend} {name}: dtype or layout differ"
            assert torch.equal(a, e), f"{backend} {name}: the two paths differ"


# (the interpreter's case is left out: 40 s for a ResNet-18 there; the op-level test covers it)
@pytest.mark.parametrize("case", [p for p in BACKEND_DEVICE if "interp" not in p.id])
def test_eval_fast_path_of_the_folded_model(case, counted, monkeypatch):
    backend, device = case
    torch.manual_seed(0)
    m = resnet_fused.resnet18(num_classes=4).to(device).eval()
    x = torch.randn(1, 3, 16, 16, device=device)
    with torch.no_grad(), resnet_fused.use_backend(backend):
        fast = m(x)
        assert counted == {"conv_bn_fwd": 0, "conv_affine_act": 0, "conv_affine_act_maxpool": 0}
        monkeypatch.setattr(_common, "DIRECT", [False])
        slow = m(x)
    # every conv of ResNet-18 through a custom op: the stem with its pool, the 19 others
    assert counted["conv_affine_act_maxpool"] == 1 and counted["conv_affine_act"] == 19
    assert torch.equal(fast, slow)


def test_interceptors_get_the_custom_op(counted):
    # A dispatch mode sees the custom op (and counts its FLOPs as one op), never its insides.
    from torch.utils.flop_counter import FlopCounterMode

    x, w, bn, res, conv = make("3x3s1", "cpu")
    args = (x, w, bn["bn_weight"], bn["bn_bias"], bn["running_mean"].clone(), bn["running_var"].clone())
    with resnet_fused.use_backend("reference"):
        with FlopCounterMode(display=False) as fc:
            conv_bn_relu(*args, residual=res, training=True, **conv)
        assert counted["conv_bn_fwd"] == 1
        ops = {str(k) for k in fc.get_flop_counts().get("Global", {})}
        assert not any("convolution" in o for o in ops), ops  # the conv inside was not seen
        # a function mode (here torch.device as a context) also keeps the custom op
        with torch.device("cpu"):
            conv_bn_relu(*args, residual=res, training=True, **conv)
        assert counted["conv_bn_fwd"] == 2
        # meta tensors: the custom op's fake kernel
        meta = [t.to("meta") for t in args]
        out = conv_bn_relu(*meta, residual=res.to("meta"), training=True, **conv)
        assert counted["conv_bn_fwd"] == 3 and out.device.type == "meta"
        # plain eager: the fast path
        conv_bn_relu(*args, residual=res, training=True, **conv)
        assert counted["conv_bn_fwd"] == 3


def test_compile_traces_the_custom_op(counted):
    x, w, bn, res, conv = make("1x1s1", "cpu")
    args = (x, w, bn["bn_weight"], bn["bn_bias"], bn["running_mean"].clone(), bn["running_var"].clone())
    torch._dynamo.reset()
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    with resnet_fused.use_backend("reference"):
        f = torch.compile(lambda *a: conv_bn_relu(*a, residual=res, training=False, **conv), backend=backend,
                          fullgraph=True)
        out = f(*args)
        exp = conv_bn_relu(*args, residual=res, training=False, **conv)
    assert any("resnet_fused.conv_bn_fwd" in s for s in seen), seen
    assert torch.equal(out, exp)


def test_double_backward_is_refused_on_both_paths(monkeypatch):
    x, w, bn, res, conv = make("1x1s1", "cpu")
    for direct in (True, False):
        monkeypatch.setattr(_common, "DIRECT", [direct])
        xr = x.detach().clone().requires_grad_()
        with resnet_fused.use_backend("reference"):
            out = conv_bn_relu(xr, w, bn["bn_weight"], bn["bn_bias"], bn["running_mean"].clone(),
                               bn["running_var"].clone(), training=True, **conv)
        (gx,) = torch.autograd.grad(out.square().sum(), xr, create_graph=True)
        with pytest.raises(RuntimeError):
            gx.sum().backward()


def test_jit_trace_records_the_custom_op(counted):
    x, w, bn, res, conv = make("1x1s1", "cpu")
    args = (x, w, bn["bn_weight"], bn["bn_bias"], bn["running_mean"].clone(), bn["running_var"].clone(), res)

    def f(x, w, g, b, rm, rv, res):
        return conv_bn_relu(x, w, g, b, rm, rv, residual=res, training=False, **conv)

    with resnet_fused.use_backend("reference"):
        traced = torch.jit.trace(f, args, check_trace=False)
        assert counted["conv_bn_fwd"] == 1
        assert "resnet_fused::conv_bn_fwd" in str(traced.graph)
        assert torch.equal(traced(*args), f(*args))


def test_backward_under_a_mode_takes_the_custom_op(monkeypatch):
    # the forward ran eagerly (fast path); a dispatch mode around backward() must see the
    # backward custom op, not the aten ops inside it
    from torch.utils.flop_counter import FlopCounterMode

    calls = []
    direct_bwd = cbr._bwd_direct
    monkeypatch.setattr(cbr, "_bwd_direct", lambda *a: calls.append(1) or direct_bwd(*a))
    x, w, bn, res, conv = make("3x3s1", "cpu")
    with resnet_fused.use_backend("reference"):
        for mode in (None, FlopCounterMode(display=False)):
            xr = x.detach().clone().requires_grad_()
            out = conv_bn_relu(xr, w, bn["bn_weight"], bn["bn_bias"], bn["running_mean"].clone(),
                               bn["running_var"].clone(), training=True, **conv)
            if mode is None:
                out.sum().backward()
                assert calls == [1]
            else:
                with mode:
                    out.sum().backward()
                assert calls == [1]  # the custom op ran instead
                assert not any("convolution_backward" in str(k) for k in mode.get_flop_counts().get("Global", {}))
            assert xr.grad is not None


class _DropGrad(torch.autograd.Function):
    """Identity whose backward sends no gradient upstream."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, g):
        return None


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("recompute,relu", [(False, True), (True, True), (True, False)])
def test_synchronized_backward_joins_the_collective_without_an_output_gradient(direct, recompute, relu,
                                                                                monkeypatch):
    # (with recompute and no ReLU the forward keeps neither the conv output nor the output)
    # every rank must join the backward's all-reduce, also a rank whose output got no gradient
    from resnet_fused.ops.conv_bn_relu import reference, sync

    joined = []
    monkeypatch.setattr(_common, "DIRECT", [direct])
    monkeypatch.setattr(sync, "group_key", lambda g: 7 if g is not None else 0)
    monkeypatch.setattr(sync, "finalize", lambda pm, pm2, rows, M, rm, rv, mom, eps, key:
                        reference.bn_finalize(pm, pm2, rows, M, rm, rv, mom, eps))
    monkeypatch.setattr(sync, "reduce_grad_sums", lambda gy, gyz, M, key: joined.append(key) or (gy, gyz, M))
    x, w, bn, res, conv = make("1x1s1", "cpu")
    xr = x.detach().clone().requires_grad_()
    with resnet_fused.use_backend("reference"):
        out = conv_bn_relu(xr, w, bn["bn_weight"], bn["bn_bias"], bn["running_mean"].clone(),
                           bn["running_var"].clone(), training=True, process_group=True, recompute=recompute,
                           relu=relu, **conv)
        (_DropGrad.apply(out).sum() + 0 * xr.sum()).backward()
    assert joined == [7]
    assert xr.grad is not None and not xr.grad.any()  # nothing flowed back through the conv


@pytest.mark.skipif(not __import__("resnet_fused")._triton.interpreting(), reason="TRITON_INTERPRET=1 not set")
@pytest.mark.parametrize("direct", [True, False])
def test_synchronized_triton_backward_recomputes_the_relu_mask_from_z(direct, monkeypatch):
    # synchronized BatchNorm on the Triton backend keeps the Python arithmetic between its two
    # collectives, and still takes the mask from z (one rank: the collectives stubbed as identities)
    from resnet_fused.ops.conv_bn_relu import sync, triton_kernels

    monkeypatch.setattr(_common, "DIRECT", [direct])
    monkeypatch.setattr(sync, "group_key", lambda g: 7 if g is not None else 0)
    monkeypatch.setattr(sync, "finalize", lambda pm, pm2, rows, M, rm, rv, mom, eps, key:
                        triton_kernels.bn_finalize(pm, pm2, rows, M, rm, rv, mom, eps))
    joined = []
    monkeypatch.setattr(sync, "reduce_grad_sums", lambda gy, gyz, M, key: joined.append(key) or (gy, gyz, M))
    x, w, bn, _, conv = make("3x3s1", "cpu")
    grads = {}
    for group in (True, None):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, bn["bn_weight"], bn["bn_bias"])]
        with resnet_fused.use_backend("triton"), resnet_fused.dispatch_trace() as trace:
            out = conv_bn_relu(*leaves, bn["running_mean"].clone(), bn["running_var"].clone(), training=True,
                               process_group=group, **conv)
            saved = [t for t in out.grad_fn.saved_tensors if t is not None]
            grads[group] = torch.autograd.grad(out.square().sum(), leaves)
        assert ("conv_bn_relu_backward/triton", "mask from z") in trace, trace
        assert joined == [7]  # the synchronized call's backward joined; the plain one's (after it) did not
        assert not any(t.data_ptr() == out.data_ptr() for t in saved)
    for name, a, e in zip(("x", "weight", "bn_weight", "bn_bias"), grads[True], grads[None]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=f"grad {name}")
