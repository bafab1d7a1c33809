"""resnet_fused: torchvision-compatible ResNets on fused conv + BatchNorm + ReLU operators.

Backends: ``"reference"`` (pure PyTorch, any device), ``"triton"`` (Triton kernels; CUDA
tensors, or CPU tensors under ``TRITON_INTERPRET=1``) and ``"cuda"`` (the compiled
extension ``resnet_fused._C``). See :func:`available_backends` and :func:`set_backend`.
"""
from . import _ext
from ._backends import available_backends, dispatch_trace, get_backend, set_backend, use_backend
from . import functional

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "dispatch_trace",
    "functional",
    "get_backend",
    "set_backend",
    "use_backend",
]


def build_info() -> dict:
    """How this installation was built and what loaded: torch versions, CUDA
    architectures, and why the CUDA extension is missing if it is."""
    import torch

    from . import _triton

    b = _ext.BUILD_INFO
    return {
        "torch_runtime": torch.__version__,
        "torch_build": getattr(b, "TORCH_VERSION", None),
        "cuda_build": getattr(b, "CUDA_VERSION", None),
        "cuda_arch_list": getattr(b, "CUDA_ARCH_LIST", None),
        "cuda_extension_loaded": _ext.LOADED,
        "cuda_extension_error": _ext.ERROR,
        "triton": getattr(_triton.triton, "__version__", None),
        "triton_interpret": _triton.interpreting(),
        "backends": available_backends(),
    }
