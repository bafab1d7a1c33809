"""Triton backend of conv + BatchNorm (+ residual) + ReLU.

Activations are NHWC (channels_last): a conv output of shape [N, K, P, Q] is stored as
an [M, K] row-major matrix, M = N*P*Q. The convolution is an implicit GEMM
  out[m, k] = sum_{r, s, c} x[n, p*SH - PH + r*DH, q*SW - PW + s*DW, g*Cg + c] * w[k, r, s, c]
with the input patch gathered on the fly (zero padding by masking), tensor cores through
`tl.dot` and an fp32 (fp64 for fp64 inputs) accumulator. Its epilogue either
  * eval:     applies the folded BatchNorm (scale, shift), the residual and ReLU, one store;
  * training: stores the raw conv output z and this tile's per-channel mean and M2 (sum of
              squared deviations from the tile mean), merged later with Chan's formula:
              exact, deterministic (no atomics) and free of the E[z^2]-E[z]^2 cancellation.
fp16/bf16 accumulators are rounded to the activation dtype before the epilogue, as PyTorch's
conv output is before its BatchNorm (overflow gives inf as in eager).
"""
from __future__ import annotations

import os

import torch

from ..._triton import interpreting, tl, triton

# Tiles used under the interpreter (CPU, numpy), no autotuning: small tiles for small problems
# (so that tests cross tile boundaries in every dimension), large ones otherwise (the
# interpreter's cost is per program and per loop iteration, not per element).
_INTERP_SMALL = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_C=16)
_INTERP_LARGE = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_C=64)
_ELEM_BLOCK = 1024


def _conv_configs():
    # (BLOCK_M, BLOCK_N, BLOCK_C, warps, stages): large tiles for the big GEMMs, narrow BLOCK_C
    # for the stem (3 channels) and BLOCK_N 16-32 for grouped convs; pruned per problem below.
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_C=bc), num_warps=w, num_stages=st)
            # Six candidates: each costs a compile per kernel specialization on first use (about
            # 1-2 s), so the space stays small until measurements say which shapes matter.
            for bm, bn, bc, w, st in [
                (128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4),
                (128, 64, 16, 4, 4), (32, 32, 16, 4, 2),
            ]]


