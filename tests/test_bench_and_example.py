"""The benchmark suite's CPU smoke mode and the training example run end to end and
write what they promise (CI runs them so that they never rot)."""
from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from conftest import NO_CUDA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(spec.origin))
    spec.loader.exec_module(mod)
    return mod


def _no_interpreter():
    # the CPU comparison is eager vs the reference backend; under TRITON_INTERPRET=1 fused-auto
    # would run ResNet-18 through Triton's interpreter (minutes), which other tests cover
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_benchmark_smoke_writes_results(tmp_path):
    out, results = tmp_path / "out", tmp_path / "results"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--device", "cpu", "--smoke",
                        "--batches", "2", "--out", str(out), "--results", str(results), "--record"],
                       capture_output=True, text=True, timeout=600, env=_no_interpreter())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "CPU comparison" in r.stdout and "| resnet18 | infer | fp32 | 2 | fused-reference |" in r.stdout
    assert f"this run's CSVs, summary and plots: {out}" in r.stdout
    # CPU smoke rows are never recorded, --record or not
    assert "CPU smoke rows are not recorded" in r.stdout and not results.exists()
    # cells with no value (peak memory on the CPU, the measured peaks) print as a dash, never nan
    assert "nan" not in r.stdout.lower().replace("nanos", "") and "–" in r.stdout
    run = _load("benchmarks/run.py", "rf_bench_run")
    with open(out / "models.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == run.MODEL_COLUMNS + ["status"]
    assert {r["impl"] for r in rows} == {"eager", "eager-cl", "fused-reference", "fused-auto"}
    assert all(r["status"] == "ok" for r in rows)
    assert all(float(r["img_per_s"]) > 0 and float(r["ms_p20"]) <= float(r["ms_median"]) <= float(r["ms_p80"])
               for r in rows)
    with open(out / "ops.csv") as f:
        ops = list(csv.DictReader(f))
    assert list(ops[0]) == run.OP_COLUMNS + ["status"]
    conv_rows = [r for r in ops if r["op"] == "conv_bn_relu"]
    assert {r["impl"] for r in conv_rows} == {"eager", "conv-only", "fused-reference"}
    pool_rows = [r for r in ops if r["op"] == "conv_bn_relu_maxpool"]  # the stem with its pool, inference
    assert {r["impl"] for r in pool_rows} == {"eager", "fused-reference"} and all(r["status"] == "ok" for r in pool_rows)
    mp_rows = [r for r in ops if r["op"] == "max_pool2d"]  # the stem's pool in training, forward and backward
    assert {(r["mode"], r["impl"]) for r in mp_rows} == {(m, i) for m in ("fwd", "fwd-bwd")
                                                         for i in ("eager", "fused-reference")}
    assert all(r["status"] == "ok" for r in mp_rows)
    pad_rows = [r for r in ops if r["op"] == "conv"]  # the stem conv padded to 4 and 8 channels (lead 17)
    assert {(r["mode"], r["impl"]) for r in pad_rows} == {(m, i) for m in ("fwd", "fwd-wgrad")
                                                          for i in ("conv-only", "conv-only-c4", "conv-only-c8")}
    assert all(r["status"] == "ok" for r in pad_rows)
    # no CUDA graphs on the CPU: every row says it was timed per call, host included
    assert {r["timing"] for r in ops} == {"call"} and all(r["ms_median"] == r["call_ms_median"] for r in ops)
    for name in ("models.csv", "ops.csv", "summary.md", "throughput.png", "layers.png"):
        assert (out / name).stat().st_size > 0, name
    # fused-auto's per-layer choice: printed and written beside the other outputs
    with open(out / "explain_resnet18_infer_fp32_b2.csv") as f:
        ex = list(csv.DictReader(f))
    assert len(ex) == 20 and ex[0]["layer"] == "conv1" and ex[0]["op"] == "conv_affine_act"
    assert "## Per-layer choice of fused-auto: resnet18_train_fp32_b2" in r.stdout
    # a run's folder (as fetched from a GPU machine) appends to a results folder
    other = tmp_path / "other"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--append-from", str(out),
                        "--results", str(other)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(other / "models.csv") as f:
        again = list(csv.DictReader(f))
    assert list(again[0]) == run.MODEL_COLUMNS and len(again) == len(rows)


def test_benchmark_default_output_is_a_fresh_folder(tmp_path, monkeypatch, capsys):
    run = _load("benchmarks/run.py", "rf_bench_run3")
    monkeypatch.setattr(run, "HERE", str(tmp_path))
    run.main(["--device", "cpu", "--smoke", "--batches", "2", "--modes", "infer", "--impls", "eager", "--no-ops"])
    printed = capsys.readouterr().out
    (folder,) = os.listdir(tmp_path / "out")
    assert f"this run's CSVs, summary and plots: {tmp_path / 'out' / folder}" in printed
    assert sorted(os.listdir(tmp_path / "out" / folder)) == ["models.csv", "summary.md", "throughput.png"]
    assert not (tmp_path / "results").exists()


def test_benchmark_correctness_guard_rejects_a_wrong_implementation():
    run = _load("benchmarks/run.py", "rf_bench_run2")
    ref = torch.randn(4, 10)
    assert run.check("x", lambda: ref.clone(), ref, "infer", torch.float32) == "ok"
    assert run.check("x", lambda: ref * 1.5, ref, "infer", torch.float32).startswith("failed")
    assert run.check("x", lambda: ref * float("nan"), ref, "infer", torch.float32).startswith("failed")
    assert run.check("x", lambda: torch.tensor(2.0), torch.tensor(1.0), "train", torch.float32).startswith("failed")


def test_training_example_smoke(tmp_path):
    import resnet_fused

    ex = _load("examples/train.py", "rf_train_example")
    with resnet_fused.use_backend("reference"):  # (CI sets TRITON_INTERPRET=1: keep the interpreter out of it)
        eager_acc, fused_acc = ex.main(["--epochs", "1", "--limit", "128", "--size", "8", "--batch-size", "32",
                                        "--out", str(tmp_path), "--device", "cpu"])
    assert 0 <= eager_acc <= 1 and 0 <= fused_acc <= 1
    assert (tmp_path / "train_digits_resnet18_cpu.csv").stat().st_size > 0
    assert (tmp_path / "train_digits_resnet18_cpu.png").stat().st_size > 0


def test_train_curve_smoke(tmp_path):
    tc = _load("benchmarks/train_curve.py", "rf_train_curve")
    noise, dev = tc.main(["--device", "cpu", "--smoke", "--out", str(tmp_path)])
    assert noise >= 0 and dev >= 0
    with open(tmp_path / "train_curve_resnet18_fp32_cpu.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "eager", "eager-rerun", "fused-reference"] and len(rows) == 5
    assert (tmp_path / "train_curve_resnet18_fp32_cpu.png").stat().st_size > 0


def test_benchmark_reduce_overhead_variants_build_and_pass_the_guard(tmp_path):
    # torch.compile(mode="reduce-overhead") of the fused model (CUDA graphs on a GPU; on the CPU
    # plain inductor): a training step and an inference call pass the correctness guard
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--device", "cpu", "--smoke",
                        "--batches", "2", "--impls", "fused-reference-ro", "--no-ops", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, env=_no_interpreter())
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "models.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["mode"], r["impl"], r["status"]) for r in rows} == {("infer", "fused-reference-ro", "ok"),
                                                                    ("train", "fused-reference-ro", "ok")}


