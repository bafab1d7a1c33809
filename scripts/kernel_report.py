#!/usr/bin/env python
"""Static kernel report: every Triton convolution variant ResNet-50 can select, compiled for
sm_90 without a GPU, read back from its SASS, with a per-layer time estimate.

  python scripts/kernel_report.py                    # batch 256 and 1, eval and train, bf16 and fp16
  python scripts/kernel_report.py --quick --check    # CI: bf16/fp16, fails on spills or no HGMMA
  python scripts/kernel_report.py --csv out.csv --perf-md docs/perf.md

How: the host side of the Triton backend (``triton_kernels.conv_fwd``) runs on meta tensors for
every ResNet-50 conv (torchvision v1.5, 224x224) with its launches captured instead of run; each
captured launch is specialized exactly as Triton's JIT would specialize it for real
channels_last CUDA tensors (the JIT's own ``native_specialize_impl``: 16-divisible sizes and
16-byte aligned pointers as attributes, integer arguments equal to 1 as constants), and compiled
for sm_90 with every tile configuration the autotuner keeps for that problem (after its pruning).
From the compiled kernel: registers, spill bytes (ptxas -v), shared memory, the MMA instructions
in the SASS (HGMMA = wgmma, HMMA = mma.sync), the global-load kinds (UTMALDG = TMA, LDGSTS =
cp.async, LDG = plain), and the full pipeline drains per output tile (waits for zero outstanding
wgmma groups or async copies in the Triton GPU IR, weighted by the trip counts of the
constant-bounded loops around them).

The estimate (static, per layer x mode x config), stated assumptions:
  * compute: the tile-padded FLOPs (M, N rounded up to the tile, the reduction to BLOCK_C
    steps) at 790 TFLOP/s (bf16/fp16 dense, measured on this workplace's H100);
  * memory: DRAM bytes at 3.0 TB/s (measured copy rate): input once per pass over the N tiles
    that L2 cannot cover (the tile order decides: grouped order re-reads nothing while a group's
    A tiles, GROUP_M x BLOCK_M rows, fit in half of the 50 MB L2; otherwise once per N tile),
    weights once per M group, output (and z, residual, statistics partials) once;
  * time = max(compute, memory) / wave efficiency (tiles over 132 SMs x resident CTAs per SM,
    from shared memory and registers), plus the pipeline fill: (num_stages - 1) k-steps of
    about 1 us per drain per tile, in waves.
It is not a measurement. The GPU runs fill the measured columns beside it.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import dataclasses
import math
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from layers import RESNET50  # noqa: E402
from resnet_fused.ops.conv_bn_relu import triton_kernels as tk  # noqa: E402

PEAK_FLOPS = 790e12
PEAK_BYTES = 3.0e12
SMS = 132
L2_BYTES = 50 * 2**20
SMEM_PER_SM = 228 * 1024
REGS_PER_SM = 65536
DRAIN_US = 1.0  # one pipeline refill (num_stages - 1 global-load latencies), per drain per tile
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


# --- capture ------------------------------------------------------------------------------------
class _Launch:
    def __init__(self, name, obj, grid, args, kwargs):
        self.name, self.obj, self.grid, self.args, self.kwargs = name, obj, grid, args, kwargs

    @property
    def fn(self):
        return self.obj.fn if isinstance(self.obj, triton.runtime.Autotuner) else self.obj

    def bound(self):
        names = self.fn.arg_names
        d = dict(zip(names, self.args))
        d.update(self.kwargs)
        return d

    def configs(self):
        """[(constexpr kwargs, num_warps, num_stages)] the launch can run with."""
        if isinstance(self.obj, triton.runtime.Autotuner):
            named = dict(zip(self.fn.arg_names, self.args))
            kw = dict(self.kwargs)
            cfgs = self.obj.configs
            prune = getattr(self.obj, "early_config_prune", None)
            if prune is not None:
                cfgs = prune(cfgs, named, **kw)
            return [(dict(c.kwargs), c.num_warps, c.num_stages, c.pre_hook) for c in cfgs]
        kw = dict(self.kwargs)
        return [({}, kw.pop("num_warps", 4), kw.pop("num_stages", 3), None)]


class _Recorder:
    def __init__(self, name, obj, log):
        self.name, self.obj, self.log = name, obj, log
        if isinstance(obj, triton.runtime.Autotuner):
            c = obj.configs[0]
            self.best_config = triton.Config(dict(c.kwargs, BLOCK_M=128), num_warps=c.num_warps)
        self.fn = getattr(obj, "fn", obj)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(_Launch(self.name, self.obj, grid, args, kwargs))
        return launch


@contextlib.contextmanager
def capture():
    log = []
    saved = {}
    for name in dir(tk):
        obj = getattr(tk, name)
        if isinstance(obj, (triton.runtime.Autotuner, triton.runtime.JITFunction)):
            saved[name] = obj
            setattr(tk, name, _Recorder(name, obj, log))
    try:
        yield log
    finally:
        for name, obj in saved.items():
            setattr(tk, name, obj)


POOL_SUFFIX = " +maxpool"


def pooled_layers(layers):
    """The stem with its max-pool in the epilogue (eval only), as a layer of its own; count 0: the
    sums of estimates and floors stay those of the 53 convs."""
    return [dataclasses.replace(L, name=L.name + POOL_SUFFIX, count=0) for L in layers if L.name.startswith("stem")]


def _pooled(L):
    return L.name.endswith(POOL_SUFFIX)


def launches_for(layer, batch, mode, dtype):
    """The kernel launches conv_fwd makes for one ResNet-50 layer (meta tensors: nothing runs)."""
    L = layer
    dev = torch.device("meta")
    x = torch.empty(batch, L.C, L.H, L.H, device=dev, dtype=dtype).to(memory_format=torch.channels_last)
    w = torch.empty(L.K, L.R, L.R, L.C, device=dev, dtype=dtype)
    P = L.P
    training = mode == "train"
    kw = dict(training=training)
    if not training:
        kw.update(scale=None, shift=torch.empty(L.K, device=dev), relu=L.relu,
                  residual=torch.empty(batch, L.K, P, P, device=dev, dtype=dtype).to(memory_format=torch.channels_last)
                  if L.residual else None)
        if _pooled(L):
            kw.update(pool=True)
    with capture() as log:
        tk.conv_fwd(x, w, L.K, P, P, (L.stride, L.stride), (L.padding, L.padding), (1, 1), 1, **kw)
    return log


# --- specialization and compile --------------------------------------------------------------------
def specialize(fn, bound, cfg):
    """(signature, constexprs, attrs) as Triton's JIT builds them for these arguments."""
    signature, constexprs, attrs = {}, {}, {}
    values = dict(bound, **cfg)
    for i, p in enumerate(fn.params):
        v = values[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = v
            continue
        ty, attr = native_specialize_impl(BaseBackend, v, False, not p.do_not_specialize,
                                          not p.do_not_specialize_on_alignment)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = v
        elif isinstance(attr, str):
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    return signature, constexprs, attrs


def _key(fn, signature, constexprs, attrs, num_warps, num_stages):
    return (fn.__name__, tuple(sorted(signature.items())), tuple(sorted((k, repr(v)) for k, v in constexprs.items())),
            tuple(sorted((k, repr(v)) for k, v in attrs.items())), num_warps, num_stages)


def compile_variant(fn, signature, constexprs, attrs, num_warps, num_stages):
    k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    return analyse(k, num_warps, num_stages)


def _run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def analyse(k, num_warps, num_stages):
    with tempfile.TemporaryDirectory() as d:
        cubin, ptx = os.path.join(d, "k.cubin"), os.path.join(d, "k.ptx")
        open(cubin, "wb").write(k.asm["cubin"])
        open(ptx, "w").write(k.asm["ptx"])
        res = _run([os.path.join(BIN, "cuobjdump"), "-res-usage", cubin]).stdout
        sass = _run([os.path.join(BIN, "cuobjdump"), "-sass", cubin]).stdout
        arch = re.search(r"\.target\s+(sm_\w+)", k.asm["ptx"]).group(1)
        pv = _run([os.path.join(BIN, "ptxas"), f"--gpu-name={arch}", "-v", "-o", os.path.join(d, "o.cubin"), ptx])
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    regs, stack = (int(m.group(1)), int(m.group(2))) if m else (-1, -1)
    spill = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", pv.stderr + pv.stdout))
    ops = collections.Counter()
    for line in sass.splitlines():
        mm = re.search(r"\b(HGMMA|HMMA|UTMALDG|UBLKCP|LDGSTS|LDG|STL|LDL|DFMA|FFMA)\b", line)
        if mm:
            ops[mm.group(1)] += 1
    mma = "HGMMA" if ops["HGMMA"] else ("HMMA" if ops["HMMA"] else ("DFMA" if ops["DFMA"] else "none"))
    loads = "+".join(n for n, c in (("TMA", ops["UTMALDG"] + ops["UBLKCP"]), ("cp.async", ops["LDGSTS"]),
                                     ("plain", ops["LDG"])) if c) or "none"
    return dict(regs=regs, stack=stack, spill_bytes=spill + (stack if ops["STL"] else 0), smem=k.metadata.shared,
                mma=mma, mma_count=ops["HGMMA"] or ops["HMMA"], loads=loads, ldg=ops["LDG"], ldgsts=ops["LDGSTS"],
                tma=ops["UTMALDG"], drains=drains_per_tile(k.asm["ttgir"]), num_warps=num_warps,
                num_stages=num_stages)


def drains_per_tile(ttgir):
    """Full pipeline drains per output tile: waits for zero outstanding wgmma groups or async
    copies (pendings = 0 / num = 0) in the Triton GPU IR, adjacent ones counted as one drain,
    each weighted by the trip counts of the enclosing loops whose bounds are constants. In a
    persistent kernel (a loop with runtime bounds over the tiles) only the waits inside that loop
    count: the ones after it run once per program, not per tile."""
    consts = dict(re.findall(r"(%[\w.#]+) = arith\.constant (-?\d+) : i(?:32|64)", ttgir))
    stack = []  # per open region: (trip count, runtime-bounded loop?)
    inside, outside, last = 0, 0, None
    persistent = False
    for i, line in enumerate(ttgir.splitlines()):
        s = line.strip()
        if s.startswith("}"):
            if stack:
                stack.pop()
            if s.endswith("{"):  # } else {
                stack.append((1, False))
            continue
        if re.search(r"warp_group_dot_wait .*pendings = 0\b", s) or re.search(r"async_wait .*num = 0\b", s):
            here = (len(stack), tuple(stack))
            if last is None or last[1] != here or i - last[0] > 3:  # not the twin of the wait just before
                w = math.prod(t for t, _ in stack) if stack else 1
                if any(rt for _, rt in stack):
                    inside += w
                else:
                    outside += w
            last = (i, here)
            continue
        if s.endswith("{"):
            m = re.search(r"scf\.for %[\w.#]+ = (%[\w.#]+) to (%[\w.#]+) step (%[\w.#]+)", s)
            trips, runtime = 1, False
            if m:
                lb, ub, st = (consts.get(v) for v in m.groups())
                if None not in (lb, ub, st):
                    trips = max(0, -(-(int(ub) - int(lb)) // int(st)))
                else:
                    runtime = persistent = True
            stack.append((trips, runtime))
    return inside if persistent else outside


# --- estimate -----------------------------------------------------------------------------------
def estimate(L, batch, mode, dtype_bytes, launch, cfg_kw, info):
    b = launch.bound()
    v = dict(b, **cfg_kw)
    BM, BN = v.get("BLOCK_M", 128), v.get("BLOCK_N", 128)
    BC = v.get("BLOCK_C", 64)
    M = batch * L.P * L.P
    K, C, RS = L.K, L.C, L.R * L.R
    split = v.get("SPLIT_K", 1) or 1
    tiles_m, tiles_n = math.ceil(M / BM), math.ceil(K / BN)
    PP = (L.P - 1) // 2 + 1  # (the pooled output, POOL)
    if v.get("POOL"):
        tr, tc = tk.pool_tile(BM)
        tiles_m = batch * math.ceil(PP / (tr // 2 - 1)) * math.ceil(PP / (tc // 2 - 1))
    red = RS * math.ceil(C / BC) * BC if not v.get("PACKED") else math.ceil(RS * C / BC) * BC
    flops = 2.0 * tiles_m * BM * tiles_n * BN * red
    # residency: CTAs per SM limited by shared memory and registers
    threads = 32 * info["num_warps"]
    per_sm = max(1, min(SMEM_PER_SM // max(info["smem"], 1), REGS_PER_SM // max(info["regs"] * threads, 1), 32))
    tiles = tiles_m * tiles_n * split
    slots = SMS * per_sm
    waves = math.ceil(tiles / slots)
    wave_eff = tiles / (waves * slots)
    # DRAM bytes: grouped order keeps a group's A tiles in L2 while its N tiles run
    a_bytes = batch * L.H * L.H * C * dtype_bytes
    group_m = v.get("GROUP_M", 0)
    if group_m and group_m * BM * C * RS * dtype_bytes <= L2_BYTES // 2 or tiles_n == 1:
        a_reads = 1
    else:
        a_reads = tiles_n if a_bytes > L2_BYTES // 2 else 1
    w_bytes = K * C * RS * dtype_bytes
    out_bytes = M * K * dtype_bytes * (1 + (1 if (mode == "eval" and L.residual) else 0))
    if v.get("POOL"):
        out_bytes = batch * PP * PP * K * dtype_bytes
    stats = (2 * tiles_m * K * 4) if mode == "train" else 0
    split_bytes = (2 * split * M * K * 4) if split > 1 else 0
    bytes_ = a_bytes * a_reads + w_bytes + out_bytes + stats + split_bytes
    t_c, t_m = flops / PEAK_FLOPS, bytes_ / PEAK_BYTES
    fill = waves * info["drains"] * DRAIN_US * 1e-6
    t = max(t_c, t_m) / max(wave_eff, 1e-9) + fill
    return dict(tiles=tiles, waves=waves, wave_eff=round(wave_eff, 3), a_reads=a_reads, gflop_padded=flops / 1e9,
                mbytes=bytes_ / 1e6, est_us=t * 1e6, compute_us=t_c * 1e6, memory_us=t_m * 1e6, fill_us=fill * 1e6)


# --- main ----------------------------------------------------------------------------------------
def floor_us(L, batch, dtype_bytes, mode="eval"):
    """The layer's floor (docs/perf.md): FLOPs at 790 TFLOP/s or its fewest bytes at 3.0 TB/s. In
    training the conv kernel reads no residual (the normalisation pass adds it)."""
    nbytes = L.min_bytes(batch, dtype_bytes)
    if _pooled(L):  # the input once, the pooled output once
        PP = (L.P - 1) // 2 + 1
        nbytes = dtype_bytes * (batch * (L.C * L.H * L.H + L.K * PP * PP) + L.K * L.C * L.R * L.R)
    if mode == "train" and L.residual:
        nbytes -= batch * L.K * L.P * L.P * dtype_bytes
    return max(L.flops(batch) / PEAK_FLOPS, nbytes / PEAK_BYTES) * 1e6


def _compile_job(job):
    key, fn_name, sig, cx, attrs, nw, ns = job
    fn = getattr(tk, fn_name)  # (by name: the kernels pickle by reference)
    try:
        return key, compile_variant(fn, sig, cx, attrs, nw, ns), None
    except Exception as e:  # reported as a problem
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        return key, None, f"{type(e).__name__}: {str(cause)[:300]}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="256,1")
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--modes", default="eval,train")
    ap.add_argument("--quick", action="store_true", help="batch 256 only (CI)")
    ap.add_argument("--check", action="store_true", help="exit 1 if a bf16/fp16 variant spills or has no HGMMA")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--perf-md", default=None, help="rewrite the report table inside this markdown file")
    args = ap.parse_args(argv)
    batches = [256] if args.quick else [int(b) for b in args.batches.split(",")]
    layers = RESNET50
    # 1. every (layer, launch, config) and its specialization
    variants, jobs = [], {}
    for dname in args.dtypes.split(","):
        dt = DTYPES[dname]
        eb = torch.tensor([], dtype=dt).element_size()
        for batch in batches:
            for mode in args.modes.split(","):
                for L in layers + (pooled_layers(layers) if mode == "eval" else []):
                    for launch in launches_for(L, batch, mode, dt):
                        bound = launch.bound()
                        for cfg_kw, nw, ns, hook in launch.configs():
                            if hook is not None:  # e.g. the TMA descriptors' boxes follow the tile
                                hook({**bound, **cfg_kw})
                            sig, cx, attrs = specialize(launch.fn, bound, cfg_kw)
                            key = _key(launch.fn, sig, cx, attrs, nw, ns)
                            jobs.setdefault(key, (key, launch.fn.__name__, sig, cx, attrs, nw, ns))
                            variants.append((dname, eb, batch, mode, L, launch, dict(bound), cfg_kw, nw, ns, key))
    print(f"{len(variants)} variants, {len(jobs)} distinct kernels to compile ({args.jobs} in parallel)", flush=True)
    # 2. compile the distinct kernels
    results = {}
    if args.jobs > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("fork")) as ex:
            for i, (key, info, err) in enumerate(ex.map(_compile_job, jobs.values())):
                results[key] = (info, err)
    else:
        for job in jobs.values():
            key, info, err = _compile_job(job)
            results[key] = (info, err)
    # 3. rows, estimates, problems
    rows, problems = [], []
    for dname, eb, batch, mode, L, launch, bound, cfg_kw, nw, ns, key in variants:
        info, err = results[key]
        tag = f"{dname} b{batch} {mode} {L.name} {launch.fn.__name__} {cfg_kw} w{nw} s{ns}"
        if err:
            problems.append(f"COMPILE FAIL {tag}: {err}")
            continue
        is_conv = "w_ptr" in bound or "a_desc" in bound  # (not the split-K reduce: no MMA there)
        row = dict(dtype=dname, batch=batch, mode=mode, layer=L.name, kernel=launch.fn.__name__,
                   config=_cfg_str({**bound, **cfg_kw}, nw, ns), **info)
        if is_conv:
            row.update(estimate(L, batch, mode, eb, launch, cfg_kw, info))
            row["floor_us"] = floor_us(L, batch, eb, mode)
            if info["spill_bytes"] > 0:
                problems.append(f"SPILL {info['spill_bytes']} B: {tag}")
            if info["mma"] != "HGMMA":
                problems.append(f"NO HGMMA ({info['mma']}): {tag}")
        rows.append(row)
    if args.csv:
        cols = sorted({k for r in rows for k in r}, key=lambda c: (_COL_ORDER.index(c) if c in _COL_ORDER else 99, c))
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
    md = markdown(rows, layers + pooled_layers(layers))
    print(md)
    if args.perf_md:
        write_into(args.perf_md, md)
    for p in problems:
        print(p)
    print(f"{len(rows)} variants, {len(jobs)} distinct kernels, {len(problems)} problem(s); Triton "
          f"{triton.__version__}, sm_90")
    return 1 if (args.check and problems) else 0


_COL_ORDER = ["dtype", "batch", "mode", "layer", "kernel", "config", "regs", "spill_bytes", "smem", "mma", "mma_count",
              "loads", "drains", "tiles", "waves", "wave_eff", "est_us", "floor_us"]


def _cfg_str(kw, nw, ns):
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_C", "SPLIT_K", "GROUP_M")
    tile = "x".join(str(kw[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_C") if k in kw)
    extra = " ".join(f"{k.lower()}={kw[k]}" for k in keys[3:] if k in kw and kw[k] not in (None, 1, 0))
    return f"{tile} w{nw} s{ns}" + (f" {extra}" if extra else "")


def markdown(rows, layers):
    """Per dtype x batch x mode x layer: the variants of the conv kernels (range over configs)."""
    conv = [r for r in rows if "est_us" in r]
    lines = ["| dtype | batch | mode | layer | kernel | configs | regs | spill B | smem KB | MMA | loads | drains/tile "
             "| est µs (best config) | floor µs |", "|" + "---|" * 14]
    groups = collections.OrderedDict()
    for r in conv:
        groups.setdefault((r["dtype"], r["batch"], r["mode"], r["layer"], r["kernel"]), []).append(r)
    totals = collections.defaultdict(lambda: [0.0, 0.0])
    counts = {L.name: L.count for L in layers}
    for (dname, batch, mode, layer, kernel), rs in groups.items():
        best = min(rs, key=lambda r: r["est_us"])
        rng = lambda k: f"{min(r[k] for r in rs)}" + (f"-{max(r[k] for r in rs)}" if len({r[k] for r in rs}) > 1 else "")  # noqa: E731
        lines.append(f"| {dname} | {batch} | {mode} | {layer} | {kernel} | {len(rs)} | {rng('regs')} | "
                     f"{rng('spill_bytes')} | {round(max(r['smem'] for r in rs) / 1024)} | "
                     f"{'/'.join(sorted({r['mma'] for r in rs}))} | {'/'.join(sorted({r['loads'] for r in rs}))} | "
                     f"{rng('drains')} | {best['est_us']:.1f} ({best['config']}) | {best['floor_us']:.1f} |")
        t = totals[(dname, batch, mode)]
        t[0] += best["est_us"] * counts[layer]
        t[1] += best["floor_us"] * counts[layer]
    lines.append("")
    lines.append("| dtype | batch | mode | sum of estimates x count (ms) | sum of floors (ms) | ratio |")
    lines.append("|---|---|---|---|---|---|")
    for (dname, batch, mode), (e, f) in totals.items():
        lines.append(f"| {dname} | {batch} | {mode} | {e / 1e3:.2f} | {f / 1e3:.2f} | {e / f:.2f}x |")
    return "\n".join(lines)


BEGIN, END = "<!-- kernel-report:begin -->", "<!-- kernel-report:end -->"


def write_into(path, md):
    text = open(path).read()
    block = f"{BEGIN}\n{md}\n{END}"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    open(path, "w").write(text)


if __name__ == "__main__":
    sys.exit(main())
