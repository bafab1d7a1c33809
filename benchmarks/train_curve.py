#!/usr/bin/env python
"""Loss curves of N training steps: eager (twice, for eager's own run-to-run noise) and fused,
from the same weights on the same batches. Writes a CSV and a PNG.

  python benchmarks/train_curve.py                       # GPU: ResNet-50, bf16 autocast, batch 256, 100 steps
  python benchmarks/train_curve.py --device cpu --smoke  # tiny CPU run (CI)

The fused curve should stay within the band eager draws around itself: on a GPU two eager
runs differ (cuDNN picks non-deterministic algorithms), which is the noise floor; on the CPU
eager is deterministic, so the second eager run uses channels_last to perturb rounding.
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import sys

import torch
import torch.nn.functional as F

import resnet_fused

HERE = os.path.dirname(os.path.abspath(__file__))


def run(model, batches, device, dtype, backend=None):
    lr = 0.1 * batches[0][0].shape[0] / 256  # the linear scaling rule: 0.1 per 256 images
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-5)
    losses = []
    ctx = resnet_fused.use_backend(backend) if backend else torch.autocast(device.type, enabled=False)
    with ctx:
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = model(x)
            loss = F.cross_entropy(out.float(), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--backend", default=None, help="fused backend (default: triton on GPU, reference on CPU)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    if args.smoke or cpu:
        args.steps, args.batch, args.size = min(args.steps, 4), min(args.batch, 8), min(args.size, 64)
        args.dtype = "fp32" if cpu else args.dtype
    model_name = args.model or ("resnet18" if cpu else "resnet50")
    backend = args.backend or ("reference" if cpu else "triton")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    import torchvision

    torch.manual_seed(0)
    base = getattr(torchvision.models, model_name)(num_classes=100)
    g = torch.Generator().manual_seed(1)
    # A fixed pool of batches with a learnable signal (class-dependent mean), reused in order.
    centers = torch.randn(100, 3, 1, 1, generator=g)
    batches = []
    for _ in range(args.steps):
        y = torch.randint(0, 100, (args.batch,), generator=g)
        x = torch.randn(args.batch, 3, args.size, args.size, generator=g) + 2 * centers[y]
        batches.append((x.to(device).to(memory_format=torch.channels_last), y.to(device)))
    curves = {}
    runs = [("eager", None, torch.channels_last), ("eager-rerun", None, torch.contiguous_format if cpu else torch.channels_last),
            ("fused-" + backend, backend, torch.channels_last)]
    for name, be, fmt in runs:
        m = copy.deepcopy(base).to(device).to(memory_format=fmt)
        if be:
            resnet_fused.fuse(m)
        bs = batches if fmt == torch.channels_last else [(x.contiguous(), y) for x, y in batches]
        curves[name] = run(m, bs, device, dtype, be)
        print(f"{name}: first {curves[name][0]:.4f} last {curves[name][-1]:.4f}", flush=True)
    e, e2, f = curves["eager"], curves["eager-rerun"], curves["fused-" + backend]
    noise = max(abs(a - b) for a, b in zip(e, e2))
    dev = max(abs(a - b) for a, b in zip(e, f))
    print(f"max |eager - eager rerun| = {noise:.4g}; max |eager - fused| = {dev:.4g}")
    os.makedirs(args.out, exist_ok=True)
    tag = f"train_curve_{model_name}_{args.dtype}_{device.type}"
    with open(os.path.join(args.out, tag + ".csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step"] + list(curves))
        for i in range(len(e)):
            w.writerow([i + 1] + [round(curves[k][i], 6) for k in curves])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for k, st in zip(curves, ("-", ":", "--")):
            ax.plot(range(1, len(e) + 1), curves[k], st, label=k)
        ax.set(xlabel="step", ylabel="loss", title=f"{model_name} {args.dtype} batch {args.batch} ({device.type})")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, tag + ".png"), dpi=90)
    except ImportError:
        pass
    return noise, dev


if __name__ == "__main__":
    main()
    sys.exit(0)
