"""Every Triton kernel compiles for sm_90 (the H100/H200 target) with the installed Triton,
without a GPU: what the interpreter cannot tell (Triton's compile-time type and shape
rules, shared-memory limits). A subprocess, because kernels defined under
TRITON_INTERPRET=1 cannot be compiled."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from resnet_fused import _triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not _triton.HAS_TRITON, reason="triton not importable")
def test_all_triton_kernels_compile_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "triton_compile_check.py"), "--quick"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0 and "0 failure(s)" in r.stdout, (r.stdout[-4000:] + r.stderr[-2000:])
    assert r.stdout.count("OK   conv ") >= 8  # each dtype, training and eval
