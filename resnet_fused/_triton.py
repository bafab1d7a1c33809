"""Triton availability. Kernel modules import ``triton``/``tl`` from here and define
their kernels only when HAS_TRITON is true."""
from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    ERROR = ""
except ImportError as e:  # pragma: no cover - depends on the installation
    triton = None
    tl = None
    HAS_TRITON = False
    ERROR = f"triton is not importable ({e})"


def interpreting() -> bool:
    """True when Triton runs kernels through its interpreter (``TRITON_INTERPRET=1``),
    which executes them on CPU tensors. Triton reads the variable when a kernel is
    decorated, so it must be set before resnet_fused is imported."""
    return HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
