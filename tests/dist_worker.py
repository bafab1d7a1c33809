"""One rank of the multi-process tests (launched by test_distributed.py; gloo on the CPU,
or NCCL on GPUs when --device cuda). Writes its results with torch.save."""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import resnet_fused  # noqa: E402


def data(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


def train(model, batches, device):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        loss.backward()
        opt.step()
        losses.append(loss.detach().cpu())
    return losses


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--init", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--scenario", choices=["ddp", "syncbn"], required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="reference")
    args = ap.parse_args()
    device = torch.device(args.device, args.rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{args.init}",
                            rank=args.rank, world_size=args.world)
    resnet_fused.set_backend(args.backend)
    ids = [device.index] if device.type == "cuda" else None
    steps = [data(8, 64, seed=10 + s) for s in range(2)]
    shard = [(x[args.rank::args.world], y[args.rank::args.world]) for x, y in steps]
    result = {}
    if args.scenario == "ddp":
        # eager DDP and fused DDP from the same weights, on this rank's shard
        torch.manual_seed(0)
        eager = torchvision.models.resnet18(num_classes=5).double().to(device)
        fused = resnet_fused.fuse(copy.deepcopy(eager))
        e_ddp = torch.nn.parallel.DistributedDataParallel(eager, device_ids=ids)
        f_ddp = torch.nn.parallel.DistributedDataParallel(fused, device_ids=ids)
        result["eager_loss"] = train(e_ddp, shard, device)
        with resnet_fused.dispatch_trace() as trace:
            result["fused_loss"] = train(f_ddp, shard, device)
        result["fused_ran"] = sum(1 for op, _ in trace if op == "conv_bn_relu")
        result["eager"] = {k: v.cpu() for k, v in eager.state_dict().items()}
        result["fused"] = {k: v.cpu() for k, v in fused.state_dict().items()}
    else:
        torch.manual_seed(0)
        model = resnet_fused.resnet18(num_classes=5).double()
        model = resnet_fused.convert_sync_batchnorm(model).to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        result["loss"] = train(ddp, shard, device)
        result["state"] = {k: v.cpu() for k, v in model.state_dict().items()}
    torch.save(result, os.path.join(args.out, f"rank{args.rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
