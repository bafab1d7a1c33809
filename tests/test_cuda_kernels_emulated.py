"""The CUDA extension's own kernels (csrc/bn_kernels.cu, add_relu_kernel.cu, max_pool_kernel.cu), run
on the CPU: their source, with each ``kernel<<<grid, block, smem, stream>>>(args)`` rewritten as a call
to the emulator's launcher, compiled by the host C++ compiler against tests/cuda_emu (a CPU
stand-in for the few CUDA runtime pieces they use: one OS thread per CUDA thread of a block,
__syncthreads as the block's barrier, __shared__ as statics, bf16/fp16 with round-to-nearest-even).

What this proves without a GPU: the kernels' index arithmetic (which channel pack and which
rows a thread visits, every output written once), the block and grid shapes they are launched
with (an invalid configuration is reported as on the device), their choice between the 16-byte
vector path and the scalar path, and their arithmetic against float64, for every dtype. What it
cannot prove: speed, the memory model of a real GPU, or what nvcc does differently from the host
compiler. The same kernels on a GPU: tests/test_bn_kernels.py, tests/test_conv_bn_relu.py.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMU = os.path.join(ROOT, "tests", "cuda_emu")
SOURCES = ["bn_kernels.cu", "add_relu_kernel.cu", "max_pool_kernel.cu"]
_LAUNCH = re.compile(r"^(\s*)(\S.*?)<<<(.+?)>>>\(")


def translate(src: str) -> str:
    """``kernel<<<cfg>>>(args)`` -> ``emu::launch(kernel, cfg)(args)`` (each launch in csrc opens
    on one line)."""
    out, n = [], 0
    for line in src.splitlines():
        m = _LAUNCH.match(line)
        if m:
            line = f"{m.group(1)}emu::launch({m.group(2)}, {m.group(3)})(" + line[m.end():]
            n += 1
        elif "<<<" in line:
            raise ValueError(f"a launch this translation does not understand: {line.strip()}")
        out.append(line)
    if not n:
        raise ValueError("no kernel launch found")
    return "\n".join(out) + "\n"


def test_translate_rewrites_every_launch():
    src = "  k<T, 1><<<dim3(a, b), 256, 0, s>>>(x, y);\nint z = 1;\n    kernel<<<g(M, p), dim3(p.x), 0, st>>>(\n"
    assert translate(src) == ("  emu::launch(k<T, 1>, dim3(a, b), 256, 0, s)(x, y);\nint z = 1;\n"
                              "    emu::launch(kernel, g(M, p), dim3(p.x), 0, st)(\n")
    with pytest.raises(ValueError, match="does not understand"):
        translate("  k\n  <<<1, 1>>>(x);")


@pytest.fixture(scope="module")
def emulated_lib(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    d = tmp_path_factory.mktemp("cuda_emu")
    objs = []
    for name in SOURCES:
        with open(os.path.join(ROOT, "csrc", name)) as f:
            text = translate(f.read())
        path = d / (name.replace(".cu", "_emu.cpp"))
        path.write_text(text)
        objs.append(str(path))
    lib = d / "libcuda_emu.so"
    cmd = [cxx, "-std=c++20", "-O1", "-fno-strict-aliasing", "-pthread", "-fPIC", "-shared", "-I", EMU, "-I",
           os.path.join(ROOT, "csrc"), *objs, os.path.join(EMU, "glue.cpp"), "-o", str(lib)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr[-4000:]}"
    return str(lib)


@pytest.mark.parametrize("group", ["bn", "add_relu", "max_pool"])
@pytest.mark.parametrize("dtype", ["fp32", "fp64", "fp16", "bf16"])
def test_cuda_kernels_emulated_against_float64(emulated_lib, group, dtype):
    r = subprocess.run([sys.executable, os.path.join(EMU, "check_kernels.py"), emulated_lib, group, dtype],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert r.stdout.count("ok ") >= 16, r.stdout