def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles much larger than the problem (the stem's 3 channels, grouped convs' few
    channels per group, small M): they waste the MMA work and the tuning time."""
    args = {**named_args, **kwargs}
    red = int(args["Cg"]) * (int(args["R"]) * int(args["S"]) if args.get("PACKED") else 1)  # reduction per step
    cap_c = max(16, triton.next_power_of_2(red))
    cap_n = max(16, triton.next_power_of_2(int(args["Kg"])))
    cap_m = max(32, triton.next_power_of_2(int(args["M"])))
    kept = [c for c in configs if c.kwargs["BLOCK_C"] <= cap_c and c.kwargs["BLOCK_N"] <= cap_n
            and c.kwargs["BLOCK_M"] <= cap_m]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_C"])]


def _quick_bench(fn, quantiles=None, **_):
    # Short timing per config (the default spends ~125 ms each): tuning a whole network stays
    # within seconds once the kernels are compiled. The first call compiles (not counted); the
    # timing is charged to the tuning budget shared with the backend selection.
    import time

    from ... import _select

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)
    finally:
        _select.spend(time.perf_counter() - t0)


@triton.jit
def _mma(a, b, acc, F64: tl.constexpr, F32: tl.constexpr, IEEE: tl.constexpr):
    """acc += a @ b on tensor cores; fp64 (gradcheck) has no tensor-core path: exact
    products summed in fp64."""
    if F64:
        acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    elif F32:
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc)
    return acc


# Loop bounds in these kernels are compile-time constants (Cg, R*S, the finalize's trip
# count): Triton 3.6's interpreter cannot loop over a runtime scalar under NumPy >= 2.4.
@triton.jit
def _conv_fwd_kernel(
    x_ptr,  # [N, C, H, W] input, any strides (NHWC is the fast layout)
    w_ptr,  # [K, R, S, Cg] weight, contiguous (channel fastest)
    out_ptr,  # [M, K] output (eval epilogue)
    z_ptr,  # [M, K] raw conv output (training, or eval when backward needs it)
    scale_ptr, shift_ptr,  # [K] folded BatchNorm, accumulator dtype (eval)
    res_ptr,  # [M, K] residual, NHWC dense (eval, HAS_RES)
    pmean_ptr, pm2_ptr,  # [cdiv(M, BLOCK_M), K] per-tile mean / M2 (training)
    C, H, W, K, P, Q, M, Kg,
    sxn, sxc, sxh, sxw,
    SH, SW, PH, PW, DH, DW,
    R: tl.constexpr, S: tl.constexpr,
    Cg: tl.constexpr,  # input channels per group: a compile-time loop bound (a handful of values per network)
    PACKED: tl.constexpr,  # reduce over flattened (r, s, c) (few channels per group) instead of per (r, s)
    TRAINING: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, STORE_Z: tl.constexpr,
    HAS_SCALE: tl.constexpr,  # eval: False when the scale is folded into the weight (shift = bias)
    IEEE: tl.constexpr,  # fp32 inputs: IEEE fp32 products instead of TF32
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)  # over groups x output-channel tiles of one group
    tiles_per_group = tl.cdiv(Kg, BLOCK_N)
    g = pid_n // tiles_per_group
    offs_kg = (pid_n % tiles_per_group) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = offs_kg < Kg
    offs_k = g * Kg + offs_kg  # global output channel
    # int64 row indices: N*P*Q*K may exceed 2^31.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    q = offs_m % Q
    t = offs_m // Q
    p = t % P
    n = t // P
    h0 = p * SH - PH
    w0 = q * SW - PW
    x_row = x_ptr + n * sxn + (g * Cg).to(tl.int64) * sxc  # [BLOCK_M] pointers at (n, group's first channel)
    w_col = w_ptr + offs_k.to(tl.int64) * (R * S * Cg)  # [BLOCK_N]
    offs_c = tl.arange(0, BLOCK_C)

    F64: tl.constexpr = x_ptr.dtype.element_ty == tl.float64
    F32: tl.constexpr = x_ptr.dtype.element_ty == tl.float32
    if F64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PACKED:
        # Few channels per group (the stem's 3, ResNeXt's 4): the reduction runs over the
        # flattened (r, s, c) index, so that each BLOCK_C-wide step is full of real products
        # instead of mostly channel padding (5x less MMA work for the stem).
        RSC: tl.constexpr = R * S * Cg
        for k0 in range(0, RSC, BLOCK_C):
            kk = k0 + offs_c
            kk_mask = kk < RSC
            r = kk // (S * Cg)
            s = (kk // Cg) % S
            c = kk % Cg
            h = h0[:, None] + r[None, :] * DH
            w = w0[:, None] + s[None, :] * DW
            valid = m_mask[:, None] & kk_mask[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            a = tl.load(x_row[:, None] + h * sxh + w * sxw + c[None, :].to(tl.int64) * sxc, mask=valid, other=0.0)
            b = tl.load(w_col[None, :] + kk[:, None], mask=kk_mask[:, None] & k_mask[None, :], other=0.0)
            acc = _mma(a, b, acc, F64, F32, IEEE)
    else:
        for rs in range(0, R * S):
            r = rs // S
            s = rs % S
            h = h0 + r * DH
            w = w0 + s * DW
            valid = m_mask & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            a_row = x_row + h * sxh + w * sxw
            b_col = w_col + rs * Cg
            for c0 in range(0, Cg, BLOCK_C):
                cc = c0 + offs_c
                c_mask = cc < Cg
                a = tl.load(a_row[:, None] + cc[None, :].to(tl.int64) * sxc, mask=valid[:, None] & c_mask[None, :],
                            other=0.0)
                b = tl.load(b_col[None, :] + cc[:, None], mask=c_mask[:, None] & k_mask[None, :], other=0.0)
                acc = _mma(a, b, acc, F64, F32, IEEE)

    if not F64 and not F32:
        # fp16 / bf16: round the conv output to the activation dtype first, as PyTorch's conv
        # does before the BatchNorm sees it; overflow to inf behaves as in eager, and the
        # batch statistics describe exactly the stored z.
        acc = acc.to(x_ptr.dtype.element_ty).to(tl.float32)
    mk = offs_m[:, None] * K + offs_k[None, :]
    mask = m_mask[:, None] & k_mask[None, :]
    if STORE_Z:
        tl.store(z_ptr + mk, acc.to(z_ptr.dtype.element_ty), mask=mask)
    if TRAINING:
        # This tile's statistics of the conv output: count, mean, M2.
        cnt = tl.minimum(M - pid_m.to(tl.int64) * BLOCK_M, BLOCK_M).to(acc.dtype)
        accm = tl.where(m_mask[:, None], acc, 0.0)
        mean = tl.sum(accm, axis=0) / cnt
        d = tl.where(m_mask[:, None], acc - mean[None, :], 0.0)
        m2 = tl.sum(d * d, axis=0)
        pidx = pid_m.to(tl.int64) * K + offs_k
        tl.store(pmean_ptr + pidx, mean, mask=k_mask)
        tl.store(pm2_ptr + pidx, m2, mask=k_mask)
    else:
        sh = tl.load(shift_ptr + offs_k, mask=k_mask, other=0.0)
        if HAS_SCALE:
            sc = tl.load(scale_ptr + offs_k, mask=k_mask, other=0.0)
            y = acc * sc[None, :] + sh[None, :]
        else:
            y = acc + sh[None, :]
        if HAS_RES:
            y += tl.load(res_ptr + mk, mask=mask, other=0.0).to(y.dtype)
        if RELU:
            y = tl.where(y < 0, 0.0, y)  # NaN stays NaN, as in torch.relu
        tl.store(out_ptr + mk, y.to(out_ptr.dtype.element_ty), mask=mask)


_conv_fwd_tuned = triton.autotune(
    configs=_conv_configs(),
    prune_configs_by={"early_config_prune": _prune_configs},
    do_bench=_quick_bench,
    # Each config rewrites every output it owns (the statistics buffers are sized for the
    # smallest BLOCK_M), so benchmarking configs on the live buffers is harmless.
    key=["M", "K", "C", "Cg", "H", "W", "P", "Q", "SH", "SW", "PH", "PW", "DH", "DW", "R", "S", "sxc", "TRAINING",
         "HAS_RES", "RELU", "STORE_Z", "HAS_SCALE", "IEEE"],
)(_conv_fwd_kernel)

_MIN_BLOCK_M = 16  # smallest BLOCK_M among the configs above and the interpreter's
# One fixed configuration: under torch.use_deterministic_algorithms (autotuning picks by timing,
# so two processes could group the statistics differently) and with RESNET_FUSED_AUTOTUNE=0
# (no tuning time, e.g. for test suites).
_FIXED = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_C=32, num_warps=4, num_stages=3)


_tuned: set = set()  # the autotuner's keys (and dtypes) already tuned in this process


def _use_fixed_config(x, w, M, K, C, H, W, P, Q, stride, padding, dilation, training, residual, relu, store_z,
                      has_scale, ieee) -> bool:
    """The fixed tile configuration instead of autotuning: deterministic mode, with
    RESNET_FUSED_AUTOTUNE=0, and for problems not yet tuned once the tuning budget shared with
    the backend selection is spent (or while a CUDA graph is captured)."""
    if torch.are_deterministic_algorithms_enabled() or os.environ.get("RESNET_FUSED_AUTOTUNE", "1") == "0":
        return True
    from ... import _select

    key = (M, K, C, w.shape[3], H, W, P, Q, *stride, *padding, *dilation, w.shape[1], w.shape[2], x.stride(1),
           training, residual is not None, relu, store_z, has_scale, ieee, x.dtype)
    if key in _tuned:
        return False
    if _select.budget_left() <= 0 or _select.capturing():
        return True
    _tuned.add(key)
    return False


def conv_fwd(x, w_krsc, K, P, Q, stride, padding, dilation, groups, *, training, scale=None, shift=None,
             residual=None, relu=True, store_z=False, ieee=True):
    """Launch the implicit-GEMM conv with its fused epilogue.

    Args:
        x: [N, C, H, W] input (any strides).
        w_krsc: [K, R, S, C // groups] contiguous weight.
        scale, shift: [K] folded BatchNorm in the accumulator dtype (eval).
        residual: [N, K, P, Q] channels_last-dense residual or None (eval).
    Returns:
        (out, z, pmean, pm2, rows_per_partial): out (eval) and z are [N, K, P, Q]
        channels_last; pmean/pm2 are [G, K] per-tile statistics (training) over
        rows_per_partial output pixels each (the last partial may hold fewer).
    """
    N, C, H, W = x.shape
    _, R, S, Cg = w_krsc.shape
    Kg = K // groups
    M = N * P * Q
    dev, dt = x.device, x.dtype
    acc_dt = torch.float64 if dt == torch.float64 else torch.float32
    cl = torch.channels_last
    out = torch.empty((N, K, P, Q), device=dev, dtype=dt, memory_format=cl) if not training else None
    z = torch.empty((N, K, P, Q), device=dev, dtype=dt, memory_format=cl) if (training or store_z) else None
    interp = interpreting()
    if interp or dt == torch.float64:
        small = M * K <= 64 * 64 * 4 and Cg <= 64
        kernel, cfg = _conv_fwd_kernel, dict(_INTERP_SMALL if small else _INTERP_LARGE)
        if dt == torch.float64 and not interp:
            cfg.update(BLOCK_M=32, BLOCK_N=32, BLOCK_C=8)
        block_m = cfg["BLOCK_M"]
    elif _use_fixed_config(x, w_krsc, M, K, C, H, W, P, Q, stride, padding, dilation, training, residual, relu,
                           z is not None, scale is not None, ieee):
        kernel, cfg = _conv_fwd_kernel, dict(_FIXED)
        block_m = cfg["BLOCK_M"]
    else:
        kernel, cfg, block_m = _conv_fwd_tuned, {}, None
    pm = pm2 = None
    if training:
        # Sized for the smallest BLOCK_M; the launch below reports the BLOCK_M it used.
        g_max = triton.cdiv(M, block_m or _MIN_BLOCK_M)
        pm = torch.empty((g_max, K), device=dev, dtype=acc_dt)
        pm2 = torch.empty((g_max, K), device=dev, dtype=acc_dt)
    if M == 0:
        return out, z, pm, pm2, block_m or _MIN_BLOCK_M
    if groups * triton.cdiv(Kg, 16) > 65535:
        raise ValueError(f"conv_bn_relu (triton): {groups} groups x {Kg} channels exceed the launch grid")
    dummy = x  # never dereferenced when its flag is off
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), groups * triton.cdiv(Kg, meta["BLOCK_N"]))
    kernel[grid](
        x, w_krsc,
        out if out is not None else dummy, z if z is not None else dummy,
        scale if scale is not None else dummy, shift if shift is not None else dummy,
        residual if residual is not None else dummy,
        pm if pm is not None else dummy, pm2 if pm2 is not None else dummy,
        C, H, W, K, P, Q, M, Kg,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        R=R, S=S, Cg=Cg, PACKED=Cg < 16, TRAINING=training, HAS_RES=residual is not None, RELU=relu, STORE_Z=z is not None,
        HAS_SCALE=scale is not None, IEEE=ieee, **cfg,
    )
    if block_m is None:
        block_m = _conv_fwd_tuned.best_config.kwargs["BLOCK_M"]
    if training:
        g = triton.cdiv(M, block_m)
        pm, pm2 = pm[:g], pm2[:g]
    return out, z, pm, pm2, block_m


@triton.jit
def _bn_finalize_kernel(
    pmean_ptr, pm2_ptr,  # [G, K] partial mean / M2, each over ROWS rows (last: the rest)
    mean_ptr, invstd_ptr,  # [K] outputs, accumulator dtype
    rmean_ptr, rvar_ptr,  # [K] running statistics (read)
    nrmean_ptr, nrvar_ptr,  # [K] updated running statistics (written; UPDATE)
    G, K, M, ROWS,
    mom_hi, mom_lo, eps_hi, eps_lo,  # momentum and eps as fp32 (hi + lo) pairs: exact enough for fp64
    UPDATE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
    G_STEPS: tl.constexpr,  # >= cdiv(G, BLOCK_G), a power of two (few compiled variants; masked)
):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    offs_g = tl.arange(0, BLOCK_G)
    F64: tl.constexpr = mean_ptr.dtype.element_ty == tl.float64
    if F64:
        zero = tl.zeros((BLOCK_G, BLOCK_K), dtype=tl.float64)
    else:
        zero = tl.zeros((BLOCK_G, BLOCK_K), dtype=tl.float32)
    # Chan's parallel merge: mean = sum(n_i mean_i) / M,  M2 = sum(M2_i + n_i (mean_i - mean)^2).
    s = zero
    for gi in range(0, G_STEPS):
        gg = gi * BLOCK_G + offs_g
        msk = (gg < G)[:, None] & k_mask[None, :]
        cnt = tl.minimum(M - gg.to(tl.int64) * ROWS, ROWS).to(zero.dtype)
        pm = tl.load(pmean_ptr + gg[:, None].to(tl.int64) * K + offs_k[None, :], mask=msk, other=0.0)
        s += tl.where(msk, cnt[:, None] * pm, 0.0)
    # Promote the scalars through a vector of the accumulator dtype (exact: hi is an fp32 value).
    zk = tl.sum(zero, axis=0)
    Mf = zk + M
    momentum = (zk + mom_hi) + mom_lo
    eps = (zk + eps_hi) + eps_lo
    mean = tl.sum(s, axis=0) / Mf
    s2 = zero
    for gi in range(0, G_STEPS):
        gg = gi * BLOCK_G + offs_g
        msk = (gg < G)[:, None] & k_mask[None, :]
        cnt = tl.minimum(M - gg.to(tl.int64) * ROWS, ROWS).to(zero.dtype)
        idx = gg[:, None].to(tl.int64) * K + offs_k[None, :]
        pm = tl.load(pmean_ptr + idx, mask=msk, other=0.0)
        p2 = tl.load(pm2_ptr + idx, mask=msk, other=0.0)
        d = pm - mean[None, :]
        s2 += tl.where(msk, p2 + cnt[:, None] * d * d, 0.0)
    var = tl.sum(s2, axis=0) / Mf  # biased: used to normalise
    if F64:
        invstd = 1.0 / tl.sqrt(var + eps)  # fp64 sqrt and division are IEEE-rounded already
    else:
        invstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))  # IEEE-rounded, not the approximate fp32 ones
    tl.store(mean_ptr + offs_k, mean, mask=k_mask)
    tl.store(invstd_ptr + offs_k, invstd, mask=k_mask)
    if UPDATE:
        # As F.batch_norm: running = (1 - momentum) * running + momentum * batch, unbiased variance.
        rm = tl.load(rmean_ptr + offs_k, mask=k_mask).to(mean.dtype)
        rv = tl.load(rvar_ptr + offs_k, mask=k_mask).to(mean.dtype)
        unbiased = var * (Mf / (Mf - 1.0))
        tl.store(nrmean_ptr + offs_k, ((1.0 - momentum) * rm + momentum * mean).to(nrmean_ptr.dtype.element_ty),
                 mask=k_mask)
        tl.store(nrvar_ptr + offs_k, ((1.0 - momentum) * rv + momentum * unbiased).to(nrvar_ptr.dtype.element_ty),
                 mask=k_mask)


def _split(v: float) -> tuple[float, float]:
    """v as hi + lo, both exactly representable in fp32 (Triton passes float scalars as fp32)."""
    hi = float(torch.tensor(v, dtype=torch.float32))
    return hi, float(torch.tensor(v - hi, dtype=torch.float32))


@triton.jit
def _bn_merge_kernel(
    pmean_ptr, pm2_ptr,  # [G, K] partial mean / M2 over ROWS rows each (the last: the rest)
    qmean_ptr, qm2_ptr,  # [cdiv(G, GROUP), K] merged partials over ROWS * GROUP rows each
    G, K, M, ROWS,
    GROUP: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Chan's merge of GROUP consecutive partials into one: the first level of a two-level
    # reduction, so that the finalize loops over G / GROUP partials instead of G (M / BLOCK_M
    # is thousands at batch 256).
    q = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    gg = q * GROUP + tl.arange(0, GROUP)
    msk = (gg < G)[:, None] & k_mask[None, :]
    idx = gg[:, None].to(tl.int64) * K + offs_k[None, :]
    pm = tl.load(pmean_ptr + idx, mask=msk, other=0.0)
    p2 = tl.load(pm2_ptr + idx, mask=msk, other=0.0)
    cnt = tl.maximum(tl.minimum(M - gg.to(tl.int64) * ROWS, ROWS), 0).to(pm.dtype)[:, None]
    n = tl.sum(tl.where(msk, cnt, 0.0), axis=0)
    mean = tl.sum(tl.where(msk, cnt * pm, 0.0), axis=0) / n
    d = pm - mean[None, :]
    m2 = tl.sum(tl.where(msk, p2 + cnt * d * d, 0.0), axis=0)
    out = q.to(tl.int64) * K + offs_k
    tl.store(qmean_ptr + out, mean, mask=k_mask)
    tl.store(qm2_ptr + out, m2, mask=k_mask)


_MERGE_ABOVE = 256  # partials beyond which a merge level runs first
_MERGE_GROUP = 64


def bn_finalize(pmean, pm2, rows, M, running_mean, running_var, momentum, eps):
    G, K = pmean.shape
    while G > _MERGE_ABOVE:
        G2 = triton.cdiv(G, _MERGE_GROUP)
        qm = torch.empty((G2, K), device=pmean.device, dtype=pmean.dtype)
        q2 = torch.empty_like(qm)
        _bn_merge_kernel[(G2, triton.cdiv(K, 32))](pmean, pm2, qm, q2, G, K, M, rows, GROUP=_MERGE_GROUP,
                                                    BLOCK_K=32)
        pmean, pm2, rows, G = qm, q2, rows * _MERGE_GROUP, G2
    mean = torch.empty(K, device=pmean.device, dtype=pmean.dtype)
    invstd = torch.empty_like(mean)
    update = running_mean is not None
    new_rm = torch.empty_like(running_mean) if update else None
    new_rv = torch.empty_like(running_var) if update else None
    block_k = 32
    _bn_finalize_kernel[(triton.cdiv(K, block_k),)](
        pmean, pm2, mean, invstd,
        running_mean if update else mean, running_var if update else mean,
        new_rm if update else mean, new_rv if update else mean,
        G, K, M, rows, *_split(momentum), *_split(eps),
        UPDATE=update, BLOCK_G=32, BLOCK_K=block_k, G_STEPS=triton.next_power_of_2(triton.cdiv(G, 32)),
    )
    return mean, invstd, new_rm, new_rv


@triton.jit
def _bn_apply_kernel(
    z_ptr,  # [M*K] conv output, NHWC dense
    scale_ptr, shift_ptr,  # [K] accumulator dtype
    res_ptr,  # [M*K] residual (HAS_RES)
    out_ptr,  # [M*K]
    n_elements, K,
    HAS_RES: tl.constexpr, RELU: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    k = offs % K
    sc = tl.load(scale_ptr + k, mask=mask, other=0.0)
    y = tl.load(z_ptr + offs, mask=mask, other=0.0).to(sc.dtype) * sc + tl.load(shift_ptr + k, mask=mask, other=0.0)
    if HAS_RES:
        y += tl.load(res_ptr + offs, mask=mask, other=0.0).to(y.dtype)
    if RELU:
        y = tl.where(y < 0, 0.0, y)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def bn_apply(z, scale, shift, residual, relu):
    """out = relu?(z * scale + shift + residual?) over NHWC-dense z (and residual)."""
    out = torch.empty_like(z)
    n = z.numel()
    if n:
        _bn_apply_kernel[(triton.cdiv(n, _ELEM_BLOCK),)](
            z, scale, shift, residual if residual is not None else z, out, n, z.shape[1],
            HAS_RES=residual is not None, RELU=relu, BLOCK=_ELEM_BLOCK)
    return out


@triton.jit
def _bn_bwd_reduce_kernel(
    grad_ptr,  # [M, K] upstream gradient, NHWC dense
    out_ptr,  # [M, K] forward output (for the ReLU mask)
    z_ptr,  # [M, K] conv output
    mean_ptr,  # [K]
    psum_ptr, psumz_ptr,  # [G, K] partial sums of gy and gy * (z - mean)
    M, K,
    ROWS: tl.constexpr,  # rows per partial (a loop bound)
    RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_g = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    mean = tl.load(mean_ptr + offs_k, mask=k_mask, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=mean.dtype)
    accz = tl.zeros((BLOCK_M, BLOCK_K), dtype=mean.dtype)
    row0 = pid_g.to(tl.int64) * ROWS
    for r0 in range(0, ROWS, BLOCK_M):
        rows = row0 + r0 + tl.arange(0, BLOCK_M)
        msk = (rows < M)[:, None] & k_mask[None, :]
        idx = rows[:, None] * K + offs_k[None, :]
        gy = tl.load(grad_ptr + idx, mask=msk, other=0.0).to(mean.dtype)
        if RELU:
            o = tl.load(out_ptr + idx, mask=msk, other=0.0)
            gy = tl.where(o <= 0, 0.0, gy)  # as threshold_backward: NaN passes
        zc = tl.load(z_ptr + idx, mask=msk, other=0.0).to(mean.dtype) - mean[None, :]
        acc += gy
        accz += tl.where(msk, gy * zc, 0.0)
    pidx = pid_g.to(tl.int64) * K + offs_k
    tl.store(psum_ptr + pidx, tl.sum(acc, axis=0), mask=k_mask)
    tl.store(psumz_ptr + pidx, tl.sum(accz, axis=0), mask=k_mask)


def bn_bwd_reduce(grad, out, z, mean, relu):
    """Per-channel sum(gy) and sum(gy * (z - mean)), gy = grad masked by ReLU. Returns two [K] tensors."""
    K = z.shape[1]
    M = z.numel() // K if K else 0
    rows = 32 if interpreting() else 256
    G = max(1, triton.cdiv(M, rows))
    psum = torch.zeros((G, K), device=z.device, dtype=mean.dtype)
    psumz = torch.zeros_like(psum)
    if M:
        bk = 16 if interpreting() else 64
        _bn_bwd_reduce_kernel[(G, triton.cdiv(K, bk))](
            grad, out, z, mean, psum, psumz, M, K, ROWS=rows, RELU=relu, BLOCK_M=min(rows, 32), BLOCK_K=bk)
    # A fixed-order sum over the partials: deterministic.
    return psum.sum(0), psumz.sum(0)


@triton.jit
def _bn_bwd_apply_kernel(
    grad_ptr, out_ptr, z_ptr,  # [M*K] NHWC dense
    mean_ptr, invstd_ptr, a_ptr, b_ptr, c_ptr,  # [K]
    dz_ptr, gres_ptr,  # [M*K] outputs
    n_elements, K,
    RELU: tl.constexpr, STORE_GRES: tl.constexpr, USE_Z: tl.constexpr, BLOCK: tl.constexpr,
):
    # dz = a * gy + b * xhat + c,  xhat = (z - mean) * invstd.  Training BatchNorm:
    # a = gamma * invstd, b = -a * sum(gy * xhat) / M, c = -a * sum(gy) / M; eval: b = c = 0.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    k = offs % K
    a = tl.load(a_ptr + k, mask=mask, other=0.0)
    gy = tl.load(grad_ptr + offs, mask=mask, other=0.0)
    if RELU:
        o = tl.load(out_ptr + offs, mask=mask, other=0.0)
        gy = tl.where(o <= 0, 0.0, gy)  # as threshold_backward: NaN passes
    if STORE_GRES:
        tl.store(gres_ptr + offs, gy.to(gres_ptr.dtype.element_ty), mask=mask)
    dz = a * gy.to(a.dtype)
    if USE_Z:
        xhat = (tl.load(z_ptr + offs, mask=mask, other=0.0).to(a.dtype) - tl.load(mean_ptr + k, mask=mask, other=0.0)) \
            * tl.load(invstd_ptr + k, mask=mask, other=0.0)
        dz += tl.load(b_ptr + k, mask=mask, other=0.0) * xhat + tl.load(c_ptr + k, mask=mask, other=0.0)
    tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)


def bn_bwd_apply(grad, out, z, mean, invstd, a, b, c, relu, store_gres):
    dz = torch.empty_like(grad)
    gres = torch.empty_like(grad) if store_gres else None
    n = grad.numel()
    if n:
        use_z = b is not None
        _bn_bwd_apply_kernel[(triton.cdiv(n, _ELEM_BLOCK),)](
            grad, out, z if use_z else grad, mean, invstd, a, b if use_z else a, c if use_z else a,
            dz, gres if store_gres else dz, n, grad.shape[1],
            RELU=relu, STORE_GRES=store_gres, USE_Z=use_z, BLOCK=_ELEM_BLOCK)
    return dz, gres
