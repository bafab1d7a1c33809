"""Multi-process training: the fused models under DistributedDataParallel (identical to
eager DDP) and synchronized BatchNorm (two ranks equal one process over the concatenated
batch). Two processes on the gloo backend on the CPU (reference backend); with GPUs the same
worker runs on NCCL. float64, so that differences are semantic, not rounding."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import resnet_fused

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from dist_worker import data, train  # noqa: E402


def launch(tmp_path, scenario, world=2, device="cpu", backend="reference"):
    init = tmp_path / "init"
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "dist_worker.py"), "--rank", str(r), "--world",
                               str(world), "--init", str(init), "--out", str(tmp_path), "--scenario", scenario,
                               "--device", device, "--backend", backend],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(out)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _close(a, b, tol, what):
    for k in a:
        if a[k].dtype == torch.long:
            assert torch.equal(a[k], b[k]), f"{what} {k}"
        else:
            err = (a[k] - b[k]).abs().max().item() if a[k].numel() else 0.0
            assert err <= tol * (b[k].abs().max().item() + 1e-12), f"{what} {k}: {err}"


MULTI_GPU = "__import__('torch').cuda.device_count() < 2"
DEVICES = [pytest.param(("cpu", "reference"), id="gloo-cpu"),
           pytest.param(("cuda", "triton"), id="nccl-triton", marks=[pytest.mark.gpu, pytest.mark.skipif(
               MULTI_GPU, reason="needs 2 GPUs")]),
           pytest.param(("cuda", "cuda"), id="nccl-cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
               MULTI_GPU, reason="needs 2 GPUs")])]


@pytest.mark.parametrize("setup", DEVICES)
def test_ddp_fused_matches_eager_ddp(tmp_path, setup):
    device, backend = setup
    r0, r1 = launch(tmp_path, "ddp", device=device, backend=backend)
    for r in (r0, r1):
        assert r["fused_ran"] > 0  # the fused operators ran
        torch.testing.assert_close(torch.stack(r["fused_loss"]), torch.stack(r["eager_loss"]), atol=1e-10, rtol=1e-9)
        _close(r["fused"], r["eager"], 1e-8, "fused vs eager")
    # DDP keeps the parameters identical across replicas (the BatchNorm buffers hold each
    # rank's own statistics until the next forward broadcasts rank 0's, as with eager DDP).
    params = [k for k in r0["fused"] if "running" not in k and "num_batches" not in k]
    _close({k: r0["fused"][k] for k in params}, {k: r1["fused"][k] for k in params}, 0, "rank 0 vs rank 1")


@pytest.mark.parametrize("setup", DEVICES)
def test_sync_batchnorm_two_ranks_equal_one_process_on_the_whole_batch(tmp_path, setup):
    device, backend = setup
    r0, r1 = launch(tmp_path, "syncbn", device=device, backend=backend)
    # One process, the concatenated batch, plain BatchNorm: what SyncBatchNorm must reproduce.
    torch.manual_seed(0)
    model = resnet_fused.resnet18(num_classes=5).double()
    steps = [data(8, 64, seed=10 + s) for s in range(2)]
    # the ranks took interleaved shards x[rank::2]; the mean loss over both equals the loss over this order
    full = [(torch.cat([x[0::2], x[1::2]]), torch.cat([y[0::2], y[1::2]])) for x, y in steps]
    with resnet_fused.use_backend("reference"):
        losses = train(model, full, torch.device("cpu"))
    one = {k: v for k, v in model.state_dict().items()}
    _close(r0["state"], one, 1e-8, "syncbn rank 0 vs one process")
    _close(r1["state"], one, 1e-8, "syncbn rank 1 vs one process")
    avg = (torch.stack(r0["loss"]) + torch.stack(r1["loss"])) / 2
    torch.testing.assert_close(avg, torch.stack(losses), atol=1e-10, rtol=1e-9)
