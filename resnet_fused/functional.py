"""Functional interface to the fused operators (like ``torch.nn.functional``)."""
from .ops.add_relu import add_relu

__all__ = ["add_relu"]
