#!/usr/bin/env python
"""Compile every Triton kernel of resnet_fused for a GPU target without a GPU: each dtype,
training and eval epilogues, every tile configuration the autotuner may pick. Catches code
that runs under the interpreter but does not compile (Triton's type checks, shape rules of
tl.dot, shared-memory limits). Prints one line per variant and exits non-zero if any fails.

  python scripts/triton_compile_check.py [--arch 90] [--quick]

Must run without TRITON_INTERPRET (interpreted kernels cannot be compiled).
"""
from __future__ import annotations

import argparse
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from resnet_fused.ops import add_relu as ar  # noqa: E402
from resnet_fused.ops import max_pool as mp  # noqa: E402
from resnet_fused.ops.conv_bn_relu import triton_kernels as tk  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--quick", action="store_true", help="one tile config per dtype (CI)")
    args = ap.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0

    def comp(kernel, sig, consts, opts=None, tag=""):
        nonlocal failures
        full = {n: ("constexpr" if n in consts else sig[n]) for n in kernel.arg_names}
        try:
            k = triton.compile(ASTSource(kernel, full, consts, {}), target=target, options=opts or {})
            print(f"OK   {tag}: shared memory {k.metadata.shared} B", flush=True)
        except Exception as e:  # report every failure, then fail
            failures += 1
            print(f"FAIL {tag}: {type(e).__name__}: {str(e)[:2000]}", flush=True)

    cfgs = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_C"], c.num_warps, c.num_stages)
            for c in tk._conv_configs()]
    for dt in ["fp32", "fp16", "bf16", "fp64"]:
        acc = "fp64" if dt == "fp64" else "fp32"
        variants = [(32, 32, 8, 4, 3)] if dt == "fp64" else (cfgs[:1] + cfgs[-1:] if args.quick else cfgs)
        for training in (True, False):
            for bm, bn, bc, w, st in variants:
                for ieee in ([True, False] if dt == "fp32" else [True]):
                    sig = dict(x_ptr="*" + dt, w_ptr="*" + dt, out_ptr="*" + dt, z_ptr="*" + dt, scale_ptr="*" + acc,
                               shift_ptr="*" + acc, res_ptr="*" + dt, pmean_ptr="*" + acc, pm2_ptr="*" + acc,
                               ws_ptr="*" + acc)
                    for n in "C H W K P Q Kg PP PQ sxn sxc sxh sxw SH SW PH PW DH DW".split():
                        sig[n] = "i32"
                    sig["M"] = "i64"
                    tags = [("conv", dict(R=3, S=3, Cg=64, PACKED=False, ROWRUN=False, PAD=True, SPLIT_K=1)),
                            ("conv-splitk", dict(R=3, S=3, Cg=64, PACKED=False, ROWRUN=False, PAD=True, SPLIT_K=4))]
                    if (bm, bn, bc, w, st) == variants[0]:  # the packed reductions (stem: 7x7, 4 channels)
                        tags += [("conv-packed", dict(R=7, S=7, Cg=3, PACKED=True, ROWRUN=False, PAD=True, SPLIT_K=1)),
                                 ("conv-rowrun", dict(R=7, S=7, Cg=4, PACKED=True, ROWRUN=True, PAD=True, SPLIT_K=1))]
                        if not training:  # the stem with its max-pool in the epilogue (eval, no residual)
                            tags += [("conv-rowrun-maxpool", dict(R=7, S=7, Cg=4, PACKED=True, ROWRUN=True, PAD=True,
                                                                  SPLIT_K=1, POOL=True))]
                    for name, geo in tags:
                        pool = geo.get("POOL", False)
                        consts = dict(geo, GROUPS=1, IDX64=True, TRAINING=training, HAS_RES=not training and not pool,
                                      RELU=True, STORE_Z=not pool, HAS_SCALE=True, IEEE=ieee, POOL=pool, GROUP_M=8,
                                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_C=bc)
                        comp(tk._conv_fwd_kernel, sig, consts, dict(num_warps=w, num_stages=st),
                             tag=f"{name} {dt} {'train' if training else 'eval'} tile={bm}x{bn}x{bc} w{w} s{st} "
                                 f"ieee={ieee}")
            sig = dict(ws_ptr="*" + acc, act_ptr="*" + dt, out_ptr="*" + dt, z_ptr="*" + dt, scale_ptr="*" + acc,
                       shift_ptr="*" + acc, res_ptr="*" + dt, pmean_ptr="*" + acc, pm2_ptr="*" + acc, M="i32", K="i32")
            comp(tk._splitk_reduce_kernel, sig, dict(SPLIT_K=4, TRAINING=training, HAS_RES=not training, RELU=True,
                                                     STORE_Z=True, HAS_SCALE=True, BLOCK_M=64, BLOCK_N=64),
                 tag=f"splitk_reduce {dt} {'train' if training else 'eval'}")
            if dt != "fp64":
                # the TMA 1x1 kernel's own configurations (64-, 32- and 16-wide steps)
                cfgs1 = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_C"], c.num_warps, c.num_stages)
                         for c in tk._conv1x1_configs()]
                for bm, bn, bc, w, st in (cfgs1[:1] + cfgs1[-1:] if args.quick else cfgs1):
                    sig = dict(a_desc=f"tensordesc<{dt}[{bm}, {bc}]>", b_desc=f"tensordesc<{dt}[{bn}, {bc}]>",
                               act_ptr="*" + dt, out_ptr="*" + dt, z_ptr="*" + dt, scale_ptr="*" + acc,
                               shift_ptr="*" + acc, res_ptr="*" + dt, pmean_ptr="*" + acc, pm2_ptr="*" + acc,
                               M="i32", K="i32", C="i32", NUM_PROGS="i32")
                    for persistent in (True, False):
                        consts = dict(NCB=4, PERSISTENT=persistent, IDX64=False, TRAINING=training,
                                      HAS_RES=not training, RELU=True, STORE_Z=True, HAS_SCALE=True, IEEE=True,
                                      GROUP_M=8, BLOCK_M=bm, BLOCK_N=bn, BLOCK_C=bc)
                        comp(tk._conv1x1_kernel, sig, consts, dict(num_warps=w, num_stages=st),
                             tag=f"conv1x1-tma {dt} {'train' if training else 'eval'} tile={bm}x{bn}x{bc} "
                                 f"persistent={persistent}")
        sig = dict(z_ptr="*" + dt, scale_ptr="*" + acc, shift_ptr="*" + acc, mean_ptr="*" + acc,
                   invstd_ptr="*" + acc, res_ptr="*" + dt, out_ptr="*" + dt, M="i64", K="i32")
        for bk in (8, 64, 128):  # the channel widths _elem_blocks picks (4096 elements per program)
            for stats in (False, True):  # scale / shift given, or from the statistics (training)
                comp(tk._bn_apply_kernel, sig, dict(STATS=stats, HAS_GAMMA=True, HAS_BETA=True, HAS_RES=not stats,
                                                    RELU=True, BLOCK_M=4096 // bk, BLOCK_K=bk),
                     tag=f"bn_apply {dt} BLOCK_K={bk} stats={stats}")
        sig = dict(grad_ptr="*" + dt, out_ptr="*" + dt, z_ptr="*" + dt, mean_ptr="*" + acc, gamma_ptr="*" + acc,
                   beta_ptr="*" + acc, invstd_ptr="*" + acc, psum_ptr="*" + acc, psumz_ptr="*" + acc, M="i64",
                   K="i32")
        for mask_z in (False, True):
            comp(tk._bn_bwd_reduce_kernel, sig, dict(RELU=True, MASK_Z=mask_z, HAS_GAMMA=True, HAS_BETA=True,
                                                     STEPS=8, BLOCK_M=32, BLOCK_K=64),
                 tag=f"bwd_reduce {dt} mask_z={mask_z}")
        sig = dict(grad_ptr="*" + dt, out_ptr="*" + dt, z_ptr="*" + dt, mean_ptr="*" + acc, invstd_ptr="*" + acc,
                   a_ptr="*" + acc, b_ptr="*" + acc, c_ptr="*" + acc, gamma_ptr="*" + acc, beta_ptr="*" + acc,
                   dz_ptr="*" + dt, gres_ptr="*" + dt, M="i64", K="i32")
        for bk in (8, 64, 128):
            for mask_z in (False, True):
                comp(tk._bn_bwd_apply_kernel, sig, dict(RELU=True, STORE_GRES=not mask_z, USE_Z=True, MASK_Z=mask_z,
                                                        HAS_GAMMA=True, HAS_BETA=True, BLOCK_M=4096 // bk,
                                                        BLOCK_K=bk), tag=f"bwd_apply {dt} BLOCK_K={bk} mask_z={mask_z}")
        comp(ar._add_relu_fwd_kernel, dict(x_ptr="*" + dt, r_ptr="*" + dt, out_ptr="*" + dt, n_elements="i64"),
             dict(BLOCK=1024), tag=f"add_relu {dt}")
        geo = dict(KH=3, KW=3, SH=2, SW=2, PH=1, PW=1, BLOCK_PIX=16, BLOCK_C=64)  # the stem's pool
        dims = dict(H="i32", W="i32", C="i32", P="i32", Q="i32")
        for store in (True, False):
            comp(mp._max_pool_fwd_kernel, dict(x_ptr="*" + dt, out_ptr="*" + dt, code_ptr="*u8", NPQ="i64", **dims),
                 dict(geo, STORE_CODE=store), tag=f"max_pool fwd {dt} store_code={store}")
        comp(mp._max_pool_bwd_kernel, dict(g_ptr="*" + dt, code_ptr="*u8", dx_ptr="*" + dt, NHW="i64", **dims), geo,
             tag=f"max_pool bwd {dt}")
    for acc in ["fp32", "fp64"]:
        for rdt in ["fp32", "fp16", "bf16", "fp64"]:
            sig = dict(pmean_ptr="*" + acc, pm2_ptr="*" + acc, mean_ptr="*" + acc, invstd_ptr="*" + acc,
                       rmean_ptr="*" + rdt, rvar_ptr="*" + rdt, nrmean_ptr="*" + rdt, nrvar_ptr="*" + rdt, G="i32",
                       K="i32", M="i64", ROWS="i32", mom_hi="fp32", mom_lo="fp32", eps_hi="fp32", eps_lo="fp32")
            comp(tk._bn_finalize_kernel, sig, dict(UPDATE=True, BLOCK_G=32, BLOCK_K=32, G_STEPS=8),
                 tag=f"bn_finalize acc={acc} running={rdt}")
    for acc in ["fp32", "fp64"]:
        sig = dict(psum_ptr="*" + acc, psumz_ptr="*" + acc, gamma_ptr="*" + acc, invstd_ptr="*" + acc,
                   dgamma_ptr="*" + acc, dbeta_ptr="*" + acc, a_ptr="*" + acc, b_ptr="*" + acc, c_ptr="*" + acc,
                   G="i32", K="i32", M="i32", ninv_hi="fp32", ninv_lo="fp32")
        comp(tk._bn_bwd_coef_kernel, sig, dict(HAS_GAMMA=True, BLOCK_G=128, BLOCK_K=16, G_STEPS=8),
             tag=f"bwd_coef acc={acc}")
    for acc in ["fp32", "fp64"]:
        sig = dict(pmean_ptr="*" + acc, pm2_ptr="*" + acc, qmean_ptr="*" + acc, qm2_ptr="*" + acc, G="i32", K="i32",
                   M="i64", ROWS="i32")
        comp(tk._bn_merge_kernel, sig, dict(GROUP=64, BLOCK_K=32), tag=f"bn_merge acc={acc}")
    print(f"{failures} failure(s), Triton {triton.__version__}, sm_{args.arch}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
