"""Runs csrc's BatchNorm, add_relu and max_pool kernels under the CPU emulation (emu.h) against float64
NumPy formulas; a child process of tests/test_cuda_kernels_emulated.py, so that a crash (say, a
16-byte vector access on a misaligned pointer) fails one test instead of the whole run.

    python check_kernels.py LIB {bn,add_relu,max_pool} {fp32,fp64,fp16,bf16}

Prints one line per checked case and exits 1 at the first mismatch.
"""
from __future__ import annotations

import ctypes
import itertools
import sys

import numpy as np

DT = {"fp32": 0, "fp64": 1, "fp16": 2, "bf16": 3}
# rounding of one stored value, relative (the outputs are rounded once from fp32 / fp64)
TOL = {"fp32": 2e-6, "fp64": 1e-13, "fp16": 1e-3, "bf16": 8e-3}
SENTINEL = 1234.5


def to_storage(v, dt):
    """float64 values -> the array the kernels read (bf16: uint16 bits, rounded to nearest even)."""
    if dt == "bf16":
        u = np.asarray(v, np.float32).view(np.uint32).astype(np.uint64)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return u.astype(np.uint16)
    return np.asarray(v, {"fp32": np.float32, "fp64": np.float64, "fp16": np.float16}[dt])


def values(a, dt):
    """The float64 values of a kernel-side array."""
    if dt == "bf16":
        return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return a.astype(np.float64)


def alloc(n, dt, misaligned=False, fill=SENTINEL):
    """n elements, 16-byte aligned or exactly one element past an aligned address."""
    item = 2 if dt in ("fp16", "bf16") else (4 if dt == "fp32" else 8)
    raw = np.empty(n * item + 64, np.uint8)
    off = (-raw.ctypes.data) % 16 + (item if misaligned else 0)
    a = raw[off:off + n * item].view(np.uint16 if dt == "bf16" else to_storage([], dt).dtype)
    a[:] = to_storage(np.full(n, fill), dt)
    assert (a.ctypes.data % 16 == 0) != misaligned
    return a


def ptr(a):
    return None if a is None else ctypes.c_void_p(a.ctypes.data)