def test_append_csv_upgrades_an_older_header(tmp_path):
    # rows recorded before a column existed keep their values; the file gets the new header
    run = _load("benchmarks/run.py", "rf_bench_run4")
    path = tmp_path / "ops.csv"
    old_cols = [c for c in run.OP_COLUMNS if c not in ("timing", "call_ms_median")]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_cols)
        w.writeheader()
        w.writerow({c: f"old-{c}" for c in old_cols})
    run.append_csv(str(path), run.OP_COLUMNS, [dict({c: f"new-{c}" for c in run.OP_COLUMNS}, status="ok"),
                                               dict(layer="not recorded", status="failed: x")])
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == run.OP_COLUMNS and len(rows) == 2
    assert rows[0]["layer"] == "old-layer" and rows[0]["timing"] == "" and rows[0]["ms_median"] == "old-ms_median"
    assert rows[1]["timing"] == "new-timing" and rows[1]["call_ms_median"] == "new-call_ms_median"


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="no CUDA GPU")
def test_gpu_graph_timing_excludes_host_time():
    # the op benchmark's GPU timing: a call that spends 20 ms on the host and microseconds on
    # the GPU is timed as its GPU work by graph replay, and as its host time per call
    import time

    run = _load("benchmarks/run.py", "rf_bench_run5")
    x = torch.randn(1 << 20, device="cuda")
    ys = []

    def step():
        time.sleep(0.02)
        ys.append(torch.relu(x))

    call = run.quantiles(run.time_fn(step, torch.device("cuda"), 1, 3))[0]
    times, why = run.time_graph(step, 3, calls=2)
    assert why is None and len(times) == 3
    assert call >= 20.0 and run.quantiles(times)[0] < 2.0
    torch.testing.assert_close(ys[-1], torch.relu(x))

    def sync_step():  # a host synchronisation cannot be captured: reported, not raised
        x.sum().item()

    times, why = run.time_graph(sync_step, 3)
    assert times is None and why


@pytest.mark.skipif(not __import__("resnet_fused")._ext.LOADED and os.environ.get("RESNET_FUSED_REQUIRE_CUDA_EXT") != "1",
                    reason="CUDA extension not loaded")
def test_host_overhead_cpu_mode_runs_every_path(tmp_path):
    """scripts/host_overhead.py --device cpu compiles its C++ stand-ins of the extension's kernels
    (their signatures must follow the ops': a drift aborts the process at load) and times every
    path of the CUDA backend's host code; a couple of calls each, no timing asserted."""
    env = dict(_no_interpreter(), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "host_overhead.py"), "--device", "cpu",
                        "--iters", "2"], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    for row in ("| eager | train fwd+bwd |", "| fused-cuda custom op, training in C++ | train fwd+bwd |",
                "| fused-cuda fast path, training in C++, C++ autograd node | train fwd+bwd |",
                "| fused-cuda fast path, training in C++, C++ autograd node | eval fwd |",
                "| fused-cuda fast path, training in C++, Python autograd node | train fwd+bwd |",
                "| fused-cuda fast path, training in Python, Python autograd node | train fwd+bwd |"):
        assert row in r.stdout, (row, r.stdout)
