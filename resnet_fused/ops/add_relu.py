"""Residual add + ReLU: ``relu(x + residual)``.

One op = one module: the reference, the Triton kernel and launcher, the call into
the CUDA extension, the ``torch.library`` registration (fake kernel, autograd) and the
public function live here side by side.

Memory traffic is one read of each input and one write (3 passes instead of eager's
5: add reads 2 and writes 1, relu reads 1 and writes 1).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backends
from .._triton import HAS_TRITON, tl, triton
from ._common import as_layout, check_float, check_same, device_guard

OP = "add_relu"
_backends.declare_candidates(OP, ("triton", "cuda"))  # no per-call timing: the first available


# --- reference ------------------------------------------------------------------------
def add_relu_reference(x: Tensor, residual: Tensor) -> Tensor:
    """The oracle: eager PyTorch."""
    return torch.relu(x + residual)


# --- Triton -----------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _add_relu_fwd_kernel(
        x_ptr,  # [n] dense storage of x
        r_ptr,  # [n] residual, same strides as x
        out_ptr,  # [n] output, same strides as x
        n_elements,
        BLOCK: tl.constexpr,
    ):
        # int64 before multiplying: tensors may hold more than 2^31 elements.
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        x = tl.load(x_ptr + offs, mask=mask)
        r = tl.load(r_ptr + offs, mask=mask)
        # fp16/bf16 add in fp32 and round once (PyTorch's opmath); fp32/fp64 stay as they are.
        if x.dtype == tl.float16 or x.dtype == tl.bfloat16:
            s = x.to(tl.float32) + r.to(tl.float32)
        else:
            s = x + r
        # `s < 0` is false for NaN, so NaN propagates as torch.relu does.
        y = tl.where(s < 0, 0.0, s)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def add_relu_triton(x: Tensor, residual: Tensor) -> Tensor:
    """Triton implementation.

    Args:
        x, residual: tensors of one shape, dtype and device.
    Returns:
        ``relu(x + residual)`` laid out like ``torch.empty_like(x)``.
    """
    out = torch.empty_like(x)
    n = out.numel()
    if n:
        xd, rd = as_layout(x, out), as_layout(residual, out)
        block = 1024
        _add_relu_fwd_kernel[(triton.cdiv(n, block),)](xd, rd, out, n, BLOCK=block, num_warps=4)
    return out


# --- CUDA C++ (csrc/add_relu*.c*) --------------------------------------------------------
def add_relu_cuda(x: Tensor, residual: Tensor) -> Tensor:
    like = torch.empty_like(x)
    return torch.ops.resnet_fused_C.add_relu(as_layout(x, like), as_layout(residual, like))


def _add_relu_reference_backend(x: Tensor, residual: Tensor) -> Tensor:
    # The reference backend in eager ops, but with the op's output layout (that of
    # torch.empty_like(x), which the fake kernel promises).
    out = torch.empty_like(x)
    return torch.add(x, residual, out=out).relu_()


_IMPLS = {"reference": _add_relu_reference_backend, "triton": add_relu_triton, "cuda": add_relu_cuda}


# --- registration ----------------------------------------------------------------------
@torch.library.custom_op("resnet_fused::add_relu", mutates_args=())
def _add_relu_op(x: Tensor, residual: Tensor, backend: str) -> Tensor:
    _backends.note(OP, backend)
    with device_guard(x):
        return _IMPLS[backend](x, residual)


@_add_relu_op.register_fake
def _(x: Tensor, residual: Tensor, backend: str) -> Tensor:
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output)


def _backward(ctx, grad: Tensor):
    (out,) = ctx.saved_tensors
    # d relu(s)/ds = [out > 0]; both summands receive the same gradient.
    g = torch.ops.aten.threshold_backward(grad, out, 0)
    return g, g, None


_add_relu_op.register_autograd(_backward, setup_context=_setup_context)


def add_relu(x: Tensor, residual: Tensor) -> Tensor:
    """``torch.relu(x + residual)`` in one pass, differentiable in both inputs.

    Both tensors must have the same shape, dtype (float32, float64, float16 or bfloat16)
    and device; any strides/memory format are accepted and the output is laid out like
    ``torch.empty_like(x)``. The backend follows :func:`resnet_fused.set_backend`.
    """
    check_float(OP, "x", x)
    check_float(OP, "residual", residual)
    check_same(OP, "x", x, "residual", residual)
    return _add_relu_op(x, residual, _backends.resolve(OP, x))
