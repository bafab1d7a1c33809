"""Synchronized BatchNorm for conv_bn_relu: statistics merged across a process group.

Forward: each rank reduces its per-tile partials to (count, mean, M2) per channel; one
all_gather brings every rank's triple; Chan's merge gives the global mean and variance
(exact, no E[z^2] - E[z]^2 cancellation). Backward: one all_reduce of
[sum(gy), sum(gy * (z - mean)), count]. Runs on any device and backend, the CPU (gloo)
included, unlike torch's nn.SyncBatchNorm.

Process groups cannot be operator arguments: they are registered here and passed as an
integer key (0: no synchronisation).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .reference import merge_partials

_GROUPS: dict[int, object] = {}


def group_key(process_group) -> int:
    """0 when there is nothing to synchronise (no group, or a group of one)."""
    if process_group is None or not dist.is_available() or not dist.is_initialized():
        return 0
    if process_group is True:
        process_group = dist.group.WORLD
    if dist.get_world_size(process_group) <= 1:
        return 0
    key = id(process_group)
    _GROUPS[key] = process_group
    return key


def finalize(pm, pm2, rows, M, running_mean, running_var, momentum, eps, key):
    group = _GROUPS[key]
    mean, m2 = merge_partials(pm, pm2, rows, M)
    local = torch.stack([torch.full_like(mean, M), mean, m2])  # [3, K]
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    g = torch.stack(parts)  # [world, 3, K]
    n, means, m2s = g[:, 0], g[:, 1], g[:, 2]
    total = n.sum(0)
    gmean = (n * means).sum(0) / total
    var = (m2s + n * (means - gmean) ** 2).sum(0) / total
    invstd = torch.rsqrt(var + eps)
    if running_mean is None:
        return gmean, invstd, None, None
    new_rm = ((1 - momentum) * running_mean.to(gmean.dtype) + momentum * gmean).to(running_mean.dtype)
    new_rv = ((1 - momentum) * running_var.to(var.dtype) + momentum * var * total / (total - 1)).to(running_var.dtype)
    return gmean, invstd, new_rm, new_rv


def reduce_grad_sums(sum_gy, sum_gyz, M, key):
    group = _GROUPS[key]
    buf = torch.stack([sum_gy, sum_gyz, torch.full_like(sum_gy, M)])
    dist.all_reduce(buf, group=group)
    # The count is the same in every channel: a float holding an exact integer.
    return buf[0], buf[1], buf[2][0]
