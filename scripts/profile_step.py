#!/usr/bin/env python
"""Where a ResNet-50 step spends its GPU time: torch.profiler's kernel table for one
implementation (eager-cl or a fused backend), training or inference, bf16 channels_last.

  python scripts/profile_step.py --impl fused-cuda --mode train --batch 256 --out prof_cuda_train.txt

Prints the GPU time by kernel (top N) and the step's total GPU and wall time; with --out also
writes the table to a file. For diagnosis, not for reported figures (the profiler adds overhead).
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F
import torchvision

import resnet_fused


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", default="fused-cuda", help="eager-cl, fused-triton or fused-cuda")
    ap.add_argument("--mode", default="train", choices=["train", "infer"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", default=None)
    ap.add_argument("--cuda-train-path", default="node", choices=["node", "c++", "python"],
                    help="fused-cuda training: one operator with a C++ autograd node (default), the C++ layer "
                         "calls under a Python autograd.Function, or the Python orchestration")
    a = ap.parse_args()
    from resnet_fused.ops.conv_bn_relu import cuda as cuda_impl

    cuda_impl.CPP_TRAIN[0] = a.cuda_train_path != "python"
    cuda_impl.CPP_NODE[0] = a.cuda_train_path == "node"
    torch.manual_seed(0)
    m = torchvision.models.resnet50().cuda().to(memory_format=torch.channels_last)
    if a.impl.startswith("fused-"):
        resnet_fused.fuse(m)
        ctx = resnet_fused.use_backend(a.impl.split("-")[1])
    else:
        ctx = contextlib.nullcontext()
    x = torch.randn(a.batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (a.batch,), device="cuda")
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
    m.train(a.mode == "train")

    def step():
        if a.mode == "train":
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", torch.bfloat16):
                out = m(x)
            F.cross_entropy(out.float(), t).backward()
            opt.step()
        else:
            with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
                m(x)

    with ctx:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 5 * 1e3
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
            torch.cuda.synchronize()
    ka = prof.key_averages()
    # kernels only: an op's event carries its kernels' device time too
    on_gpu = [e for e in ka if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    gpu = sum(e.self_device_time_total for e in on_gpu) / 1e3
    launches = sum(e.count for e in on_gpu)  # kernels, copies and fills run in the step
    table = ka.table(sort_by="self_device_time_total", row_limit=a.top, max_name_column_width=90)
    head = (f"{a.impl} {a.mode} b{a.batch} bf16: wall {wall:.2f} ms/step (unprofiled, mean of 5); "
            f"GPU kernel time in the profiled step {gpu:.2f} ms over {launches} kernels / copies"
            f"{'' if a.impl != 'fused-cuda' or a.mode != 'train' else f' (training layers: {a.cuda_train_path})'}; "
            f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(head)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(head + "\n" + table + "\n")


if __name__ == "__main__":
    main()
