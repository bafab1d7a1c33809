"""resnet_fused: torchvision-compatible ResNets on fused conv + BatchNorm + ReLU operators.

Backends: ``"reference"`` (pure PyTorch, any device), ``"triton"`` (Triton kernels; CUDA
tensors, or CPU tensors under ``TRITON_INTERPRET=1``) and ``"cuda"`` (the compiled
extension ``resnet_fused._C``). See :func:`available_backends` and :func:`set_backend`.
"""
from . import _ext
from ._backends import available_backends, dispatch_trace, get_backend, set_backend, use_backend
from . import functional
from .explain import Explanation, explain
from .graphs import capture

__version__ = "0.1.0"

_MODEL_NAMES = ("ResNet", "BasicBlock", "Bottleneck", "SyncBatchNorm2d", "fuse", "convert_sync_batchnorm", "clear_fold_cache",
                "set_recompute", "get_recompute", "use_recompute", "resnet18", "resnet34", "resnet50", "resnet101",
                "resnet152", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2",
                "wide_resnet101_2")


def __getattr__(name):
    # The models need torchvision: import it on first use, not with the package.
    if name in _MODEL_NAMES or name == "models":
        import importlib

        models = importlib.import_module("resnet_fused.models")
        return models if name == "models" else getattr(models, name)
    raise AttributeError(f"module 'resnet_fused' has no attribute {name!r}")


__all__ = list(_MODEL_NAMES) + [
    "available_backends",
    "capture",
    "dispatch_trace",
    "explain",
    "Explanation",
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
