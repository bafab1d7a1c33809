"""Functional interface to the fused operators (like ``torch.nn.functional``)."""
from .ops.add_relu import add_relu
from .ops.conv_bn_relu import conv_bn_relu, conv_bn_relu_fork
from .ops.max_pool import max_pool2d

__all__ = ["add_relu", "conv_bn_relu", "conv_bn_relu_fork", "max_pool2d"]
