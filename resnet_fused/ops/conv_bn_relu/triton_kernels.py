"""Triton backend of conv + BatchNorm (+ residual) + ReLU.

Activations are NHWC (channels_last): a conv output of shape [N, K, P, Q] is stored as
an [M, K] row-major matrix, M = N*P*Q. The convolution is an implicit GEMM
  out[m, k] = sum_{r, s, c} x[n, p*SH - PH + r*DH, q*SW - PW + s*DW, g*Cg + c] * w[k, r, s, c]
with the input patch gathered on the fly (zero padding by masking), tensor cores through
`tl.dot` and an fp32 (fp64 for fp64 inputs) accumulator. Its epilogue either
  * eval:     applies the folded BatchNorm (scale, shift), the residual and ReLU, one store;
  * training: stores the raw conv output z and this tile's per-channel mean and M2 (sum of
              squared deviations from the tile mean), merged later with Chan's formula:
              exact, deterministic (no atomics) and free of the E[z^2]-E[z]^2 cancellation;
  * eval + max-pool (the ResNet stem's 3x3 stride-2 pad-1 pool): a tile is a 2-D block of
              conv outputs with a one-pixel halo, pooled in registers; only the pooled
              output is written (see _pool_epilogue).
fp16/bf16 accumulators are rounded to the activation dtype before the epilogue, as PyTorch's
conv output is before its BatchNorm (overflow gives inf as in eager).
"""
from __future__ import annotations

import os

import torch

from ... import _backends
from ..._triton import interpreting, tl, triton

PATH = "triton_conv"  # dispatch_trace() entry naming the kernel path a call took

# Tiles used under the interpreter (CPU, numpy), no autotuning: small tiles for small problems
# (so that tests cross tile boundaries in every dimension), large ones otherwise (the
# interpreter's cost is per program and per loop iteration, not per element).
_INTERP_SMALL = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_C=16)
_INTERP_LARGE = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_C=64)
_ELEM_BLOCK = 1024


def _cfg(bm, bn, bc, warps, stages):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_C=bc), num_warps=warps, num_stages=stages)


def _conv_configs():
    # Hopper tiles: reduction steps of 64 (128-byte rows: the widest shared-memory swizzle) where
    # the channels allow, 128x128 / 128x256 / 256x128 output tiles on two warpgroups; 32- and
    # 16-wide steps and narrow N tiles for few channels (grouped convs, the stem's packed
    # reduction). _prune_configs keeps the few that fit a problem.
    return [
        _cfg(128, 128, 64, 8, 4), _cfg(128, 256, 64, 8, 3), _cfg(256, 128, 64, 8, 3),
        _cfg(128, 64, 64, 4, 4), _cfg(64, 128, 64, 4, 4), _cfg(64, 64, 64, 4, 4),
        _cfg(128, 128, 32, 8, 4), _cfg(128, 64, 32, 4, 4), _cfg(64, 64, 32, 4, 4),
        # the pooled stem only (POOL): a 16 x 16 pixel tile keeps 7 x 7 pooled pixels (77% of its
        # rows), where 128 rows (8 x 16) keep 3 x 7 (66%)
        _cfg(256, 64, 32, 8, 4),
        _cfg(64, 32, 32, 4, 4), _cfg(64, 16, 32, 4, 4), _cfg(64, 16, 16, 4, 4),
    ]


def _pow2_floor(v):
    return 1 << (max(int(v), 1).bit_length() - 1)


def _step_width(red):
    """BLOCK_C for a reduction of ``red`` values per step: 64, 32 or 16, the widest whose padding
    stays under about a third of a step (28 -> 32, 48 -> 64)."""
    return 64 if red >= 48 else (32 if red >= 24 else 16)


