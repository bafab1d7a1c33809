"""Per-layer backend selection under "auto" (resnet_fused._select, through _backends.resolve).

On the CPU the selection runs with an injected timer (no GPU timing), candidates that are
runnable here, and tensors on the CPU (tests add "cpu" to the devices auto selects on); the
GPU tests at the end time real candidates.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import resnet_fused
from resnet_fused import _backends, _select, _triton

from conftest import NO_CUDA


@pytest.fixture
def sel(tmp_path, monkeypatch):
    """A clean selection state: empty memory, a private cache folder and table folder, a large
    budget, and "cpu" among the devices auto chooses on."""
    monkeypatch.setenv("RESNET_FUSED_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_select, "TABLE_DIR", str(tmp_path / "tables"))
    monkeypatch.setattr(_backends, "_SELECT_DEVICES", ("cuda", "cpu"))
    _select.reset()
    before = _select.budget_left()
    _select.set_budget(1e9)
    yield tmp_path
    _select.reset()
    _select.set_budget(before)


OP = "test_op"
CANDS = ("triton", "reference")  # both "available" wherever Triton imports


@pytest.fixture
def op(monkeypatch):
    if not _triton.HAS_TRITON:
        pytest.skip("triton not importable")
    monkeypatch.setitem(_backends._CANDIDATES, OP, CANDS)
    return OP


def key(n=4, training=False, op=OP):
    x = torch.empty(n, 8, 6, 6)
    w = torch.empty(16, 8, 3, 3)
    return x, _select.conv_key(op, x, w, [1, 1], [1, 1], [1, 1], 1, False, True, training, False)


class Timer:
    """Preset milliseconds per backend (an exception instance: that candidate raises)."""

    def __init__(self, ms):
        self.ms, self.calls = ms, []

    def __call__(self, fn, backend):
        self.calls.append(backend)
        v = self.ms[backend]
        if isinstance(v, Exception):
            raise v
        return v


def runner(b):
    return lambda: None


def test_picks_the_fastest_under_an_injected_timer(sel, op):
    x, k = key()
    t = Timer({"triton": 2.0, "reference": 1.0})
    with _select.use_timer(t):
        assert _backends.resolve(op, x, key=k, runner=runner) == "reference"
        assert sorted(t.calls) == ["reference", "triton"]
        # decided: no second timing
        assert _backends.resolve(op, x, key=k, runner=runner) == "reference"
        assert len(t.calls) == 2
    x2, k2 = key(n=8)  # another signature is decided on its own
    with _select.use_timer(Timer({"triton": 1.0, "reference": 3.0})):
        assert _backends.resolve(op, x2, key=k2, runner=runner) == "triton"


def test_ties_go_to_the_declared_order(sel, op):
    x, k = key()
    with _select.use_timer(Timer({"triton": 1.5, "reference": 1.5})):
        assert _backends.resolve(op, x, key=k, runner=runner) == "triton"


def test_a_failing_candidate_is_skipped_and_reported(sel, op):
    x, k = key()
    with _select.use_timer(Timer({"triton": RuntimeError("no kernel for this"), "reference": 5.0})):
        with resnet_fused.dispatch_trace():
            rows = resnet_fused.explain(_OneCall(op, k), x).rows
    assert rows[0]["choice"] == "reference" and rows[0]["source"] == "timing"
    assert rows[0]["ms"] == {"reference": 5.0}
    assert "RuntimeError: no kernel for this" in rows[0]["errors"]["triton"]
    # every candidate failing: the rule's choice (the real call then raises the real error), not remembered
    x2, k2 = key(n=2)
    boom = Timer({"triton": ValueError("a"), "reference": ValueError("b")})
    with _select.use_timer(boom):
        assert _select.choose(x2, k2, CANDS, runner) == ("triton", "rule (every candidate failed)")
    assert (x2.device.type, _select.key_str(k2)) not in _select._timed


class _OneCall(torch.nn.Module):
    """A 'model' whose forward makes one resolve call (for explain)."""

    def __init__(self, op, k):
        super().__init__()
        self.op, self.k = op, k

    def forward(self, x):
        return _backends.resolve(self.op, x, key=self.k, runner=runner)


def test_forced_backends_win(sel, op):
    x, k = key()
    with _select.use_timer(Timer({"triton": 1.0, "reference": 2.0})):
        assert _backends.resolve(op, x, key=k, runner=runner) == "triton"
    t = Timer({})
    with _select.use_timer(t), resnet_fused.use_backend("reference"):
        assert _backends.resolve(op, x, key=k, runner=runner) == "reference"
    assert t.calls == []


def test_deterministic_mode_never_times_and_uses_only_the_table(sel, op):
    x, k = key()
    with _select.use_timer(Timer({"triton": 9.0, "reference": 1.0})):
        assert _backends.resolve(op, x, key=k, runner=runner) == "reference"  # timed: in memory and cache
    t = Timer({})
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with _select.use_timer(t):
            # memory and cache come from timing: ignored; no table entry: the fixed rule
            assert _select.choose(x, k, CANDS, runner) == ("triton", "rule (deterministic)")
            x2, k2 = key(n=16)
            assert _select.choose(x2, k2, CANDS, runner) == ("triton", "rule (deterministic)")
            # a table entry is used
            os.makedirs(_select.TABLE_DIR)
            with open(_select.table_path("cpu"), "w") as f:
                json.dump({"format": 1, "device": "cpu", "entries": {_select.key_str(k2): {"choice": "reference"}}}, f)
            _select.reset(memory=False)
            assert _select.choose(x2, k2, CANDS, runner) == ("reference", "table")
    finally:
        torch.use_deterministic_algorithms(prev)
    assert t.calls == []


def test_no_timing_while_capturing_compiling_or_without_budget(sel, op, monkeypatch):
    x, k = key()
    t = Timer({})
    with _select.use_timer(t):
        with monkeypatch.context() as mp:
            mp.setattr(_select, "capturing", lambda: True)
            assert _select.choose(x, k, CANDS, runner) == ("triton", "rule (capture)")
        _select.set_budget(0)
        assert _select.choose(x, k, CANDS, runner) == ("triton", "rule (budget)")
        _select.set_budget(10)
        assert _select.choose(x, k, CANDS, runner, no_timing="synchronized BatchNorm") == (
            "triton", "rule (synchronized BatchNorm)")
    assert t.calls == []
    # rule decisions are not remembered: the next call that may time does
    with _select.use_timer(Timer({"triton": 2.0, "reference": 1.0})):
        assert _select.choose(x, k, CANDS, runner) == ("reference", "timing")


def test_timing_is_charged_to_the_budget(sel, op):
    import time

    x, k = key()
    _select.set_budget(0.05)

    def slow(fn, b):
        time.sleep(0.04)
        return 1.0

    with _select.use_timer(slow):
        assert _select.choose(x, k, CANDS, runner)[1] == "timing"
    assert _select.budget_left() == 0.0
    x2, k2 = key(n=2)
    assert _select.choose(x2, k2, CANDS, runner) == ("triton", "rule (budget)")


@pytest.mark.skipif(not _triton.HAS_TRITON, reason="triton not importable")
def test_triton_autotuning_shares_the_budget(sel, monkeypatch):
    # once the budget is spent, problems not tuned yet take the fixed tile configuration;
    # problems tuned before keep their tuned kernel
    from resnet_fused.ops.conv_bn_relu import triton_kernels as tk

    monkeypatch.delenv("RESNET_FUSED_AUTOTUNE", raising=False)
    monkeypatch.setattr(tk, "_tuned", set())

    def fixed(M):
        # the key: the kernel and its autotuner key values, as conv_fwd builds it
        return tk._use_fixed_config(("implicit", M, 16, 8, 8, 6, 6, 6, 6, 1, 1, 1, 1, 1, 1, 3, 3, 1, 1, 1, False,
                                     (0,), torch.float32))

    assert fixed(72) is False  # budget left: tune
    _select.set_budget(0)
    assert fixed(72) is False  # tuned before: keep it
    assert fixed(36) is True  # new problem, no budget: the fixed configuration


def test_cache_round_trip(sel, op):
    x, k = key()
    with _select.use_timer(Timer({"triton": 3.0, "reference": 1.0})):
        assert _select.choose(x, k, CANDS, runner) == ("reference", "timing")
    path = _select.cache_path("cpu")
    data = json.load(open(path))
    assert data["format"] == 1 and data["device"] == "cpu" and data["versions"]["torch"] == torch.__version__
    assert data["entries"][_select.key_str(k)] == {"choice": "reference", "ms": {"triton": 3.0, "reference": 1.0},
                                                   "errors": {}}
    _select.reset()  # a new process: memory empty, the file read again
    t = Timer({})
    with _select.use_timer(t):
        assert _select.choose(x, k, CANDS, runner) == ("reference", "cache")
    assert t.calls == []
    assert _select.details("cpu", _select.key_str(k))["ms"] == {"triton": 3.0, "reference": 1.0}


_WRITER = r"""
import sys
from resnet_fused import _select
path, tag = sys.argv[1], sys.argv[2]
for i in range(40):
    _select.write_entries(path, "cpu", {f"{tag}-{i}": {"choice": "triton", "ms": {"triton": float(i)}}})