def check(got, want, tol, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    ok = np.isclose(got, want, rtol=tol, atol=tol, equal_nan=True)
    if not ok.all():
        idx = np.argwhere(~ok)[:4].tolist()
        print(f"FAIL {what}: {int((~ok).sum())} of {ok.size} differ; first at {idx}: got {got[~ok][:4]} "
              f"want {want[~ok][:4]}", flush=True)
        sys.exit(1)


def rounded(v, dt):
    return values(to_storage(v, dt), dt)


def main():
    lib = ctypes.CDLL(sys.argv[1])
    group, dt = sys.argv[2], sys.argv[3]
    i64 = ctypes.c_int64
    acc = np.float64 if dt == "fp64" else np.float32
    rng = np.random.default_rng(0)
    tol = TOL[dt]

    def mk(M, K, misaligned=False, offset=0.0, specials=False):
        v = rng.standard_normal(M * K) + offset
        if specials and v.size > 4:
            v[::7], v[3::11] = np.nan, -np.inf
        a = alloc(M * K, dt, misaligned)
        a[:] = to_storage(v, dt)
        return a, values(a, dt).reshape(M, K)

    if group == "max_pool":
        check_max_pool(lib, dt, rng, tol)
        return

    if group == "add_relu":
        for n, mis, sms in itertools.product([1, 7, 8, 9, 255, 4099], [False, True], [1, 3]):
            lib.emu_set_sms(sms)
            x, xv = mk(n, 1, mis, specials=True)
            r, rv = mk(n, 1)
            out = alloc(n, dt, mis)
            assert lib.emu_add_relu(ptr(x), ptr(r), ptr(out), i64(n), DT[dt]) == 0
            want = np.maximum(rounded(xv + rv, dt), 0)
            want[np.isnan(xv + rv)] = np.nan
            check(values(out, dt).reshape(n, 1), want, tol, f"add_relu n={n} misaligned={mis}")
            print(f"ok add_relu {dt} n={n} misaligned={mis} sms={sms}", flush=True)
        return

    shapes = [(1, 1), (1, 8), (2, 1), (37, 7), (37, 24), (9, 264), (3, 2056), (600, 64)]
    for (M, K), mis in itertools.product(shapes, [False, True]):
        lib.emu_set_sms(1 if M * K > 4000 else 3)
        # forward: normalize (+ residual) (+ ReLU)
        z, zv = mk(M, K, mis, specials=True)
        res, resv = mk(M, K)
        scale, shift = (rng.random(K) + 0.5).astype(acc), rng.standard_normal(K).astype(acc)
        for relu, has_res in itertools.product((0, 1), (False, True)):
            out = alloc(M * K, dt, mis)
            assert lib.emu_bn_apply(ptr(z), ptr(scale), ptr(shift), ptr(res) if has_res else None, ptr(out), i64(M),
                                    i64(K), relu, DT[dt]) == 0
            y = zv * scale + shift + (resv if has_res else 0)
            if relu:
                y = np.where(y < 0, 0.0, y)  # NaN stays NaN
            check(values(out, dt).reshape(M, K), rounded(y, dt), tol, f"bn_apply M={M} K={K} relu={relu}")
        # statistics: per-chunk shifted sums, then the finalize (running statistics updated)
        zs, zsv = mk(M, K, mis, offset=3.0)
        for rows in sorted({1, 3, 256, max(1, M // 2)}):
            G = -(-M // rows)
            pm, pm2 = np.full(G * K, SENTINEL, acc), np.full(G * K, SENTINEL, acc)
            assert lib.emu_bn_stats(ptr(zs), ptr(pm), ptr(pm2), i64(M), i64(K), i64(rows), DT[dt]) == 0
            for g in range(G):
                c = zsv[g * rows:(g + 1) * rows]
                check(pm.reshape(G, K)[g], c.mean(0), 1e-5 if acc is np.float32 else 1e-12, f"partial mean g={g}")
                check(pm2.reshape(G, K)[g], ((c - c.mean(0)) ** 2).sum(0), (1e-5 if acc is np.float32 else 1e-12)
                      * max(1, len(c)), f"partial M2 g={g}")
            if M > 1:
                mean, invstd = np.empty(K, acc), np.empty(K, acc)
                rm, rv = rng.standard_normal(K).astype(np.float32), (rng.random(K) + 0.5).astype(np.float32)
                nrm, nrv = np.empty(K, np.float32), np.empty(K, np.float32)
                # the apply's coefficients too (affine: given gamma / beta, or absent: 1 / 0), or not asked for
                affine = rows % 2 == 1
                gamma = (rng.random(K) + 0.5).astype(acc) if rows == 1 else None
                beta = rng.standard_normal(K).astype(acc) if rows == 1 else None
                scale, shift = np.full(K, SENTINEL, acc), np.full(K, SENTINEL, acc)
                assert lib.emu_bn_finalize(ptr(pm), ptr(pm2), i64(G), i64(K), i64(M), i64(rows), ptr(mean),
                                           ptr(invstd), ptr(rm), ptr(rv), ptr(nrm), ptr(nrv), 0,
                                           ctypes.c_double(0.1), ctypes.c_double(1e-5), int(acc is np.float64),
                                           ptr(gamma), ptr(beta), ptr(scale) if affine else None,
                                           ptr(shift) if affine else None) == 0
                var = zsv.var(0)
                check(mean, zsv.mean(0), 1e-5, f"mean M={M} K={K} rows={rows}")
                check(invstd, 1 / np.sqrt(var + 1e-5), 1e-4, f"invstd M={M} K={K} rows={rows}")
                check(nrm, 0.9 * rm + 0.1 * zsv.mean(0), 1e-5, "running mean")
                check(nrv, 0.9 * rv + 0.1 * var * M / (M - 1), 1e-4, "running var")
                # in place (the C++ node's finalize: new_running_* are running_*): the same bits
                irm, irv = rm.copy(), rv.copy()
                assert lib.emu_bn_finalize(ptr(pm), ptr(pm2), i64(G), i64(K), i64(M), i64(rows), ptr(mean),
                                           ptr(invstd), ptr(irm), ptr(irv), ptr(irm), ptr(irv), 0,
                                           ctypes.c_double(0.1), ctypes.c_double(1e-5), int(acc is np.float64),
                                           ptr(gamma), ptr(beta), None, None) == 0
                assert np.array_equal(irm, nrm) and np.array_equal(irv, nrv), "finalize in place"
                if affine:
                    sc = (gamma if gamma is not None else 1.0) / np.sqrt(var + 1e-5)
                    check(scale, sc, 1e-4, f"scale M={M} K={K} rows={rows}")
                    sh = (beta if beta is not None else 0.0) - zsv.mean(0) * sc
                    check(shift, sh, 1e-4 * (1 + np.abs(zsv.mean(0) * sc)), f"shift M={M} K={K} rows={rows}")
                else:
                    check(scale, np.full(K, SENTINEL), 0, "scale untouched")
        # backward: the reduction (ReLU mask from the output) and the elementwise pass
        grad, gv = mk(M, K, mis, specials=True)
        outb, ov = mk(M, K, specials=True)
        mean = (rng.standard_normal(K) * 0.1).astype(acc)
        invstd = (rng.random(K) + 0.5).astype(acc)
        a, b, c = (rng.random(K) + 0.5).astype(acc), rng.standard_normal(K).astype(acc), rng.standard_normal(K).astype(acc)
        zb, zbv = mk(M, K, mis)
        for relu in (0, 1):
            gy = np.where(ov <= 0, 0.0, gv) if relu else gv  # as threshold_backward: NaN passes
            for rows in sorted({1, 256, max(1, M // 3)}):
                G = -(-M // rows)
                ps, psz = np.full(G * K, SENTINEL, acc), np.full(G * K, SENTINEL, acc)
                assert lib.emu_bn_bwd_reduce(ptr(grad), ptr(outb), ptr(zb), ptr(mean), ptr(ps), ptr(psz), i64(M),
                                             i64(K), i64(rows), relu, DT[dt], None, None) == 0
                for g in range(G):
                    sl = slice(g * rows, (g + 1) * rows)
                    check(ps.reshape(G, K)[g], gy[sl].sum(0), 1e-4, f"bwd_reduce sum g={g} rows={rows}")
                    check(psz.reshape(G, K)[g], (gy[sl] * (zbv[sl] - mean)).sum(0), 1e-4, f"bwd_reduce sum z g={g}")
        # the per-channel backward terms from G partial sums (finite ones: a fixed-order sum over G)
        for G, has_gamma in ((1, False), (5, True), (40, True)):
            ps, psz = rng.standard_normal((G, K)).astype(acc), rng.standard_normal((G, K)).astype(acc)
            gam = (rng.random(K) + 0.5).astype(acc) if has_gamma else None
            outs = [np.full(K, SENTINEL, acc) for _ in range(5)]
            assert lib.emu_bn_bwd_coef(ptr(ps), ptr(psz), i64(G), i64(K), i64(M), ptr(gam), ptr(invstd),
                                       *map(ptr, outs), int(acc is np.float64)) == 0
            dgamma, dbeta, ca, cb, cc = outs
            s_gy, s_gyz = ps.astype(np.float64).sum(0), psz.astype(np.float64).sum(0)
            wa = (gam if has_gamma else 1.0) * invstd
            eps_sum = (1e-12 if acc is np.float64 else 1e-6) * G  # the sum's rounding, absolute (O(1) terms)
            check(dbeta, s_gy, eps_sum, f"bwd_coef dbeta G={G}")
            check(dgamma, s_gyz * invstd, eps_sum * invstd, f"bwd_coef dgamma G={G}")
            check(ca, wa, 1e-6, "bwd_coef a")
            check(cb, -wa / M * s_gyz * invstd, 2 * eps_sum * wa / M * invstd + 1e-6 * np.abs(wa / M * s_gyz * invstd),
                  "bwd_coef b")
            check(cc, -wa / M * s_gy, 2 * eps_sum * wa / M + 1e-6 * np.abs(wa / M * s_gy), "bwd_coef c")
        for relu in (0, 1):
            gy = np.where(ov <= 0, 0.0, gv) if relu else gv  # as threshold_backward: NaN passes
            for train, store in itertools.product((False, True), (False, True)):
                dz, gres = alloc(M * K, dt, mis), (alloc(M * K, dt, mis) if store else None)
                assert lib.emu_bn_bwd_apply(ptr(grad), ptr(outb) if relu else None, ptr(zb) if train else None,
                                            ptr(mean) if train else None, ptr(invstd) if train else None, ptr(a),
                                            ptr(b) if train else None, ptr(c) if train else None, ptr(dz), ptr(gres),
                                            i64(M), i64(K), relu, DT[dt], None, None) == 0
                want = a * gy + ((b * invstd * (zbv - mean) + c) if train else 0)
                check(values(dz, dt).reshape(M, K), rounded(want, dt), 4 * tol, f"bwd_apply M={M} K={K} train={train}")
                if store:
                    check(values(gres, dt).reshape(M, K), gy, tol, "gres")
        # the ReLU's mask recomputed from z and the forward's scale / shift (no residual; the C++
        # autograd node's backward): the same bits as with the output of the forward's apply kernel
        zm, _ = mk(M, K, mis, specials=True)
        msc, msh = (rng.random(K) + 0.5).astype(acc), rng.standard_normal(K).astype(acc)
        outm = alloc(M * K, dt, mis)
        assert lib.emu_bn_apply(ptr(zm), ptr(msc), ptr(msh), None, ptr(outm), i64(M), i64(K), 1, DT[dt]) == 0
        rows = max(1, M // 3)
        G = -(-M // rows)
        sums = {}
        for from_z in (False, True):
            ps, psz = np.full(G * K, SENTINEL, acc), np.full(G * K, SENTINEL, acc)
            assert lib.emu_bn_bwd_reduce(ptr(grad), None if from_z else ptr(outm), ptr(zm), ptr(mean), ptr(ps),
                                         ptr(psz), i64(M), i64(K), i64(rows), 1, DT[dt],
                                         ptr(msc) if from_z else None, ptr(msh) if from_z else None) == 0
            dz, gres = alloc(M * K, dt, mis), alloc(M * K, dt, mis)
            assert lib.emu_bn_bwd_apply(ptr(grad), None if from_z else ptr(outm), ptr(zm), ptr(mean), ptr(invstd),
                                        ptr(a), ptr(b), ptr(c), ptr(dz), ptr(gres), i64(M), i64(K), 1, DT[dt],
                                        ptr(msc) if from_z else None, ptr(msh) if from_z else None) == 0
            sums[from_z] = [ps, psz, values(dz, dt), values(gres, dt)]
        for name, x, y in zip(("sum", "sum z", "dz", "gres"), sums[False], sums[True]):
            assert np.array_equal(x, y, equal_nan=True), f"mask from z: {name} M={M} K={K}"
        # and that mask is the ReLU's (the forward's output <= 0 masks the gradient)
        om = values(outm, dt).reshape(M, K)
        check(sums[True][3].reshape(M, K), np.where(om <= 0, 0.0, gv), tol, "gres, mask from z")
        print(f"ok bn {dt} M={M} K={K} misaligned={mis}", flush=True)


def pool_reference(xv, k, s, p):
    """max_pool2d over NHWC float64 values as PyTorch chooses: (kh, kw) order, greater or NaN
    replaces, the first element inside the input starts; -> (out, code)."""
    N, H, W, C = xv.shape
    P, Q = (H + 2 * p[0] - k[0]) // s[0] + 1, (W + 2 * p[1] - k[1]) // s[1] + 1
    out, code = np.empty((N, P, Q, C)), np.full((N, P, Q, C), -1, np.int64)
    for pi, qi in itertools.product(range(P), range(Q)):
        best = np.full((N, C), -np.inf)
        kc = np.full((N, C), -1, np.int64)
        for kh, kw in itertools.product(range(k[0]), range(k[1])):
            h, w = pi * s[0] - p[0] + kh, qi * s[1] - p[1] + kw
            if 0 <= h < H and 0 <= w < W:
                v = xv[:, h, w, :]
                take = (kc < 0) | (v > best) | np.isnan(v)
                best, kc = np.where(take, v, best), np.where(take, kh * k[1] + kw, kc)
        out[:, pi, qi], code[:, pi, qi] = best, kc
    return out, code


def check_max_pool(lib, dt, rng, tol):
    i64 = ctypes.c_int64
    cases = [((2, 9, 10, 8), (3, 3), (2, 2), (1, 1)), ((1, 7, 7, 3), (3, 3), (2, 2), (1, 1)),
             ((2, 12, 11, 16), (2, 2), (2, 2), (0, 0)), ((1, 6, 9, 24), (3, 2), (1, 2), (1, 0)),
             ((3, 5, 5, 5), (1, 1), (1, 1), (0, 0)), ((1, 16, 16, 64), (3, 3), (2, 2), (1, 1)),
             ((2, 4, 6, 40), (2, 3), (2, 1), (1, 1)), ((1, 3, 3, 2), (3, 3), (3, 3), (1, 1))]
    for (shape, k, s, p), mis in itertools.product(cases, [False, True]):
        N, H, W, C = shape
        P, Q = (H + 2 * p[0] - k[0]) // s[0] + 1, (W + 2 * p[1] - k[1]) // s[1] + 1
        n_in, n_out = N * H * W * C, N * P * Q * C
        x = alloc(n_in, dt, mis)
        v = np.round(rng.standard_normal(n_in) * 4) / 4  # ties within windows
        v[::13], v[5::17] = np.nan, -np.inf
        if shape == (1, 7, 7, 3):
            v[:3 * 7 * 3] = -np.inf  # rows 0-2: the first row of windows holds -inf alone
        x[:] = to_storage(v, dt)
        xv = values(x, dt).reshape(N, H, W, C)
        out = alloc(n_out, dt, mis)
        raw = np.full(n_out + 17, 77, np.uint8)
        code = raw[(-raw.ctypes.data) % 16 + (1 if mis else 0):][:n_out]
        geo = [i64(N), i64(H), i64(W), i64(C), i64(P), i64(Q), k[0], k[1], s[0], s[1], p[0], p[1], DT[dt]]
        assert lib.emu_max_pool_fwd(ptr(x), ptr(out), ptr(code), *geo) == 0
        want, want_code = pool_reference(xv, k, s, p)
        what = f"max_pool {shape} k={k} s={s} p={p} misaligned={mis}"
        got = values(out, dt).reshape(N, P, Q, C)
        if not np.array_equal(got, want, equal_nan=True):
            print(f"FAIL forward {what}", flush=True)
            sys.exit(1)
        if not np.array_equal(code.reshape(N, P, Q, C), want_code):
            print(f"FAIL code {what}", flush=True)
            sys.exit(1)
        out2 = alloc(n_out, dt, mis)  # inference: no code
        assert lib.emu_max_pool_fwd(ptr(x), ptr(out2), None, *geo) == 0
        if not np.array_equal(values(out2, dt).reshape(N, P, Q, C), want, equal_nan=True):
            print(f"FAIL forward without code {what}", flush=True)
            sys.exit(1)
        # backward: each pooled gradient to its window's chosen pixel, summed where windows overlap
        g = alloc(n_out, dt, mis)
        g[:] = to_storage(rng.standard_normal(n_out), dt)
        gv = values(g, dt).reshape(N, P, Q, C)
        dx = alloc(n_in, dt, mis)
        assert lib.emu_max_pool_bwd(ptr(g), ptr(code), ptr(dx), *geo) == 0
        ref = np.zeros((N, H, W, C))
        n_i, c_i = np.meshgrid(np.arange(N), np.arange(C), indexing="ij")
        for pi, qi in itertools.product(range(P), range(Q)):
            kc = want_code[:, pi, qi]
            h, w = pi * s[0] - p[0] + kc // k[1], qi * s[1] - p[1] + kc % k[1]
            np.add.at(ref, (n_i, h, w, c_i), gv[:, pi, qi])
        check(values(dx, dt).reshape(N, H, W, C), rounded(ref, dt), tol, f"backward {what}")
        print(f"ok max_pool {dt} {shape} k={k} s={s} p={p} misaligned={mis}", flush=True)


if __name__ == "__main__":
    main()
