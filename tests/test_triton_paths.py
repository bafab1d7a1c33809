"""Each path of the Triton convolution (triton_kernels.conv_fwd) on shapes chosen to take it,
proved by dispatch_trace's "triton_conv" entry, with parity against the reference composite:

  tma-1x1[-persistent]   dense 1x1 stride-1 convs: TMA GEMM, persistent over tiles (the
                         persistent loop runs under Triton >= 3.7's interpreter; 3.6's takes the
                         one-tile-per-program twin)
  implicit[-splitK]      the flattened implicit GEMM, split-K when the output is small
  implicit-packed[...]   few channels per group: flattened (r, s, c) reduction
  implicit-rowrun[...]   few channels, groups 1, NHWC-dense: each step loads one filter row's
                         contiguous (s, c) run; the stem's 3 channels padded to 4 ("-padded-channels")

Odd sizes everywhere (M, C and K not multiples of any tile), stride 2, batch 1, eval and
training. On the CPU the kernels run under TRITON_INTERPRET=1 (fp32, IEEE products: 1e-4);
on a GPU in bf16, judged against float64 truth relative to PyTorch's own bf16 error.
"""
from __future__ import annotations

import pytest
import torch

import resnet_fused
from resnet_fused import _triton
from resnet_fused.functional import conv_bn_relu
from resnet_fused.ops.conv_bn_relu import conv_bn_relu_reference

from conftest import NO_CUDA, assert_close

pytestmark = pytest.mark.usefixtures("ieee_fp32")

# name: (N, C, K, H, W, kernel, stride, padding, groups, layout, expected path prefix)
CASES = {
    "1x1-tma": (3, 24, 40, 7, 9, 1, 1, 0, 1, "cl", "tma-1x1"),
    "1x1-tma-batch1": (1, 16, 24, 5, 5, 1, 1, 0, 1, "cl", "tma-1x1"),
    "1x1-unaligned-channels": (2, 18, 24, 5, 5, 1, 1, 0, 1, "cl", "implicit"),  # rows of 18 x 4 B: no TMA
    "1x1-stride2": (2, 24, 40, 9, 7, 1, 2, 0, 1, "cl", "implicit"),
    "1x1-nchw-input": (2, 24, 40, 5, 5, 1, 1, 0, 1, "nchw", "implicit"),
    "3x3-flattened": (2, 24, 40, 9, 9, 3, 1, 1, 1, "cl", "implicit"),
    "3x3s2-flattened": (3, 40, 24, 9, 7, 3, 2, 1, 1, "cl", "implicit"),
    "3x3-split-k": (1, 40, 24, 5, 5, 3, 1, 1, 1, "cl", "implicit-split"),
    "3x3s2-split-k": (1, 40, 24, 7, 7, 3, 2, 1, 1, "cl", "implicit-split"),
    "grouped-packed": (2, 16, 16, 6, 6, 3, 1, 1, 4, "cl", "implicit-packed"),
    "stem": (2, 3, 16, 11, 11, 7, 2, 3, 1, "cl", "implicit-rowrun"),
    "packed-nchw-input": (2, 8, 16, 9, 9, 3, 2, 1, 1, "nchw", "implicit-packed"),
    "rowrun-dense": (2, 8, 24, 9, 9, 3, 1, 1, 1, "cl", "implicit-rowrun"),
}


def _path(trace):
    paths = [b for op, b in trace if op == "triton_conv"]
    assert len(paths) == 1, trace
    return paths[0]


