"""Backend selection: which implementation of a fused operator runs.

The dispatcher picks the device; this small switch picks, per call, Triton vs the
compiled CUDA extension vs the pure-PyTorch reference:

* ``"auto"`` (default): CUDA tensors -> ``"triton"`` if available, else ``"cuda"``, else
  ``"reference"``; CPU tensors -> ``"reference"``, except under ``TRITON_INTERPRET=1``,
  where ``"triton"`` runs them through Triton's interpreter.
* an explicit name, from :func:`set_backend`, :func:`use_backend` or the environment
  variable ``RESNET_FUSED_BACKEND``: that backend or a clear error, never a silent
  fallback.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from . import _ext, _triton

BACKENDS = ("reference", "triton", "cuda")
_CHOICES = ("auto",) + BACKENDS


def available_backends() -> list[str]:
    """The backends usable in this installation: ``"reference"`` always, ``"triton"``
    when Triton imports, ``"cuda"`` when the compiled extension loaded."""
    out = ["reference"]
    if _triton.HAS_TRITON:
        out.append("triton")
    if _ext.LOADED:
        out.append("cuda")
    return out


def _why_unavailable(name: str) -> str:
    if name == "triton":
        return _triton.ERROR
    if name == "cuda":
        return _ext.ERROR
    return ""


def _validate(name: str, source: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in _CHOICES:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {', '.join(_CHOICES)}")
    name = name.strip().lower()
    if name != "auto" and name not in available_backends():
        raise RuntimeError(f"{source}: backend {name!r} is not available: {_why_unavailable(name)}")
    return name


# A plain module global (not a thread-local) so that torch.compile can read it and guard
# on it like any other global.
_env = os.environ.get("RESNET_FUSED_BACKEND", "auto")
if _env.strip().lower() not in _CHOICES:
    raise ValueError(f"RESNET_FUSED_BACKEND: unknown backend {_env!r}; expected one of {', '.join(_CHOICES)}")
_current: str = _env.strip().lower()


def get_backend() -> str:
    """The backend setting in force ("auto" or a backend name)."""
    return _current


def set_backend(name: str) -> None:
    """Set the backend for all later calls: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``."""
    global _current
    _current = _validate(name, "set_backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the enclosed calls on backend ``name``, then restore."""
    global _current
    prev = _current
    _current = _validate(name, "use_backend")
    try:
        yield
    finally:
        _current = prev


def resolve(op: str, t: torch.Tensor) -> str:
    """The concrete backend that runs ``op`` on tensors like ``t``; raises if the chosen
    backend cannot run on that device."""
    name = _current
    dev = t.device.type
    avail = available_backends()
    if name == "auto":
        if dev == "cuda":
            if "triton" in avail:
                return "triton"
            return "cuda" if "cuda" in avail else "reference"
        if dev == "cpu" and "triton" in avail and _triton.interpreting():
            return "triton"
        return "reference"
    if name not in avail:  # set through the environment variable
        raise RuntimeError(f"{op}: backend {name!r} (RESNET_FUSED_BACKEND) is not available: {_why_unavailable(name)}")
    if name == "triton" and dev != "cuda" and not (dev == "cpu" and _triton.interpreting()):
        raise RuntimeError(
            f"{op}: the 'triton' backend runs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
            f"import), got a {dev} tensor")
    if name == "cuda" and dev != "cuda":
        raise RuntimeError(f"{op}: the 'cuda' backend runs CUDA tensors, got a {dev} tensor")
    return name


# --- which implementation ran (for tests and debugging) ----------------------------
_trace: list[list[tuple[str, str]]] = []


@contextlib.contextmanager
def dispatch_trace() -> Iterator[list[tuple[str, str]]]:
    """Record ``(op, backend)`` for every fused-operator implementation that runs inside
    the block. Tests use it to prove which path ran."""
    log: list[tuple[str, str]] = []
    _trace.append(log)
    try:
        yield log
    finally:
        _trace.remove(log)


def note(op: str, backend: str) -> None:
    """Called by each implementation as it runs."""
    for log in _trace:
        log.append((op, backend))
