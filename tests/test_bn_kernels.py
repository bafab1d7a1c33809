"""The BatchNorm kernels of the Triton and CUDA backends, called directly, against float64
formulas: the statistics (CUDA: partials + finalize), the normalize + residual + ReLU, and the
backward's reduction and elementwise pass.

The shapes are chosen around the kernels' tiling: channel counts below, at and off the 16-byte
pack width (7, 8, 24), one more pack than a block's chunk of packs (264 bf16 channels: 33
packs against the reductions' 32; 2056: 257 packs against the elementwise kernels' 256), row
counts that do not divide the row-threads (1, 37, 3001), and an input whose data pointer is not
16-byte aligned (the scalar path). Tolerance: the output dtype's rounding (fp32 2e-5 relative,
bf16 1e-2) on top of float64 truth; the sums are compared to 1e-4 of their scale.
"""
from __future__ import annotations

import pytest
import torch

from conftest import BACKEND_DEVICE

CASES = [p for p in BACKEND_DEVICE if p.values[0][0] != "reference"]


def _impl(backend):
    from resnet_fused import _backends
    from resnet_fused.ops.conv_bn_relu import cuda as cuda_impl
    from resnet_fused.ops.conv_bn_relu import triton_kernels as tk

    if backend not in _backends.available_backends():
        pytest.skip(f"{backend} backend not available")
    return tk if backend == "triton" else cuda_impl


def _shapes(device):
    if device == "cpu":  # the interpreter: small
        return [(1, 8), (37, 7), (37, 24), (5, 264)]
    return [(1, 8), (37, 7), (37, 24), (3001, 64), (129, 264), (33, 2056), (7, 4104)]


def _nhwc(M, K, dtype, device, g, misaligned=False):
    """An [M, K] matrix as a channels_last [M, K, 1, 1] tensor (optionally 1 element past a
    16-byte boundary)."""
    v = torch.randn(M * K, generator=g, dtype=torch.float64)
    if misaligned:
        buf = torch.empty(M * K + 1, dtype=dtype, device=device)
        t = buf[1:].as_strided((M, K, 1, 1), (K, 1, K, K))
        t.copy_(v.view(M, K, 1, 1).to(dtype))
        return t
    return v.view(M, K, 1, 1).to(device, dtype).contiguous(memory_format=torch.channels_last)


def _mat(t):
    return t.detach().double().cpu().reshape(t.shape[0], t.shape[1])


DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float64: 1e-12}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
def test_bn_kernels_against_float64(case, dtype, misaligned):
    backend, device = case
    B = _impl(backend)
    g = torch.Generator().manual_seed(0)
    for M, K in _shapes(device):
        z = _nhwc(M, K, dtype, device, g, misaligned)
        res = _nhwc(M, K, dtype, device, g)
        zd = _mat(z)
        # per-channel coefficients in the accumulator dtype (fp32)
        scale = (torch.rand(K, generator=g) + 0.5).to(device)
        shift = torch.randn(K, generator=g).to(device)
        tol = TOL[dtype]
        for relu in (True, False):
            for residual in (res, None):
                out = B.bn_apply(z, scale, shift, residual, relu)
                want = zd * scale.double().cpu() + shift.double().cpu() + (_mat(residual) if residual is not None else 0)
                if relu:
                    want = want.clamp_min(0)
                assert out.stride() == z.stride() or out.is_contiguous(memory_format=torch.channels_last)
                torch.testing.assert_close(_mat(out), want, rtol=tol, atol=tol, msg=f"bn_apply M={M} K={K}")
        out = B.bn_apply(z, scale, shift, res, True)
        # backward: the reduction and the elementwise pass
        grad = _nhwc(M, K, dtype, device, g, misaligned)
        mean = torch.randn(K, generator=g).to(device) * 0.1
        invstd = (torch.rand(K, generator=g) + 0.5).to(device)
        gd, od, md = _mat(grad), _mat(out), mean.double().cpu()
        for relu in (True, False):
            gy = gd * (od > 0) if relu else gd
            s, sz = B.bn_bwd_reduce(grad, out, z, mean, relu)
            scl = gy.abs().sum(0).max().item() * (1 + zd.abs().max().item()) + 1e-6
            torch.testing.assert_close(s.double().cpu(), gy.sum(0), rtol=0, atol=1e-4 * scl,
                                       msg=f"bwd_reduce sum M={M} K={K}")
            torch.testing.assert_close(sz.double().cpu(), (gy * (zd - md)).sum(0), rtol=0, atol=1e-4 * scl,
                                       msg=f"bwd_reduce sum z M={M} K={K}")
            a = (torch.rand(K, generator=g) + 0.5).to(device)
            b, c = torch.randn(K, generator=g).to(device), torch.randn(K, generator=g).to(device)
            for train in (True, False):
                for store in (True, False):
                    dz, gres = B.bn_bwd_apply(grad, out, z, mean, invstd, a, b if train else None,
                                              c if train else None, relu, store)
                    want = a.double().cpu() * gy
                    if train:
                        want = want + b.double().cpu() * (zd - md) * invstd.double().cpu() + c.double().cpu()
                    torch.testing.assert_close(_mat(dz), want, rtol=tol, atol=tol * 4,
                                               msg=f"bwd_apply M={M} K={K} relu={relu} train={train}")
                    if store:
                        torch.testing.assert_close(_mat(gres), gy, rtol=tol, atol=tol, msg=f"gres M={M} K={K}")
                    else:
                        assert gres is None


