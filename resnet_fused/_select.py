"""Per-layer choice of the fastest backend under ``"auto"`` on CUDA.

An operator that has several CUDA implementations (the Triton kernels, the CUDA extension)
declares them as candidates (:func:`resnet_fused._backends.declare_candidates`) and passes
its call signature and a runner to :func:`resnet_fused._backends.resolve`. The first call with a
signature decides, in this order:

1. a decision already taken in this process (timed here, or read from 2. or 3.);
2. the cache file of this device and software versions (``RESNET_FUSED_CACHE_DIR``, default
   ``~/.cache/resnet_fused``), written by earlier processes;
3. the table shipped in the package (``resnet_fused/tuning/<gpu>.json``, filled from GPU runs);
4. timing every candidate on the real shapes (warm-up, then the fastest of three rounds of
   back-to-back calls between CUDA events, outputs into scratch tensors), keeping the fastest;
   a candidate that raises is skipped and reported; the result goes to 1. and 2.;
5. a fixed rule (the first candidate in the declared order) when timing is not allowed:
   under ``torch.use_deterministic_algorithms(True)`` (which also skips 1. and 2., so that the
   choice never depends on an earlier timing), while ``torch.compile`` traces, during CUDA-graph
   capture, for synchronized BatchNorm (timing would run collectives), or once the tuning budget
   is spent. Rule decisions are not remembered: a later call that may time does.

The tuning budget (``RESNET_FUSED_TUNE_BUDGET`` seconds of timing per process, default 20; 0
disables timing) is shared with the Triton autotuner, so that a first ResNet-50 call stays
within seconds once its kernels are compiled (compilation is not counted).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

FORMAT = 1
_lock = threading.RLock()

# (device name, key) -> backend, by where the decision came from
_timed: dict[tuple[str, str], str] = {}
_file: dict[str, dict[str, str]] = {}  # device name -> key -> backend (cache file)
_table: dict[str, dict[str, str]] = {}  # device name -> key -> backend (shipped table)
_details: dict[tuple[str, str], dict] = {}  # (device, key) -> {"ms": {...}, "errors": {...}}
_loaded: set[str] = set()
# (device index, key tuple) -> (choice, source): the per-call fast path once decided
_fast: dict[tuple, tuple[str, str]] = {}
_device_names: dict[int, str] = {}


# --- budget ---------------------------------------------------------------------------------
def _initial_budget() -> float:
    v = os.environ.get("RESNET_FUSED_TUNE_BUDGET", "20")
    try:
        return max(0.0, float(v))
    except ValueError:
        raise ValueError(f"RESNET_FUSED_TUNE_BUDGET: expected a number of seconds, got {v!r}") from None


_budget = [_initial_budget()]
_charged = [0.0]  # seconds charged so far (spend), to avoid charging nested timing twice
_excluded = [0.0]  # seconds a timer declared not chargeable (warm-up: compilation, plan search)


def budget_left() -> float:
    return _budget[0]


def set_budget(seconds: float) -> None:
    """Seconds of timing this process may still spend on backend selection and autotuning."""
    _budget[0] = max(0.0, float(seconds))


def spend(seconds: float) -> None:
    _budget[0] = max(0.0, _budget[0] - seconds)
    _charged[0] += seconds


@contextlib.contextmanager
def not_charged():
    """Time spent inside is not charged to the budget (a timer's warm-up calls, which compile
    kernels and search plans)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _excluded[0] += time.perf_counter() - t0


def capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def timing_blocked() -> Optional[str]:
    """Why no timing may happen now (None: it may)."""
    if torch.are_deterministic_algorithms_enabled():
        return "deterministic"
    if torch.compiler.is_compiling():
        return "compile"
    if capturing():
        return "capture"
    if _budget[0] <= 0:
        return "budget"
    return None


# --- keys and files -------------------------------------------------------------------------
_DT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64"}


def conv_key(op: str, x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int,
             residual: bool, relu: bool, training: bool, allow_tf32: bool) -> tuple:
    """The call signature a decision is kept for: a tuple of plain values (so that
    torch.compile can use it as a constant)."""
    N, C, H, W = x.shape
    K, Cg, R, S = weight.shape
    return (op, N, C, H, W, K, R, S, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], groups,
            _DT.get(x.dtype, "other"), int(residual), int(relu), int(training), int(allow_tf32))


def key_str(key: tuple) -> str:
    op, N, C, H, W, K, R, S, sh, sw, ph, pw, dh, dw, g, dt, res, relu, train, tf32 = key
    return (f"{op}|x={N}x{C}x{H}x{W}|w={K}x{C // g}x{R}x{S}|s={sh},{sw}|p={ph},{pw}|d={dh},{dw}|g={g}|{dt}"
            f"|res={res}|relu={relu}|train={train}|tf32={tf32}")


def device_name_of(t: torch.Tensor) -> str:
    """The name decisions are filed under: the GPU's name (e.g. "NVIDIA H100 80GB HBM3"), or
    the device type for other devices."""
    return device_name(t.device.index) if t.is_cuda else t.device.type


