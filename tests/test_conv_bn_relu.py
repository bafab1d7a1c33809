"""conv_bn_relu on every backend against the eager composite (F.conv2d -> F.batch_norm
-> add -> ReLU).

Tolerances: fp32 runs with IEEE products (TF32 off), so differences come from summation
order in the conv (tens of terms) amplified by 1/std in the normalisation: 1e-4 absolute
and relative on O(1) outputs. fp64: 1e-10. fp16/bf16 are judged against the fp32 reference
relative to PyTorch's own low-precision error: max|ours - ref32| <= 2 max|torch_lp - ref32| + tiny.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused import _triton
from resnet_fused.functional import conv_bn_relu
from resnet_fused.ops.conv_bn_relu import conv_bn_relu_reference

from conftest import NO_CUDA, BACKEND_DEVICE, FUSED_BACKEND_DEVICE, assert_close

# name: (C, K, H, W, kernel, stride, padding, dilation, groups)
GEOMETRIES = {
    "1x1s1": (8, 16, 5, 6, 1, 1, 0, 1, 1),
    "1x1s2": (8, 16, 6, 7, 1, 2, 0, 1, 1),
    "3x3s1": (8, 16, 5, 5, 3, 1, 1, 1, 1),
    "3x3s2": (8, 16, 7, 6, 3, 2, 1, 1, 1),
    "3x3d2": (8, 16, 6, 6, 3, 1, 2, 2, 1),
    "7x7s2-stem": (3, 16, 11, 11, 7, 2, 3, 1, 1),
    "3x3g8": (32, 32, 5, 5, 3, 1, 1, 1, 8),
    "3x3g8s2": (32, 32, 6, 6, 3, 2, 1, 1, 8),
    # several tiles in every GEMM dimension (M, K and the C loop) at the interpreter's tile sizes
    "3x3-multitile": (40, 48, 6, 6, 3, 1, 1, 1, 1),
    # >= 16 channels per group: the per-(r, s) reduction (fewer take the packed (r, s, c) one)
    "1x1s2-wide": (32, 16, 6, 7, 1, 2, 0, 1, 1),
    "3x3s2-wide": (24, 16, 7, 6, 3, 2, 1, 1, 1),
    "7x7s2-wide": (16, 16, 9, 9, 7, 2, 3, 1, 1),
    "3x3g2d2-wide": (32, 32, 6, 6, 3, 1, 2, 2, 2),
}


pytestmark = pytest.mark.usefixtures("ieee_fp32")


def make(geom, device, dtype=torch.float32, N=2, seed=0, residual=True, affine=True):
    C, K, H, W, k, s, p, d, g = GEOMETRIES[geom] if isinstance(geom, str) else geom
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(device=device, dtype=dtype)

    x = r(N, C, H, W).to(memory_format=torch.channels_last)
    w = r(K, C // g, k, k, scale=(C // g * k * k) ** -0.5)
    P = (H + 2 * p - d * (k - 1) - 1) // s + 1
    Q = (W + 2 * p - d * (k - 1) - 1) // s + 1
    bn = dict(
        bn_weight=r(K, scale=0.3, shift=1.0) if affine else None,
        bn_bias=r(K, scale=0.3) if affine else None,
        running_mean=r(K, scale=0.1).float() if dtype != torch.float64 else r(K, scale=0.1),
        running_var=(torch.rand(K, generator=gen) + 0.5).to(device=device,
                                                             dtype=torch.float64 if dtype == torch.float64 else torch.float32),
    )
    res = r(N, K, P, Q) if residual else None
    conv = dict(stride=s, padding=p, dilation=d, groups=g)
    return x, w, bn, res, conv


def _bn_params_to(bn, dtype):
    # As model.to(dtype) leaves them: every BatchNorm tensor in the low-precision dtype.
    return {k: (v.to(dtype) if v is not None else v) for k, v in bn.items()}


def run(backend, x, w, bn, res, conv, **kw):
    bn = {k: (v.clone() if v is not None else None) for k, v in bn.items()}
    with resnet_fused.use_backend(backend), resnet_fused.dispatch_trace() as trace:
        out = conv_bn_relu(x, w, bn["bn_weight"], bn["bn_bias"], bn["running_mean"], bn["running_var"],
                           residual=res, **conv, **kw)
    assert trace and trace[0] == ("conv_bn_relu", backend), f"expected the {backend} path, trace={trace}"
    return out, bn


def ref(x, w, bn, res, conv, **kw):
    bn = {k: (v.clone() if v is not None else None) for k, v in bn.items()}
    out = conv_bn_relu_reference(x, w, bn["bn_weight"], bn["bn_bias"], bn["running_mean"], bn["running_var"],
                                 residual=res, **conv, **kw)
    return out, bn


def _tol(dtype):
    return (1e-10, 1e-10) if dtype == torch.float64 else (1e-4, 1e-4)


@pytest.mark.parametrize("case", BACKEND_DEVICE)
@pytest.mark.parametrize("geom", list(GEOMETRIES))
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_forward_parity_fp32(case, geom, training):
    backend, device = case
    x, w, bn, res, conv = make(geom, device)
    for kw in (dict(residual=res, relu=True), dict(residual=None, relu=False)):
        r = kw.pop("residual")
        out, bn_o = run(backend, x, w, bn, r, conv, training=training, **kw)
        exp, bn_e = ref(x, w, bn, r, conv, training=training, **kw)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert_close(out, exp, *_tol(torch.float32), msg=f"{backend} {geom} {kw}")
        # Running statistics: updated in training exactly as F.batch_norm does, untouched in eval.
        assert_close(bn_o["running_mean"], bn_e["running_mean"], 1e-6, 1e-5)
        assert_close(bn_o["running_var"], bn_e["running_var"], 1e-6, 1e-5)
        if not training:
            assert torch.equal(bn_o["running_mean"], bn["running_mean"])


@pytest.mark.parametrize("case", BACKEND_DEVICE)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_forward_parity_fp64(case, training):
    backend, device = case
    x, w, bn, res, conv = make("3x3s2", device, torch.float64)
    out, bn_o = run(backend, x, w, bn, res, conv, training=training)
    exp, bn_e = ref(x, w, bn, res, conv, training=training)
    assert_close(out, exp, *_tol(torch.float64))
    assert_close(bn_o["running_var"], bn_e["running_var"], 1e-12, 1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_forward_tf32_like_pytorch(backend, training):
    # PyTorch's default on a GPU: fp32 convolutions in TF32 (cudnn.allow_tf32), which the fused
    # ops follow. Judged against float64 truth relative to PyTorch's own TF32 error.
    if backend == "cuda" and "cuda" not in resnet_fused.available_backends():
        pytest.skip("CUDA extension not loaded")
    x, w, bn, res, conv = make("3x3-multitile", "cuda", N=4)
    truth, _ = ref(*(t.double() for t in (x, w)), {k: v.double() for k, v in bn.items()}, res.double(), conv,
                   training=training)
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        out, _ = run(backend, x, w, bn, res, conv, training=training)
        torch_tf32, _ = ref(x, w, bn, res, conv, training=training)
    finally:
        torch.backends.cudnn.allow_tf32 = prev
    ours_err = (out.double() - truth).abs().max().item()
    torch_err = (torch_tf32.double() - truth).abs().max().item()
    # (+ TF32's own scale: cuDNN may pick an IEEE kernel for so small a problem -- seen on an
    # H100 for a 1x1x1 one -- while Triton's tf32 dot rounds the operands to 10-bit mantissas)
    scale = truth.abs().max().item()
    assert ours_err <= 3 * torch_err + 5e-3 * scale, f"ours {ours_err} vs PyTorch's TF32 {torch_err} (scale {scale})"


def _lowp_dtypes(device):
    if device == "cpu" and _triton.interpreting():
        return [torch.float16]  # numpy has no bfloat16
    return [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("case", BACKEND_DEVICE)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_forward_low_precision(case, training):
    backend, device = case
    for dtype in _lowp_dtypes(device):
        x, w, bn, res, conv = make("3x3s1", device, torch.float32, N=4)
        exp32, _ = ref(x, w, bn, res, conv, training=training)
        xl, wl, rl = x.to(dtype), w.to(dtype), res.to(dtype)
        bnl = _bn_params_to(bn, dtype)
        torch_lp, _ = ref(xl, wl, bnl, rl, conv, training=training)
        out, _ = run(backend, xl, wl, bnl, rl, conv, training=training)
        assert out.dtype == dtype
        ours_err = (out.float() - exp32).abs().max().item()
        torch_err = (torch_lp.float() - exp32).abs().max().item()
        assert ours_err <= 2 * torch_err + 1e-3, f"{dtype}: ours {ours_err} vs torch {torch_err}"


@pytest.mark.parametrize("case", BACKEND_DEVICE)
def test_layouts_and_affine_options(case):
    backend, device = case
    x, w, bn, res, conv = make("3x3s2", device)
    for name, xx, rr in [
        ("nchw", x.contiguous(), res.contiguous()),
        ("non-contiguous", x.contiguous()[:, :, :, :].transpose(2, 3).contiguous().transpose(2, 3), res[:, :, :, :]),
        ("sliced-batch", torch.cat([x, x])[::2], res),
    ]:
        out, _ = run(backend, xx, w, bn, rr, conv, training=True)
        exp, _ = ref(xx, w, bn, rr, conv, training=True)
        assert_close(out, exp, 1e-4, 1e-4, msg=name)
    # affine=False (no bn weight/bias), and training without running statistics.
    x, w, bn, res, conv = make("1x1s1", device, affine=False)
    bn_nostats = dict(bn, running_mean=None, running_var=None)
    for b, training in [(bn, False), (bn, True), (bn_nostats, True)]:
        out, _ = run(backend, x, w, b, res, conv, training=training)
        exp, _ = ref(x, w, b, res, conv, training=training)
        assert_close(out, exp, 1e-4, 1e-4)


@pytest.mark.parametrize("case", BACKEND_DEVICE)
def test_running_stats_momentum(case):
    backend, device = case
    x, w, bn, res, conv = make("1x1s2", device)
    for momentum in (0.1, 0.5, 1.0, 0.0):
        _, bn_o = run(backend, x, w, bn, res, conv, training=True, momentum=momentum, eps=1e-3)
        _, bn_e = ref(x, w, bn, res, conv, training=True, momentum=momentum, eps=1e-3)
        assert_close(bn_o["running_mean"], bn_e["running_mean"], 1e-6, 1e-5, msg=f"momentum={momentum}")
        assert_close(bn_o["running_var"], bn_e["running_var"], 1e-6, 1e-5, msg=f"momentum={momentum}")


@pytest.mark.parametrize("case", BACKEND_DEVICE)
def test_large_mean_statistics_are_stable(case):
    # A channel mean far above its spread: E[z^2] - E[z]^2 in fp32 would lose every digit.
    backend, device = case
    x, w, bn, res, conv = make("1x1s1", device)
    x = (x + 300.0).contiguous(memory_format=torch.channels_last)
    out, bn_o = run(backend, x, w, bn, None, conv, training=True, relu=False)
    exp, bn_e = ref(x.double(), w.double(), {k: v.double() for k, v in bn.items()}, None, conv, training=True,
                    relu=False)
    assert_close(out.double(), exp, 2e-2, 1e-3)  # conv of inputs ~300 in fp32: ~1e-5 relative error
    assert_close(bn_o["running_var"].double(), bn_e["running_var"], 1e-3, 1e-3)


@pytest.mark.parametrize("case", BACKEND_DEVICE)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("geom", ["3x3s2", "3x3g8s2", "7x7s2-stem"])
def test_backward_parity_fp32(case, training, geom):
    backend, device = case
    x, w, bn, res, conv = make(geom, device)
    leaves = [x, w, bn["bn_weight"], bn["bn_bias"], res]
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    xg, wg, gg, bg, rg = leaves
    bnp = dict(bn, bn_weight=gg, bn_bias=bg)
    gout = torch.randn(res.shape, device=device)
    with resnet_fused.use_backend(backend), resnet_fused.dispatch_trace() as trace:
        out = conv_bn_relu(xg, wg, gg, bg, bn["running_mean"].clone(), bn["running_var"].clone(), residual=rg,
                           training=training, **conv)
        got = torch.autograd.grad(out, leaves, gout)
    assert ("conv_bn_relu_backward", backend) in trace
    exp_out = conv_bn_relu_reference(xg, wg, gg, bg, bn["running_mean"].clone(), bn["running_var"].clone(),
                                     residual=rg, training=training, **conv)
    exp = torch.autograd.grad(exp_out, leaves, gout)
    for name, a, e in zip(["x", "weight", "bn_weight", "bn_bias", "residual"], got, exp):
        assert_close(a, e, 1e-4, 1e-3, msg=f"grad {name}")


@pytest.mark.parametrize("case", BACKEND_DEVICE)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_gradcheck_float64(case, training):
    backend, device = case
    fast = device == "cpu" and backend == "triton"
    geom = (4, 4, 4, 4, 3, 2, 1, 1, 2)  # grouped, strided, padded
    x, w, bn, res, conv = make(geom, device, torch.float64, N=2)
    rm, rv = bn["running_mean"], bn["running_var"]

    def f(x, w, g, b, r):
        return conv_bn_relu(x, w, g, b, rm.clone(), rv.clone(), residual=r, training=training, **conv)

    inputs = [t.detach().clone().requires_grad_() for t in (x, w, bn["bn_weight"], bn["bn_bias"], res)]
    with resnet_fused.use_backend(backend):
        assert torch.autograd.gradcheck(f, inputs, fast_mode=fast, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", BACKEND_DEVICE)
def test_gradcheck_without_relu_and_residual(case):
    backend, device = case
    fast = device == "cpu" and backend == "triton"
    x, w, bn, _, conv = make((4, 4, 3, 3, 1, 1, 0, 1, 1), device, torch.float64, N=2, residual=False)

    def f(x, w, g, b):
        return conv_bn_relu(x, w, g, b, None, None, training=True, relu=False, **conv)

    inputs = [t.detach().clone().requires_grad_() for t in (x, w, bn["bn_weight"], bn["bn_bias"])]
    with resnet_fused.use_backend(backend):
        assert torch.autograd.gradcheck(f, inputs, fast_mode=fast)


@pytest.mark.parametrize("case", BACKEND_DEVICE)
@pytest.mark.parametrize("layout", ["strided", "expanded"])
@pytest.mark.parametrize("with_res", [False, True], ids=["no-residual", "residual"])
def test_batchnorm_vectors_as_views(case, layout, with_res):
    """bn_weight / bn_bias (and running statistics) given as strided ([::2]) or expanded (stride 0)
    views give the results of contiguous copies (the kernels index [K] vectors as ptr + k: a view is
    made dense first): output, running statistics and every gradient; float64 on the CPU. (Expanded
    running statistics cannot be updated in place: none then.)"""
    check_batchnorm_vectors_as_views(*case, layout, with_res)


def check_batchnorm_vectors_as_views(backend, device, layout, with_res, expect_trace=None):
    dtype = torch.float64 if device == "cpu" else torch.float32
    x, w, bn, res, conv = make((8, 6, 5, 5, 1, 1, 0, 1, 1), device, dtype, residual=with_res)
    K = w.shape[0]
    g = torch.randn(x.shape[0], K, *x.shape[2:], dtype=dtype, device=device)

    def step(as_view):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, res if with_res else x)]
        # gamma / beta: leaves [2K] (strided: every other entry) or [1] (expanded to K)
        bases = [(torch.stack([bn[k], torch.full_like(bn[k], 7.0)], 1).reshape(-1) if layout == "strided" else
                  bn[k][:1].clone()).requires_grad_() for k in ("bn_weight", "bn_bias")]
        vec = (lambda t: t[::2]) if layout == "strided" else (lambda t: t.expand(K))  # noqa: E731
        gamma, beta = (vec(b) if as_view else vec(b).contiguous() for b in bases)
        assert gamma.is_contiguous() != as_view
        if layout == "strided":
            stats = [torch.stack([bn[k], torch.full_like(bn[k], 3.0)], 1).reshape(-1) for k in
                     ("running_mean", "running_var")]
            rm, rv = (t[::2] if as_view else t[::2].contiguous() for t in stats)
        else:
            rm = rv = None
        with resnet_fused.use_backend(backend), resnet_fused.dispatch_trace() as trace:
            out = conv_bn_relu(leaves[0], leaves[1], gamma, beta, rm, rv, residual=leaves[2] if with_res else None,
                               training=True, **conv)
        assert expect_trace(trace, as_view) if expect_trace else trace[0] == ("conv_bn_relu", backend)
        out.backward(g)
        got = [out.detach()] + ([rm.contiguous(), rv.contiguous()] if rm is not None else [])
        return got + [t.grad for t in leaves[:2 + with_res]] + [b.grad for b in bases]

    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for i, (a, b) in enumerate(zip(step(True), step(False))):
        assert_close(a, b, atol=tol, rtol=tol, msg=f"output {i}")


@pytest.mark.parametrize("case", BACKEND_DEVICE)
def test_opcheck(case):
    backend, device = case
    x, w, bn, res, conv = make((4, 8, 4, 4, 3, 1, 1, 1, 1), device)
    cfg = [[conv["stride"]] * 2, [conv["padding"]] * 2, [conv["dilation"]] * 2, conv["groups"]]
    x.requires_grad_()
    w.requires_grad_()
    for training in (False, True):
        args = (x, w, bn["bn_weight"], bn["bn_bias"], bn["running_mean"], bn["running_var"], res, *cfg, training, 0.1,
                1e-5, True, True, False, backend)
        torch.library.opcheck(torch.ops.resnet_fused.conv_bn_fwd.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("case", FUSED_BACKEND_DEVICE)
@pytest.mark.parametrize("with_res", [True, False], ids=["residual", "no-residual"])
def test_torch_compile_fullgraph_training(case, with_res):
    # (without a residual the Triton backward takes the ReLU mask from z: the backward custom op's
    # bn_bias and mask_from_z arguments)
    backend, device = case
    torch._dynamo.reset()
    x, w, bn, res, conv = make("3x3s1", device, residual=with_res)
    w.requires_grad_()
    rm1, rv1 = bn["running_mean"].clone(), bn["running_var"].clone()
    rm2, rv2 = bn["running_mean"].clone(), bn["running_var"].clone()

    def f(x, w, rm, rv):
        return conv_bn_relu(x, w, bn["bn_weight"], bn["bn_bias"], rm, rv, residual=res, training=True, **conv)

    with resnet_fused.use_backend(backend):
        with resnet_fused.dispatch_trace() as trace:
            out = torch.compile(f, fullgraph=True)(x, w, rm1, rv1)
            (gw,) = torch.autograd.grad(out.sum(), w)
        if backend == "triton":
            want = "mask from out" if with_res else "mask from z"
            assert ("conv_bn_relu_backward/triton", want) in trace, trace
        exp = f(x, w, rm2, rv2)
        (ew,) = torch.autograd.grad(exp.sum(), w)
    assert_close(out, exp, 1e-5, 1e-5)
    assert_close(gw, ew, 1e-4, 1e-4)
    assert_close(rm1, rm2, 1e-6, 1e-6)  # the running-stat update survives compilation
    assert not torch.equal(rm1, bn["running_mean"])


@pytest.mark.parametrize("case", [c for c in BACKEND_DEVICE if c.values[0] == ("reference", "cpu")] +
                         [c for c in BACKEND_DEVICE if c.values[0][1] == "cuda"])
def test_autocast(case):
    backend, device = case
    x, w, bn, res, conv = make("3x3s1", device)
    lp = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.autocast(device_type=device, dtype=lp):
        out, _ = run(backend, x, w, bn, res.to(lp), conv, training=True)
        exp_conv = F.conv2d(x, w, None, **conv)
    assert out.dtype == lp == exp_conv.dtype
    exp, _ = ref(x, w, bn, res, conv, training=True)
    assert (out.float() - exp).abs().max().item() < 0.1


@pytest.mark.parametrize("case", BACKEND_DEVICE)
def test_empty_batch(case):
    backend, device = case
    x, w, bn, res, conv = make("3x3s1", device, N=0)
    out, _ = run(backend, x, w, bn, res, conv, training=False)
    assert out.shape == (0, 16, 5, 5)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        run(backend, x, w, bn, res, conv, training=True)


@pytest.mark.parametrize("case", BACKEND_DEVICE)
def test_nan_propagates_forward_and_backward_like_eager(case):
    # A NaN input pixel gives NaN outputs; ReLU's backward passes the gradient where the
    # output is NaN (threshold_backward), so the residual gradient matches eager's exactly.
    backend, device = case
    x, w, bn, res, conv = make("3x3s1", device)
    x = x.clone()
    x[0, :, 2, 2] = float("nan")
    r1, r2 = res.clone().requires_grad_(), res.clone().requires_grad_()
    g = torch.randn_like(res)
    with resnet_fused.use_backend(backend):
        out = conv_bn_relu(x, w, bn["bn_weight"], bn["bn_bias"], bn["running_mean"], bn["running_var"], residual=r1,
                           training=False, **conv)
        (gr,) = torch.autograd.grad(out, r1, g)
    exp = conv_bn_relu_reference(x, w, bn["bn_weight"], bn["bn_bias"], bn["running_mean"], bn["running_var"],
                                 residual=r2, training=False, **conv)
    (er,) = torch.autograd.grad(exp, r2, g)
    assert torch.isnan(out).sum() == torch.isnan(exp).sum() > 0
    assert_close(out, exp, 1e-4, 1e-4)
    assert_close(gr, er, 0, 0)


# --- bad input ------------------------------------------------------------------------------
def _args():
    x, w, bn, res, conv = make("3x3s1", "cpu")
    return x, w, bn, res, conv


def _call(x, w, bn, **kw):
    return conv_bn_relu(x, w, bn["bn_weight"], bn["bn_bias"], bn["running_mean"], bn["running_var"], **kw)


def test_single_value_per_channel_in_training_matches_batch_norm():
    x, w, bn, _, _ = _args()
    x1 = x[:1, :, :1, :1]
    with pytest.raises(ValueError) as ours:
        _call(x1, w[:, :, :1, :1], bn, training=True)
    with pytest.raises(ValueError) as theirs:
        F.batch_norm(torch.zeros(1, 16, 1, 1), None, None, training=True)
    assert str(ours.value) == str(theirs.value)


def test_bad_inputs():
    x, w, bn, res, conv = _args()
    with pytest.raises(ValueError, match="expected 4D input"):
        _call(x[0], w, bn, **conv)
    with pytest.raises(RuntimeError, match="to have 8 channels, but got 7 channels"):
        _call(x[:, :7], w, bn, **conv)
    with pytest.raises(RuntimeError, match="input type .* and weight type"):
        _call(x.double(), w, bn, **conv)
    with pytest.raises(RuntimeError, match="must be float32, float64, float16 or bfloat16"):
        _call(x.to(torch.uint8), w.to(torch.uint8), bn, **conv)
    with pytest.raises(ValueError, match=r"residual has shape \(2, 16, 4, 4\)"):
        _call(x, w, bn, residual=res[:, :, :4, :4], **conv)
    with pytest.raises(ValueError, match=r"bn_weight must have shape \(16,\)"):
        _call(x, w, dict(bn, bn_weight=bn["bn_weight"][:3]), **conv)
    with pytest.raises(ValueError, match="must be defined in evaluation mode"):
        _call(x, w, dict(bn, running_mean=None, running_var=None), **conv)
    with pytest.raises(RuntimeError, match="too small"):
        _call(x[:, :, :2, :2], w, bn, stride=1, padding=0)
    with pytest.raises(ValueError, match="groups=3"):
        _call(x, w, bn, stride=1, padding=1, groups=3)
    with pytest.raises(ValueError, match="stride and dilation must be >= 1"):
        _call(x, w, bn, stride=0, padding=1)
    with pytest.raises(TypeError, match="padding must be an int or a pair"):
        _call(x, w, bn, padding="same")


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="no CUDA GPU")
def test_device_mismatch():
    x, w, bn, res, conv = _args()
    with pytest.raises(RuntimeError, match="weight is on cuda"):
        _call(x, w.cuda(), bn, **conv)
    with pytest.raises(RuntimeError, match="residual is on cuda"):
        _call(x, w, bn, residual=res.cuda(), **conv)


@pytest.mark.parametrize("case", BACKEND_DEVICE)
@pytest.mark.parametrize("shape", [(1, 5, 7, 1, 1, 1), (1, 13, 11, 7, 7, 3), (2, 3, 17, 1, 1, 3), (2, 19, 5, 7, 7, 7)],
                         ids=["1x1-spatial", "7x7-input", "1x1-pad", "odd-channels-7x7k"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_odd_sizes(case, shape, training):
    backend, device = case
    N, C, K, H, W, k = shape
    if training and N * H * W < 2:
        N = 2
    geom = (C, K, H, W, k, 1, k // 2, 1, 1)
    x, w, bn, res, conv = make(geom, device, N=N)
    out, bn_o = run(backend, x, w, bn, res, conv, training=training)
    exp, bn_e = ref(x, w, bn, res, conv, training=training)
    assert_close(out, exp, 1e-4, 1e-4)
    assert_close(bn_o["running_var"], bn_e["running_var"], 1e-5, 1e-5)


@pytest.mark.parametrize("case", BACKEND_DEVICE)
def test_fp16_overflow_like_eager(case):
    # Conv outputs beyond fp16's range are inf in eager before the BatchNorm sees them; the
    # fused kernels round their accumulator the same way, so inf (and the NaN that the
    # normalisation of inf gives in training) land where eager's do.
    backend, device = case
    x, w, bn, res, conv = make("1x1s1", device, torch.float16)
    bn = _bn_params_to(bn, torch.float16)
    bn["running_var"] = torch.full_like(bn["running_var"], 1e4)  # scale ~1e-2: y would fit fp16 if z did not
    x = x.clone()
    x[0, :, 0, 0] = 30000.0
    w = w.abs() * 4
    for training in (False,):
        out, _ = run(backend, x, w, bn, None, conv, training=training, relu=False)
        exp, _ = ref(x, w, bn, None, conv, training=training, relu=False)
        assert torch.isinf(exp).any()
        assert torch.equal(torch.isinf(out), torch.isinf(exp)) and torch.equal(torch.isnan(out), torch.isnan(exp))
        fin = torch.isfinite(exp)
        assert_close(out[fin].float(), exp[fin].float(), 2e-2, 2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_deterministic_training_is_bitwise_reproducible(backend):
    if backend not in resnet_fused.available_backends() or _triton.interpreting():
        pytest.skip(f"{backend} not runnable here")
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=False)
    try:
        results = []
        for _ in range(2):
            x, w, bn, res, conv = make((64, 128, 28, 28, 3, 1, 1, 1, 1), "cuda", torch.bfloat16, N=16)
            w.requires_grad_()
            with resnet_fused.use_backend(backend):
                out, bn_o = run(backend, x, w, bn, res, conv, training=True)
                (gw,) = torch.autograd.grad(out.float().square().sum(), w)
            results.append((out, gw, bn_o["running_var"]))
        for a, b in zip(*results):
            assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_more_than_2_pow_31_elements(backend):
    # 64-bit offsets: a stem conv whose output has 2.17e9 elements (bf16, 4.3 GB); the last
    # images, whose offsets exceed 2^31, are checked against cuDNN + eager BatchNorm.
    if backend not in resnet_fused.available_backends() or _triton.interpreting():
        pytest.skip(f"{backend} not runnable here")
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs a GPU with 40 GB")
    N = 2700
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, 3, 224, 224, device="cuda", dtype=torch.bfloat16, generator=g)
    x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(64, 3, 7, 7, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
    gamma, beta = torch.rand(64, device="cuda") + 0.5, torch.randn(64, device="cuda")
    rm, rv = torch.randn(64, device="cuda") * 0.1, torch.rand(64, device="cuda") + 0.5
    with torch.no_grad(), resnet_fused.use_backend(backend):
        out = conv_bn_relu(x, w, gamma, beta, rm, rv, stride=2, padding=3)
    assert out.numel() > 2**31
    tail = slice(N - 4, N)
    with torch.no_grad():
        exp = conv_bn_relu_reference(x[tail], w, gamma, beta, rm, rv, stride=2, padding=3)
    err = (out[tail].float() - exp.float()).abs().max().item()
    assert err < 0.1 * exp.float().abs().max().item()
    del out
    torch.cuda.empty_cache()


@pytest.mark.skipif(not _triton.HAS_TRITON, reason="triton not importable")
def test_autotune_pruning_keeps_fitting_tiles():
    from resnet_fused.ops.conv_bn_relu import triton_kernels as tk

    cfgs = tk._conv_configs()
    tiles = lambda **a: {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_C"])  # noqa: E731
                         for c in tk._prune_configs(cfgs, dict(dict(R=1, S=1), **a))}
    # the stem (3 channels padded to 4, packed 7x7x4 = 196-long reduction): 64-wide steps, N = 64
    assert tiles(Cg=4, Kg=64, M=802816, R=7, S=7, PACKED=True) == {(128, 64, 64), (64, 64, 64)}
    # a big GEMM keeps every 64-step tile, the 256-wide ones only while they fill a wave
    big = tiles(Cg=512, Kg=512, M=12544)
    assert big == {(128, 128, 64), (128, 256, 64), (256, 128, 64), (128, 64, 64), (64, 128, 64), (64, 64, 64)}
    assert not {t for t in tiles(Cg=512, Kg=512, M=3136) if 256 in t[:2]}  # 13 x 4 tiles of 256: < 132
    # 24..47 channels per step: 32-wide steps; N no wider than the channels, no narrower than 64
    assert tiles(Cg=40, Kg=64, M=4096) == {(128, 64, 32), (64, 64, 32)}
    # the stem's row runs (7 taps x 4 channels = 28 per step): 32-wide steps
    assert tiles(Cg=4, Kg=64, M=802816, R=7, S=7, PACKED=True, ROWRUN=True) == {(128, 64, 32), (64, 64, 32)}
    # ResNeXt-like groups (4 channels in, 4 out per group): narrow N tiles, still >= 64 rows (wgmma)
    assert tiles(Cg=4, Kg=4, M=7) == {(64, 16, 16)}
    assert tiles(Cg=4, Kg=4, M=50000, R=3, S=3, PACKED=True) == {(64, 16, 32)}
    # every config any of these keeps has BLOCK_M >= 64 (the smallest wgmma)
    assert all(c.kwargs["BLOCK_M"] >= 64 for c in cfgs)


@pytest.mark.skipif(not _triton.HAS_TRITON, reason="triton not importable")
def test_fixed_config_and_split_k_rules():
    from resnet_fused.ops.conv_bn_relu import triton_kernels as tk

    assert tk._fixed_config(256, 3, 3, False, 256, 50176) == dict(BLOCK_M=128, BLOCK_N=128, BLOCK_C=64, num_warps=8,
                                                                  num_stages=4)
    assert tk._fixed_config(64, 1, 1, False, 64, 1000)["BLOCK_N"] == 64
    # split-K only where the output has too few 64x64 tiles for 132 SMs and the reduction is long
    assert tk._split_k(M=256 * 49, Kg=512, groups=1, nstep=72, sms=132) == 1  # layer4, batch 256
    assert tk._split_k(M=49, Kg=512, groups=1, nstep=72, sms=132) == 8  # layer4, batch 1: 8 tiles
    assert tk._split_k(M=196, Kg=1024, groups=1, nstep=4, sms=132) == 1  # a short reduction is not split
    assert tk._split_k(M=3136, Kg=64, groups=1, nstep=9, sms=132) == 2  # 49 tiles: 2 splits of >= 4 steps


@pytest.mark.parametrize("case", [c for c in BACKEND_DEVICE if c.values[0][0] == "triton"])
def test_two_level_statistics_merge(case, monkeypatch):
    # Force the merge level (normally above 256 partials) on a small problem.
    from resnet_fused.ops.conv_bn_relu import triton_kernels as tk

    backend, device = case
    monkeypatch.setattr(tk, "_MERGE_ABOVE", 2)
    monkeypatch.setattr(tk, "_MERGE_GROUP", 2)
    for dt in (torch.float32, torch.float64):
        x, w, bn, res, conv = make("3x3-multitile", device, dt, N=3)
        out, bn_o = run(backend, x, w, bn, res, conv, training=True)
        exp, bn_e = ref(x, w, bn, res, conv, training=True)
        assert_close(out, exp, *_tol(dt))
        assert_close(bn_o["running_var"], bn_e["running_var"], *_tol(dt))


@pytest.mark.parametrize("case", [p for p in BACKEND_DEVICE if p.values[0] in (("reference", "cpu"),
                                                                           ("triton", "cpu"))])
@pytest.mark.parametrize("direct", [True, False], ids=["fast-path", "custom-op"])
def test_output_kept_for_backward_only_as_the_relu_mask(case, direct, monkeypatch):
    # without a ReLU the forward keeps no reference to its output (a downsample's output, the next
    # op's residual, is freed once that op has run, as in eager); with one it keeps the output, except
    # on Triton in training without a residual, whose backward recomputes the mask from z (then it
    # keeps bn_bias instead: a parameter)
    from resnet_fused.ops import _common

    backend, device = case
    monkeypatch.setattr(_common, "DIRECT", [direct])
    x, w, bn, res, conv = make("3x3s2", device)
    x.requires_grad_()
    for relu, residual in ((False, None), (True, None), (True, res)):
        with resnet_fused.use_backend(backend), resnet_fused.dispatch_trace() as trace:
            out = conv_bn_relu(x, w, bn["bn_weight"], bn["bn_bias"], bn["running_mean"].clone(),
                               bn["running_var"].clone(), training=True, relu=relu, residual=residual, **conv)
            saved = [t for t in out.grad_fn.saved_tensors if t is not None]
            g, = torch.autograd.grad(out, x, torch.ones_like(out))
        from_z = backend == "triton" and relu and residual is None
        keeps_out = any(t.data_ptr() == out.data_ptr() for t in saved)
        assert keeps_out == (relu and not from_z), (relu, [tuple(t.shape) for t in saved])
        if backend == "triton":
            want = "mask from z" if from_z else "mask from out" if relu else "no mask"
            assert ("conv_bn_relu_backward/triton", want) in trace, trace
        exp = conv_bn_relu_reference(x, w, bn["bn_weight"], bn["bn_bias"], bn["running_mean"].clone(),
                                     bn["running_var"].clone(), training=True, relu=relu, residual=residual, **conv)
        e, = torch.autograd.grad(exp, x, torch.ones_like(exp))
        assert_close(g, e, 1e-4, 1e-3, f"grad x relu={relu}")


TRITON_DEVICE = [p for p in FUSED_BACKEND_DEVICE if p.values[0][0] == "triton"]


@pytest.mark.parametrize("case", TRITON_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("direct", [True, False], ids=["fast-path", "custom-op"])
def test_triton_relu_mask_from_z_gives_the_gradients_of_the_mask_from_out(case, dtype, direct, monkeypatch):
    # the same kernels with the mask read from the output: every gradient bit for bit (the masks
    # are the same, and nothing else differs), with and without affine BatchNorm parameters
    import resnet_fused.ops.conv_bn_relu as CBR
    from resnet_fused.ops import _common

    backend, device = case
    monkeypatch.setattr(_common, "DIRECT", [direct])
    for affine in (True, False):
        x, w, bn, _, conv = make("3x3s2", device, dtype, residual=False, affine=affine)
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, bn["bn_weight"], bn["bn_bias"])
                  if t is not None]
        gout = torch.randn(x.shape[0], w.shape[0], 4, 3, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        got = {}
        for from_z in (True, False):
            if not from_z:
                monkeypatch.setattr(CBR, "_mask_from_z", lambda *a: False)
            with resnet_fused.use_backend(backend), resnet_fused.dispatch_trace() as trace:
                out = conv_bn_relu(*leaves[:2], *(leaves[2:] if affine else (None, None)), bn["running_mean"].clone(),
                                   bn["running_var"].clone(), training=True, **conv)
                got[from_z] = (out, torch.autograd.grad(out, leaves, gout))
            assert ("conv_bn_relu_backward/triton", "mask from z" if from_z else "mask from out") in trace, trace
        monkeypatch.undo()
        monkeypatch.setattr(_common, "DIRECT", [direct])
        assert (got[True][0] > 0).any() and (got[True][0] == 0).any()  # the mask matters
        assert_close(got[True][0], got[False][0], 0, 0, "out")
        for i, (a, e) in enumerate(zip(got[True][1], got[False][1])):
            assert_close(a, e, 0, 0, f"grad {i} affine={affine}")


@pytest.mark.parametrize("case", BACKEND_DEVICE)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("direct", [True, False], ids=["fast-path", "custom-op"])
def test_recompute_gives_the_same_gradients_without_keeping_the_conv_output(case, training, direct, monkeypatch):
    from resnet_fused.ops import _common

    monkeypatch.setattr(_common, "DIRECT", [direct])
    backend, device = case
    x, w, bn, res, conv = make("3x3s2", device)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, bn["bn_weight"], bn["bn_bias"], res)]
    gout = torch.randn(res.shape, device=device)
    got = {}
    for recompute in (False, True):
        with resnet_fused.use_backend(backend):
            out = conv_bn_relu(*leaves[:4], bn["running_mean"].clone(), bn["running_var"].clone(),
                               residual=leaves[4], training=training, recompute=recompute, **conv)
            kept = out.grad_fn.saved_tensors
            # the conv output (shaped as out, not out itself) is kept only without recompute
            z_kept = any(t is not None and t.shape == out.shape and t.data_ptr() != out.data_ptr() for t in kept)
            assert z_kept != recompute
            got[recompute] = (out, torch.autograd.grad(out, leaves, gout))
    assert_close(got[True][0], got[False][0], 0, 0, "out")
    for name, a, e in zip(["x", "weight", "bn_weight", "bn_bias", "residual"], got[True][1], got[False][1]):
        assert_close(a, e, 1e-5, 1e-4, msg=f"grad {name}")


@pytest.mark.parametrize("case", BACKEND_DEVICE)
def test_gradcheck_float64_with_recompute(case):
    backend, device = case
    x, w, bn, res, conv = make((4, 4, 4, 4, 3, 2, 1, 1, 2), device, torch.float64, N=2)
    rm, rv = bn["running_mean"], bn["running_var"]

    def f(x, w, g, b, r):
        return conv_bn_relu(x, w, g, b, rm.clone(), rv.clone(), residual=r, training=True, recompute=True, **conv)

    inputs = [t.detach().clone().requires_grad_() for t in (x, w, bn["bn_weight"], bn["bn_bias"], res)]
    with resnet_fused.use_backend(backend):
        assert torch.autograd.gradcheck(f, inputs, fast_mode=device == "cpu" and backend == "triton", atol=1e-6,
                                        rtol=1e-5)


def test_recompute_only_where_the_backward_reads_the_conv_output(monkeypatch):
    import resnet_fused.ops.conv_bn_relu as CBR

    calls = []
    real = CBR.aten_conv
    monkeypatch.setattr(CBR, "aten_conv", lambda *a: calls.append(1) or real(*a))
    x, w, bn, _, conv = make("3x3s2", "cpu", residual=False)
    x.requires_grad_()
    for training, affine_grad, expected in ((False, False, 0), (False, True, 1), (True, False, 1)):
        calls.clear()
        g, b = (t.clone().requires_grad_(affine_grad) for t in (bn["bn_weight"], bn["bn_bias"]))
        with resnet_fused.use_backend("reference"):
            out = conv_bn_relu(x, w, g, b, bn["running_mean"].clone(), bn["running_var"].clone(),
                               training=training, recompute=True, **conv)
            out.square().sum().backward()
        # eval with frozen BatchNorm parameters (a detection backbone): the input gradient reads no z
        assert len(calls) == expected, (training, affine_grad, calls)