"""


def test_two_processes_writing_the_cache_at_once(sel):
    path = _select.cache_path("cpu")
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, path, tag], env=dict(os.environ))
             for tag in ("a", "b")]
    assert [p.wait(timeout=240) for p in procs] == [0, 0]
    entries = json.load(open(path))["entries"]
    assert set(entries) == {f"{t}-{i}" for t in "ab" for i in range(40)}  # merged, nothing lost
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".tmp")]


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 99}), json.dumps(
    {"format": 1, "device": "cpu", "versions": {"torch": "0.0.1", "triton": "0", "cuda": None,
                                                 "resnet_fused": "0"},
     "entries": {"k": {"choice": "triton"}}})], ids=["corrupt", "other-format", "other-versions"])
def test_a_corrupt_or_foreign_cache_is_ignored_with_a_warning_and_rewritten(sel, op, content):
    x, k = key()
    path = _select.cache_path("cpu")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(content)
    with pytest.warns(RuntimeWarning, match="ignoring the selection cache"):
        with _select.use_timer(Timer({"triton": 2.0, "reference": 1.0})):
            assert _select.choose(x, k, CANDS, runner) == ("reference", "timing")
    data = json.load(open(path))  # rewritten, valid, this process's versions
    assert data["versions"]["torch"] == torch.__version__ and list(data["entries"]) == [_select.key_str(k)]


def test_table_seeds_a_first_run(sel, op):
    x, k = key()
    os.makedirs(_select.TABLE_DIR)
    with open(_select.table_path("cpu"), "w") as f:
        json.dump({"format": 1, "device": "cpu", "versions": {"torch": "other"},  # versions may differ
                   "entries": {_select.key_str(k): {"choice": "reference", "ms": {"reference": 0.5}}}}, f)
    t = Timer({})
    with _select.use_timer(t):
        assert _select.choose(x, k, CANDS, runner) == ("reference", "table")
    assert t.calls == []
    # a table naming a candidate not available here is passed over
    with open(_select.table_path("cpu"), "w") as f:
        json.dump({"format": 1, "device": "cpu", "entries": {_select.key_str(k): {"choice": "cuda"}}}, f)
    _select.reset()
    with _select.use_timer(Timer({"triton": 1.0, "reference": 2.0})):
        assert _select.choose(x, k, CANDS, runner) == ("triton", "timing")


def test_export_table_round_trips(sel, op, tmp_path):
    x, k = key()
    with _select.use_timer(Timer({"triton": 1.0, "reference": 2.0})):
        _select.choose(x, k, CANDS, runner)
    out = tmp_path / "table.json"
    assert _select.export_table(str(out), "cpu") == 1
    data = json.load(open(out))
    assert data["entries"][_select.key_str(k)]["choice"] == "triton"


def test_bad_budget_environment_variable():
    r = subprocess.run([sys.executable, "-c", "import resnet_fused"], env=dict(os.environ, RESNET_FUSED_TUNE_BUDGET="x"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "RESNET_FUSED_TUNE_BUDGET" in r.stderr


def test_explain_lists_every_conv_of_resnet50():
    # (the reference backend forced: under the interpreter auto would run ResNet-50 through
    # Triton's interpreter, a minute; auto's rows are covered by the resnet18 tests below)
    m = resnet_fused.resnet50(num_classes=10).eval()
    convs = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Conv2d)]
    assert len(convs) == 53
    before = {n: b.clone() for n, b in m.named_buffers()}
    with resnet_fused.use_backend("reference"):
        e = resnet_fused.explain(m, torch.randn(1, 3, 32, 32))
        assert sorted(r["layer"] for r in e) == sorted(convs)  # every conv once (in execution order)
        assert {r["op"] for r in e} == {"conv_affine_act"}
        assert all((r["choice"], r["source"]) == ("reference", "forced") for r in e)
        # training mode: batch statistics, and the model's buffers are left as they were
        m.train()
        e = resnet_fused.explain(m, torch.randn(2, 3, 32, 32))
    assert len(e) == 53 and {r["op"] for r in e} == {"conv_bn_relu"} and all(r["training"] for r in e)
    assert all(torch.equal(b, before[n]) for n, b in m.named_buffers())
    text = str(e)
    assert text.count("\n") == 54 and "| layer1.0.conv1 | conv_bn_relu | 2x64x8x8 | 64x64x1x1 |" in text


def test_explain_csv(tmp_path):
    m = resnet_fused.resnet18(num_classes=3).eval()
    e = resnet_fused.explain(m, torch.randn(1, 3, 16, 16))  # auto: the device's one path
    want = ("triton", "device (interpreter)") if _triton.interpreting() else ("reference", "device")
    assert len(e) == 20 and all((r["choice"], r["source"]) == want for r in e)
    p = tmp_path / "e.csv"
    e.to_csv(str(p))
    import csv

    rows = list(csv.DictReader(open(p)))
    assert len(rows) == 20 and rows[0]["layer"] == "conv1" and rows[0]["candidates"] == "–"
    assert rows[0]["choice"] == want[0] and rows[0]["input"] == "1x3x16x16" and rows[0]["weight"] == "64x3x7x7"


@pytest.mark.skipif(not _triton.interpreting(), reason="needs TRITON_INTERPRET=1: two backends runnable on the CPU")
def test_compile_fullgraph_uses_the_decisions_without_timing(sel, monkeypatch):
    # the model's convs choose between Triton (interpreter) and the reference on the CPU: timed
    # eagerly (injected timer: Triton faster), then torch.compile(fullgraph=True) traces the
    # decisions as constants and never times
    for name in ("conv_affine_act", "conv_bn_relu"):
        monkeypatch.setitem(_backends._CANDIDATES, name, ("reference", "triton"))
    m = _tiny().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        with _select.use_timer(Timer({"triton": 1.0, "reference": 2.0})):
            eager = m(x)
        t = Timer({})
        torch._dynamo.reset()
        cm = torch.compile(m, fullgraph=True, backend="aot_eager")
        with _select.use_timer(t), resnet_fused.dispatch_trace() as trace:
            got = cm(x)
    assert t.calls == []
    assert {b for op, b in trace if op == "conv_affine_act"} == {"triton"}
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
    # and with no decision at all (memory and cache file gone): the fixed rule (the first
    # candidate), still no timing
    os.remove(_select.cache_path("cpu"))
    _select.reset()
    torch._dynamo.reset()
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    with torch.no_grad(), _select.use_timer(t), resnet_fused.dispatch_trace() as trace:
        cm(x)
    assert t.calls == [] and {b for op, b in trace if op == "conv_affine_act"} == {"reference"}


def test_compile_fullgraph_of_a_fused_model_with_auto():
    m = _tiny()
    x = torch.randn(2, 3, 8, 8)
    ref = m(x)
    torch._dynamo.reset()
    out = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def _tiny():
    import copy

    from torchvision.models import resnet as tvr

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
                              torch.nn.ReLU(), tvr.BasicBlock(8, 8))
    return resnet_fused.fuse(copy.deepcopy(net))


# --- GPU ----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="no CUDA GPU")
def test_gpu_selection_on_real_timings(tmp_path, monkeypatch):
    if not {"triton", "cuda"} <= set(resnet_fused.available_backends()):
        pytest.skip("needs both the Triton and the CUDA backends")
    monkeypatch.setenv("RESNET_FUSED_CACHE_DIR", str(tmp_path))
    _select.reset()
    _select.set_budget(60)
    from resnet_fused.ops.conv_bn_relu.inference import conv_affine_act

    x = torch.randn(32, 64, 28, 28, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    shift = torch.randn(64, device="cuda")
    m = torch.nn.Module()
    m.forward = lambda inp: conv_affine_act(inp, w, None, shift, None, (1, 1), (1, 1), (1, 1), 1, True)
    e = resnet_fused.explain(m, x, names={})
    (row,) = e.rows
    assert row["source"] == "timing" and set(row["ms"]) == {"triton", "cuda"}
    assert all(v > 0 for v in row["ms"].values())
    assert row["choice"] == min(row["ms"], key=row["ms"].get)
    # the second call takes the decision from memory; a fresh process would take it from the file
    assert resnet_fused.explain(m, x, names={}).rows[0]["source"] == "memory"
    assert os.path.exists(_select.cache_path(torch.cuda.get_device_name()))
    _select.reset()
    _select.set_budget(_select._initial_budget())


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="no CUDA GPU")
def test_gpu_cuda_graph_capture_with_auto(tmp_path, monkeypatch):
    monkeypatch.setenv("RESNET_FUSED_CACHE_DIR", str(tmp_path))
    _select.reset()
    _select.set_budget(60)
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10).cuda().eval().to(memory_format=torch.channels_last)
    m = resnet_fused.resnet18(num_classes=10).cuda().eval().to(memory_format=torch.channels_last)
    m.load_state_dict(tv.state_dict())
    x = torch.randn(4, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
        run = resnet_fused.capture(m, x)  # the warm-up decides (timing), the capture only looks up
        got = run(x).float()
        ref = tv(x).float()
        e = resnet_fused.explain(m, x)
    convs = [r for r in e if r["op"] == "conv_affine_act"]
    assert len(convs) == 20 and all(r["source"] == "memory" for r in convs), {r["source"] for r in convs}
    assert (got - ref).abs().max().item() <= 0.05 * ref.abs().max().item() + 0.05
    _select.reset()
    _select.set_budget(_select._initial_budget())


def test_shipped_tuning_tables_are_valid():
    import glob

    tables = glob.glob(os.path.join(os.path.dirname(resnet_fused.__file__), "tuning", "*.json"))
    for path in tables:
        data = json.load(open(path))
        assert data["format"] == _select.FORMAT and os.path.basename(path) == f"{_select._slug(data['device'])}.json"
        for k, e in data["entries"].items():
            assert e["choice"] in ("triton", "cuda", "reference") and k.split("|")[0].split(":")[0] in (
                "conv_bn_relu", "conv_affine_act"), (path, k)  # (":no-bias", ":maxpool": variants of the op)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _select._read(path, data["device"], check_versions=False) == data["entries"]
