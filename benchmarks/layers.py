"""The convolution layers of ResNet-50 (torchvision, 224x224 input, v1.5: stride on the 3x3),
with how many times each geometry occurs in one forward pass."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Conv:
    name: str
    C: int  # input channels
    K: int  # output channels
    H: int  # input height (= width)
    R: int  # kernel size
    stride: int
    count: int  # occurrences in ResNet-50
    residual: bool = False  # the block's last conv: BN + residual add + ReLU
    relu: bool = True

    @property
    def padding(self):
        return self.R // 2

    @property
    def P(self):
        return (self.H + 2 * self.padding - self.R) // self.stride + 1

    def flops(self, n):
        return 2 * n * self.P * self.P * self.K * self.C * self.R * self.R

    def min_bytes(self, n, elem):
        """Each input read once, each output written once (weights once)."""
        act = n * (self.C * self.H * self.H + self.K * self.P * self.P * (2 if self.residual else 1))
        return elem * (act + self.K * self.C * self.R * self.R)


RESNET50 = [
    Conv("stem 7x7/2 3-64", 3, 64, 224, 7, 2, 1),
    Conv("l1 1x1 64-64", 64, 64, 56, 1, 1, 1),
    Conv("l1 3x3 64-64", 64, 64, 56, 3, 1, 3),
    Conv("l1 1x1 64-256 +res", 64, 256, 56, 1, 1, 3, residual=True),
    Conv("l1 ds 1x1 64-256", 64, 256, 56, 1, 1, 1, relu=False),
    Conv("l1 1x1 256-64", 256, 64, 56, 1, 1, 2),
    Conv("l2 1x1 256-128", 256, 128, 56, 1, 1, 1),
    Conv("l2 3x3/2 128-128", 128, 128, 56, 3, 2, 1),
    Conv("l2 1x1 128-512 +res", 128, 512, 28, 1, 1, 4, residual=True),
    Conv("l2 ds 1x1/2 256-512", 256, 512, 56, 1, 2, 1, relu=False),
    Conv("l2 1x1 512-128", 512, 128, 28, 1, 1, 3),
    Conv("l2 3x3 128-128", 128, 128, 28, 3, 1, 3),
    Conv("l3 1x1 512-256", 512, 256, 28, 1, 1, 1),
    Conv("l3 3x3/2 256-256", 256, 256, 28, 3, 2, 1),
    Conv("l3 1x1 256-1024 +res", 256, 1024, 14, 1, 1, 6, residual=True),
    Conv("l3 ds 1x1/2 512-1024", 512, 1024, 28, 1, 2, 1, relu=False),
    Conv("l3 1x1 1024-256", 1024, 256, 14, 1, 1, 5),
    Conv("l3 3x3 256-256", 256, 256, 14, 3, 1, 5),
    Conv("l4 1x1 1024-512", 1024, 512, 14, 1, 1, 1),
    Conv("l4 3x3/2 512-512", 512, 512, 14, 3, 2, 1),
    Conv("l4 1x1 512-2048 +res", 512, 2048, 7, 1, 1, 3, residual=True),
    Conv("l4 ds 1x1/2 1024-2048", 1024, 2048, 14, 1, 2, 1, relu=False),
    Conv("l4 1x1 2048-512", 2048, 512, 7, 1, 1, 2),
    Conv("l4 3x3 512-512", 512, 512, 7, 3, 1, 2),
]

# Small stand-ins for the CPU smoke run.
SMOKE = [
    Conv("smoke stem 7x7/2 3-16", 3, 16, 32, 7, 2, 1),
    Conv("smoke 3x3 16-16", 16, 16, 16, 3, 1, 1),
    Conv("smoke 1x1 16-64 +res", 16, 64, 16, 1, 1, 1, residual=True),
    Conv("smoke 3x3/2 32-32", 32, 32, 16, 3, 2, 1),
]
