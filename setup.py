"""Build script for resnet_fused.

The compiled extension ``resnet_fused._C`` (csrc/) is built when the torch in the
build environment is a CUDA build *and* a CUDA toolkit can be found; otherwise the
package installs without it (the Triton and reference backends still work) and says
why. Knobs (environment variables):

  RESNET_FUSED_BUILD_CUDA   auto (default) | 1 (force: fail if it cannot be built) | 0 (skip)
  CUDA_HOME / CUDA_PATH     the toolkit; when unset it is found even behind an nvcc
                            wrapper script (nvcc itself is asked where it lives)
  TORCH_CUDA_ARCH_LIST      target architectures; default "8.0;9.0+PTX" (A100 / sm_8x,
                            H100 / sm_90 device code, PTX for newer GPUs) — a GPU need not
                            be visible
  MAX_JOBS                  parallel compile jobs; default from cores and free memory
  RESNET_FUSED_DEBUG        1: -O0 -g -lineinfo
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def log(msg):
    print(f"[resnet_fused build] {msg}", file=sys.stderr, flush=True)


def _is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home():
    """Return (path, how) of the CUDA toolkit, or (None, reason)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        p = os.environ.get(var)
        if p:
            if _is_toolkit(p):
                return p, f"${var}"
            log(f"${var}={p} is not a CUDA toolkit (no bin/nvcc or include/cuda_runtime.h); looking elsewhere")
    nvcc = shutil.which("nvcc")
    if nvcc:
        guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _is_toolkit(guess):
            return guess, f"nvcc on PATH ({nvcc})"
        # nvcc on PATH may be a wrapper script outside the toolkit: ask the real nvcc,
        # which reports its own folder as _HERE_ in a dry run.
        try:
            out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True, text=True, timeout=60)
            m = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.M)
            if m:
                cand = os.path.dirname(m.group(1).strip())
                if _is_toolkit(cand):
                    return cand, f"asked the nvcc wrapper on PATH ({nvcc})"
        except (OSError, subprocess.SubprocessError) as e:
            log(f"could not run {nvcc}: {e}")
    cands = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in cands:
        if _is_toolkit(c):
            return c, "standard location"
    return None, "no CUDA toolkit found (set CUDA_HOME)"


def default_max_jobs():
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            avail_kb = int(re.search(r"MemAvailable:\s+(\d+)", f.read()).group(1))
        by_mem = max(1, avail_kb // (3 * 1024 * 1024))  # ~3 GB per nvcc/g++ job on torch headers
    except (OSError, AttributeError):
        by_mem = cores
    return max(1, min(cores, by_mem))


def write_build_info(**info):
    lines = ['"""Written by setup.py at build time: what the compiled extension was built against."""']
    for k, v in info.items():
        lines.append(f"{k} = {v!r}")
    with open(os.path.join(HERE, "resnet_fused", "_build_info.py"), "w") as f:
        f.write("\n".join(lines) + "\n")


def cuda_extension_plan():
    """Decide whether to build the extension; return (ext_modules, cmdclass, info)."""
    mode = os.environ.get("RESNET_FUSED_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"RESNET_FUSED_BUILD_CUDA must be auto, 0 or 1, not {mode!r}")
    info = dict(BUILT_WITH_CUDA=False, TORCH_VERSION=None, CUDA_VERSION=None, CUDA_ARCH_LIST=None, SKIP_REASON="")

    def skip(reason):
        if mode == "1":
            raise SystemExit(f"RESNET_FUSED_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        log(f"building WITHOUT the CUDA extension: {reason}")
        info["SKIP_REASON"] = reason
        return [], {}, info

    if mode == "0":
        return skip("RESNET_FUSED_BUILD_CUDA=0")
    try:
        import torch
    except ImportError:
        return skip("torch is not importable in the build environment")
    info["TORCH_VERSION"] = torch.__version__
    if not torch.version.cuda:
        return skip(f"torch {torch.__version__} is not a CUDA build")
    cuda_home, how = find_cuda_home()
    if cuda_home is None:
        return skip(how)
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported: set it first.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home
    debug = os.environ.get("RESNET_FUSED_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # No -std flag: torch picks the C++ standard its headers need (C++17 up to 2.13, C++20 after).
    nvcc_flags = opt + ["-lineinfo"]
    if debug:
        nvcc_flags.append("-G")
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    info.update(BUILT_WITH_CUDA=True, CUDA_VERSION=torch.version.cuda,
                CUDA_ARCH_LIST=os.environ["TORCH_CUDA_ARCH_LIST"])
    log(f"CUDA extension: torch {torch.__version__} (CUDA {torch.version.cuda}), toolkit {cuda_home} "
        f"[{how}], TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, MAX_JOBS={os.environ['MAX_JOBS']}, "
        f"sources={sources}")
    ext = cpp_extension.CUDAExtension(
        name="resnet_fused._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": opt, "nvcc": nvcc_flags},
    )
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}
    return [ext], cmdclass, info


ext_modules, cmdclass, build_info = cuda_extension_plan()
write_build_info(**build_info)

setup(
    packages=find_packages(include=["resnet_fused", "resnet_fused.*"]),
    package_data={"resnet_fused": ["tuning/*.json"]},  # per-GPU tuning tables of the backend selection
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
