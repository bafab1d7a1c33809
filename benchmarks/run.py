#!/usr/bin/env python
"""resnet_fused benchmark suite: whole models and single operators against eager PyTorch
and torch.compile.

  python benchmarks/run.py                        # GPU: ResNet-50 bf16, infer + train, the default grid
  python benchmarks/run.py --models resnet18,resnet50 --batches 1,64,256 --modes infer
  python benchmarks/run.py --device cpu --smoke   # no GPU: tiny CPU comparison (reference backend vs eager)

Every implementation starts from the same weights, is checked against eager before it is
timed (a wrong one is reported as failed and never timed), is warmed up, and is timed with
CUDA events per iteration; the median, p20 and p80 are reported with img/s and peak memory.
``fused-auto`` is the product's default (per-layer choice between the backends); its choice per
layer is printed and written as explain_<model>_<mode>_<dtype>_b<batch>.csv. Optional variants:
``compile-max`` (max-autotune), ``*-graph`` (inference replayed from a CUDA graph through
``resnet_fused.capture``), ``*-ro`` (``torch.compile(mode="reduce-overhead")`` of the eager or
the fused model: CUDA graphs for training steps too, so the host's time per step disappears).

Operator rows (``--no-ops`` skips them) time every ResNet-50 conv layer as eager conv + BN
(+ residual) + ReLU, the conv alone (``conv-only``: cuDNN) and ``conv_bn_relu`` per backend. On
a GPU their ms_* are GPU time from CUDA-graph replay (``timing`` = graph; host time excluded, so
a layer's Python path does not hide its kernels), with the per-call time beside them
(``call_ms_median``).

Each run writes its CSVs, a markdown summary and PNG plots into a fresh folder
benchmarks/out/<time>-<device>/ (or --out DIR) and prints the path. Only --record appends the
rows to the committed benchmarks/results/{models,ops}.csv (never the CPU smoke rows).
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from layers import RESNET50, SMOKE  # noqa: E402

import resnet_fused  # noqa: E402
from resnet_fused.functional import conv_bn_relu  # noqa: E402

MODEL_COLUMNS = ["timestamp", "commit", "device", "torch", "triton", "model", "mode", "dtype", "batch", "impl",
                 "img_per_s", "ms_median", "ms_p20", "ms_p80", "peak_mem_mb"]
OP_COLUMNS = ["timestamp", "commit", "device", "torch", "triton", "layer", "op", "mode", "dtype", "batch", "impl",
              "ms_median", "ms_p20", "ms_p80", "tflops", "gbps", "peak_tflops", "peak_gbps", "timing",
              "call_ms_median"]
# Op rows, ``timing``: "graph" = GPU time per call from CUDA-graph replay (host time excluded;
# ms_* and the rates are that), "call" = one eager call between two events (host included:
# what an eager caller waits, and an upper bound on the GPU's time). ``call_ms_median`` is the
# call time in both cases. Rows recorded before the column existed are "call".
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPU_IMPLS = ["eager", "eager-cl", "compile", "fused-triton", "fused-cuda", "fused-auto"]
OPTIONAL_IMPLS = ["compile-max", "eager-cl-graph", "fused-triton-graph", "fused-cuda-graph", "fused-auto-graph",
                  # torch.compile(mode="reduce-overhead"): CUDA graphs for training steps too (host time gone)
                  "compile-ro", "fused-triton-ro", "fused-cuda-ro", "fused-auto-ro",
                  # training with every conv output kept (resnet_fused.set_recompute("none")): the default
                  # recomputes the 1x1 expansions' outputs in the backward (less memory, one more conv each)
                  "fused-triton-keepz", "fused-cuda-keepz", "fused-auto-keepz"]
CPU_IMPLS = ["eager", "eager-cl", "fused-reference", "fused-auto"]
# Op rows besides the fused backends: eager conv + BN (+ residual) + ReLU, and the conv alone
OP_BASE_IMPLS = ["eager", "conv-only"]
NONE = "–"  # a cell with no value


# --- environment ------------------------------------------------------------------------------
def environment(device):
    # RESNET_FUSED_COMMIT: for a copy of the tree without .git (the GPU machine gets one)
    commit = os.environ.get("RESNET_FUSED_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                    text=True, timeout=10).stdout.strip() or "unknown"
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            if dirty:
                commit += "-dirty"
        except (OSError, subprocess.SubprocessError):
            commit = "unknown"
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = "none"
    name = torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or platform.machine())
    return dict(timestamp=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), commit=commit,
                device=name, torch=torch.__version__, triton=triton_v)


# --- timing -----------------------------------------------------------------------------------
def time_fn(fn, device, warmup, iters, min_time=0.0):
    """Per-iteration times in ms (CUDA events on the GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = time.perf_counter()
        while len(times) < iters or (time.perf_counter() - start < min_time and len(times) < 10 * iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_graph(fn, iters, calls=10):
    """GPU time per call in ms, host time excluded: ``calls`` calls of ``fn`` captured into one
    CUDA graph (after a warm-up on a side stream, as capture needs), the graph replayed
    ``iters`` times between CUDA events. Returns (times, None), or (None, reason) where the
    calls cannot be captured (then the caller keeps the per-call timing)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            for _ in range(calls):
                fn()
    except Exception as e:  # noqa: BLE001  (uncapturable: a host sync, an allocation outside the pool, ...)
        torch.cuda.synchronize()
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    del g
    return times, None


def time_op(step, device, args, what):
    """An op row's times: (times, timing, per-call median). On a GPU the times are GPU time from
    graph replay (timing "graph"), or the per-call times where the step cannot be captured."""
    times = time_fn(step, device, args.warmup, args.op_iters)
    call_med = quantiles(times)[0]
    if device.type == "cuda":
        gtimes, why = time_graph(step, args.op_iters)
        if gtimes is not None:
            return gtimes, "graph", call_med
        print(f"\nop {what}: not capturable ({why}); timed per call, host included")
    return times, "call", call_med


def quantiles(times):
    s = sorted(times)
    q = lambda p: s[min(len(s) - 1, max(0, round(p * (len(s) - 1))))]  # noqa: E731
    return statistics.median(s), q(0.2), q(0.8)


# --- implementations ----------------------------------------------------------------------------
def build(impl, base, device, dtype, mode, example):
    """A callable running one step of ``impl`` on a copy of ``base``; returns (step, model)."""
    import torchvision  # noqa: F401

    m = copy.deepcopy(base).to(device)
    cl = impl not in ("eager",)
    if cl:
        m = m.to(memory_format=torch.channels_last)
    ro = impl.endswith("-ro")  # torch.compile(mode="reduce-overhead") of the model (eager or fused)
    backend = None
    if impl.startswith("fused-"):
        backend = impl.split("-")[1]
        resnet_fused.fuse(m)
    autocast = dtype != torch.float32
    if mode == "infer":
        m.eval()
    else:
        m.train()
    fwd = m
    if impl in ("compile", "compile-max"):
        fwd = torch.compile(m, mode="max-autotune" if impl == "compile-max" else None)
    elif ro:
        fwd = torch.compile(m, mode="reduce-overhead")
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) if mode == "train" else None
    x = example.to(device)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (x.shape[0],), device=device, generator=None)

    def run_fwd(inp):
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            return fwd(inp)

    mark = torch.compiler.cudagraph_mark_step_begin if ro else (lambda: None)
    if mode == "infer":
        def step():
            mark()
            with torch.inference_mode():
                return run_fwd(x)
    else:
        def step():
            mark()  # a new step: the graphs' previous outputs may be overwritten
            opt.zero_grad(set_to_none=True)
            out = run_fwd(x)
            loss = F.cross_entropy(out.float(), target)
            loss.backward()
            opt.step()
            return loss

    if impl.endswith("-graph"):
        if device.type != "cuda" or mode != "infer":
            raise ValueError("CUDA-graph variants are for inference on a GPU")

        def model_call(inp):
            with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                return fwd(inp)

        with torch.inference_mode():
            replay = resnet_fused.capture(model_call, x)
        step = lambda: replay(x)  # noqa: E731

    if backend is None:
        return step, m

    policy = "none" if impl.endswith("-keepz") else resnet_fused.get_recompute()

    def fused_step():
        with resnet_fused.use_backend(backend), resnet_fused.use_recompute(policy):
            return step()

    return fused_step, m


def check(impl, step, ref_out, mode, dtype):
    """Correctness guard against eager: logits (infer) or the first loss (train)."""
    out = step()
    out = out.float()
    ref = ref_out.float()
    if mode == "infer":
        err = ((out - ref).abs().max() / (ref.abs().max() + 1e-6)).item()
        tol = 2e-2 if dtype == torch.float32 else 8e-2
    else:
        err = abs(out.item() - ref.item()) / (abs(ref.item()) + 1e-6)
        tol = 2e-2
    if not (err <= tol):  # NaN fails too
        return f"failed: {err:.3g} relative error vs eager (tolerance {tol})"
    return "ok"


def explain_model(m, example, device, dtype, mode):
    """resnet_fused.explain on a built (fused, auto) model, in its mode and dtype."""
    x = example.to(device).to(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        return resnet_fused.explain(m, x)


def bench_models(args, device, env, out_rows, progress, explains=None):
    import torchvision

    impls = args.impls
    for model_name in args.models:
        torch.manual_seed(0)
        base = getattr(torchvision.models, model_name)(num_classes=1000)
        for mode in args.modes:
            for dname in args.dtypes:
                dtype = DTYPES[dname]
                for batch in args.batches:
                    if mode == "train" and batch < 2:
                        continue
                    example = torch.randn(batch, 3, args.size, args.size)
                    torch.manual_seed(1)
                    ref_step, _ = build("eager", base, device, dtype, mode, example)
                    ref_out = ref_step()
                    ref_out = ref_out.detach().clone() if isinstance(ref_out, torch.Tensor) else ref_out
                    for impl in impls:
                        progress.set_description(f"{model_name} {mode} {dname} b{batch} {impl}")
                        row = dict(env, model=model_name, mode=mode, dtype=dname, batch=batch, impl=impl)
                        step = _m = None
                        try:
                            torch.manual_seed(1)
                            step, _m = build(impl, base, device, dtype, mode, example)
                            status = check(impl, step, ref_out, mode, dtype)
                        except Exception as e:  # an implementation that cannot run is reported, not timed
                            status = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
                        if status == "ok":
                            if device.type == "cuda":
                                torch.cuda.synchronize()
                                torch.cuda.reset_peak_memory_stats()
                            times = time_fn(step, device, args.warmup, args.iters, args.min_time)
                            med, p20, p80 = quantiles(times)
                            peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
                            row.update(img_per_s=round(batch / (med / 1e3), 1), ms_median=round(med, 4),
                                       ms_p20=round(p20, 4), ms_p80=round(p80, 4), peak_mem_mb=round(peak, 1) if peak is not None else None)
                        row["status"] = status
                        out_rows.append(row)
                        progress.update(1)
                        if impl == "fused-auto" and status == "ok" and explains is not None:
                            explains.append((f"{model_name}_{mode}_{dname}_b{batch}",
                                             explain_model(_m, example, device, dtype, mode)))
                        del step
                        if device.type == "cuda":
                            torch.cuda.empty_cache()


# --- operators ----------------------------------------------------------------------------------
def _r1(v):
    return round(v, 1) if v is not None else None


def measured_peaks(device, dtype):
    """The device's matmul rate (TFLOP/s) and copy bandwidth (GB/s, read + write), measured now."""
    if device.type != "cuda":
        return None, None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = statistics.median(time_fn(lambda: a @ b, device, 3, 10))
    tflops = 2 * n ** 3 / (t / 1e3) / 1e12
    src = torch.randn(2 ** 28, device=device, dtype=torch.float32) * 0 + 1  # 1 GiB of non-zero data
    dst = torch.empty_like(src)
    t = statistics.median(time_fn(lambda: dst.copy_(src), device, 3, 10))
    gbps = 2 * src.numel() * 4 / (t / 1e3) / 1e9
    del a, b, src, dst
    return tflops, gbps


def bench_ops(args, device, env, rows, progress):
    layers = SMOKE if args.smoke else RESNET50
    batch = args.op_batch
    backends = ["reference"] if device.type != "cuda" else [b for b in ("triton", "cuda")
                                                              if b in resnet_fused.available_backends()]
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        peak_tf, peak_gb = measured_peaks(device, dtype)
        elem = torch.tensor([], dtype=dtype).element_size()
        for L in layers:
            g = torch.Generator(device="cpu").manual_seed(0)
            x = torch.randn(batch, L.C, L.H, L.H, generator=g).to(device, dtype).to(memory_format=torch.channels_last)
            w = (torch.randn(L.K, L.C, L.R, L.R, generator=g) * (L.C * L.R * L.R) ** -0.5).to(device, dtype)
            w = w.to(memory_format=torch.channels_last)
            gamma = torch.rand(L.K, generator=g).add(0.5).to(device)
            beta = torch.randn(L.K, generator=g).to(device)
            rm, rv = torch.zeros(L.K, device=device), torch.ones(L.K, device=device)
            res = (torch.randn(batch, L.K, L.P, L.P, generator=g).to(device, dtype)
                   .to(memory_format=torch.channels_last) if L.residual else None)
            conv = dict(stride=L.stride, padding=L.padding)

            def eager(training):
                y = F.batch_norm(F.conv2d(x, w, None, **conv), rm, rv, gamma, beta, training, 0.1, 1e-5)
                if res is not None:
                    y = y + res
                return torch.relu(y) if L.relu else y

            def ours(training):
                return conv_bn_relu(x, w, gamma, beta, rm, rv, training=training, residual=res, relu=L.relu, **conv)

            def conv_only(training):  # the convolution alone (cuDNN on a GPU): what fusing adds to it
                return F.conv2d(x, w, None, **conv)

            for mode in ("eval", "train", "train-fwd-bwd"):
                training = mode != "eval"
                for impl in OP_BASE_IMPLS + [f"fused-{b}" for b in backends]:
                    progress.set_description(f"op {L.name} {mode} {impl}")
                    fn = {"eager": eager, "conv-only": conv_only}.get(impl, ours)
                    ctx = resnet_fused.use_backend(impl.split("-")[1]) if impl.startswith("fused-") else _null()
                    with ctx:
                        if mode == "train-fwd-bwd":
                            xs = [x, w]
                            for t in xs:
                                t.requires_grad_(True)
                            gout = None

                            def step(fn=fn):
                                nonlocal gout
                                y = fn(True)
                                if gout is None:
                                    gout = torch.randn_like(y)
                                torch.autograd.grad(y, xs, gout)
                        else:
                            for t in (x, w):
                                t.requires_grad_(False)

                            def step(fn=fn, training=training):
                                with torch.no_grad():
                                    return fn(training)
                        status = "ok"
                        if impl.startswith("fused-") and mode != "train-fwd-bwd":
                            with torch.no_grad():
                                ref, got = eager(training).float(), fn(training).float()
                            err = ((ref - got).abs().max() / (ref.abs().max() + 1e-6)).item()
                            if not err <= (2e-2 if dtype == torch.float32 else 8e-2):
                                status = f"failed: {err:.3g} relative error vs eager"
                        row = dict(env, layer=L.name, op="conv_bn_relu", mode=mode, dtype=dname, batch=batch, impl=impl,
                                   status=status, peak_tflops=_r1(peak_tf), peak_gbps=_r1(peak_gb))
                        if status == "ok":
                            try:
                                times, timing, call_med = time_op(step, device, args, f"{L.name} {mode} {impl}")
                                med, p20, p80 = quantiles(times)
                                mult = 3 if mode == "train-fwd-bwd" else 1
                                row.update(ms_median=round(med, 4), ms_p20=round(p20, 4), ms_p80=round(p80, 4),
                                           tflops=round(mult * L.flops(batch) / (med / 1e3) / 1e12, 2),
                                           gbps=round(L.min_bytes(batch, elem) / (med / 1e3) / 1e9, 1),
                                           timing=timing, call_ms_median=round(call_med, 4))
                            except Exception as e:
                                row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
                        rows.append(row)
                        progress.update(1)
            for t in (x, w):
                t.requires_grad_(False)
            if L.residual:
                _bench_add_relu(args, device, env, rows, progress, L, batch, dtype, dname, backends, peak_tf, peak_gb)
            if "stem" in L.name:
                _bench_stem_maxpool(args, device, env, rows, progress, L, x, w, gamma, beta, rm, rv, batch, dtype, dname,
                                    backends, peak_tf, peak_gb)
                _bench_max_pool(args, device, env, rows, progress, L, batch, dtype, dname, backends, peak_tf, peak_gb)
                _bench_stem_conv_padded(args, device, env, rows, progress, L, x, w, batch, dtype, dname, peak_tf,
                                        peak_gb)


def _bench_stem_maxpool(args, device, env, rows, progress, L, x, w, gamma, beta, rm, rv, batch, dtype, dname, backends,
                        peak_tf, peak_gb):
    """The stem and its max-pool in inference (docs/perf.md lead 4): eager conv + BN + ReLU +
    max_pool2d against conv_affine_act_maxpool (BatchNorm folded; Triton pools in the conv's
    epilogue, the CUDA backend runs cuDNN's conv and then our pool kernel). Bytes: the input read
    and the pooled output written once."""
    from resnet_fused.ops.conv_bn_relu.inference import conv_affine_act_maxpool, fold_bn

    conv = dict(stride=L.stride, padding=L.padding)
    wf, bias = fold_bn(w, gamma, beta, rm, rv, 1e-5, dtype)
    PP = (L.P - 1) // 2 + 1
    elem = x.element_size()
    nbytes = elem * (batch * (L.C * L.H * L.H + L.K * PP * PP) + L.K * L.C * L.R * L.R)

    def eager():
        y = F.batch_norm(F.conv2d(x, w, None, **conv), rm, rv, gamma, beta, False, 0.1, 1e-5)
        return F.max_pool2d(torch.relu(y), 3, 2, 1)

    def ours():
        return conv_affine_act_maxpool(x, wf, None, bias, (L.stride,) * 2, (L.padding,) * 2, (1, 1), 1, True)

    for impl in ["eager"] + [f"fused-{b}" for b in backends]:
        progress.set_description(f"op {L.name} +maxpool eval {impl}")
        fn = eager if impl == "eager" else ours
        ctx = resnet_fused.use_backend(impl.split("-")[1]) if impl != "eager" else _null()
        with ctx, torch.no_grad():
            status = "ok"
            if impl != "eager":
                ref, got = eager().float(), fn().float()
                err = ((ref - got).abs().max() / (ref.abs().max() + 1e-6)).item()
                if not err <= (2e-2 if dtype == torch.float32 else 8e-2):
                    status = f"failed: {err:.3g} relative error vs eager"
            row = dict(env, layer=f"{L.name} +maxpool", op="conv_bn_relu_maxpool", mode="eval", dtype=dname,
                       batch=batch, impl=impl, status=status, peak_tflops=_r1(peak_tf), peak_gbps=_r1(peak_gb))
            if status == "ok":
                try:
                    times, timing, call_med = time_op(fn, device, args, f"{L.name} +maxpool eval {impl}")
                    med, p20, p80 = quantiles(times)
                    row.update(ms_median=round(med, 4), ms_p20=round(p20, 4), ms_p80=round(p80, 4),
                               tflops=round(L.flops(batch) / (med / 1e3) / 1e12, 2),
                               gbps=round(nbytes / (med / 1e3) / 1e9, 1), timing=timing,
                               call_ms_median=round(call_med, 4))
                except Exception as e:
                    row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            rows.append(row)
            progress.update(1)


def _bench_stem_conv_padded(args, device, env, rows, progress, L, x, w, batch, dtype, dname, peak_tf, peak_gb):
    """An experiment for the CUDA backend's stem (docs/perf.md lead 17): cuDNN's conv of the
    3-channel channels_last input against the same conv with input and weight padded to 4 and to 8
    channels (zeros: the same result), as MLPerf-style stems do, forward and forward + weight
    gradient (the stem's input needs no gradient). The padding's own copy is outside the timing."""
    conv = dict(stride=L.stride, padding=L.padding)
    elem = x.element_size()
    for mode in ("fwd", "fwd-wgrad"):
        for cp in (L.C, 4, 8):
            impl = "conv-only" if cp == L.C else f"conv-only-c{cp}"
            progress.set_description(f"op stem conv {mode} {impl}")
            xp = F.pad(x, (0, 0, 0, 0, 0, cp - L.C)).contiguous(memory_format=torch.channels_last)
            wp = F.pad(w, (0, 0, 0, 0, 0, cp - L.C)).contiguous(memory_format=torch.channels_last)
            status = "ok"
            with torch.no_grad():
                ref = F.conv2d(x, w, None, **conv).float()
                err = ((F.conv2d(xp, wp, None, **conv).float() - ref).abs().max() / (ref.abs().max() + 1e-6)).item()
            if not err <= 1e-2:
                status = f"failed: {err:.3g} relative error vs the unpadded conv"
            if mode == "fwd-wgrad":
                wq = wp.detach().requires_grad_()
                go = torch.randn_like(ref).to(dtype).contiguous(memory_format=torch.channels_last)
                def step(xp=xp, wq=wq, go=go):
                    return torch.autograd.grad(F.conv2d(xp, wq, None, **conv), (wq,), go)
            else:
                step = lambda xp=xp, wp=wp: F.conv2d(xp, wp, None, **conv)  # noqa: E731
            row = dict(env, layer=L.name, op="conv", mode=mode, dtype=dname, batch=batch, impl=impl, status=status,
                       peak_tflops=_r1(peak_tf), peak_gbps=_r1(peak_gb))
            if status == "ok":
                times, timing, call_med = time_op(step, device, args, f"stem conv {mode} {impl}")
                med, p20, p80 = quantiles(times)
                mult = 2 if mode == "fwd-wgrad" else 1
                moved = elem * (batch * (L.C * L.H * L.H + L.K * L.P * L.P) + L.K * L.C * L.R * L.R)
                row.update(ms_median=round(med, 4), ms_p20=round(p20, 4), ms_p80=round(p80, 4),
                           tflops=round(mult * L.flops(batch) / (med / 1e3) / 1e12, 2),
                           gbps=round(mult * moved / (med / 1e3) / 1e9, 1), timing=timing,
                           call_ms_median=round(call_med, 4))
            rows.append(row)
            progress.update(1)


def _bench_max_pool(args, device, env, rows, progress, L, batch, dtype, dname, backends, peak_tf, peak_gb):
    """The stem's pool in training (docs/perf.md lead 16): F.max_pool2d (int64 indices; its backward
    zero-fills and scatters) against functional.max_pool2d (one-byte window positions; a gathering
    backward), on the stem's ReLU output. Bytes: the input read and the output written once (and in
    the backward the output's gradient read and the input's written once)."""
    from resnet_fused.functional import max_pool2d

    g = torch.Generator(device="cpu").manual_seed(1)
    a = torch.randn(batch, L.K, L.P, L.P, generator=g).relu().to(device, dtype).to(memory_format=torch.channels_last)
    PP = (L.P - 1) // 2 + 1
    nbytes = a.element_size() * batch * L.K * (L.P * L.P + PP * PP)
    for mode in ("fwd", "fwd-bwd"):
        for impl in ["eager"] + [f"fused-{k}" for k in backends]:
            progress.set_description(f"op max_pool2d {L.name} {mode} {impl}")
            fn = (lambda t: F.max_pool2d(t, 3, 2, 1)) if impl == "eager" else (lambda t: max_pool2d(t, 3, 2, 1))
            ctx = resnet_fused.use_backend(impl.split("-")[1]) if impl != "eager" else _null()
            with ctx:
                if mode == "fwd-bwd":
                    pa = a.detach().requires_grad_()
                    go = torch.randn(batch, L.K, PP, PP, device=device, dtype=dtype)
                    go = go.to(memory_format=torch.channels_last)
                    step = lambda fn=fn, pa=pa, go=go: torch.autograd.grad(fn(pa), (pa,), go)  # noqa: E731
                else:
                    step = lambda fn=fn: fn(a)  # noqa: E731
                status = "ok"
                if impl != "eager":
                    pa_, pb_ = a.detach().requires_grad_(), a.detach().requires_grad_()
                    go_ = torch.randn(batch, L.K, PP, PP, device=device, dtype=dtype)
                    ours_, ref_ = fn(pa_), F.max_pool2d(pb_, 3, 2, 1)
                    if not torch.equal(ours_, ref_):
                        status = "failed: differs from F.max_pool2d"
                    else:
                        (g1,), (g2,) = torch.autograd.grad(ours_, (pa_,), go_), torch.autograd.grad(ref_, (pb_,), go_)
                        err = ((g1.float() - g2.float()).abs().max() / (g2.float().abs().max() + 1e-6)).item()
                        if not err <= 1e-2:
                            status = f"failed: gradient {err:.3g} relative error vs F.max_pool2d"
                row = dict(env, layer=f"{L.name} pool", op="max_pool2d", mode=mode, dtype=dname, batch=batch,
                           impl=impl, status=status, peak_tflops=_r1(peak_tf), peak_gbps=_r1(peak_gb))
                if status == "ok":
                    times, timing, call_med = time_op(step, device, args, f"max_pool2d {L.name} {mode} {impl}")
                    med, p20, p80 = quantiles(times)
                    moved = nbytes * (2 if mode == "fwd-bwd" else 1)
                    row.update(ms_median=round(med, 4), ms_p20=round(p20, 4), ms_p80=round(p80, 4), tflops=0.0,
                               gbps=round(moved / (med / 1e3) / 1e9, 1), timing=timing,
                               call_ms_median=round(call_med, 4))
                rows.append(row)
                progress.update(1)


def _bench_add_relu(args, device, env, rows, progress, L, batch, dtype, dname, backends, peak_tf, peak_gb):
    """add_relu against torch.relu(a + b) on a block output's shape (3 passes vs 5)."""
    from resnet_fused.functional import add_relu

    shape = (batch, L.K, L.P, L.P)
    a = torch.randn(shape, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    b = torch.randn_like(a)
    nbytes = 3 * a.numel() * a.element_size()
    for mode in ("fwd", "fwd-bwd"):
        for impl in ["eager"] + [f"fused-{k}" for k in backends]:
            progress.set_description(f"op add_relu {L.name} {mode} {impl}")
            fn = (lambda p, q: torch.relu(p + q)) if impl == "eager" else add_relu
            ctx = resnet_fused.use_backend(impl.split("-")[1]) if impl != "eager" else _null()
            with ctx:
                if mode == "fwd-bwd":
                    pa, pb = a.detach().requires_grad_(), b.detach().requires_grad_()
                    g = torch.randn_like(a)
                    step = lambda fn=fn, pa=pa, pb=pb, g=g: torch.autograd.grad(fn(pa, pb), (pa, pb), g)  # noqa: E731
                else:
                    step = lambda fn=fn: fn(a, b)  # noqa: E731
                status = "ok"
                if impl != "eager" and not torch.equal(fn(a, b), torch.relu(a + b)):
                    status = "failed: differs from torch.relu(a + b)"
                row = dict(env, layer=f"{L.name} output", op="add_relu", mode=mode, dtype=dname, batch=batch,
                           impl=impl, status=status, peak_tflops=_r1(peak_tf), peak_gbps=_r1(peak_gb))
                if status == "ok":
                    times, timing, call_med = time_op(step, device, args, f"add_relu {L.name} {mode} {impl}")
                    med, p20, p80 = quantiles(times)
                    moved = nbytes * (2 if mode == "fwd-bwd" else 1)  # backward: read grad and out, write grad
                    row.update(ms_median=round(med, 4), ms_p20=round(p20, 4), ms_p80=round(p80, 4), tflops=0.0,
                               gbps=round(moved / (med / 1e3) / 1e9, 1), timing=timing,
                               call_ms_median=round(call_med, 4))
                rows.append(row)
                progress.update(1)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# --- output -------------------------------------------------------------------------------------
def append_csv(path, columns, rows):
    rows = [r for r in rows if r.get("status") == "ok"]
    if not rows:
        return
    new = not os.path.exists(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not new:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header, old = list(reader.fieldnames or []), list(reader)
        if header != columns:  # columns added since the file was written: rewrite it under the new header
            extra = [c for c in header if c not in columns]
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=columns + extra, extrasaction="ignore")
                w.writeheader()
                w.writerows(old)
            columns = columns + extra
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)


def write_csv(path, columns, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns + ["status"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def cell(v, fmt="{}"):
    """A table cell: '–' where there is no value (None, NaN, empty)."""
    if v is None or v == "" or (isinstance(v, float) and v != v):
        return NONE
    return fmt.format(v)


def model_table(rows, baseline):
    lines = ["| model | mode | dtype | batch | impl | img/s | ms median (p20-p80) | peak MB | vs " + baseline + " |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = {(r["model"], r["mode"], r["dtype"], r["batch"]): r for r in rows
            if r["impl"] == baseline and r["status"] == "ok"}
    for r in rows:
        key = (r["model"], r["mode"], r["dtype"], r["batch"])
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['mode']} | {r['dtype']} | {r['batch']} | {r['impl']} | "
                         f"{r['status']} | {NONE} | {NONE} | {NONE} |")
            continue
        b = base.get(key)
        sp = f"{r['img_per_s'] / b['img_per_s']:.2f}x" if b else NONE
        lines.append(f"| {r['model']} | {r['mode']} | {r['dtype']} | {r['batch']} | {r['impl']} | "
                     f"{r['img_per_s']:.1f} | {r['ms_median']:.3f} ({r['ms_p20']:.3f}-{r['ms_p80']:.3f}) | "
                     f"{cell(r.get('peak_mem_mb'))} | {sp} |")
    return "\n".join(lines)


def op_table(rows):
    lines = ["| op | layer | mode | dtype | impl | ms median | timing (per-call ms) | TFLOP/s | GB/s | vs eager |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["op"], r["layer"], r["mode"], r["dtype"]): r for r in rows if r["impl"] == "eager" and r["status"] == "ok"}
    for r in rows:
        head = f"| {r['op']} | {r['layer']} | {r['mode']} | {r['dtype']} | {r['impl']} |"
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']} | {NONE} | {NONE} | {NONE} | {NONE} |")
            continue
        b = base.get((r["op"], r["layer"], r["mode"], r["dtype"]))
        sp = f"{b['ms_median'] / r['ms_median']:.2f}x" if b else NONE
        timing = r.get("timing") or "call"
        call = r.get("call_ms_median")
        timing += f" ({call:.3f})" if isinstance(call, float) and timing == "graph" else ""
        lines.append(f"{head} {r['ms_median']:.3f} | {timing} | {cell(r.get('tflops'))} | {cell(r.get('gbps'))} | "
                     f"{sp} |")
    return "\n".join(lines)


def plots(out, model_rows, op_rows):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots")
        return []
    written = []
    ok = [r for r in model_rows if r["status"] == "ok"]
    groups = sorted({(r["model"], r["mode"], r["dtype"]) for r in ok})
    if groups:
        fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
        for ax, (m, mode, d) in zip(axes[0], groups):
            for impl in sorted({r["impl"] for r in ok}):
                pts = sorted((r["batch"], r["img_per_s"]) for r in ok
                             if (r["model"], r["mode"], r["dtype"], r["impl"]) == (m, mode, d, impl))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", label=impl)
            ax.set(xscale="log", xlabel="batch", ylabel="img/s", title=f"{m} {mode} {d}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        p = os.path.join(out, "throughput.png")
        fig.savefig(p, dpi=90)
        written.append(p)
    ok = [r for r in op_rows if r["status"] == "ok" and r["op"] == "conv_bn_relu"]
    if ok:
        modes = sorted({r["mode"] for r in ok})
        layers = list(dict.fromkeys(r["layer"] for r in ok))
        fig, axes = plt.subplots(len(modes), 1, figsize=(12, 3.5 * len(modes)), squeeze=False)
        for ax, mode in zip(axes[:, 0], modes):
            base = {(r["layer"], r["dtype"]): r["ms_median"] for r in ok if r["impl"] == "eager" and r["mode"] == mode}
            impls = sorted({r["impl"] for r in ok if r["impl"] != "eager"})
            for i, impl in enumerate(impls):
                ys = []
                for L in layers:
                    r = next((r for r in ok if (r["layer"], r["mode"], r["impl"]) == (L, mode, impl)), None)
                    ys.append(base.get((L, r["dtype"]), float("nan")) / r["ms_median"] if r else float("nan"))
                xs = [j + 0.8 * i / max(1, len(impls)) for j in range(len(layers))]
                ax.bar(xs, ys, width=0.8 / max(1, len(impls)), label=impl)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xticks(range(len(layers)))
            ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=7)
            ax.set(ylabel="speedup vs eager", title=f"conv_bn_relu per layer ({mode})")
            ax.legend(fontsize=8)
        fig.tight_layout()
        p = os.path.join(out, "layers.png")
        fig.savefig(p, dpi=90)
        written.append(p)
    return written


def _typed(row):
    """A CSV row with its numbers as numbers (for the tables and plots)."""
    out = dict(row)
    for k, v in row.items():
        if k in ("batch",) and v not in ("", None):
            out[k] = int(v)
        elif k in ("img_per_s", "ms_median", "ms_p20", "ms_p80", "peak_mem_mb", "tflops", "gbps", "peak_tflops",
                   "peak_gbps", "call_ms_median") and v not in ("", None):
            out[k] = float(v)
    return out


def append_from(dirs, results, out=None):
    """Append the ok rows of the run folders ``dirs`` to ``results``; with ``out``, write their
    combined summary.md and plots there."""
    got = {"models.csv": [], "ops.csv": []}
    for d in dirs:
        for name, cols in (("models.csv", MODEL_COLUMNS), ("ops.csv", OP_COLUMNS)):
            src = os.path.join(d, name)
            if os.path.exists(src):
                with open(src) as f:
                    rows = list(csv.DictReader(f))
                append_csv(os.path.join(results, name), cols, rows)
                got[name] += [_typed(r) for r in rows if r.get("status") == "ok"]
                print(f"appended {sum(r.get('status') == 'ok' for r in rows)} rows of {src}")
    if out:
        os.makedirs(out, exist_ok=True)
        text = []
        mrows, orows = got["models.csv"], got["ops.csv"]
        heads = sorted({f"device {r['device']}, torch {r['torch']}, triton {r['triton']}, commit {r['commit']}"
                        for r in mrows + orows})
        if mrows:
            text += ["## Models", "", model_table(mrows, "eager-cl"), ""]
        if orows:
            text += ["## Operators", "", op_table(orows), ""]
        with open(os.path.join(out, "summary.md"), "w") as f:
            f.write("# Benchmark runs\n\n" + "\n".join(f"- {h}" for h in heads) + "\n\n" + "\n".join(text))
        for p in plots(out, mrows, orows):
            print("wrote", p)
    return got["models.csv"], got["ops.csv"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU: under 2 minutes)")
    ap.add_argument("--models", default=None, help="comma list, e.g. resnet18,resnet50 (default resnet50)")
    ap.add_argument("--modes", default="infer,train")
    ap.add_argument("--dtypes", default=None, help="fp32,bf16,fp16 (default bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--batches", default=None, help="default 1,256 on GPU (each batch size recompiles torch.compile)")
    ap.add_argument("--impls", default=None, help=f"default {','.join(GPU_IMPLS)}; optional {','.join(OPTIONAL_IMPLS)}")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--no-models", action="store_true")
    ap.add_argument("--no-ops", action="store_true")
    ap.add_argument("--op-batch", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--op-iters", type=int, default=20)
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds of timed iterations at least (GPU)")
    ap.add_argument("--out", default=None, help="folder for this run's CSVs, summary and plots (default: a fresh "
                                                "benchmarks/out/<time>-<device>/)")
    ap.add_argument("--record", action="store_true", help="also append this run's rows to the committed results "
                                                          "CSVs (--results); never for CPU smoke runs")
    ap.add_argument("--results", default=os.path.join(HERE, "results"), help="folder of the recorded CSVs")
    ap.add_argument("--append-from", default=None, metavar="DIR[,DIR...]",
                    help="append the ok rows of other runs' --out folders (e.g. fetched from a GPU machine) to "
                         "the results CSVs (with --out: also their combined summary and plots), and exit")
    args = ap.parse_args(argv)
    if args.append_from:
        return append_from(args.append_from.split(","), args.results, args.out)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cpu":
        print("No GPU in use: running a small CPU comparison (the reference backend against eager PyTorch). "
              "The GPU numbers need a CUDA device.")
        args.smoke = True
    cpu = device.type == "cpu"
    args.models = (args.models or ("resnet18" if cpu else "resnet50")).split(",")
    args.modes = args.modes.split(",")
    args.dtypes = (args.dtypes or ("fp32" if cpu else "bf16")).split(",")
    args.batches = [int(b) for b in (args.batches or ("2,4" if cpu else "1,256")).split(",")]
    args.impls = (args.impls or ",".join(CPU_IMPLS if cpu else GPU_IMPLS)).split(",")
    if args.smoke:
        args.size = min(args.size, 64)
        args.op_batch = min(args.op_batch, 4)
        args.iters, args.op_iters, args.warmup, args.min_time = min(args.iters, 3), min(args.op_iters, 3), 1, 0.0
    if cpu and any(i.startswith("fused-")
                   and i.removesuffix("-ro").removesuffix("-keepz") not in ("fused-reference", "fused-auto")
                   for i in args.impls):
        sys.exit("fused-triton / fused-cuda need a GPU; on the CPU use fused-reference")
    env = environment(device)
    print(f"device: {env['device']}; torch {env['torch']}, triton {env['triton']}, commit {env['commit']}; "
          f"backends {resnet_fused.available_backends()}")
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    n_models = 0 if args.no_models else len(args.models) * len(args.modes) * len(args.dtypes) * len(args.batches) * len(args.impls)
    layers = SMOKE if args.smoke else RESNET50
    n_impl = len(OP_BASE_IMPLS) + (1 if cpu else len([b for b in ("triton", "cuda") if b in resnet_fused.available_backends()]))
    n_ops = 0 if args.no_ops else ((len(layers) * 3 + sum(L.residual for L in layers) * 2) * n_impl
                                   + sum("stem" in L.name for L in layers) * ((n_impl - 1) * 3 + 6)) * len(args.dtypes)
    progress = tqdm(total=n_models + n_ops, dynamic_ncols=True) if tqdm else _NoBar()
    model_rows, op_rows, explains = [], [], []
    if not args.no_models:
        bench_models(args, device, env, model_rows, progress, explains)
    if not args.no_ops:
        bench_ops(args, device, env, op_rows, progress)
    progress.close()

    baseline = "eager-cl"
    text = []
    if model_rows:
        text += ["## Models", "", model_table(model_rows, baseline), ""]
    if op_rows:
        text += ["## Operators (per ResNet-50 layer: conv_bn_relu; add_relu on the block outputs)", "",
                 f"measured peaks: {cell(op_rows[0]['peak_tflops'])} TFLOP/s, {cell(op_rows[0]['peak_gbps'])} GB/s",
                 "",
                 op_table(op_rows), ""]
    for name, e in explains:
        text += [f"## Per-layer choice of fused-auto: {name} (resnet_fused.explain)", "", e.markdown(), ""]
    header = (f"device {env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, "
              f"{env['timestamp']}")
    print("\n" + header + "\n\n" + "\n".join(text))
    out = args.out or os.path.join(HERE, "out", f"{env['timestamp'].replace(':', '')}-{_slug(env['device'])}")
    os.makedirs(out, exist_ok=True)
    if model_rows:
        write_csv(os.path.join(out, "models.csv"), MODEL_COLUMNS, model_rows)
    if op_rows:
        write_csv(os.path.join(out, "ops.csv"), OP_COLUMNS, op_rows)
    for name, e in explains:
        e.to_csv(os.path.join(out, f"explain_{name}.csv"))
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(f"# Benchmark run\n\n{header}\n\n" + "\n".join(text))
    plots(out, model_rows, op_rows)
    print(f"\nthis run's CSVs, summary and plots: {out}")
    if args.record:
        if args.smoke or cpu:
            print("--record: CPU smoke rows are not recorded in the results CSVs")
        else:
            append_csv(os.path.join(args.results, "models.csv"), MODEL_COLUMNS, model_rows)
            append_csv(os.path.join(args.results, "ops.csv"), OP_COLUMNS, op_rows)
            print(f"recorded the ok rows in {args.results}")
    failed = [r for r in model_rows + op_rows if r["status"] != "ok"]
    if failed:
        print(f"{len(failed)} implementation(s) failed their correctness check or could not run (see table)")
    return model_rows, op_rows


def _slug(s):
    import re

    return re.sub(r"[^A-Za-z0-9.]+", "-", s).strip("-").lower()


class _NoBar:
    def update(self, n):
        pass

    def set_description(self, s):
        pass

    def close(self):
        pass


if __name__ == "__main__":
    main()
