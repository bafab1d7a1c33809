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
    """Counts of calls of the two custom ops the public functions may use."""
    calls = {"conv_bn_fwd": 0, "conv_affine_act": 0}
    fwd, aff = cbr._fwd_op, inference.conv_affine_act_op

    def fwd_counted(*a):
        calls["conv_bn_fwd"] += 1
        return fwd(*a)

    def aff_counted(*a):
        calls["conv_affine_act"] += 1
        return aff(*a)

    monkeypatch.setattr(cbr, "_fwd_op", fwd_counted)
    monkeypatch.setattr(inference, "conv_affine_act_op", aff_counted)
    return calls


def _step(backend, x, w, bn, res, conv, training):
    """One forward + backward; returns the output, the updated running stats and every gradient."""
    x, w, res = (t.detach().clone().requires_grad_() for t in (x, w, res))
    bn = {k: v.clone() for k, v in bn.items()}
    g, b = bn["bn_weight"].requires_grad_(), bn["bn_bias"].requires_grad_()
    with resnet_fused.use_backend(backend):
        out = conv_bn_relu(x, w, g, b, bn["running_mean"], bn["running_var"], residual=res, training=training,
                           **conv)
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype).to(out.device)
    out.backward(gout)
    return [out.detach(), bn["running_mean"], bn["running_var"], x.grad, w.grad, g.grad, b.grad, res.grad]


@pytest.mark.parametrize("case", BACKEND_DEVICE)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_direct_path_equals_the_custom_op_path_bitwise(case, training, counted, monkeypatch):
    backend, device = case
    if device == "cuda":
        # atomics (cuDNN's weight gradient, the reductions' fast forms) would differ run to run
        prev = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
        monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
        try:
            return _compare_paths(backend, device, training, counted, monkeypatch)
        finally:
            torch.use_deterministic_algorithms(prev)
    _compare_paths(backend, device, training, counted, monkeypatch)


def _compare_paths(backend, device, training, counted, monkeypatch):
    x, w, bn, res, conv = make("3x3s2", device)
    direct = _step(backend, x, w, bn, res, conv, training)
    assert counted["conv_bn_fwd"] == 0  # the fast path ran
    monkeypatch.setattr(_common, "DIRECT", [False])
    via_op = _step(backend, x, w, bn, res, conv, training)
    assert counted["conv_bn_fwd"] == 1  # the custom op ran
    for name, a, e in zip(["out", "running_mean", "running_var", "dx", "dw", "dgamma", "dbeta", "dres"],
                          direct, via_op):
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
        assert counted == {"conv_bn_fwd": 0, "conv_affine_act": 0}
        monkeypatch.setattr(_common, "DIRECT", [False])
        slow = m(x)
    assert counted["conv_affine_act"] == 20  # every conv of ResNet-18 through the custom op
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