def device_name(index: Optional[int]) -> str:
    i = torch.cuda.current_device() if index is None else index
    name = _device_names.get(i)
    if name is None:
        name = _device_names[i] = torch.cuda.get_device_name(i)
    return name


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", s.lower()).strip("-")


def _versions() -> dict:
    from . import __version__, _triton

    return {"torch": torch.__version__, "triton": getattr(_triton.triton, "__version__", None),
            "cuda": torch.version.cuda, "resnet_fused": __version__}


def cache_dir() -> str:
    d = os.environ.get("RESNET_FUSED_CACHE_DIR")
    if d:
        return d
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "resnet_fused")


def cache_path(device: str) -> str:
    """The cache file of one device and this process's software versions."""
    v = _versions()
    return os.path.join(cache_dir(), f"selection-{_slug(device)}-torch{_slug(v['torch'])}-triton"
                                     f"{_slug(str(v['triton']))}.json")


TABLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuning")


def table_path(device: str) -> str:
    """The shipped tuning table of a device: resnet_fused/tuning/<slug of its name>.json."""
    return os.path.join(TABLE_DIR, f"{_slug(device)}.json")


def _read(path: str, device: str, check_versions: bool) -> Optional[dict]:
    """The entries of a cache or table file, or None (missing; corrupt or foreign: warned)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
            raise ValueError("not a resnet_fused selection file of format 1")
        if data.get("device") != device:
            raise ValueError(f"written for device {data.get('device')!r}, not {device!r}")
        if check_versions:
            want = _versions()
            got = {k: data.get("versions", {}).get(k) for k in want}
            if got != want:
                raise ValueError(f"written by {got}, this process runs {want}")
        entries = data["entries"]
        for k, e in entries.items():
            if not isinstance(k, str) or not isinstance(e, dict) or not isinstance(e.get("choice"), str):
                raise ValueError(f"malformed entry {k!r}")
        return entries
    except (OSError, ValueError, json.JSONDecodeError) as e:
        kind = "cache" if check_versions else "tuning table"
        warnings.warn(f"resnet_fused: ignoring the selection {kind} {path}: {e}"
                      + ("; it will be rewritten" if check_versions else ""), RuntimeWarning, stacklevel=3)
        return None


@contextlib.contextmanager
def _file_lock(path: str):
    """An exclusive lock beside ``path`` (POSIX), so that two processes merge rather than
    overwrite each other's entries; without fcntl only the atomic replace protects the file."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover (Windows)
        yield
        return
    with open(path + ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_entries(path: str, device: str, entries: dict, merge: bool = True) -> None:
    """Write (merging with what is there, if valid) atomically: a temporary file in the same
    folder, then os.replace."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with _file_lock(path):
        merged = {}
        if merge:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a corrupt or foreign file was reported when read
                merged.update(_read(path, device, check_versions=True) or {})
        merged.update(entries)
        data = {"format": FORMAT, "device": device, "versions": _versions(), "entries": dict(sorted(merged.items()))}
        fd, tmp = tempfile.mkstemp(prefix=".selection-", suffix=".tmp", dir=os.path.dirname(path) or ".")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _load(device: str) -> None:
    if device in _loaded:
        return
    with _lock:
        if device in _loaded:
            return
        for store, path, versions in ((_file, cache_path(device), True), (_table, table_path(device), False)):
            entries = _read(path, device, check_versions=versions) or {}
            store[device] = {k: e["choice"] for k, e in entries.items()}
            for k, e in entries.items():
                if isinstance(e.get("ms"), dict):
                    _details.setdefault((device, k), {"ms": e["ms"], "errors": e.get("errors", {})})
        _loaded.add(device)


def reset(memory: bool = True) -> None:
    """Forget decisions held in memory (files stay) and re-read the files on the next call."""
    with _lock:
        _fast.clear()
        if memory:
            _timed.clear()
            _details.clear()
        _file.clear()
        _table.clear()
        _loaded.clear()


# --- timing ---------------------------------------------------------------------------------
def cuda_timer(fn: Callable[[], object], backend: Optional[str] = None) -> float:
    """Milliseconds per call: two warm-up calls (compilation, autotuning, cuDNN plans), then
    the fastest of three rounds of three back-to-back calls between CUDA events."""
    with not_charged():
        fn()
        fn()
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(3):
            fn()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) / 3)
    return best


_timer: list[Callable[..., float]] = [cuda_timer]


@contextlib.contextmanager
def use_timer(timer: Callable[..., float]):
    """Replace the timer (tests inject one): ``timer(fn, backend) -> milliseconds per call``."""
    prev = _timer[0]
    _timer[0] = timer
    try:
        yield
    finally:
        _timer[0] = prev


def _time_candidates(candidates, runner, device):
    from . import _backends

    times, errors = {}, {}
    for b in candidates:
        t0, c0, x0 = time.perf_counter(), _charged[0], _excluded[0]
        try:
            # the candidate's GPU current: the timer's events and synchronisation are on it
            with _backends.quiet(), (torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()):
                times[b] = float(_timer[0](runner(b), b))
        except Exception as e:  # a candidate that cannot run this call is skipped and reported
            errors[b] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        finally:
            # the window, less what nested timing (the autotuner) charged itself and the warm-up
            spend(max(0.0, time.perf_counter() - t0 - (_charged[0] - c0) - (_excluded[0] - x0)))
    return times, errors


# --- deciding -------------------------------------------------------------------------------
def _rule(candidates) -> str:
    return candidates[0]


def _lookup(device: str, k: str, candidates, deterministic: bool):
    """(choice, source) from memory, the cache file or the table, or (None, None)."""
    _load(device)
    stores = (("table", _table.get(device, {})),) if deterministic else (
        ("memory", None), ("cache", _file.get(device, {})), ("table", _table.get(device, {})))
    for source, store in stores:
        c = _timed.get((device, k)) if store is None else store.get(k)
        if c is not None and c in candidates:
            return c, source
    return None, None


@torch.compiler.assume_constant_result
def traced_choice(device_index: int, key: tuple, candidates: tuple, deterministic: bool) -> str:
    """The decision while torch.compile traces (no timing; a constant in the graph)."""
    c, _ = _lookup(device_name(device_index) if device_index is not None else "cpu", key_str(key), candidates,
                   deterministic)
    return c if c is not None else _rule(candidates)


def choose(x: torch.Tensor, key: tuple, candidates: tuple, runner: Optional[Callable[[str], Callable]],
           no_timing: Optional[str] = None) -> tuple[str, str]:
    """(backend, source) for one call; see the module docstring for the order."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    fk = (x.device.type, x.device.index, key, candidates)
    if not deterministic:
        hit = _fast.get(fk)
        if hit is not None:
            return hit
    c, source = _choose(x, key, candidates, runner, no_timing, deterministic)
    if not deterministic and not source.startswith("rule"):
        _fast[fk] = (c, "memory" if source == "timing" else source)
    return c, source


def _choose(x, key, candidates, runner, no_timing, deterministic):
    device = device_name_of(x)
    k = key_str(key)
    c, source = _lookup(device, k, candidates, deterministic)
    if c is not None:
        return c, source
    why = timing_blocked() or no_timing or (None if runner is not None else "no runner")
    if why is not None:
        return _rule(candidates), f"rule ({why})"
    with _lock:
        c, source = _lookup(device, k, candidates, deterministic)  # another thread may have timed it
        if c is not None:
            return c, source
        times, errors = _time_candidates(candidates, runner, x.device)
        if not times:  # nothing ran: the call itself will raise the real error
            _details[(device, k)] = {"ms": {}, "errors": errors}
            return _rule(candidates), "rule (every candidate failed)"
        order = {b: i for i, b in enumerate(candidates)}
        choice = min(times, key=lambda b: (times[b], order[b]))  # ties: the declared order
        _timed[(device, k)] = choice
        _details[(device, k)] = {"ms": times, "errors": errors}
        try:
            write_entries(cache_path(device), device,
                          {k: {"choice": choice, "ms": {b: round(t, 5) for b, t in times.items()}, "errors": errors}})
        except OSError as e:
            warnings.warn(f"resnet_fused: could not write the selection cache: {e}", RuntimeWarning, stacklevel=2)
        return choice, "timing"


def details(device: str, k: str) -> dict:
    return _details.get((device, k), {"ms": {}, "errors": {}})


def export_table(path: str, device: Optional[str] = None) -> int:
    """Write the decisions timed in this process (and those of the cache file) for ``device``
    as a tuning table (the format of ``resnet_fused/tuning/<gpu>.json``); returns how many."""
    device = device or device_name(None)
    _load(device)
    entries = {}
    for k, c in list(_file.get(device, {}).items()) + [(k, c) for (d, k), c in _timed.items() if d == device]:
        d = details(device, k)
        entries[k] = {"choice": c, "ms": d.get("ms", {}), "errors": d.get("errors", {})}
    write_entries(path, device, entries, merge=False)
    return len(entries)


# --- recording (explain) --------------------------------------------------------------------
@dataclass
class Recorder:
    names: dict  # id(conv module) -> qualified name
    layer: str = "?"
    rows: list = field(default_factory=list)


RECORDER: Optional[Recorder] = None


def record(op: str, x: torch.Tensor, weight: Optional[torch.Tensor], key: Optional[tuple], choice: str,
           source: str) -> None:
    r = RECORDER
    if r is None:
        return
    ms, errors = {}, {}
    if key is not None and source not in ("forced", "device", "device (interpreter)"):
        d = details(device_name_of(x), key_str(key))
        ms, errors = d.get("ms", {}), d.get("errors", {})
    r.rows.append(dict(layer=r.layer, op=op, input=tuple(x.shape), weight=tuple(weight.shape) if weight is not None
                       else None, dtype=str(x.dtype).replace("torch.", ""),
                       training=bool(key[18]) if key is not None else None, residual=bool(key[16]) if key else None,
                       ms=dict(ms), errors=dict(errors), choice=choice, source=source))
