"""conv_bn_relu_fork: a residual block's shortcut reads the block's input through its first conv's
autograd node, which adds the shortcut's gradient to x's in its own backward (the 1x1 dgrad GEMM
accumulating into it) instead of leaving autograd to sum two gradients.

Every test compares against the same layers run without the fork (autograd's sum), proves the
path from the dispatch trace, and on the CPU runs in float64 (tight tolerances: the GEMM and ATen's
dgrad differ only in summation order). The CUDA backend's C++ node is tested on the CPU over the
BatchNorm stand-ins (test_conv_bn_train_cpp.py)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import resnet_fused
from resnet_fused import dispatch_trace, use_backend
from resnet_fused.functional import conv_bn_relu, conv_bn_relu_fork
from resnet_fused.ops.conv_bn_relu import cuda as cuda_impl

from conftest import BACKEND_DEVICE, NO_CUDA, REQUIRE_EXT, assert_close
from test_conv_bn_relu import make
from test_conv_bn_train_cpp import cpu_bn_kernels

CL = torch.channels_last
FORK = ("conv_bn_relu/fork",)
JOIN = ("conv_bn_relu_backward/shortcut", "dgrad gemm")


def _block(C=8, Cm=4, H=5, W=6, N=2, device="cpu", dtype=torch.float64, seed=0):
    """A small Bottleneck-like pair: conv1 1x1 C -> Cm (the fork), conv2 1x1 Cm -> C whose residual
    is the shortcut (identity), or a downsample 1x1 conv C -> C of it (no ReLU)."""
    x, w1, bn1, _, _ = make((C, Cm, H, W, 1, 1, 0, 1, 1), device, dtype, N=N, seed=seed, residual=False)
    _, w2, bn2, _, _ = make((Cm, C, H, W, 1, 1, 0, 1, 1), device, dtype, N=N, seed=seed + 1, residual=False)
    _, wd, bnd, _, _ = make((C, C, H, W, 1, 1, 0, 1, 1), device, dtype, N=N, seed=seed + 2, residual=False)
    g = torch.randn(N, C, H, W, generator=torch.Generator().manual_seed(seed + 3)).to(device, dtype)
    return x, (w1, bn1), (w2, bn2), (wd, bnd), g.contiguous(memory_format=CL)


def _leaves(x, *layers):
    out = [x.detach().clone().requires_grad_()]
    for w, bn in layers:
        out.append(w.detach().clone().requires_grad_())
        out += [bn[k].detach().clone().requires_grad_() for k in ("bn_weight", "bn_bias")]
    return out


def _step(leaves, bns, shortcut_kind, fork, training=True):
    """Forward and backward of the pair; returns (output, gradients of every leaf, the fork's s)."""
    x, w1, g1, b1, w2, g2, b2, wd, gd, bd = leaves
    bn1, bn2, bnd = ({k: v.clone() for k, v in bn.items()} for bn in bns)
    stats = lambda bn: (bn["running_mean"], bn["running_var"])  # noqa: E731
    if fork:
        y1, s = conv_bn_relu_fork(x, w1, g1, b1, *stats(bn1), training=training)
    else:
        y1, s = conv_bn_relu(x, w1, g1, b1, *stats(bn1), training=training), x
    res = s if shortcut_kind == "identity" else conv_bn_relu(s, wd, gd, bd, *stats(bnd), training=training,
                                                             relu=False)
    return y1, s, conv_bn_relu(y1, w2, g2, b2, *stats(bn2), training=training, residual=res)


def _grads(backend, block, shortcut_kind, fork, training=True):
    x, l1, l2, ld, g = block
    leaves = _leaves(x, l1, l2, ld)
    with use_backend(backend), dispatch_trace() as trace:
        _, s, out = _step(leaves, (l1[1], l2[1], ld[1]), shortcut_kind, fork, training)
        out.backward(g)
    used = leaves if shortcut_kind == "downsample" else leaves[:7]
    return out.detach(), [t.grad for t in used], s, trace


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval-grad"])
@pytest.mark.parametrize("shortcut_kind", ["identity", "downsample"])
@pytest.mark.parametrize("backend_device", BACKEND_DEVICE)
def test_fork_gives_autograds_gradients_and_joins_in_the_dgrad(backend_device, shortcut_kind, training):
    backend, device = backend_device
    dtype = torch.float64 if device == "cpu" else torch.bfloat16
    block = _block(device=device, dtype=dtype)
    out, grads, s, trace = _grads(backend, block, shortcut_kind, fork=True, training=training)
    out0, grads0, s0, trace0 = _grads(backend, block, shortcut_kind, fork=False, training=training)
    if device == "cpu":
        assert_close(out, out0, atol=0, rtol=0)
        for i, (a, b) in enumerate(zip(grads, grads0)):
            assert_close(a, b, atol=1e-12, rtol=1e-12, msg=f"gradient {i}")
    else:  # bf16: against float64 truth, relative to the same layers' own error without the fork
        truth = _grads("reference", tuple(_to64(t) for t in block), shortcut_kind, fork=False, training=training)[1]
        for i, (a, b, t) in enumerate(zip(grads, grads0, truth)):
            err, err0 = (a.double() - t).abs().max().item(), (b.double() - t).abs().max().item()
            assert err <= 2 * err0 + 1e-2 * t.abs().max().item(), f"gradient {i}: {err} vs {err0} without the fork"
    # the path: the fork taken, its alias a view of x whose gradient the GEMM joined
    if backend == "cuda" and training:  # the C++ node (the Python node in eval with gradients)
        assert ("conv_bn_train/cuda", "c++ node, fork") in trace
    else:
        assert (FORK[0], backend) in trace and JOIN in trace
    assert s._base is not None and s.data_ptr() == s._base.data_ptr()
    assert not any(t[0] in (FORK[0], JOIN[0]) for t in trace0)


def _to64(t):
    if isinstance(t, torch.Tensor):
        return t.double().contiguous(memory_format=CL) if t.dim() == 4 else t.double()
    if isinstance(t, dict):
        return {k: (v.double() if v is not None else None) for k, v in t.items()}
    return tuple(_to64(v) for v in t)


@pytest.mark.parametrize("case", ["3x3", "1x1-stride2", "no-grad-for-x", "no_grad", "function-mode", "switched-off",
                                  "deterministic"])
def test_fork_is_plain_where_it_would_not_pay(case, monkeypatch, request):
    """Another geometry, no gradient for x, no autograd, a path other than the eager fast path,
    deterministic algorithms, or the join switched off:
    ``s`` is x itself (autograd sums as usual), and the results are conv_bn_relu's."""
    geom = {"3x3": (8, 4, 5, 5, 3, 1, 1, 1, 1), "1x1-stride2": (8, 4, 6, 6, 1, 2, 0, 1, 1)}.get(
        case, (8, 4, 5, 5, 1, 1, 0, 1, 1))
    x, w, bn, _, conv = make(geom, "cpu", torch.float64, residual=False)
    x = x.requires_grad_(case != "no-grad-for-x")
    w = w.requires_grad_()

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    if case == "switched-off":  # (RESNET_FUSED_SHORTCUT_JOIN=0)
        from resnet_fused.ops import conv_bn_relu as op

        monkeypatch.setattr(op, "SHORTCUT_JOIN", [False])
    if case == "deterministic":  # (cuBLAS GEMMs need CUBLAS_WORKSPACE_CONFIG there)
        prev = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        request.addfinalizer(lambda: torch.use_deterministic_algorithms(prev))
    ctx = {"no_grad": torch.no_grad(), "function-mode": Mode()}.get(case)
    with use_backend("reference"), dispatch_trace() as trace, (ctx if ctx is not None else torch.enable_grad()):
        out, s = conv_bn_relu_fork(x, w, bn["bn_weight"], bn["bn_bias"], bn["running_mean"].clone(),
                                   bn["running_var"].clone(), training=True, **conv)
        ref = conv_bn_relu(x, w, bn["bn_weight"], bn["bn_bias"], bn["running_mean"].clone(),
                           bn["running_var"].clone(), training=True, **conv)
    assert s is x
    assert_close(out, ref, atol=0, rtol=0)
    assert FORK not in [t[:1] for t in trace]


@pytest.mark.parametrize("which", ["output only", "shortcut only"])
def test_fork_with_one_of_its_two_gradients(which):
    """The layer's output unused (only the shortcut's gradient flows back: it is x's), or the
    shortcut unused (a plain layer)."""
    x, (w1, bn1), _, _, _ = _block()
    xf, x0 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with use_backend("reference"):
        out, s = conv_bn_relu_fork(xf, w1, bn1["bn_weight"], bn1["bn_bias"], None, None, training=True)
        out0 = conv_bn_relu(x0, w1, bn1["bn_weight"], bn1["bn_bias"], None, None, training=True)
        if which == "output only":
            (out * out).sum().backward()
            (out0 * out0).sum().backward()
        else:
            (s * s).sum().backward()
            (x0 * x0).sum().backward()
    assert_close(xf.grad, x0.grad, atol=1e-12, rtol=1e-12)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))