def _prune_configs(configs, named_args, **kwargs):
    """The configs worth timing for one problem: one reduction step width (64, 32 or 16: the
    widest the per-step channels fill), output tiles no wider than the channels (and no narrower
    than 64 when there are 64 or more), no taller than the problem, and 256-wide tiles only where
    they still make a full wave over 132 SMs (and, in the implicit GEMM, not in training)."""
    args = {**named_args, **kwargs}
    if args.get("ROWRUN"):  # one filter row's (s, c) run per step
        red = int(args["Cg"]) * int(args["S"])
    else:
        red = int(args["Cg"]) * (int(args["R"]) * int(args["S"]) if args.get("PACKED") else 1)  # reduction per step
    bc = _step_width(red)
    Kg, M = int(args.get("Kg", args.get("K"))), int(args["M"])
    cap_n = max(16, triton.next_power_of_2(Kg))
    min_n = min(64, cap_n)
    cap_m = max(64, triton.next_power_of_2(M))
    groups = int(args.get("GROUPS", 1))
    split = int(args.get("SPLIT_K", 1))

    def tiles(c):
        return triton.cdiv(M, c.kwargs["BLOCK_M"]) * groups * triton.cdiv(Kg, c.kwargs["BLOCK_N"]) * split

    kept = [c for c in configs if c.kwargs["BLOCK_C"] == bc and min_n <= c.kwargs["BLOCK_N"] <= cap_n
            and c.kwargs["BLOCK_M"] <= cap_m
            and (max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) < 256 or tiles(c) >= 132)
            and (c.kwargs["BLOCK_M"] < 256 or c.kwargs["BLOCK_N"] > 64 or args.get("POOL"))
            # the implicit GEMM's statistics epilogue on a 256-wide tile spills (112 B, fp16,
            # Triton 3.8: scripts/kernel_report.py)
            and not (args.get("TRAINING") and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 128 * 128)]
    if not kept:
        kept = [min([c for c in configs if c.kwargs["BLOCK_C"] == bc] or configs,
                    key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    return kept


def _fixed_config(Cg, R, S, packed, Kg, M, groups=1, split=1, rowrun=False):
    """The one configuration used without autotuning (deterministic mode, RESNET_FUSED_AUTOTUNE=0,
    a spent tuning budget): the first the pruning keeps, from a fixed preference order."""
    args = dict(Cg=Cg, R=R, S=S, PACKED=packed, Kg=Kg, M=M, GROUPS=groups, SPLIT_K=split, ROWRUN=rowrun)
    order = [_cfg(128, 128, 64, 8, 4), _cfg(128, 64, 64, 4, 4), _cfg(64, 64, 64, 4, 4), _cfg(128, 128, 32, 8, 4),
             _cfg(128, 64, 32, 4, 4), _cfg(64, 64, 32, 4, 4), _cfg(64, 32, 32, 4, 4), _cfg(64, 16, 32, 4, 4),
             _cfg(64, 16, 16, 4, 4)]
    c = _prune_configs(order, args)[0]
    return dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)


def _quick_bench(fn, quantiles=None, **_):
    # Short timing per config (the default spends ~125 ms each): tuning a whole network stays
    # within seconds once the kernels are compiled. The first call compiles (not counted); the
    # timing is charged to the tuning budget shared with the backend selection.
    import time

    from ... import _select

    with _select.not_charged():
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


@triton.jit
def _tile_ids(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of a linear tile index in grouped order: GROUP_M row tiles sweep every
    column tile before the next group starts, so each A (activation) tile is read from DRAM
    about once and reused from L2 by the column tiles."""
    in_group = GROUP_M * num_pid_n
    first_m = (tile // in_group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % in_group) % size_m
    pid_n = (tile % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def _eval_affine(acc, offs_k, k_mask, scale_ptr, shift_ptr, HAS_SCALE: tl.constexpr):
    """The folded BatchNorm of an eval tile: acc * scale + shift, or acc + shift (scale folded)."""
    sh = tl.load(shift_ptr + offs_k, mask=k_mask, other=0.0)
    if HAS_SCALE:
        sc = tl.load(scale_ptr + offs_k, mask=k_mask, other=0.0)
        return acc * sc[None, :] + sh[None, :]
    return acc + sh[None, :]


@triton.jit
def _epilogue(acc, offs_m, offs_k, m_mask, k_mask, stat_row, M, K, act_ptr, out_ptr, z_ptr, scale_ptr, shift_ptr,
              res_ptr, pmean_ptr, pm2_ptr, TRAINING: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
              STORE_Z: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr):
    """The fused epilogue of one [BLOCK_M, BLOCK_N] output tile (rows offs_m of the [M, K]
    output): eval applies (scale,) shift, residual and ReLU; training stores z and the tile's
    per-channel (mean, M2) as statistics partial ``stat_row``."""
    F64: tl.constexpr = act_ptr.dtype.element_ty == tl.float64
    F32: tl.constexpr = act_ptr.dtype.element_ty == tl.float32
    if not F64 and not F32:
        # fp16 / bf16: round the conv output to the activation dtype first, as PyTorch's conv
        # does before the BatchNorm sees it; overflow to inf behaves as in eager, and the
        # batch statistics describe exactly the stored z.
        acc = acc.to(act_ptr.dtype.element_ty).to(tl.float32)
    mk = offs_m[:, None] * K + offs_k[None, :]
    mask = m_mask[:, None] & k_mask[None, :]
    if STORE_Z:
        tl.store(z_ptr + mk, acc.to(z_ptr.dtype.element_ty), mask=mask)
    if TRAINING:
        # This tile's statistics of the conv output: count, mean, M2.
        cnt = tl.minimum(M - stat_row.to(tl.int64) * BLOCK_M, BLOCK_M).to(acc.dtype)
        accm = tl.where(m_mask[:, None], acc, 0.0)
        mean = tl.sum(accm, axis=0) / cnt
        d = tl.where(m_mask[:, None], acc - mean[None, :], 0.0)
        m2 = tl.sum(d * d, axis=0)
        pidx = stat_row.to(tl.int64) * K + offs_k
        tl.store(pmean_ptr + pidx, mean, mask=k_mask)
        tl.store(pm2_ptr + pidx, m2, mask=k_mask)
    else:
        y = _eval_affine(acc, offs_k, k_mask, scale_ptr, shift_ptr, HAS_SCALE)
        if HAS_RES:
            y += tl.load(res_ptr + mk, mask=mask, other=0.0).to(y.dtype)
        if RELU:
            y = tl.where(y < 0, 0.0, y)  # NaN stays NaN, as in torch.relu
        tl.store(out_ptr + mk, y.to(out_ptr.dtype.element_ty), mask=mask)


# The pooled epilogue's maxima on the fp32 values (then one rounding of the pooled tile) or on the
# values rounded to the output dtype: the same results (rounding is monotonic). Static evidence,
# sm_90, bf16 stem (registers / SASS instructions per tile, 128x64 and 256x64 tiles): Triton 3.6
# upcasts 16-bit maxima anyway, and fp32 pooling gives 168 / 2,808 and 239 / 2,888 where 16-bit
# gives 235 / 3,832 and 248 / 4,064; Triton 3.8 packs bf16 maxima (HMNMX2): 16-bit gives
# 165 / 2,344 and 143 / 2,392, fp32 193 / 2,040 and 175 / 2,128. So fp32 before 3.7.
_POOL_IN_ACC = tl.constexpr(tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7))


@triton.jit
def _max3(a, b, c):
    # NaN-propagating, as max_pool2d
    return tl.maximum(tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL), c, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _maxpool_tile(y, TR: tl.constexpr, TC: tl.constexpr, BLOCK_N: tl.constexpr):
    """3x3 stride-2 max-pool of a [TR * TC, BLOCK_N] tile of conv outputs (row-major TR x TC
    pixels) whose pixel (0, 0) is a window's top-left corner: pooled (i, j) is the max over
    tile rows 2i..2i+2 and columns 2j..2j+2. Returns [(TR // 2) * (TC // 2), BLOCK_N]; the last
    pooled row and column (their windows leave the tile) are junk for the caller to mask.
    Rows (and then columns) 2i, 2i+1 come from a reshape, 2i+2 from a gather."""
    y3 = tl.reshape(y, (TR, TC, BLOCK_N))
    ev, od = tl.split(tl.permute(tl.reshape(y3, (TR // 2, 2, TC, BLOCK_N)), (0, 2, 3, 1)))
    ri = tl.minimum(2 * tl.arange(0, TR // 2) + 2, TR - 1)
    nx = tl.gather(y3, ri[:, None, None] + tl.zeros((TR // 2, TC, BLOCK_N), tl.int32), 0)
    rows = _max3(ev, od, nx)  # [TR // 2, TC, BLOCK_N]
    ev, od = tl.split(tl.permute(tl.reshape(rows, (TR // 2, TC // 2, 2, BLOCK_N)), (0, 1, 3, 2)))
    ci = tl.minimum(2 * tl.arange(0, TC // 2) + 2, TC - 1)
    nx = tl.gather(rows, ci[None, :, None] + tl.zeros((TR // 2, TC // 2, BLOCK_N), tl.int32), 1)
    return tl.reshape(_max3(ev, od, nx), ((TR // 2) * (TC // 2), BLOCK_N))


@triton.jit
def _pool_epilogue(acc, m_mask, offs_k, k_mask, img, tr, tc, PP, PQ, K, act_ptr, out_ptr, scale_ptr, shift_ptr,
                   RELU: tl.constexpr, HAS_SCALE: tl.constexpr, IDX64: tl.constexpr, TR: tl.constexpr,
                   TC: tl.constexpr, BLOCK_N: tl.constexpr):
    """Eval epilogue with the max-pool: the folded BatchNorm and ReLU as _epilogue's, pixels
    outside the conv output (the pool's padding) as -inf, then _maxpool_tile, before or after the
    rounding to the output dtype (_POOL_IN_ACC: rounding is monotonic, the pool of the rounded
    values is the rounded pool); stores the
    (TR // 2 - 1) x (TC // 2 - 1) pooled pixels of tile (tr, tc) of image img."""
    F64: tl.constexpr = act_ptr.dtype.element_ty == tl.float64
    F32: tl.constexpr = act_ptr.dtype.element_ty == tl.float32
    if not F64 and not F32:
        acc = acc.to(act_ptr.dtype.element_ty).to(tl.float32)
    y = _eval_affine(acc, offs_k, k_mask, scale_ptr, shift_ptr, HAS_SCALE)
    if RELU:
        y = tl.where(y < 0, 0.0, y)  # NaN stays NaN, as in torch.relu
    # (-inf selected in the accumulator dtype, then rounded: the same values, and a 16-bit
    # constant the interpreter cannot make is not needed)
    y = tl.where(m_mask[:, None], y, float("-inf"))
    if _POOL_IN_ACC:
        pooled = _maxpool_tile(y, TR, TC, BLOCK_N).to(out_ptr.dtype.element_ty)
    else:
        pooled = _maxpool_tile(y.to(out_ptr.dtype.element_ty), TR, TC, BLOCK_N)
    PR: tl.constexpr = TR // 2 - 1
    PC: tl.constexpr = TC // 2 - 1
    i = tl.arange(0, (TR // 2) * (TC // 2)) // (TC // 2)
    j = tl.arange(0, (TR // 2) * (TC // 2)) % (TC // 2)
    pr = tr * PR + i
    pc = tc * PC + j
    pmask = (i < PR) & (j < PC) & (pr < PP) & (pc < PQ)
    if IDX64:
        row = (img.to(tl.int64) * PP + pr) * PQ + pc
    else:
        row = (img * PP + pr) * PQ + pc
    tl.store(out_ptr + row[:, None] * K + offs_k[None, :], pooled, mask=pmask[:, None] & k_mask[None, :])


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
    ws_ptr,  # [SPLIT_K, M, K] float32 partial sums (SPLIT_K > 1: the reduce kernel runs the epilogue)
    C, H, W, K, P, Q, M, Kg,
    PP, PQ,  # the pooled output's size (POOL)
    sxn, sxc, sxh, sxw,
    SH, SW, PH, PW, DH, DW,
    R: tl.constexpr, S: tl.constexpr,
    Cg: tl.constexpr,  # input channels per group: a compile-time loop bound (a handful of values per network)
    GROUPS: tl.constexpr,
    PACKED: tl.constexpr,  # reduce over flattened (r, s, c) (few channels per group) instead of per (r, s)
    ROWRUN: tl.constexpr,  # PACKED, groups 1, NHWC-dense x with C == Cg: (s, c) of one filter row is one run
    PAD: tl.constexpr,  # padding > 0: taps can fall outside the input (masks); else only the row mask
    SPLIT_K: tl.constexpr,  # > 1: this program sums 1/SPLIT_K of the reduction into ws_ptr
    IDX64: tl.constexpr,  # 64-bit row and address arithmetic (more than 2^31 elements somewhere)
    TRAINING: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, STORE_Z: tl.constexpr,
    HAS_SCALE: tl.constexpr,  # eval: False when the scale is folded into the weight (shift = bias)
    IEEE: tl.constexpr,  # fp32 inputs: IEEE fp32 products instead of TF32
    POOL: tl.constexpr,  # eval: 3x3 stride-2 pad-1 max-pool of the output in the epilogue (the stem's)
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Implicit-GEMM convolution: one flattened, software-pipelined loop over (r, s, channel
    block), so that the loads of the next tap are in flight while this one multiplies (one
    pipeline drain per output tile, at its end)."""
    tiles_per_group = tl.cdiv(Kg, BLOCK_N)
    if POOL:
        # A tile is TR x TC conv output pixels starting one pixel above and left of its first
        # pooled pixel's window centre: (TR // 2 - 1) x (TC // 2 - 1) pooled pixels whose windows
        # lie inside it (pool_tile() on the host: the same shape).
        TC: tl.constexpr = 16 if BLOCK_M >= 128 else (8 if BLOCK_M >= 64 else 4)
        TR: tl.constexpr = BLOCK_M // TC
        tcols = tl.cdiv(PQ, TC // 2 - 1)
        per_img = tl.cdiv(PP, TR // 2 - 1) * tcols
        num_pid_m = (M // (P * Q)) * per_img
    else:
        num_pid_m = tl.cdiv(M, BLOCK_M)
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_pid_m, GROUPS * tiles_per_group, GROUP_M)
    g = pid_n // tiles_per_group
    offs_kg = (pid_n % tiles_per_group) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = offs_kg < Kg
    offs_k = g * Kg + offs_kg  # global output channel
    if POOL:
        img = pid_m // per_img
        tr = (pid_m - img * per_img) // tcols
        tc = (pid_m - img * per_img) - tr * tcols
        lm = tl.arange(0, BLOCK_M)
        if IDX64:  # (the pixel rows and columns below feed the input's addresses)
            lm = lm.to(tl.int64)
        lr = lm // TC
        lc = lm % TC
        p = tr * (2 * (TR // 2 - 1)) - 1 + lr
        q = tc * (2 * (TC // 2 - 1)) - 1 + lc
        # (the last row and column of the tile feed no kept pooled pixel: not loaded)
        m_mask = (p >= 0) & (p < P) & (q >= 0) & (q < Q) & (lr < TR - 1) & (lc < TC - 1)
        if IDX64:
            n = img.to(tl.int64) + lm * 0
        else:
            n = img + lm * 0
        offs_m = lm  # (unused by the pooled epilogue)
    else:
        if IDX64:
            offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        else:
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        q = offs_m % Q
        t = offs_m // Q
        p = t % P
        n = t // P
    h0 = p * SH - PH
    w0 = q * SW - PW
    x_row = x_ptr + n * sxn + g * Cg * sxc  # [BLOCK_M] pointers at (n, group's first channel)
    w_col = w_ptr + offs_k * (R * S * Cg)  # [BLOCK_N]
    offs_c = tl.arange(0, BLOCK_C)

    F64: tl.constexpr = x_ptr.dtype.element_ty == tl.float64
    F32: tl.constexpr = x_ptr.dtype.element_ty == tl.float32
    if F64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if ROWRUN:
        # The stem: in NHWC-dense memory with C == Cg channels, the S*Cg values (s, c) of one
        # filter row r at one output pixel are contiguous: each step loads a run of BLOCK_C of
        # them (vector loads, asynchronous copies), R x cdiv(S*Cg, BLOCK_C) steps.
        SC: tl.constexpr = S * Cg
        NJB: tl.constexpr = (SC + BLOCK_C - 1) // BLOCK_C
        NSTEP: tl.constexpr = R * NJB
    elif PACKED:
        # Few channels per group (ResNeXt's 4): the reduction runs over the flattened (r, s, c)
        # index, so that each BLOCK_C-wide step is full of real products instead of mostly
        # channel padding.
        RSC: tl.constexpr = R * S * Cg
        NSTEP: tl.constexpr = (RSC + BLOCK_C - 1) // BLOCK_C
    else:
        NCB: tl.constexpr = (Cg + BLOCK_C - 1) // BLOCK_C
        NSTEP: tl.constexpr = R * S * NCB
    ITERS: tl.constexpr = (NSTEP + SPLIT_K - 1) // SPLIT_K
    step0 = tl.program_id(1) * ITERS
    for i in range(ITERS):
        kk = step0 + i
        if ROWRUN:
            r = kk // NJB
            j = (kk - r * NJB) * BLOCK_C + offs_c  # (s, c) flattened: s = j // Cg
            h = h0 + r * DH
            j_mask = j < SC
            amask = m_mask[:, None] & j_mask[None, :]
            if NSTEP % SPLIT_K != 0:
                amask &= kk < NSTEP
            if PAD:
                wj = w0[:, None] + (j // Cg)[None, :] * DW
                amask &= ((h >= 0) & (h < H))[:, None] & (wj >= 0) & (wj < W)
            # w0 * Cg + j == (w0 + s) * Cg + c: the run starts at a multiple of Cg elements
            a = tl.load((x_row + h * sxh)[:, None] + (w0 * Cg)[:, None] + j[None, :], mask=amask, other=0.0)
            bmask = j_mask[:, None] & k_mask[None, :]
            if NSTEP % SPLIT_K != 0:
                bmask &= kk < NSTEP
            b = tl.load(w_col[None, :] + (r * SC + j)[:, None], mask=bmask, other=0.0)
        elif PACKED:
            rsc = kk * BLOCK_C + offs_c
            rsc_mask = rsc < RSC
            r = rsc // (S * Cg)
            s = (rsc // Cg) % S
            c = rsc % Cg
            h = h0[:, None] + r[None, :] * DH
            w = w0[:, None] + s[None, :] * DW
            amask = m_mask[:, None] & rsc_mask[None, :]
            if PAD:
                amask &= (h >= 0) & (h < H) & (w >= 0) & (w < W)
            a = tl.load(x_row[:, None] + h * sxh + w * sxw + c[None, :] * sxc, mask=amask, other=0.0)
            b = tl.load(w_col[None, :] + rsc[:, None], mask=rsc_mask[:, None] & k_mask[None, :], other=0.0)
        else:
            rs = kk // NCB
            cc = (kk - rs * NCB) * BLOCK_C + offs_c
            r = rs // S
            s = rs - r * S
            h = h0 + r * DH
            w = w0 + s * DW
            rowm = m_mask
            if PAD:
                rowm &= (h >= 0) & (h < H) & (w >= 0) & (w < W)
            amask = rowm[:, None]
            bmask = k_mask[None, :]
            if Cg % BLOCK_C != 0:
                amask &= cc[None, :] < Cg
                bmask &= cc[:, None] < Cg
            if NSTEP % SPLIT_K != 0:
                inr = kk < NSTEP  # the last split's tail
                amask &= inr
                bmask &= inr
            a = tl.load(x_row[:, None] + (h * sxh + w * sxw)[:, None] + cc[None, :] * sxc, mask=amask, other=0.0)
            b = tl.load(w_col[None, :] + (rs * Cg + cc)[:, None], mask=bmask, other=0.0)
        acc = _mma(a, b, acc, F64, F32, IEEE)

    if SPLIT_K > 1:
        # partial sums, fixed slot per split: the reduce kernel adds them in split order
        mk = offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
        tl.store(ws_ptr + tl.program_id(1).to(tl.int64) * M * K + mk, acc, mask=m_mask[:, None] & k_mask[None, :])
    elif POOL:
        _pool_epilogue(acc, m_mask, offs_k, k_mask, img, tr, tc, PP, PQ, K, x_ptr, out_ptr, scale_ptr, shift_ptr, RELU,
                       HAS_SCALE, IDX64, TR, TC, BLOCK_N)
    else:
        _epilogue(acc, offs_m, offs_k, m_mask, k_mask, pid_m, M, K, x_ptr, out_ptr, z_ptr, scale_ptr, shift_ptr,
                  res_ptr, pmean_ptr, pm2_ptr, TRAINING, HAS_RES, RELU, STORE_Z, HAS_SCALE, BLOCK_M)


@triton.jit
def _splitk_reduce_kernel(
    ws_ptr, act_ptr, out_ptr, z_ptr, scale_ptr, shift_ptr, res_ptr, pmean_ptr, pm2_ptr, M, K,
    SPLIT_K: tl.constexpr, TRAINING: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
    STORE_Z: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Split-K: the SPLIT_K partial sums of one output tile added in a fixed order (no atomics:
    deterministic), then the same epilogue as the unsplit kernel."""
    pid_m = tl.program_id(0)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    k_mask = offs_k < K
    mask = m_mask[:, None] & k_mask[None, :]
    mk = offs_m[:, None] * K + offs_k[None, :]
    acc = tl.load(ws_ptr + mk, mask=mask, other=0.0)
    for sp in range(1, SPLIT_K):
        acc += tl.load(ws_ptr + sp * M * K + mk, mask=mask, other=0.0)
    _epilogue(acc, offs_m, offs_k, m_mask, k_mask, pid_m, M, K, act_ptr, out_ptr, z_ptr, scale_ptr, shift_ptr,
              res_ptr, pmean_ptr, pm2_ptr, TRAINING, HAS_RES, RELU, STORE_Z, HAS_SCALE, BLOCK_M)


@triton.jit
def _conv1x1_kernel(
    a_desc,  # TMA descriptor of the input as a dense [M, C] matrix (1x1, stride 1, NHWC)
    b_desc,  # TMA descriptor of the weight as [K, C]
    act_ptr, out_ptr, z_ptr, scale_ptr, shift_ptr, res_ptr, pmean_ptr, pm2_ptr,
    M, K, C, NUM_PROGS,  # (C: the autotuner's key and pruning)
    NCB: tl.constexpr,  # reduction steps: cdiv(C, BLOCK_C)
    PERSISTENT: tl.constexpr,  # one program per SM looping over tiles (else one tile per program)
    IDX64: tl.constexpr,
    TRAINING: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, STORE_Z: tl.constexpr,
    HAS_SCALE: tl.constexpr, IEEE: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """A 1x1 stride-1 convolution is a dense GEMM of the NHWC input [M, C] with the weight
    [K, C]^T: tiles come in through TMA (out-of-range rows and channels read as zeros), and in
    the persistent form the tile loop and the reduction loop are flattened into one pipelined
    loop, so that the next tile's loads are issued while this tile's epilogue runs."""
    F32: tl.constexpr = act_ptr.dtype.element_ty == tl.float32
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(K, BLOCK_N)
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGS, flatten=True):
            _conv1x1_tile(tile, a_desc, b_desc, act_ptr, out_ptr, z_ptr, scale_ptr, shift_ptr, res_ptr, pmean_ptr,
                          pm2_ptr, M, K, num_pid_m, num_pid_n, NCB, IDX64, F32, TRAINING, HAS_RES, RELU, STORE_Z,
                          HAS_SCALE, IEEE, GROUP_M, BLOCK_M, BLOCK_N, BLOCK_C)
    else:
        _conv1x1_tile(tl.program_id(0), a_desc, b_desc, act_ptr, out_ptr, z_ptr, scale_ptr, shift_ptr, res_ptr,
                      pmean_ptr, pm2_ptr, M, K, num_pid_m, num_pid_n, NCB, IDX64, F32, TRAINING, HAS_RES, RELU,
                      STORE_Z, HAS_SCALE, IEEE, GROUP_M, BLOCK_M, BLOCK_N, BLOCK_C)


@triton.jit
def _conv1x1_tile(tile, a_desc, b_desc, act_ptr, out_ptr, z_ptr, scale_ptr, shift_ptr, res_ptr, pmean_ptr, pm2_ptr,
                  M, K, num_pid_m, num_pid_n, NCB: tl.constexpr, IDX64: tl.constexpr, F32: tl.constexpr,
                  TRAINING: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, STORE_Z: tl.constexpr,
                  HAS_SCALE: tl.constexpr, IEEE: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_m, pid_n = _tile_ids(tile, num_pid_m, num_pid_n, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(NCB):
        a = a_desc.load([pid_m * BLOCK_M, kb * BLOCK_C])
        b = b_desc.load([pid_n * BLOCK_N, kb * BLOCK_C])
        acc = _mma(a, b.T, acc, False, F32, IEEE)
    if IDX64:
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    _epilogue(acc, offs_m, offs_k, offs_m < M, offs_k < K, pid_m, M, K, act_ptr, out_ptr, z_ptr, scale_ptr,
              shift_ptr, res_ptr, pmean_ptr, pm2_ptr, TRAINING, HAS_RES, RELU, STORE_Z, HAS_SCALE, BLOCK_M)


def _conv1x1_configs():
    # every step width _step_width can ask for (64, 32, 16) has configs
    return [_cfg(128, 128, 64, 8, 4), _cfg(128, 256, 64, 8, 3), _cfg(256, 128, 64, 8, 3), _cfg(128, 64, 64, 4, 4),
            _cfg(64, 128, 64, 4, 4), _cfg(128, 128, 32, 8, 4), _cfg(128, 64, 32, 4, 4), _cfg(64, 64, 32, 4, 4),
            _cfg(128, 64, 16, 4, 4), _cfg(64, 64, 16, 4, 4)]


def _set_block_shapes(nargs):
    # the descriptors' boxes follow the config being run (autotuner pre-hook)
    nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_C"]]
    nargs["b_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_C"]]


_GROUP_M = 8
_MIN_BLOCK_M = 16  # smallest BLOCK_M among the configs above and the interpreter's
_MIN_TUNED_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in _conv_configs() + _conv1x1_configs())  # 64
_SPLIT_BLOCK = 64  # the split-K reduce kernel's tile (its statistics partials cover 64 rows)


def _with_hook(cfgs, hook):
    for c in cfgs:
        c.pre_hook = hook
    return cfgs


_conv_fwd_tuned = triton.autotune(
    configs=_conv_configs(),
    prune_configs_by={"early_config_prune": _prune_configs},
    do_bench=_quick_bench,
    # Each config rewrites every output it owns (the statistics buffers are sized for the
    # smallest BLOCK_M, the split-K workspace is written whole by every split), so benchmarking
    # configs on the live buffers is harmless.
    key=["M", "K", "C", "Cg", "H", "W", "P", "Q", "SH", "SW", "PH", "PW", "DH", "DW", "R", "S", "sxc", "GROUPS",
         "SPLIT_K", "ROWRUN", "TRAINING", "HAS_RES", "RELU", "STORE_Z", "HAS_SCALE", "IEEE", "POOL"],
)(_conv_fwd_kernel)


def _prune_1x1_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    return _prune_configs(configs, dict(Cg=args["C"], R=1, S=1, PACKED=False, Kg=args["K"], M=args["M"]))


_conv1x1_tuned = triton.autotune(
    configs=_with_hook(_conv1x1_configs(), _set_block_shapes),
    prune_configs_by={"early_config_prune": _prune_1x1_configs},
    do_bench=_quick_bench,
    key=["M", "K", "C", "NCB", "TRAINING", "HAS_RES", "RELU", "STORE_Z", "HAS_SCALE", "IEEE", "PERSISTENT"],
)(_conv1x1_kernel)

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

_SMS: dict = {}


def _num_sms(device):
    if device.type != "cuda":  # the interpreter's pretend GPU; meta tensors (the static report): an H100
        return 132 if device.type == "meta" else 4
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


def _persistent_ok():
    # Triton 3.6's interpreter cannot run a loop with runtime bounds (NumPy >= 2.4); 3.8's can.
    if not interpreting():
        return True
    major, minor = (int(v) for v in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 7)


def _split_k(M, Kg, groups, nstep, sms):
    """Split the reduction when the output has too few tiles to fill the GPU (small batches,
    layer 4): 2-8 splits, each at least 4 reduction steps; 1 otherwise."""
    tiles = triton.cdiv(M, 64) * groups * triton.cdiv(Kg, 64)
    if tiles >= sms or nstep < 8:
        return 1
    return max(1, min(8, _pow2_floor(2 * sms // max(tiles, 1)), _pow2_floor(nstep // 4)))


_tuned: set = set()  # the autotuner's keys (and dtypes) already tuned in this process


def _use_fixed_config(key) -> bool:
    """The fixed tile configuration instead of autotuning: deterministic mode, with
    RESNET_FUSED_AUTOTUNE=0, and for problems not yet tuned once the tuning budget shared with
    the backend selection is spent (or while a CUDA graph is captured). ``key``: the kernel and
    the values of its autotuner key (and the dtype), so that "tuned" means what the autotuner's
    own cache means."""
    if torch.are_deterministic_algorithms_enabled() or os.environ.get("RESNET_FUSED_AUTOTUNE", "1") == "0":
        return True
    from ... import _select

    if key in _tuned:
        return False
    if _select.budget_left() <= 0 or _select.capturing():
        return True
    _tuned.add(key)
    return False


def _max_offset(t):
    return sum((d - 1) * st for d, st in zip(t.shape, t.stride()) if d > 0) + 1


def pool_tile(block_m):
    """(TR, TC): the conv-output pixels a pooled tile of BLOCK_M rows covers (the kernel's rule)."""
    tc = 16 if block_m >= 128 else (8 if block_m >= 64 else 4)
    return block_m // tc, tc


def pooled_size(P):
    """The output size of a 3x3 stride-2 pad-1 max-pool over P pixels (floor mode)."""
    return (P - 1) // 2 + 1


def conv_fwd(x, w_krsc, K, P, Q, stride, padding, dilation, groups, *, training, scale=None, shift=None,
             residual=None, relu=True, store_z=False, ieee=True, pool=False):
    """Launch the convolution with its fused epilogue: the TMA GEMM for dense 1x1 stride-1
    convs, else the implicit GEMM (with split-K when the output is too small to fill the GPU).

    Args:
        x: [N, C, H, W] input (any strides).
        w_krsc: [K, R, S, C // groups] contiguous weight.
        scale, shift: [K] folded BatchNorm in the accumulator dtype (eval).
        residual: [N, K, P, Q] channels_last-dense residual or None (eval).
        pool: eval without a residual: ``out`` is max_pool2d(., 3, 2, 1) of the conv's output,
            pooled in the epilogue (the conv's own output is never written).
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
    if pool and (training or residual is not None or store_z):
        raise ValueError("conv_fwd: pool is for eval without a residual or z")
    PP, PQ = (pooled_size(P), pooled_size(Q)) if pool else (P, Q)
    out = torch.empty((N, K, PP, PQ), device=dev, dtype=dt, memory_format=cl) if not training else None
    z = torch.empty((N, K, P, Q), device=dev, dtype=dt, memory_format=cl) if (training or store_z) else None
    interp = interpreting()
    if M == 0:
        pm = torch.empty((0, K), device=dev, dtype=acc_dt) if training else None
        return out, z, pm, (pm.clone() if training else None), _MIN_BLOCK_M
    padded = False
    if groups == 1 and Cg < 16 and Cg % 4:
        # The stem (3 channels): pad the input and weight channels to a multiple of 4 in one
        # cheap pass, so that the packed (r, s, c) gather loads 4 channels at a time.
        Cp = -(-Cg // 4) * 4
        xp = torch.empty((N, Cp, H, W), device=dev, dtype=dt, memory_format=cl)  # one write per value
        xp[:, C:].zero_()
        xp[:, :C] = x
        wp = torch.zeros((K, R, S, Cp), device=dev, dtype=dt)
        wp[..., :Cg] = w_krsc
        x, w_krsc, C, Cg = xp, wp, Cp, Cp
        padded = True
    flags = dict(TRAINING=training, HAS_RES=residual is not None, RELU=relu, STORE_Z=z is not None,
                 HAS_SCALE=scale is not None, IEEE=ieee)
    dummy = x  # never dereferenced when its flag is off
    idx64 = max(_max_offset(x), M * K) >= 2 ** 31
    packed = Cg < 16
    tensors = dict(out=out if out is not None else dummy, z=z if z is not None else dummy,
                   scale=scale if scale is not None else dummy, shift=shift if shift is not None else dummy,
                   res=residual if residual is not None else dummy)
    flag_key = tuple(flags.values())

    # --- dense 1x1 stride-1: the TMA GEMM ---------------------------------------------------
    elem = x.element_size()
    if (not pool and TensorDescriptor is not None and R == 1 and S == 1 and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)
            and groups == 1 and dt != torch.float64 and x.is_contiguous(memory_format=cl)
            and (C * elem) % 16 == 0 and x.data_ptr() % 16 == 0 and w_krsc.data_ptr() % 16 == 0
            and _split_k(M, Kg, 1, triton.cdiv(C, 64), _num_sms(dev)) == 1):
        a2 = x.permute(0, 2, 3, 1).reshape(M, C)  # a view: NHWC-dense
        b2 = w_krsc.reshape(K, C)
        bc = _step_width(C)  # the step width _prune_configs keeps
        if interp:
            cfg = dict(_INTERP_SMALL if M * K <= 64 * 64 * 4 and C <= 64 else _INTERP_LARGE)
            bc = cfg["BLOCK_C"]
        elif _use_fixed_config(("1x1", M, K, C, bc, _persistent_ok(), flag_key, dt)):
            cfg = _fixed_config(C, 1, 1, False, K, M)
        else:
            cfg = None
        a_desc = TensorDescriptor(a2, [M, C], [C, 1], [cfg["BLOCK_M"] if cfg else 64, bc])
        b_desc = TensorDescriptor(b2, [K, C], [C, 1], [cfg["BLOCK_N"] if cfg else 64, bc])
        persistent = _persistent_ok()
        nprog = _num_sms(dev)  # one program per SM (a 128x128 tile's pipeline fills most of one)
        pm = pm2 = None
        if training:
            pm = torch.empty((triton.cdiv(M, cfg["BLOCK_M"] if cfg else 64), K), device=dev, dtype=acc_dt)
            pm2 = torch.empty_like(pm)

        def grid(meta):
            tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"])
            return (min(tiles, nprog) if persistent else tiles,)

        kernel = _conv1x1_kernel if cfg else _conv1x1_tuned
        _backends.note(PATH, "tma-1x1" + ("-persistent" if persistent else ""))
        kernel[grid](
            a_desc, b_desc, x, tensors["out"], tensors["z"], tensors["scale"], tensors["shift"], tensors["res"],
            pm if pm is not None else dummy, pm2 if pm2 is not None else dummy, M, K, C, nprog,
            NCB=triton.cdiv(C, bc), PERSISTENT=persistent, IDX64=idx64, GROUP_M=_GROUP_M, **flags, **(cfg or {}))
        block_m = cfg["BLOCK_M"] if cfg else _conv1x1_tuned.best_config.kwargs["BLOCK_M"]
        if training:
            g = triton.cdiv(M, block_m)
            pm, pm2 = pm[:g], pm2[:g]
        return out, z, pm, pm2, block_m

    # --- the implicit GEMM ------------------------------------------------------------------
    rowrun = packed and groups == 1 and C == Cg and dilation[1] == 1 and x.is_contiguous(memory_format=cl)
    nstep_nominal = R * S * triton.cdiv(Cg, 64) if not packed else triton.cdiv(R * S * Cg, 16)
    # (under the interpreter too: its "GPU" has 4 SMs, so the small test problems split)
    # (a pooled tile needs its whole reduction: no split)
    split = 1 if dt == torch.float64 or pool else _split_k(M, Kg, groups, nstep_nominal, _num_sms(dev))
    if interp or dt == torch.float64:
        small = M * K <= 64 * 64 * 4 and Cg <= 64
        cfg = dict(_INTERP_SMALL if small else _INTERP_LARGE)
        if dt == torch.float64 and not interp:
            cfg.update(BLOCK_M=32, BLOCK_N=32, BLOCK_C=8)
        kernel = _conv_fwd_kernel
    elif _use_fixed_config(("implicit", M, K, C, Cg, H, W, P, Q, *stride, *padding, *dilation, R, S, x.stride(1),
                            groups, split, rowrun, flag_key, pool, dt)):
        kernel, cfg = _conv_fwd_kernel, _fixed_config(Cg, R, S, packed, Kg, M, groups, split, rowrun)
    else:
        kernel, cfg = _conv_fwd_tuned, {}
    ws = torch.empty((split, M, K), device=dev, dtype=torch.float32) if split > 1 else dummy
    pm = pm2 = None
    if training:
        # Sized for the smallest BLOCK_M (split-K: the reduce kernel's tile); the launch below
        # reports the BLOCK_M it used.
        rows0 = _SPLIT_BLOCK if split > 1 else cfg["BLOCK_M"] if cfg else _MIN_TUNED_BLOCK_M
        pm = torch.empty((triton.cdiv(M, rows0), K), device=dev, dtype=acc_dt)
        pm2 = torch.empty_like(pm)
    def grid(meta):
        if pool:
            tr, tc = pool_tile(meta["BLOCK_M"])
            m_tiles = N * triton.cdiv(PP, tr // 2 - 1) * triton.cdiv(PQ, tc // 2 - 1)
        else:
            m_tiles = triton.cdiv(M, meta["BLOCK_M"])
        return (m_tiles * groups * triton.cdiv(Kg, meta["BLOCK_N"]), split)

    _backends.note(PATH, ("implicit-rowrun" if rowrun else "implicit-packed" if packed else "implicit") + (f"-split{split}" if split > 1 else "")
                   + ("-padded-channels" if padded else "") + ("-maxpool" if pool else ""))
    kernel[grid](
        x, w_krsc, tensors["out"], tensors["z"], tensors["scale"], tensors["shift"], tensors["res"],
        pm if pm is not None and split == 1 else dummy, pm2 if pm2 is not None and split == 1 else dummy, ws,
        C, H, W, K, P, Q, M, Kg, PP, PQ,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        R=R, S=S, Cg=Cg, GROUPS=groups, PACKED=packed, ROWRUN=rowrun, PAD=tuple(padding) != (0, 0), SPLIT_K=split, IDX64=idx64,
        POOL=pool, GROUP_M=_GROUP_M, **flags, **cfg,
    )
    if split > 1:
        _splitk_reduce_kernel[(triton.cdiv(M, _SPLIT_BLOCK), triton.cdiv(K, _SPLIT_BLOCK))](
            ws, x, tensors["out"], tensors["z"], tensors["scale"], tensors["shift"], tensors["res"],
            pm if pm is not None else dummy, pm2 if pm2 is not None else dummy, M, K, SPLIT_K=split,
            **{k: v for k, v in flags.items() if k != "IEEE"}, BLOCK_M=_SPLIT_BLOCK, BLOCK_N=_SPLIT_BLOCK,
            num_warps=4)
        block_m = _SPLIT_BLOCK
    elif cfg:
        block_m = cfg["BLOCK_M"]
    else:
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


def _dense(t):
    """A [K] vector the kernels index as ptr + k: t itself when contiguous, else a contiguous copy (a
    caller's parameter or running statistic may be a strided or expanded view)."""
    return t if t is None or t.is_contiguous() else t.contiguous()


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
    running_mean, running_var = _dense(running_mean), _dense(running_var)
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


def _elem_blocks(K):
    """(BLOCK_M, BLOCK_K) of the elementwise BatchNorm kernels: a program takes BLOCK_M rows by
    BLOCK_K channels of the [M, K] NHWC matrix, so that it loads its per-channel coefficients
    once (no per-element ``offs % K``: a 64-bit division, and 2-4 more loads per element)."""
    bk = min(triton.next_power_of_2(max(K, 1)), 128)
    return max(1, _ELEM_BLOCK * (1 if interpreting() else 4) // bk), bk


@triton.jit
def _bn_affine(gamma_ptr, beta_ptr, mean, invstd, offs_k, k_mask, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr):
    """The training apply's per-channel scale = gamma * invstd and shift = beta - mean * scale
    (an explicit fma): one definition for the forward's apply and the backward's ReLU mask, so
    that both compute the same bits."""
    if HAS_GAMMA:
        sc = tl.load(gamma_ptr + offs_k, mask=k_mask, other=0.0).to(invstd.dtype) * invstd
    else:
        sc = invstd
    if HAS_BETA:
        bt = tl.load(beta_ptr + offs_k, mask=k_mask, other=0.0).to(invstd.dtype)
    else:
        bt = tl.zeros_like(invstd)
    return sc, tl.fma(-mean, sc, bt)


@triton.jit
def _relu_blocked(z, sc, sh, out_dtype: tl.constexpr):
    """Where the forward's ReLU output out = cast(relu(fma(z, scale, shift))) is <= 0 (the mask of
    threshold_backward: a NaN passes), from z and the apply's scale / shift alone."""
    return tl.fma(z.to(sc.dtype), sc[None, :], sh[None, :]).to(out_dtype) <= 0


@triton.jit
def _bn_apply_kernel(
    z_ptr,  # [M, K] conv output, NHWC dense
    scale_ptr, shift_ptr,  # [K] scale / shift (accumulator dtype); STATS: gamma / beta (any float dtype)
    mean_ptr, invstd_ptr,  # [K] batch statistics (STATS)
    res_ptr,  # [M, K] residual (HAS_RES)
    out_ptr,  # [M, K]
    M, K,
    STATS: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
    HAS_RES: tl.constexpr, RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    if STATS:  # scale and shift from the statistics, as the backward's mask recomputes them
        mean = tl.load(mean_ptr + offs_k, mask=k_mask, other=0.0)
        invstd = tl.load(invstd_ptr + offs_k, mask=k_mask, other=0.0)
        sc, sh = _bn_affine(scale_ptr, shift_ptr, mean, invstd, offs_k, k_mask, HAS_GAMMA, HAS_BETA)
    else:
        sc = tl.load(scale_ptr + offs_k, mask=k_mask, other=0.0)
        sh = tl.load(shift_ptr + offs_k, mask=k_mask, other=0.0)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    msk = (rows < M)[:, None] & k_mask[None, :]
    idx = rows[:, None] * K + offs_k[None, :]
    y = tl.fma(tl.load(z_ptr + idx, mask=msk, other=0.0).to(sc.dtype), sc[None, :], sh[None, :])
    if HAS_RES:
        y += tl.load(res_ptr + idx, mask=msk, other=0.0).to(y.dtype)
    if RELU:
        y = tl.where(y < 0, 0.0, y)
    tl.store(out_ptr + idx, y.to(out_ptr.dtype.element_ty), mask=msk)


def _apply(z, scale, shift, mean, invstd, residual, relu, stats):
    out = torch.empty_like(z)
    scale, shift = _dense(scale), _dense(shift)
    K = z.shape[1]
    M = z.numel() // K if K else 0
    if M:
        bm, bk = _elem_blocks(K)
        _bn_apply_kernel[(triton.cdiv(M, bm), triton.cdiv(K, bk))](
            z, scale if scale is not None else z, shift if shift is not None else z,
            mean if stats else z, invstd if stats else z, residual if residual is not None else z, out, M, K,
            STATS=stats, HAS_GAMMA=scale is not None, HAS_BETA=shift is not None, HAS_RES=residual is not None,
            RELU=relu, BLOCK_M=bm, BLOCK_K=bk)
    return out


def bn_apply(z, scale, shift, residual, relu):
    """out = relu?(z * scale + shift + residual?) over NHWC-dense z (and residual)."""
    return _apply(z, scale, shift, None, None, residual, relu, False)


def bn_apply_stats(z, gamma, beta, mean, invstd, residual, relu):
    """The training apply: out = relu?(z * scale + shift + residual?) with scale = gamma * invstd and
    shift = beta - mean * scale computed in the kernel (gamma / beta may be None: 1 / 0), as the
    backward kernels recompute them for the ReLU mask (``_bn_affine``)."""
    return _apply(z, gamma, beta, mean, invstd, residual, relu, True)


@triton.jit
def _bn_bwd_reduce_kernel(
    grad_ptr,  # [M, K] upstream gradient, NHWC dense
    out_ptr,  # [M, K] forward output (for the ReLU mask; not read with MASK_Z)
    z_ptr,  # [M, K] conv output
    mean_ptr,  # [K]
    gamma_ptr, beta_ptr, invstd_ptr,  # [K] (MASK_Z: the forward apply's scale / shift, recomputed)
    psum_ptr, psumz_ptr,  # [G, K] partial sums of gy and gy * (z - mean)
    M, K,
    RELU: tl.constexpr, MASK_Z: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
    STEPS: tl.constexpr,  # rows per partial: STEPS * BLOCK_M (a loop bound: a constexpr for the interpreter)
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_g = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    mean = tl.load(mean_ptr + offs_k, mask=k_mask, other=0.0)
    if MASK_Z:
        invstd = tl.load(invstd_ptr + offs_k, mask=k_mask, other=0.0)
        sc, sh = _bn_affine(gamma_ptr, beta_ptr, mean, invstd, offs_k, k_mask, HAS_GAMMA, HAS_BETA)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=mean.dtype)
    accz = tl.zeros((BLOCK_M, BLOCK_K), dtype=mean.dtype)
    row0 = pid_g.to(tl.int64) * (STEPS * BLOCK_M)
    for step in range(0, STEPS):
        rows = row0 + step * BLOCK_M + tl.arange(0, BLOCK_M)
        msk = (rows < M)[:, None] & k_mask[None, :]
        idx = rows[:, None] * K + offs_k[None, :]
        gy = tl.load(grad_ptr + idx, mask=msk, other=0.0).to(mean.dtype)
        zr = tl.load(z_ptr + idx, mask=msk, other=0.0)
        if RELU:
            if MASK_Z:
                gy = tl.where(_relu_blocked(zr, sc, sh, z_ptr.dtype.element_ty), 0.0, gy)
            else:
                o = tl.load(out_ptr + idx, mask=msk, other=0.0)
                gy = tl.where(o <= 0, 0.0, gy)  # as threshold_backward: NaN passes
        acc += gy
        accz += tl.where(msk, gy * (zr.to(mean.dtype) - mean[None, :]), 0.0)
    pidx = pid_g.to(tl.int64) * K + offs_k
    tl.store(psum_ptr + pidx, tl.sum(acc, axis=0), mask=k_mask)
    tl.store(psumz_ptr + pidx, tl.sum(accz, axis=0), mask=k_mask)


_MAX_PARTIALS = 1024  # of the backward's sums: at least 256 rows each, at most this many partials


def _bwd_partials(grad, out, z, mean, relu, mask):
    """[G, K] partial sums of gy and gy * (z - mean): G <= _MAX_PARTIALS blocks of rows (a power of
    two times 256 rows each: few compiled variants)."""
    K = z.shape[1]
    M = z.numel() // K
    bm = 32
    steps = 2 if interpreting() else max(8, triton.next_power_of_2(triton.cdiv(M, _MAX_PARTIALS * bm)))
    G = triton.cdiv(M, steps * bm)
    psum = torch.empty((G, K), device=z.device, dtype=mean.dtype)  # every partial is written
    psumz = torch.empty_like(psum)
    gamma, beta, invstd = (_dense(t) for t in mask) if mask is not None else (None, None, None)
    bk = 16 if interpreting() else 64
    _bn_bwd_reduce_kernel[(G, triton.cdiv(K, bk))](
        grad, out, z, mean, gamma if gamma is not None else mean, beta if beta is not None else mean,
        invstd if invstd is not None else mean, psum, psumz, M, K,
        RELU=relu, MASK_Z=mask is not None, HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None,
        STEPS=steps, BLOCK_M=bm, BLOCK_K=bk)
    return psum, psumz


def bn_bwd_reduce(grad, out, z, mean, relu, mask=None):
    """Per-channel sum(gy) and sum(gy * (z - mean)), gy = grad masked by ReLU. Returns two [K] tensors.
    ``mask`` = (gamma, beta, invstd): the ReLU mask from z and the training apply's scale / shift
    (``bn_apply_stats``) instead of from ``out``, which is not read."""
    K = z.shape[1]
    if not z.numel():
        z0 = torch.zeros(K, device=z.device, dtype=mean.dtype)
        return z0, z0.clone()
    psum, psumz = _bwd_partials(grad, out, z, mean, relu, mask)
    # A fixed-order sum over the partials: deterministic.
    return psum.sum(0), psumz.sum(0)


@triton.jit
def _bn_bwd_coef_kernel(
    psum_ptr, psumz_ptr,  # [G, K] partial sums of gy and gy * (z - mean)
    gamma_ptr, invstd_ptr,  # [K]
    dgamma_ptr, dbeta_ptr, a_ptr, b_ptr, c_ptr,  # [K] outputs, accumulator dtype
    G, K,
    M,  # rows: -1 / M in the kernel in fp64
    ninv_hi, ninv_lo,  # -1 / M as an fp32 (hi + lo) pair: fp32 (Triton's fp32 division may be approximate)
    HAS_GAMMA: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
    G_STEPS: tl.constexpr,  # >= cdiv(G, BLOCK_G), a power of two (few compiled variants; masked)
):
    # The training backward's per-channel terms in one program per BLOCK_K channels, in the
    # order of the Python arithmetic they replace: dbeta = sum(gy), dgamma = sum(gy (z - mean)) invstd,
    # a = gamma invstd, b = a (-1/M) dgamma, c = a (-1/M) dbeta (dz = a gy + b xhat + c).
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    invstd = tl.load(invstd_ptr + offs_k, mask=k_mask, other=0.0)
    s = tl.zeros((BLOCK_G, BLOCK_K), dtype=invstd.dtype)
    sz = tl.zeros((BLOCK_G, BLOCK_K), dtype=invstd.dtype)
    offs_g = tl.arange(0, BLOCK_G)
    for gi in range(0, G_STEPS):  # a fixed order: deterministic
        gg = gi * BLOCK_G + offs_g
        msk = (gg < G)[:, None] & k_mask[None, :]
        idx = gg[:, None].to(tl.int64) * K + offs_k[None, :]
        s += tl.load(psum_ptr + idx, mask=msk, other=0.0)
        sz += tl.load(psumz_ptr + idx, mask=msk, other=0.0)
    dbeta = tl.sum(s, axis=0)
    dgamma = tl.sum(sz, axis=0) * invstd
    if HAS_GAMMA:
        a = tl.load(gamma_ptr + offs_k, mask=k_mask, other=0.0).to(invstd.dtype) * invstd
    else:
        a = invstd
    if invstd.dtype == tl.float64:  # (a compile-time branch) correctly rounded, as Python's -1.0 / M
        coef = a * (-1.0 / (tl.zeros_like(invstd) + M))
    else:
        coef = a * ((tl.zeros_like(invstd) + ninv_hi) + ninv_lo)
    tl.store(dgamma_ptr + offs_k, dgamma, mask=k_mask)
    tl.store(dbeta_ptr + offs_k, dbeta, mask=k_mask)
    tl.store(a_ptr + offs_k, a, mask=k_mask)
    tl.store(b_ptr + offs_k, coef * dgamma, mask=k_mask)
    tl.store(c_ptr + offs_k, coef * dbeta, mask=k_mask)


def bn_bwd_reduce_coef(grad, out, z, mean, invstd, gamma, relu, mask=None):
    """The training backward's reduction and per-channel terms: (dgamma, dbeta, a, b, c) in the
    accumulator dtype, for ``bn_bwd_apply``'s dz = a gy + b xhat + c. Two launches: the partial
    sums, then one kernel for their sum and the [K] arithmetic. ``mask`` as in ``bn_bwd_reduce``."""
    K = z.shape[1]
    M = z.numel() // K if K else 0
    outs = [torch.empty(K, device=z.device, dtype=mean.dtype) for _ in range(5)]
    if not K:
        return tuple(outs)
    if M:
        psum, psumz = _bwd_partials(grad, out, z, mean, relu, mask)
    else:
        psum = psumz = torch.zeros((1, K), device=z.device, dtype=mean.dtype)
    bk, bg = 16, 32 if interpreting() else 128
    G = psum.shape[0]
    gamma = _dense(gamma)
    _bn_bwd_coef_kernel[(triton.cdiv(K, bk),)](
        psum, psumz, gamma if gamma is not None else invstd, invstd, *outs, G, K, max(M, 1), *_split(-1.0 / max(M, 1)),
        HAS_GAMMA=gamma is not None, BLOCK_G=bg, BLOCK_K=bk, G_STEPS=triton.next_power_of_2(triton.cdiv(G, bg)))
    return tuple(outs)


@triton.jit
def _bn_bwd_apply_kernel(
    grad_ptr, out_ptr, z_ptr,  # [M, K] NHWC dense (out: not read with MASK_Z)
    mean_ptr, invstd_ptr, a_ptr, b_ptr, c_ptr,  # [K]
    gamma_ptr, beta_ptr,  # [K] (MASK_Z)
    dz_ptr, gres_ptr,  # [M, K] outputs
    M, K,
    RELU: tl.constexpr, STORE_GRES: tl.constexpr, USE_Z: tl.constexpr, MASK_Z: tl.constexpr,
    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # dz = a * gy + b * xhat + c,  xhat = (z - mean) * invstd.  Training BatchNorm:
    # a = gamma * invstd, b = -a * sum(gy * xhat) / M, c = -a * sum(gy) / M; eval: b = c = 0.
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    a = tl.load(a_ptr + offs_k, mask=k_mask, other=0.0)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    msk = (rows < M)[:, None] & k_mask[None, :]
    idx = rows[:, None] * K + offs_k[None, :]
    gy = tl.load(grad_ptr + idx, mask=msk, other=0.0)
    if USE_Z or MASK_Z:
        mean = tl.load(mean_ptr + offs_k, mask=k_mask, other=0.0)
        invstd = tl.load(invstd_ptr + offs_k, mask=k_mask, other=0.0)
        zr = tl.load(z_ptr + idx, mask=msk, other=0.0)
    if RELU:
        if MASK_Z:
            sc, sh = _bn_affine(gamma_ptr, beta_ptr, mean, invstd, offs_k, k_mask, HAS_GAMMA, HAS_BETA)
            gy = tl.where(_relu_blocked(zr, sc, sh, z_ptr.dtype.element_ty), 0.0, gy)
        else:
            o = tl.load(out_ptr + idx, mask=msk, other=0.0)
            gy = tl.where(o <= 0, 0.0, gy)  # as threshold_backward: NaN passes
    if STORE_GRES:
        tl.store(gres_ptr + idx, gy.to(gres_ptr.dtype.element_ty), mask=msk)
    dz = a[None, :] * gy.to(a.dtype)
    if USE_Z:
        bi = tl.load(b_ptr + offs_k, mask=k_mask, other=0.0) * invstd
        c = tl.load(c_ptr + offs_k, mask=k_mask, other=0.0)
        dz += bi[None, :] * (zr.to(a.dtype) - mean[None, :]) + c[None, :]
    tl.store(dz_ptr + idx, dz.to(dz_ptr.dtype.element_ty), mask=msk)


def bn_bwd_apply(grad, out, z, mean, invstd, a, b, c, relu, store_gres, mask=None):
    """dz (and the residual's gradient gy when store_gres); ``mask`` = (gamma, beta, invstd) as in
    ``bn_bwd_reduce``: the ReLU mask from z, ``out`` not read."""
    dz = torch.empty_like(grad)
    gres = torch.empty_like(grad) if store_gres else None
    K = grad.shape[1]
    M = grad.numel() // K if K else 0
    if mask is not None and mask[2] is not invstd:
        raise ValueError("bn_bwd_apply: the mask's invstd must be the statistics' invstd")
    if M:
        use_z = b is not None
        gamma, beta, _ = (_dense(t) for t in mask) if mask is not None else (None, None, None)
        bm, bk = _elem_blocks(K)
        _bn_bwd_apply_kernel[(triton.cdiv(M, bm), triton.cdiv(K, bk))](
            grad, out, z if use_z or mask is not None else grad, mean, invstd, a, b if use_z else a,
            c if use_z else a, gamma if gamma is not None else a, beta if beta is not None else a,
            dz, gres if store_gres else dz, M, K,
            RELU=relu, STORE_GRES=store_gres, USE_Z=use_z, MASK_Z=mask is not None, HAS_GAMMA=gamma is not None,
            HAS_BETA=beta is not None, BLOCK_M=bm, BLOCK_K=bk)
    return dz, gres
