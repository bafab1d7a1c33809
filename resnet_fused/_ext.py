"""Loading the compiled extension ``resnet_fused._C``.

The extension must run against the torch it was compiled with (C++ ABI). Before
loading it we compare versions and, on a mismatch, refuse to load it, saying which
versions differ; the package then works with its other backends instead of crashing.
"""
from __future__ import annotations

import importlib
import warnings

import torch

LOADED: bool = False
#: Why the extension is not loaded ("" when it is).
ERROR: str = ""

try:
    from . import _build_info as BUILD_INFO  # written by setup.py
except ImportError:  # running from a source tree that was never built
    BUILD_INFO = None


def _load() -> tuple[bool, str]:
    if BUILD_INFO is None:
        return False, "resnet_fused was not built (no _build_info.py): install it with pip"
    if not BUILD_INFO.BUILT_WITH_CUDA:
        return False, f"the CUDA extension was not built: {BUILD_INFO.SKIP_REASON}"
    if BUILD_INFO.TORCH_VERSION != torch.__version__:
        return False, (
            f"the CUDA extension was built for torch {BUILD_INFO.TORCH_VERSION} but torch {torch.__version__} "
            "is installed; rebuild it against this torch: pip install --no-build-isolation --force-reinstall ."
        )
    try:
        importlib.import_module("resnet_fused._C")
    except (ImportError, OSError) as e:
        return False, f"the CUDA extension failed to load ({type(e).__name__}: {e})"
    return True, ""


LOADED, ERROR = _load()
if not LOADED and BUILD_INFO is not None and BUILD_INFO.BUILT_WITH_CUDA:
    # It was built but cannot be used here: tell the user once, at import.
    warnings.warn(f"resnet_fused: {ERROR}; the 'cuda' backend is disabled", RuntimeWarning, stacklevel=2)