def test_fork_backward_under_a_dispatch_mode_sums_outside_the_op():
    """A mode around backward() sends the Python node's backward through the custom op (the path
    the mode can see), which knows no shortcut: the node adds it after (autograd's sum, spelled out)."""
    block = _block()
    x, l1, l2, ld, g = block
    leaves = _leaves(x, l1, l2, ld)
    with use_backend("reference"), dispatch_trace() as trace:
        _, s, out = _step(leaves, (l1[1], l2[1], ld[1]), "identity", fork=True)
        with _Recorder() as rec:
            out.backward(g)
    grads0 = _grads("reference", block, "identity", fork=False)[1]
    for i, (a, b) in enumerate(zip([t.grad for t in leaves[:7]], grads0)):
        assert_close(a, b, atol=1e-12, rtol=1e-12, msg=f"gradient {i}")
    assert JOIN not in trace and torch.ops.resnet_fused.conv_bn_bwd.default in rec.calls


def test_bottleneck_models_fork_every_block():
    """A fused ResNet-50-shaped model (small widths) in training: every Bottleneck's first conv
    forks, every join is the GEMM, and the gradients are autograd's sum's (the fork off)."""
    pytest.importorskip("torchvision")
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.ResNet(torchvision.models.resnet.Bottleneck, [2, 1, 1, 1], num_classes=5,
                                   width_per_group=8).double()
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.5, 0.5)
    model = resnet_fused.models.fuse(tv).to(memory_format=CL)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=CL)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def grads(fork):
        model.load_state_dict(state)
        model.zero_grad()
        xi = x.clone().requires_grad_()
        import resnet_fused.models.resnet as R
        orig = R.conv_bn_fork
        if not fork:
            R.conv_bn_fork = lambda conv, bn, x, relu=True: (R.conv_bn(conv, bn, x, relu=relu), x)
        try:
            with use_backend("reference"), dispatch_trace() as trace:
                model(xi).square().sum().backward()
        finally:
            R.conv_bn_fork = orig
        return [xi.grad] + [p.grad.clone() for p in model.parameters()], trace

    g1, trace = grads(True)
    g0, trace0 = grads(False)
    n_blocks = 5
    assert sum(t == (FORK[0], "reference") for t in trace) == n_blocks
    assert sum(t == JOIN for t in trace) == n_blocks
    assert not any(t[0] == FORK[0] for t in trace0)
    for i, (a, b) in enumerate(zip(g1, g0)):
        assert_close(a, b, atol=1e-10, rtol=1e-10, msg=f"gradient {i}")


