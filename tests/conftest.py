"""Shared test helpers.

Nothing here touches the GPU at import time: CUDA availability is checked lazily by
skip conditions, when a test is set up.

Environment switches (CI and scripts/gpu_check.sh set them):
  TRITON_INTERPRET=1                     run the Triton kernels on CPU tensors
  RESNET_FUSED_REQUIRE_CUDA_EXT=1        fail (not skip) if the compiled extension is missing
  RESNET_FUSED_REQUIRE_TRITON=1          fail (not skip) if the Triton tests cannot run
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

import resnet_fused
from resnet_fused import _triton

REQUIRE_EXT = os.environ.get("RESNET_FUSED_REQUIRE_CUDA_EXT") == "1"
REQUIRE_TRITON = os.environ.get("RESNET_FUSED_REQUIRE_TRITON") == "1"
# (evaluated lazily by pytest at setup, in whatever namespace: no reliance on imports)
NO_CUDA = "not __import__('torch').cuda.is_available()"


def _cases():
    """(backend, device) pairs, each skipped with its reason where it cannot run."""
    interp = _triton.interpreting()
    have = resnet_fused.available_backends()
    yield pytest.param(("reference", "cpu"), id="reference-cpu")
    yield pytest.param(("triton", "cpu"), id="triton-interp-cpu",
                       marks=pytest.mark.skipif(not interp, reason="TRITON_INTERPRET=1 not set"))
    yield pytest.param(("reference", "cuda"), id="reference-cuda",
                       marks=[pytest.mark.gpu, pytest.mark.skipif(NO_CUDA, reason="no CUDA GPU")])
    yield pytest.param(("triton", "cuda"), id="triton-cuda",
                       marks=[pytest.mark.gpu, pytest.mark.skipif(NO_CUDA, reason="no CUDA GPU"),
                              pytest.mark.skipif(interp, reason="TRITON_INTERPRET=1: Triton runs on the CPU")])
    yield pytest.param(("cuda", "cuda"), id="cuda-cuda",
                       marks=[pytest.mark.gpu, pytest.mark.skipif(NO_CUDA, reason="no CUDA GPU"),
                              pytest.mark.skipif("cuda" not in have, reason="CUDA extension not loaded")])


BACKEND_DEVICE = list(_cases())
# Backends that are not the oracle itself (used where comparing reference to itself is moot).
FUSED_BACKEND_DEVICE = [p for p in BACKEND_DEVICE if p.values[0][0] != "reference"]


def report_mismatch(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> str:
    """How many elements are outside tolerance, and the worst one (Liger-style)."""
    a, e = actual.double(), expected.double()
    bad = ~torch.isclose(a, e, atol=atol, rtol=rtol, equal_nan=True)
    n = int(bad.sum())
    if n == 0:
        return "all close"
    idx = torch.nonzero(bad)[0].tolist()
    return f"{n}/{bad.numel()} elements mismatch; first at {idx}: {a[tuple(idx)].item()} vs {e[tuple(idx)].item()}"


def assert_close(actual, expected, atol, rtol, msg=""):
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True,
                               msg=lambda m: f"{msg} {report_mismatch(actual, expected, atol, rtol)}\n{m}")


@pytest.fixture
def ieee_fp32():
    """fp32 convolutions in IEEE precision (no TF32) on the GPU, for tight parity."""
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = prev


@pytest.fixture(autouse=True)
def _restore_backend():
    before = resnet_fused.get_backend()
    yield
    resnet_fused._backends._current = before


def route_to_cuda_backend(monkeypatch):
    """The 'cuda' backend chosen for CPU tensors: its host code runs over CPU stand-ins of the
    extension's kernels that a test registers."""
    from resnet_fused import _backends

    monkeypatch.setattr(_backends, "available_backends", lambda: ["reference", "triton", "cuda"])
    monkeypatch.setattr(_backends, "resolve", lambda op, t, **kw: "cuda")


@contextlib.contextmanager
def cpu_max_pool_kernels():
    """CPU stand-ins of resnet_fused_C::max_pool2d_fwd / _bwd (the reference backend's arithmetic, the
    ops' schema: with_code=False gives an empty code), for the 'cuda' backend's host code on CPU
    tensors; the kernels themselves run on the CPU in test_cuda_kernels_emulated.py. Yields the calls
    made: ("fwd", with_code) and ("bwd",)."""
    from resnet_fused.ops import max_pool as mp

    lib = torch.library.Library("resnet_fused_C", "IMPL")
    calls = []

    def fwd(x, kernel, stride, padding, with_code=True):
        calls.append(("fwd", with_code))
        out, code = mp._fwd_reference(x, list(kernel), list(stride), list(padding))
        return out, (code if with_code else code.new_empty(0))

    def bwd(grad, code, H, W, kernel, stride, padding):
        calls.append(("bwd",))
        return mp._bwd_reference(grad, code, H, W, list(kernel), list(stride), list(padding))

    try:
        lib.impl("max_pool2d_fwd", fwd, "CPU")
        lib.impl("max_pool2d_bwd", bwd, "CPU")
        yield calls
    finally:
        lib._destroy()
