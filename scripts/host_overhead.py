"""Host time per fused conv layer: what a call costs the CPU before the GPU has any work.

A training step of the fused models was host-bound on an H100 (docs/perf.md, Status item 1), so
this measures the Python / dispatcher path of one conv + BN + ReLU layer, forward + backward
(training) and forward (eval, BatchNorm folded), against eager PyTorch's conv2d + batch_norm +
relu on the same tiny problem, for the custom-op path and the eager fast path
(``RESNET_FUSED_DIRECT``).

* ``--device cuda``: real kernels on a problem so small (batch 2, 8 channels, 1x1 conv, 4x4) that the GPU
  work is negligible: wall time per call = host time.
* ``--device cpu`` (no GPU needed): the CUDA backend's host path on CPU tensors, with CPU
  implementations of the extension's kernel ops that only allocate their outputs (C++:
  scripts/host_overhead_stubs.cpp, compiled on first use); the conv itself is ATen's on the CPU
  (tiny). The training step is timed through the C++ autograd node (csrc/conv_bn_train_node.cpp),
  through the Python autograd.Function over the same C++ calls (csrc/conv_bn_train.cpp), and
  through the Python orchestration they replaced. Host costs on a GPU are higher per ATen op (kernel launches), so
  read the CPU figures as a lower bound and as a comparison between paths.

    python scripts/host_overhead.py [--device cpu|cuda] [--backend cuda|triton] [--iters N]
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time

import torch
import torch.nn.functional as F


def _load_cpu_stubs():
    """CPU implementations of the extension's kernel ops that only allocate their outputs
    (scripts/host_overhead_stubs.cpp, compiled on first use: about half a minute)."""


    from torch.utils import cpp_extension

    here = os.path.dirname(os.path.abspath(__file__))
    cpp_extension.load(name="resnet_fused_host_stubs", sources=[os.path.join(here, "host_overhead_stubs.cpp")],
                       extra_cflags=["-O2"], is_python_module=False, verbose=False)


def _per_call_us(fn, iters, sync):
    for _ in range(20):
        fn()
    sync()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / iters * 1e6)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backend", default="cuda", choices=["cuda", "triton", "reference"])
    ap.add_argument("--iters", type=int, default=300)
    args = ap.parse_args(argv)

    import resnet_fused
    from resnet_fused import _backends
    from resnet_fused.ops import _common
    from resnet_fused.ops.conv_bn_relu import conv_bn_relu
    from resnet_fused.ops.conv_bn_relu import cuda as cuda_impl
    from resnet_fused.ops.conv_bn_relu.inference import conv_affine_act, fold_bn

    torch.set_num_threads(1)
    dev = args.device
    backend = args.backend
    if dev == "cpu" and backend == "cuda":
        _load_cpu_stubs()  # the CUDA backend's host path (Python and C++) over stub kernels
        real_resolve = _backends.resolve

        def resolve(op, t, **kw):
            return "cuda" if _backends.get_backend() == "cuda" else real_resolve(op, t, **kw)

        _backends.resolve = resolve
        _backends.available_backends = lambda: ["reference", "triton", "cuda"]
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 4, 4, generator=g).to(dev).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(8, 8, 1, 1, generator=g).to(dev).to(memory_format=torch.channels_last).requires_grad_()
    gamma = torch.ones(8, device=dev, requires_grad=True)
    beta = torch.zeros(8, device=dev, requires_grad=True)
    rm, rv = torch.zeros(8, device=dev), torch.ones(8, device=dev)
    wf, bias = fold_bn(w.detach(), gamma.detach(), beta.detach(), rm, rv, 1e-5, torch.float32)
    xd = x.detach()

    def eager_train():
        F.relu(F.batch_norm(F.conv2d(x, w), rm, rv, gamma, beta, True, 0.1, 1e-5)).sum().backward()

    def eager_eval():
        with torch.no_grad():
            F.relu(F.batch_norm(F.conv2d(xd, w), rm, rv, gamma, beta, False, 0.1, 1e-5))

    def fused_train():
        conv_bn_relu(x, w, gamma, beta, rm, rv, training=True).sum().backward()

    def fused_eval():
        with torch.no_grad():
            conv_affine_act(xd, wf, None, bias, None, (1, 1), (0, 0), (1, 1), 1, True)

    rows = [("eager", "train fwd+bwd", _per_call_us(eager_train, args.iters, sync)),
            ("eager", "eval fwd", _per_call_us(eager_eval, args.iters, sync))]
    with resnet_fused.use_backend(backend):
        # (fast path?, training in C++?, C++ autograd node?)
        paths = [(False, True, True), (True, True, True)]
        if backend == "cuda":
            paths += [(True, True, False), (True, False, False)]
        for direct, cpp, node in paths:
            _common.DIRECT[0] = direct
            cuda_impl.CPP_TRAIN[0] = cpp
            cuda_impl.CPP_NODE[0] = node
            name = f"fused-{backend} {'fast path' if direct else 'custom op'}"
            if backend == "cuda":
                name += (", training in C++" if cpp else ", training in Python") + (
                    (", C++ autograd node" if node else ", Python autograd node") if direct else "")
            rows.append((name, "train fwd+bwd", _per_call_us(fused_train, args.iters, sync)))
            if node or backend != "cuda":  # (eval is the same call either way)
                rows.append((name, "eval fwd", _per_call_us(fused_eval, args.iters, sync)))
    _common.DIRECT[0] = True
    cuda_impl.CPP_TRAIN[0] = True
    cuda_impl.CPP_NODE[0] = True

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    where = torch.cuda.get_device_name() if dev == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    stub = " (stub kernels)" if dev == "cpu" and backend == "cuda" else ""
    print(f"host time per conv layer, {where}{stub}; torch {torch.__version__}, commit {commit}; "
          f"batch 2, 8 -> 8 channels, 1x1, 4x4; best of 5 x {args.iters} calls")
    print("| path | call | µs per call |")
    print("|---|---|---|")
    for name, call, us in rows:
        print(f"| {name} | {call} | {us:.1f} |")


if __name__ == "__main__":
    main()