# --- the CUDA backend's C++ node, on the CPU over the BatchNorm stand-ins -----------------------
needs_ext = pytest.mark.skipif(not REQUIRE_EXT and "cuda" not in resnet_fused.available_backends(),
                               reason="CUDA extension not built")


@pytest.fixture
def cpp_node_on_cpu(monkeypatch):
    from conftest import cpu_max_pool_kernels, route_to_cuda_backend

    route_to_cuda_backend(monkeypatch)
    with cpu_bn_kernels() as calls, cpu_max_pool_kernels():
        yield calls


@needs_ext
@pytest.mark.parametrize("shortcut_kind", ["identity", "downsample"])
def test_cpp_node_fork_joins_in_place_in_the_dgrad_gemm(cpp_node_on_cpu, shortcut_kind):
    block = _block()
    out, grads, s, trace = _grads("cuda", block, shortcut_kind, fork=True)
    out0, grads0, _, trace0 = _grads("cuda", block, shortcut_kind, fork=False)
    assert ("conv_bn_train/cuda", "c++ node, fork") in trace
    assert ("conv_bn_train/cuda", "c++ node, fork") not in trace0
    assert_close(out, out0, atol=0, rtol=0)
    for i, (a, b) in enumerate(zip(grads, grads0)):
        assert_close(a, b, atol=1e-12, rtol=1e-12, msg=f"gradient {i}")
    assert s._base is not None and s.grad_fn is not None and "ConvBnReluTrain" in s.grad_fn.name()

    # What ran in the backward: the shortcut's gradient (the residual gradient of the second layer,
    # or the downsample's dgrad) accumulated in place by one addmm_, x's gradient not from ATen's conv
    x, l1, l2, ld, g = block
    leaves = _leaves(x, l1, l2, ld)
    with use_backend("cuda"):
        _, s, out = _step(leaves, (l1[1], l2[1], ld[1]), shortcut_kind, fork=True)
    rec = _Recorder()
    with rec:
        out.backward(g)
    conv_bwd_masks = [c for c in rec.calls if c is torch.ops.aten.convolution_backward.default]
    assert torch.ops.aten.addmm_.default in rec.calls
    assert len(conv_bwd_masks) == 2 + (shortcut_kind == "downsample")  # (dgrad + wgrad, or wgrad alone)
    assert_close(leaves[0].grad, grads0[0], atol=1e-12, rtol=1e-12)


