"""Drop-in torchvision ResNets on the fused operators."""
from .resnet import (BasicBlock, Bottleneck, ResNet, SyncBatchNorm2d, clear_fold_cache, convert_sync_batchnorm, fuse,
                     get_recompute, set_recompute, use_recompute, resnet18, resnet34, resnet50, resnet101, resnet152,
                     resnext50_32x4d, resnext101_32x8d, resnext101_64x4d, wide_resnet50_2, wide_resnet101_2)

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "SyncBatchNorm2d", "clear_fold_cache", "convert_sync_batchnorm", "fuse",
           "get_recompute", "set_recompute", "use_recompute", "resnet18", "resnet34", "resnet50", "resnet101",
           "resnet152", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2",
           "wide_resnet101_2"]