@pytest.mark.parametrize("case", [p for p in CASES if p.values[0][0] == "cuda"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
def test_cuda_statistics_against_float64(case, dtype, misaligned):
    # the CUDA backend's statistics kernel (per-chunk shifted sums) and its finalize
    B = _impl("cuda")
    g = torch.Generator().manual_seed(1)
    for M, K in _shapes("cuda") + [(70000, 64)]:  # 70000 rows: 256-row chunks, a partial last one
        z = _nhwc(M, K, dtype, "cuda", g, misaligned)
        z.mul_(0.5).add_(3.0)  # an offset mean: the shifted sums must not cancel
        pm, pm2, rows = B._stats(z)
        if M < 2:
            continue
        rm, rv = torch.zeros(K, device="cuda"), torch.ones(K, device="cuda")
        mean, invstd, nrm, nrv = B.bn_finalize(pm, pm2, rows, M, rm, rv, 0.1, 1e-5)
        zd = _mat(z)
        var = zd.var(0, unbiased=False)
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(mean.double().cpu(), zd.mean(0), rtol=tol, atol=tol, msg=f"mean M={M} K={K}")
        torch.testing.assert_close(invstd.double().cpu(), (var + 1e-5).rsqrt(), rtol=10 * tol, atol=10 * tol,
                                   msg=f"invstd M={M} K={K}")
        torch.testing.assert_close(nrv.double().cpu(), 0.9 + 0.1 * zd.var(0, unbiased=True), rtol=10 * tol,
                                   atol=10 * tol)



def _close(got, want, atol, rtol, what):
    """|got - want| <= atol + rtol |want| elementwise, atol a number or a per-element tensor."""
    err = (got.double().cpu() - want).abs()
    bad = err > atol + rtol * want.abs()
    assert not bad.any(), f"{what}: {int(bad.sum())} of {bad.numel()} off; worst error {err.max().item():.3g}"


@pytest.mark.parametrize("case", [p for p in CASES if p.values[0][0] == "cuda"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=["fp32", "bf16", "fp64"])
def test_cuda_training_path_coefficients_against_float64(case, dtype):
    # the kernels of the C++ training path (csrc/conv_bn_train.cpp): the finalize that also writes
    # the apply's scale / shift, and the backward reduction followed by its per-channel terms
    _impl("cuda")
    ops = torch.ops.resnet_fused_C
    g = torch.Generator().manual_seed(2)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for M, K in [(37, 7), (3001, 64), (70000, 64), (129, 264)]:
        z = _nhwc(M, K, dtype, "cuda", g)
        z.mul_(0.5).add_(3.0)
        rows = max(256, -(-M // 512))
        pm, pm2 = ops.bn_stats(z, rows)
        zd = _mat(z)
        mu, var = zd.mean(0), zd.var(0, unbiased=False)
        istd = (var + 1e-5).rsqrt()
        gamma = (torch.rand(K, generator=g, dtype=torch.float64) + 0.5)
        beta = torch.randn(K, generator=g, dtype=torch.float64)
        for affine in (True, False):
            gm, bt = (gamma.to("cuda", acc), beta.to("cuda", acc)) if affine else (None, None)
            # with running statistics in the affine case (fp32 buffers, as a BatchNorm module's), without otherwise
            rm, rv = (torch.zeros(K, device="cuda"), torch.ones(K, device="cuda")) if affine else (None, None)
            mean, invstd, scale, shift, nrm, nrv = ops.bn_finalize_affine(pm, pm2, rows, M, rm, rv, gm, bt, 0.1, 1e-5)
            # in place (the C++ autograd node's): the same bits, written over the running statistics
            irm, irv = (rm.clone(), rv.clone()) if affine else (None, None)
            got = ops.bn_finalize_affine_(pm, pm2, rows, M, irm, irv, gm, bt, 0.1, 1e-5)
            for a, e in zip(got, (mean, invstd, scale, shift)):
                assert torch.equal(a, e)
            if affine:
                assert torch.equal(irm, nrm) and torch.equal(irv, nrv)
            if affine:
                _close(nrm, 0.1 * mu, 1e-6, 1e-5, f"running mean M={M}")
                _close(nrv, 0.9 + 0.1 * zd.var(0, unbiased=True), 1e-5, 1e-5, f"running var M={M}")
            else:
                assert nrm.numel() == 0 and nrv.numel() == 0
            sc = istd * (gamma if affine else 1)
            _close(scale, sc, 10 * tol, 10 * tol, f"scale M={M} K={K}")
            _close(shift, (beta if affine else 0) - mu * sc, 10 * tol * (1 + (mu * sc).abs()), 10 * tol,
                   f"shift M={M} K={K}")
        # backward: the sums of gy and gy * (z - mean) (ReLU mask from out), then the terms
        grad = _nhwc(M, K, dtype, "cuda", g)
        out = _nhwc(M, K, dtype, "cuda", g)
        mean_t, invstd_t = mu.to("cuda", acc), istd.to("cuda", acc)
        gd, od = _mat(grad), _mat(out)
        gy = gd * (od > 0)
        s, sz = gy.sum(0), (gy * (zd - mean_t.double().cpu())).sum(0)
        i = invstd_t.double().cpu()
        scl = gy.abs().sum(0) * (1 + zd.abs().max().item()) + 1e-6
        for gm in (gamma, None):  # (no affine weight: the kernel reads 1)
            dgamma, dbeta, a, b, c = ops.bn_bwd_reduce_coef(grad, out, z, mean_t, invstd_t,
                                                            None if gm is None else gm.to("cuda", acc), True)
            want_a = (1 if gm is None else gm) * i
            for name, got, want, atol in (("dbeta", dbeta, s, 1e-5 * scl), ("dgamma", dgamma, sz * i, 1e-5 * scl * i),
                                          ("a", a, want_a, 1e-6), ("b", b, -want_a / M * sz * i, 1e-5 * scl * i / M),
                                          ("c", c, -want_a / M * s, 1e-5 * scl / M)):
                _close(got, want, atol, 1e-5, f"{name} M={M} K={K} gamma={gm is not None}")


@pytest.mark.parametrize("case", [p for p in CASES if p.values[0][0] == "triton"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16, torch.float64], ids=["fp32", "bf16", "fp16", "fp64"])
def test_triton_training_apply_and_the_relu_mask_from_z(case, dtype):
    # The Triton training path: the apply computes scale = gamma invstd and shift = beta - mean scale
    # itself (bn_apply_stats), and the backward kernels recompute the ReLU mask from z with the same
    # arithmetic instead of reading the output. The mask must be the output's bit for bit, with the
    # values where it could differ: NaN and infinities in z, and a positive pre-ReLU value that
    # rounds to 0 in the output dtype (its output is 0, so the gradient is blocked).
    backend, device = case
    tk = _impl(backend)
    g = torch.Generator().manual_seed(3)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tol = TOL.get(dtype, 2e-3)
    # > 0 in fp32, 0 in the output dtype (for bf16 an fp32 subnormal: not under the interpreter, whose
    # fp32 -> bf16 conversion of subnormals is not the GPU's round to nearest: 1e-44 gives 8.8e-39)
    tiny = {torch.float16: 1e-9, torch.bfloat16: None if device == "cpu" else 1e-44}.get(dtype)
    for M, K in _shapes(device):
        z = _nhwc(M, K, dtype, device, g)
        mean = (torch.randn(K, generator=g, dtype=torch.float64) * 0.1).to(device, acc)
        invstd = (torch.rand(K, generator=g, dtype=torch.float64) + 0.5).to(device, acc)
        gamma = (torch.rand(K, generator=g, dtype=torch.float64) + 0.5).to(device, acc)
        beta = torch.randn(K, generator=g, dtype=torch.float64).to(device, acc)
        zf = z.view(M, K)  # (a channels_last [M, K, 1, 1] tensor: the same memory)
        zf[0, 0], zf[-1, -1] = float("nan"), float("inf")
        if K > 2:
            zf[M // 2, 1] = float("-inf")
        if tiny is not None and K > 3:  # channel 3: y = 0 * 1 + tiny for a zero z
            zf[:, 3] = 0
            gamma[3], invstd[3], mean[3], beta[3] = 1, 1, 0, tiny
        for gm, bt in ((gamma, beta), (None, None)):
            out = tk.bn_apply_stats(z, gm, bt, mean, invstd, None, True)
            sc = invstd.double().cpu() * (gm.double().cpu() if gm is not None else 1)
            sh = (bt.double().cpu() if bt is not None else 0) - mean.double().cpu() * sc
            want = (_mat(z) * sc + sh).clamp_min(0)
            fin = want.isfinite()
            torch.testing.assert_close(_mat(out)[fin], want[fin], rtol=tol, atol=tol, msg=f"apply M={M} K={K}")
            # (the output's own non-finite entries: as the formula's)
            assert torch.equal(_mat(out)[~fin].isnan(), want[~fin].isnan())
            grad = _nhwc(M, K, dtype, device, g)
            mask = (gm, bt, invstd)
            junk = torch.full_like(out, -1.0)  # with the mask from z, out is not read
            s_out = tk.bn_bwd_reduce(grad, out, z, mean, True)
            s_z = tk.bn_bwd_reduce(grad, junk, z, mean, True, mask)
            for a, e in zip(s_z, s_out):
                torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True)
            c_out = tk.bn_bwd_reduce_coef(grad, out, z, mean, invstd, gm, True)
            c_z = tk.bn_bwd_reduce_coef(grad, junk, z, mean, invstd, gm, True, mask)
            for a, e in zip(c_z, c_out):
                torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True)
            a, b, c = c_out[2:]
            for store in (False, True):
                d_out = tk.bn_bwd_apply(grad, out, z, mean, invstd, a, b, c, True, store)
                d_z = tk.bn_bwd_apply(grad, junk, z, mean, invstd, a, b, c, True, store, mask)
                for x_, e_ in zip(d_z, d_out):
                    if e_ is None:
                        assert x_ is None
                    else:
                        torch.testing.assert_close(x_, e_, rtol=0, atol=0, equal_nan=True)
            if tiny is not None and K > 3:  # that channel's gradient is blocked everywhere
                assert (_mat(d_out[1])[:, 3] == 0).all() and (_mat(out)[:, 3] == 0).all()
    with pytest.raises(ValueError, match="invstd"):
        tk.bn_bwd_apply(grad, out, z, mean, invstd, a, b, c, True, False, (gamma, beta, invstd.clone()))


@pytest.mark.parametrize("case", [p for p in CASES if p.values[0][0] == "triton"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=["fp32", "bf16", "fp64"])
def test_triton_backward_coefficients_against_float64(case, dtype):
    # bn_bwd_reduce_coef: the partial sums, then one kernel for their sum and the per-channel terms
    # of dz = a gy + b xhat + c (as the Python arithmetic it replaces), over a row count that spans
    # several partials
    backend, device = case
    tk = _impl(backend)
    g = torch.Generator().manual_seed(4)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    shapes = [(1, 8), (37, 7), (200, 24)] if device == "cpu" else [(37, 7), (3001, 64), (70000, 64), (129, 264)]
    for M, K in shapes:
        z, grad, out = (_nhwc(M, K, dtype, device, g) for _ in range(3))
        zd, gd, od = _mat(z), _mat(grad), _mat(out)
        mean = (torch.randn(K, generator=g, dtype=torch.float64) * 0.1).to(device, acc)
        invstd = (torch.rand(K, generator=g, dtype=torch.float64) + 0.5).to(device, acc)
        gamma = (torch.rand(K, generator=g, dtype=torch.float64) + 0.5).to(device, acc)
        i, md = invstd.double().cpu(), mean.double().cpu()
        for relu in (True, False):
            gy = gd * (od > 0) if relu else gd
            s, sz = gy.sum(0), (gy * (zd - md)).sum(0)
            scl = gy.abs().sum(0) * (1 + zd.abs().max().item()) + 1e-6
            rel = 1e-12 if dtype == torch.float64 else 1e-5
            for gm in (gamma, None):
                got = tk.bn_bwd_reduce_coef(grad, out, z, mean, invstd, gm, relu)
                assert all(t.dtype == acc and t.shape == (K,) for t in got)
                dgamma, dbeta, a, b, c = got
                want_a = (1 if gm is None else gm.double().cpu()) * i
                for name, t, want, atol in (("dbeta", dbeta, s, rel * scl), ("dgamma", dgamma, sz * i, rel * scl * i),
                                            ("a", a, want_a, rel), ("b", b, -want_a / M * sz * i, rel * scl * i / M),
                                            ("c", c, -want_a / M * s, rel * scl / M)):
                    _close(t, want, atol, rel, f"{name} M={M} K={K} relu={relu} gamma={gm is not None}")