def _make(case, device, dtype, seed=0):
    N, C, K, H, W, k, s, p, g, layout, _ = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=gen)
    w = torch.randn(K, C // g, k, k, generator=gen) * (C // g * k * k) ** -0.5
    bn = dict(bn_weight=torch.rand(K, generator=gen) + 0.5, bn_bias=torch.randn(K, generator=gen),
              running_mean=torch.randn(K, generator=gen) * 0.1, running_var=torch.rand(K, generator=gen) + 0.5)
    P = (H + 2 * p - k) // s + 1
    Q = (W + 2 * p - k) // s + 1
    res = torch.randn(N, K, P, Q, generator=gen)
    x = x.to(device, dtype)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "cl" else x.contiguous()
    return x, w.to(device, dtype), {n: v.to(device) for n, v in bn.items()}, res.to(device, dtype), dict(
        stride=s, padding=p, groups=g)


def _run(backend, x, w, bn, res, conv, training):
    bn = {n: v.clone() for n, v in bn.items()}
    with resnet_fused.use_backend(backend), resnet_fused.dispatch_trace() as trace:
        out = conv_bn_relu(x, w, bn["bn_weight"], bn["bn_bias"], bn["running_mean"], bn["running_var"],
                           training=training, residual=None if training else res, **conv)
    return out, bn, trace


@pytest.mark.skipif(not _triton.interpreting(), reason="TRITON_INTERPRET=1 not set")
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(CASES))
def test_path_parity_interpreter(case, training):
    x, w, bn, res, conv = _make(case, "cpu", torch.float32)
    out, bn_o, trace = _run("triton", x, w, bn, res, conv, training)
    path = _path(trace)
    assert path.startswith(CASES[case][-1]), path
    if case == "stem":
        assert path.endswith("-padded-channels")
    if case.startswith("1x1-tma"):
        from resnet_fused.ops.conv_bn_relu import triton_kernels as tk

        assert path.endswith("-persistent") == tk._persistent_ok()
    bn_e = {n: v.clone() for n, v in bn.items()}
    exp = conv_bn_relu_reference(x, w, bn_e["bn_weight"], bn_e["bn_bias"], bn_e["running_mean"], bn_e["running_var"],
                                 training=training, residual=None if training else res, **conv)
    assert_close(out, exp, 1e-4, 1e-4, msg=f"{case} {path}")
    assert_close(bn_o["running_var"], bn_e["running_var"], 1e-6, 1e-5)


@pytest.mark.skipif(not _triton.interpreting(), reason="TRITON_INTERPRET=1 not set")
def test_split_k_is_deterministic_and_matches_the_unsplit_kernel(monkeypatch):
    from resnet_fused.ops.conv_bn_relu import triton_kernels as tk

    x, w, bn, res, conv = _make("3x3-split-k", "cpu", torch.float32)
    a, _, t1 = _run("triton", x, w, bn, res, conv, True)
    b, _, _ = _run("triton", x, w, bn, res, conv, True)
    assert torch.equal(a, b)  # fixed-order reduction: bitwise repeatable
    monkeypatch.setattr(tk, "_split_k", lambda *args: 1)
    c, _, t2 = _run("triton", x, w, bn, res, conv, True)
    assert _path(t1).startswith("implicit-split") and _path(t2) == "implicit"
    assert_close(a, c, 1e-5, 1e-5)


# --- GPU -----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(CASES))
def test_path_parity_gpu_bf16(case, training):
    x, w, bn, res, conv = _make(case, "cuda", torch.bfloat16)
    out, _, trace = _run("triton", x, w, bn, res, conv, training)
    path = _path(trace)
    expected = CASES[case][-1]
    if case == "1x1-tma-batch1" or case.startswith("3x3-split") or case.startswith("3x3s2-split"):
        # on 132 SMs small outputs split the reduction; whether one does depends on the SM count
        assert path.startswith("implicit") or path.startswith("tma-1x1"), path
    elif case == "1x1-unaligned-channels":
        assert path.startswith("implicit"), path  # 18 bf16 channels: rows not 16-byte aligned for TMA
    else:
        assert path.startswith(expected.replace("-split", "")), path
    bn64 = {n: v.double() for n, v in bn.items()}
    truth = conv_bn_relu_reference(x.double(), w.double(), bn64["bn_weight"], bn64["bn_bias"], bn64["running_mean"],
                                   bn64["running_var"], training=training, residual=None if training else res.double(),
                                   **conv)
    bn_t = {n: v.clone() for n, v in bn.items()}
    torch_bf16 = conv_bn_relu_reference(x, w, bn_t["bn_weight"], bn_t["bn_bias"], bn_t["running_mean"],
                                        bn_t["running_var"], training=training,
                                        residual=None if training else res, **conv)
    e_ours = (out.double() - truth).abs().max().item()
    e_torch = (torch_bf16.double() - truth).abs().max().item()
    assert e_ours <= 2 * e_torch + 1e-3 * truth.abs().max().item(), (case, path, e_ours, e_torch)


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="no CUDA GPU")
def test_gpu_split_k_on_a_batch_1_layer4_conv():
    # ResNet-50's layer4 3x3 at batch 1: 49 output rows, 512 channels: split-K on an H100
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 512, 7, 7, generator=gen).cuda().bfloat16().to(memory_format=torch.channels_last)
    w = (torch.randn(512, 512, 3, 3, generator=gen) * (512 * 9) ** -0.5).cuda().bfloat16()
    g, b = torch.ones(512, device="cuda"), torch.zeros(512, device="cuda")
    rm, rv = torch.zeros(512, device="cuda"), torch.ones(512, device="cuda")
    with resnet_fused.use_backend("triton"), resnet_fused.dispatch_trace() as trace:
        out = conv_bn_relu(x, w, g, b, rm, rv, padding=1)
    assert _path(trace).startswith("implicit-split")
    truth = conv_bn_relu_reference(x.double(), w.double(), g.double(), b.double(), rm.double(), rv.double(), padding=1)
    ref = conv_bn_relu_reference(x, w, g, b, rm, rv, padding=1)
    assert (out.double() - truth).abs().max() <= 2 * (ref.double() - truth).abs().max() + 1e-3


