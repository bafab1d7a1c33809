"""Backend selection: which implementation of a fused operator runs.

The dispatcher picks the device; this small switch picks, per call, Triton vs the
compiled CUDA extension vs the pure-PyTorch reference:

* ``"auto"`` (default): CUDA tensors -> the fastest of the operator's declared candidates
  that are available, chosen per call signature (see ``_select``: this process's decision,
  the cache file, the shipped table, timing, or a fixed rule: the first declared candidate);
  an operator that declares none, or passes no signature, gets ``"triton"`` if available,
  else ``"cuda"``, else ``"reference"``. CPU tensors -> ``"reference"``, except under
  ``TRITON_INTERPRET=1``, where ``"triton"`` runs them through Triton's interpreter.
* an explicit name, from :func:`set_backend`, :func:`use_backend` or the environment
  variable ``RESNET_FUSED_BACKEND``: that backend or a clear error, never a silent
  fallback.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Callable, Optional

import torch

from . import _ext, _select, _triton

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


# Device types on which auto chooses among an operator's candidates (tests add "cpu").
_SELECT_DEVICES: tuple[str, ...] = ("cuda",)
# op -> the backends that can run it on CUDA, in the order the fixed rule prefers them
_CANDIDATES: dict[str, tuple[str, ...]] = {}


def declare_candidates(op: str, backends: tuple[str, ...]) -> None:
    """Called by an operator module: the CUDA backends ``auto`` chooses among for ``op``."""
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"declare_candidates({op!r}): unknown backends {unknown}")
    _CANDIDATES[op] = tuple(backends)


def candidates(op: str) -> tuple[str, ...]:
    """The declared candidates of ``op`` that this installation can run."""
    avail = available_backends()
    return tuple(b for b in _CANDIDATES.get(op, ("triton", "cuda")) if b in avail)


def resolve(op: str, t: torch.Tensor, *, key: Optional[tuple] = None,
            runner: Optional[Callable[[str], Callable[[], object]]] = None, no_timing: Optional[str] = None,
            weight: Optional[torch.Tensor] = None, explained: bool = True) -> str:
    """The concrete backend that runs ``op`` on tensors like ``t``; raises if the chosen
    backend cannot run on that device.

    ``key`` (from ``_select.conv_key``) and ``runner`` (``runner(backend)`` returns a
    zero-argument callable running this call on that backend into scratch outputs) let
    ``auto`` time the candidates on CUDA; ``no_timing`` names a reason not to time this call;
    ``explained=False``: not a row of ``resnet_fused.explain`` (which lists the conv layers)."""
    name = _current
    dev = t.device.type
    avail = available_backends()
    if name == "auto":
        if dev in _SELECT_DEVICES:
            cands = candidates(op)
            if not cands:
                choice, source = "reference", "only candidate"
            elif len(cands) == 1 or key is None:
                choice, source = cands[0], ("only candidate" if len(cands) == 1 else "rule (no signature)")
            elif torch.compiler.is_compiling():
                if all(isinstance(v, (int, str)) for v in key):  # static shapes: a constant decision
                    return _select.traced_choice(t.device.index if dev == "cuda" else None, key, cands,
                                                 torch.are_deterministic_algorithms_enabled())
                return cands[0]
            else:
                choice, source = _select.choose(t, key, cands, runner, no_timing)
        elif dev == "cpu" and "triton" in avail and _triton.interpreting():
            choice, source = "triton", "device (interpreter)"
        else:
            choice, source = "reference", "device"
        if _select.RECORDER is not None and explained:
            _select.record(op, t, weight, key, choice, source)
        return choice
    if name not in avail:  # set through the environment variable
        raise RuntimeError(f"{op}: backend {name!r} (RESNET_FUSED_BACKEND) is not available: {_why_unavailable(name)}")
    if name == "triton" and dev != "cuda" and not (dev == "cpu" and _triton.interpreting()):
        raise RuntimeError(
            f"{op}: the 'triton' backend runs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
            f"import), got a {dev} tensor")
    if name == "cuda" and dev != "cuda":
        raise RuntimeError(f"{op}: the 'cuda' backend runs CUDA tensors, got a {dev} tensor")
    if _select.RECORDER is not None and explained:
        _select.record(op, t, weight, key, name, "forced")
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


_quiet = [0]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Implementations run inside are not recorded (the selection's timing runs)."""
    _quiet[0] += 1
    try:
        yield
    finally:
        _quiet[0] -= 1


def note(op: str, backend: str) -> None:
    """Called by each implementation as it runs."""
    if _quiet[0]:
        return
    for log in _trace:
        log.append((op, backend))