@needs_ext
def test_cpp_node_fork_leaves_a_kept_shortcut_gradient_alone(cpp_node_on_cpu):
    """A hook that keeps the gradient reaching ``s`` holds a second reference: the node copies it
    before accumulating (the autograd engine's own test), so the kept tensor is what arrived."""
    block = _block()
    x, l1, l2, ld, g = block
    leaves = _leaves(x, l1, l2, ld)
    kept = []
    with use_backend("cuda"):
        _, s, out = _step(leaves, (l1[1], l2[1], ld[1]), "identity", fork=True)
        s.register_hook(lambda t: kept.append(t))
        out.backward(g)
    grads0 = _grads("cuda", block, "identity", fork=False)[1]
    assert_close(leaves[0].grad, grads0[0], atol=1e-12, rtol=1e-12)
    # the kept gradient is the second layer's residual gradient: the masked output gradient
    mask = _step(_leaves(x, l1, l2, ld), (l1[1], l2[1], ld[1]), "identity", fork=False)[2] > 0
    assert_close(kept[0], g * mask, atol=0, rtol=0)
    assert kept[0].data_ptr() != leaves[0].grad.data_ptr()


@needs_ext
def test_cpp_node_fork_without_autograd_returns_an_alias():
    """Below the Autograd key (inference mode) the fork operator returns x's alias, as its schema
    says (Tensor(a) x -> Tensor(a))."""
    with cpu_bn_kernels():
        x, (w1, bn1), _, _, _ = _block()
        with torch.inference_mode():
            out, s = torch.ops.resnet_fused_C.conv_bn_relu_train_fork(
                x, w1, bn1["bn_weight"], bn1["bn_bias"], None, None, None, [1, 1], [0, 0], [1, 1], 1, 0.1, 1e-5,
                True, False)
    assert s.data_ptr() == x.data_ptr() and s.shape == x.shape and s is not x


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_fork_only_in_16_bit(dtype):
    """On CUDA the join is a GEMM only in 16-bit (an fp32 GEMM would not follow cuDNN's TF32
    setting): in fp32 ``s`` is x and autograd sums."""
    x, (w1, bn1), _, _, _ = _block(device="cuda", dtype=dtype)
    x = x.requires_grad_()
    with use_backend("cuda" if "cuda" in resnet_fused.available_backends() else "triton"):
        _, s = conv_bn_relu_fork(x, w1, bn1["bn_weight"], bn1["bn_bias"], None, None, training=True)
    assert (s is x) == (dtype == torch.float32)