@pytest.mark.skipif(not _triton.interpreting(), reason="TRITON_INTERPRET=1 not set")
@pytest.mark.parametrize("mode", ["autotuned", "fixed"])
def test_gpu_host_logic_on_the_cpu(mode, monkeypatch):
    # The GPU's host path (real tile configs, autotuning with its pruning and TMA pre-hooks, the
    # fixed-config fallback) run through the interpreter: `interpreting` reports False to the
    # launcher, the autotuner's timing is a fake that ranks configs at random.
    import random

    from resnet_fused import _select
    from resnet_fused.ops.conv_bn_relu import triton_kernels as tk

    persistent = tk._persistent_ok()
    monkeypatch.setattr(tk, "interpreting", lambda: False)
    monkeypatch.setattr(tk, "_persistent_ok", lambda: persistent)
    monkeypatch.setattr(tk, "_tuned", set())
    rng = random.Random(0)

    def fake_bench(fn, quantiles=None, **_):
        fn()
        v = rng.random()
        return [v, v, v]

    for tuned in (tk._conv_fwd_tuned, tk._conv1x1_tuned):
        monkeypatch.setattr(tuned, "do_bench", fake_bench)
        monkeypatch.setattr(tuned, "cache", {})
    if mode == "fixed":
        monkeypatch.setenv("RESNET_FUSED_AUTOTUNE", "0")
    budget = _select.budget_left()
    _select.set_budget(1e6)
    try:
        for case in ("1x1-tma", "3x3s2-flattened", "stem", "3x3-split-k"):
            for training in (False, True):
                x, w, bn, res, conv = _make(case, "cpu", torch.float32)
                out, bn_o, trace = _run("triton", x, w, bn, res, conv, training)
                bn_e = {n: v.clone() for n, v in bn.items()}
                exp = conv_bn_relu_reference(x, w, bn_e["bn_weight"], bn_e["bn_bias"], bn_e["running_mean"],
                                             bn_e["running_var"], training=training,
                                             residual=None if training else res, **conv)
                assert_close(out, exp, 1e-4, 1e-4, msg=f"{mode} {case} {_path(trace)}")
                assert_close(bn_o["running_var"], bn_e["running_var"], 1e-6, 1e-5)
        # 1x1 with 16 channels (16-wide steps): the TMA path's pruning keeps configs for it
        x = torch.randn(2, 16, 9, 9).to(memory_format=torch.channels_last)
        w = torch.randn(40, 16, 1, 1) * 0.25
        bn = dict(bn_weight=torch.rand(40) + 0.5, bn_bias=torch.randn(40), running_mean=torch.zeros(40),
                  running_var=torch.ones(40))
        out, _, trace = _run("triton", x, w, bn, None, dict(stride=1, padding=0, groups=1), True)
        assert _path(trace).startswith("tma-1x1")
    finally:
        _select.set_budget(budget)


@pytest.mark.skipif(not _triton.HAS_TRITON, reason="triton not importable")
@pytest.mark.parametrize("C", [4, 8, 16, 20, 24, 40, 48, 64, 2048])
def test_tma_1x1_pruning_keeps_a_config_for_every_step_width(C):
    from resnet_fused.ops.conv_bn_relu import triton_kernels as tk

    kept = tk._prune_1x1_configs(tk._conv1x1_configs(), dict(C=C, K=64, M=100000))
    assert kept and {c.kwargs["BLOCK_C"] for c in kept} == {tk._step_width(C)}
