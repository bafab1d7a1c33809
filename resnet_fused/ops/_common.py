"""Input checks and layout helpers shared by the fused operators."""
from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected float32, float64, float16 or bfloat16")


def check_same(op: str, a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor, *, shape: bool = True) -> None:
    if a.device != b.device:
        raise ValueError(f"{op}: {a_name} is on {a.device} but {b_name} is on {b.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"{op}: {a_name} has dtype {a.dtype} but {b_name} has dtype {b.dtype}")
    if shape and a.shape != b.shape:
        raise ValueError(f"{op}: {a_name} has shape {tuple(a.shape)} but {b_name} has shape {tuple(b.shape)}")


def as_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` with exactly ``like``'s strides (a copy only when they differ), so that two
    dense tensors can be walked as flat storage by one elementwise kernel."""
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like).copy_(t)


@torch.compiler.assume_constant_result
def conv_allows_tf32() -> bool:
    """Whether PyTorch's convolutions may use TF32 (cuDNN), read through the new precision
    API where it exists: the legacy ``torch.backends.cudnn.allow_tf32`` getter raises once the
    new API has been used. Constant for torch.compile (a change recompiles nothing)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    p = getattr(conv, "fp32_precision", None)
    if p in ("tf32", "ieee"):
        return p == "tf32"
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        return False


def device_guard(t: torch.Tensor):
    """Make t's GPU the current device: Triton launches on the current device and stream,
    not on the tensors' device."""
    import contextlib

    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def autocast_dtype(device_type: str):
    """The autocast dtype in force for ``device_type``, or None (off, or a device type that
    has no autocast, such as meta)."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except RuntimeError:
        pass
    return None


# The eager fast path: a fused operator called eagerly on plain tensors skips the
# torch.library custom-op machinery (dispatcher round trips, schema default filling, the
# generic autograd wrapper: ~0.3-0.5 ms of host time per conv layer in a training step,
# measured on the CPU) and runs the same implementation through a plain autograd.Function.
# The custom ops stay the only path whenever something may intercept them: torch.compile /
# export tracing, a TorchDispatchMode (FakeTensorMode, FlopCounterMode, ...), a
# TorchFunctionMode, functorch transforms, torch.jit.trace, tensor subclasses and meta tensors;
# the backward decides again when it runs (compiled autograd, a mode around backward()).
DIRECT = [os.environ.get("RESNET_FUSED_DIRECT", "1") != "0"]
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def direct_ok(*tensors) -> bool:
    """Whether an eager call on ``tensors`` (None entries ignored) may take the fast path."""
    if not DIRECT[0] or torch.compiler.is_compiling():
        return False
    if (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch._C._functorch.peek_interpreter_stack() is not None
            or torch._C._get_tracing_state() is not None):  # torch.jit.trace / legacy ONNX export
        return False
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or t.is_meta):
            return False
    return True


def _stem_pad_from_env() -> int:
    v = os.environ.get("RESNET_FUSED_CUDNN_STEM_PAD", "0").strip() or "0"
    if v not in ("0", "4", "8"):
        raise ValueError(f"RESNET_FUSED_CUDNN_STEM_PAD: expected 0 (off), 4 or 8, got {v!r}")
    return int(v)


# An experiment for the CUDA backend (docs/perf.md lead 17), off by default: convolutions with fewer
# input channels than this (ResNet's 3-channel stem) get their input and weight padded with zero
# channels up to it before cuDNN sees them (the same result; cuDNN's 3-channel NHWC kernels are slow)
CUDNN_STEM_PAD = [_stem_pad_from_env()]


def pad_channels_for_cudnn(x: torch.Tensor, weight: torch.Tensor, groups: int):
    """``(x, weight)``, their channels padded with zeros to ``CUDNN_STEM_PAD[0]`` where that is set,
    the conv is ungrouped and has fewer channels (differentiable: the weight's gradient is the padded
    one's first channels); else as given."""
    c = CUDNN_STEM_PAD[0]
    if not c or groups != 1 or x.dim() != 4 or x.shape[1] >= c:
        return x, weight
    pad = (0, 0, 0, 0, 0, c - x.shape[1])
    return (torch.nn.functional.pad(x, pad).contiguous(memory_format=torch.channels_last),
            torch.nn.functional.pad(weight, pad))