@pytest.mark.parametrize("node", ["python", "c++"])
def test_fork_under_compiled_autograd(node, request):
    """Compiled autograd traces the backward: the Python node then takes the backward custom op and
    adds the shortcut's gradient after it; the C++ node runs as an opaque function with both
    gradients. The gradients are the plain backward's either way."""
    from torch._dynamo import compiled_autograd

    if node == "c++":
        if not REQUIRE_EXT and "cuda" not in resnet_fused.available_backends():
            pytest.skip("CUDA extension not built")
        request.getfixturevalue("cpp_node_on_cpu")
    backend = "cuda" if node == "c++" else "reference"
    block = _block()
    x, l1, l2, ld, g = block
    leaves = _leaves(x, l1, l2, ld)
    torch._dynamo.reset()
    with use_backend(backend), dispatch_trace() as trace:
        _, s, out = _step(leaves, (l1[1], l2[1], ld[1]), "identity", fork=True)
        with compiled_autograd._enable(torch.compile(backend="eager")):
            out.backward(g)
    assert s._base is not None
    assert (("conv_bn_train/cuda", "c++ node, fork") in trace) == (node == "c++")
    grads0 = _grads(backend, block, "identity", fork=False)[1]
    for i, (a, b) in enumerate(zip([t.grad for t in leaves[:7]], grads0)):
        assert_close(a, b, atol=1e-12, rtol=1e-12, msg=f"gradient {i}")


@needs_ext
def test_fork_on_the_cuda_backends_python_node(cpp_node_on_cpu, monkeypatch):
    """Without the C++ node (RESNET_FUSED_CPP_NODE=0) the CUDA backend's training layer is the Python
    node over the C++ calls, whose backward call knows no shortcut: the node adds it to the dgrad."""
    monkeypatch.setattr(cuda_impl, "CPP_NODE", [False])
    block = _block()
    out, grads, s, trace = _grads("cuda", block, "identity", fork=True)
    out0, grads0, _, _ = _grads("cuda", block, "identity", fork=False)
    assert (FORK[0], "cuda") in trace and ("conv_bn_relu_backward/shortcut", "dgrad + add") in trace
    assert ("conv_bn_train/cuda", "c++ node, fork") not in trace
    for i, (a, b) in enumerate(zip(grads, grads0)):
        assert_close(a, b, atol=1e-12, rtol=1e-12, msg=f"gradient {i}")


# --- the Python node: in place only into a gradient no one else holds ---------------------------
def _spy_join(monkeypatch):
    """Record, per join, whether the Python node found the shortcut's gradient its own (_owned)."""
    import resnet_fused.ops.conv_bn_relu as cbr

    seen = []
    real = cbr._dgrad_join

    def spy(dz, x, w, shortcut, owned):
        seen.append(owned)
        return real(dz, x, w, shortcut, owned)

    monkeypatch.setattr(cbr, "_dgrad_join", spy)
    return seen


def _holders_case(case, join, monkeypatch, backend="reference"):
    """One forward and backward of a fork whose shortcut's gradient someone else may hold; returns
    (the tensors to compare with the join off: autograd's own sum, the trace, and a kept gradient
    with its value when it was handed out, or None)."""
    import resnet_fused.ops.conv_bn_relu as cbr

    monkeypatch.setattr(cbr, "SHORTCUT_JOIN", [join])
    x, (w1, bn1), _, _, g = _block(Cm=8)  # (out and s of one shape: out + s)
    gen = torch.Generator().manual_seed(7)
    t = torch.randn(x.shape, generator=gen, dtype=x.dtype).contiguous(memory_format=CL)
    xl = x.clone().requires_grad_()
    seen = []
    with use_backend(backend), dispatch_trace() as trace:
        if case == "module-hook":  # a fused Bottleneck whose downsample logs its input's gradient
            from torchvision.models import resnet as tvr

            torch.manual_seed(0)
            ds = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1, bias=False), torch.nn.BatchNorm2d(16))
            blk = resnet_fused.fuse(torch.nn.Sequential(tvr.Bottleneck(8, 4, downsample=ds)).double())
            logged = []
            ds.register_full_backward_hook(lambda m, gi, go: logged.append((gi[0], gi[0].clone())))
            out = blk(xl.contiguous(memory_format=CL))
            (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum().backward()
            (kept, at_hook_time), = logged
            return [xl.grad, kept], trace, (kept, at_hook_time)
        v = torch.randn(x.shape, generator=gen, dtype=x.dtype).requires_grad_()
        a = v * 2  # (made before the fork: its backward runs after the fork's node)
        out, s = conv_bn_relu_fork(xl, w1, bn1["bn_weight"], bn1["bn_bias"], None, None, training=True)
        if case == "sole":
            ((out * out).sum() + (s * t).sum()).backward()
            return [xl.grad], trace, None
        if case == "another-branch":  # y = a + s: AddBackward hands one tensor to both branches
            y = a + s
            ((y * t).sum() + (out * out).sum()).backward()
            return [xl.grad, v.grad], trace, None
        if case == "callers-gradient":  # (out + s).backward(g): g itself flows to s
            gg = torch.randn(out.shape, generator=gen, dtype=x.dtype).contiguous(memory_format=CL)
            before = gg.clone()
            (out + s).backward(gg)
            return [xl.grad], trace, (gg, before)
        if case == "hook-keeps-it":  # (with the join off s is x: its hook sees x's whole gradient)
            s.register_hook(lambda grad: seen.append((grad, grad.clone())))
            ((out * out).sum() + (s * t).sum()).backward()
            return [xl.grad], trace, seen[0]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["sole", "another-branch", "callers-gradient", "hook-keeps-it", "module-hook"])
