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


@pytest.mark.skipif(not _triton.HAS_TRITON, reason="triton not importable")
def test_kernel_report_every_resnet50_variant_uses_hgmma_without_spills(tmp_path):
    # scripts/kernel_report.py --quick --check: every convolution variant (path x tile config the
    # autotuner keeps) of ResNet-50 at batch 256, bf16 and fp16, eval and training, specialized as
    # the JIT specializes real channels_last tensors and compiled for sm_90: fails on any spill,
    # any variant without wgmma (HGMMA), or a compile failure
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = tmp_path / "report.csv"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "kernel_report.py"), "--quick", "--check",
                        "--csv", str(out)], capture_output=True, text=True, env=env, timeout=1500)
    assert r.returncode == 0 and " 0 problem(s)" in r.stdout, (r.stdout[-4000:] + r.stderr[-2000:])
    import csv

    rows = [row for row in csv.DictReader(open(out)) if row.get("est_us")]
    layers = {row["layer"] for row in rows}
    # (the 24 conv geometries, and the stem with its max-pool in the epilogue: eval)
    assert len(layers) == 25 and {row["dtype"] for row in rows} == {"bf16", "fp16"}
    assert {row["mode"] for row in rows if row["layer"] == "stem 7x7/2 3-64 +maxpool"} == {"eval"}
    assert {row["mode"] for row in rows} == {"eval", "train"}
    assert all(row["mma"] == "HGMMA" and int(row["spill_bytes"]) == 0 and int(row["drains"]) <= 1 for row in rows)
    assert {row["kernel"] for row in rows} == {"_conv_fwd_kernel", "_conv1x1_kernel"}