def test_python_node_joins_in_place_only_into_a_gradient_no_one_else_holds(case, monkeypatch):
    """The Python node accumulates into the shortcut's gradient in place only when the autograd
    engine handed it over with no other holder: not when another branch got the same tensor (an
    add's backward), the caller passed it to backward(), or a hook kept it. Every tensor the case
    can see equals the run with the join off (autograd's sum), and each kept gradient still holds
    what it held when it was handed out."""
    seen = _spy_join(monkeypatch)
    got, trace, kept = _holders_case(case, True, monkeypatch)
    assert JOIN in trace and seen == [case == "sole"], (seen, trace)
    want, trace0, _ = _holders_case(case, False, monkeypatch)
    assert JOIN not in trace0 and len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, atol=1e-12, rtol=1e-12, msg=f"{case}: tensor {i}")
    if kept is not None:
        assert torch.equal(*kept), f"{case}: a kept gradient changed after it was handed out"


def test_fork_under_autocast_returns_the_callers_tensor():
    """Under autocast a float32 x runs in the autocast dtype; the fork's s is still the caller's x
    (no join: its alias would be the converted copy), and an x already in that dtype forks."""
    x, (w1, bn1), _, _, _ = _block(dtype=torch.float32)
    x = x.requires_grad_()
    with use_backend("reference"), torch.autocast("cpu", dtype=torch.bfloat16), dispatch_trace() as trace:
        out, s = conv_bn_relu_fork(x, w1, bn1["bn_weight"], bn1["bn_bias"], None, None, training=True)
        assert s is x and out.dtype == torch.bfloat16 and FORK[0] not in {op for op, _ in trace}
        xb = x.detach().to(torch.bfloat16).requires_grad_()
        out, s = conv_bn_relu_fork(xb, w1, bn1["bn_weight"], bn1["bn_bias"], None, None, training=True)
    assert s is not xb and s.dtype == torch.bfloat16 and s.data_ptr() == xb.data_ptr()
    assert (FORK[0], "reference") in trace


@needs_ext
@pytest.mark.parametrize("case", ["sole", "another-branch", "callers-gradient", "hook-keeps-it", "module-hook"])
def test_cpp_node_joins_in_place_only_into_a_gradient_no_one_else_holds(case, cpp_node_on_cpu, monkeypatch):
    """The same cases on the CUDA backend's C++ node (over the CPU stand-ins): its use-count test
    leaves every gradient someone else holds as it was handed out, and the results are autograd's
    sum's."""
    got, trace, kept = _holders_case(case, True, monkeypatch, backend="cuda")
    assert ("conv_bn_train/cuda", "c++ node, fork") in trace, trace
    want, trace0, _ = _holders_case(case, False, monkeypatch, backend="cuda")
    assert ("conv_bn_train/cuda", "c++ node, fork") not in trace0 and len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, atol=1e-12, rtol=1e-12, msg=f"{case}: tensor {i}")
    if kept is not None:
        assert torch.equal(*kept), f"{case}: a kept gradient changed after it was handed out"
