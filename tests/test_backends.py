"""Backend selection, build information and the compiled extension's loading."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import glob

import pytest
import torch

import resnet_fused
from resnet_fused import _backends, _ext, _triton

from conftest import REQUIRE_EXT, REQUIRE_TRITON


def run_py(code: str, **env) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=300)


def test_reference_always_available():
    assert resnet_fused.available_backends()[0] == "reference"


def test_triton_listed_iff_importable():
    assert ("triton" in resnet_fused.available_backends()) == _triton.HAS_TRITON


def test_cuda_listed_iff_extension_loaded():
    assert ("cuda" in resnet_fused.available_backends()) == _ext.LOADED
    if not _ext.LOADED:
        assert _ext.ERROR  # it must say why


@pytest.mark.skipif(not REQUIRE_TRITON, reason="RESNET_FUSED_REQUIRE_TRITON not set")
def test_required_triton_tests_will_run():
    assert _triton.HAS_TRITON, _triton.ERROR
    if not torch.cuda.is_available():
        assert _triton.interpreting(), "no GPU and TRITON_INTERPRET is not set: the Triton tests would all skip"


@pytest.mark.skipif(not (REQUIRE_EXT or _ext.LOADED), reason="CUDA extension not built here")
def test_extension_loaded_and_registered():
    assert _ext.LOADED, _ext.ERROR
    assert "cuda" in resnet_fused.available_backends()
    op = torch.ops.resnet_fused_C.add_relu.default
    assert "add_relu(Tensor x, Tensor residual) -> Tensor" in str(op._schema)
    for name in ("bn_stats", "bn_finalize", "bn_apply", "bn_bwd_reduce", "bn_bwd_apply"):
        assert getattr(torch.ops.resnet_fused_C, name).default._schema.name == f"resnet_fused_C::{name}"
    # The op has a CUDA kernel only: on CPU tensors the dispatcher refuses it by name.
    with pytest.raises(NotImplementedError, match="resnet_fused_C::add_relu"):
        op(torch.ones(2), torch.ones(2))


def _cuobjdump():
    cands = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"), shutil.which("cuobjdump")]
    if _triton.HAS_TRITON:  # Triton's wheel carries one
        cands.append(os.path.join(os.path.dirname(_triton.triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in cands if c and os.path.isfile(c)), None)


@pytest.mark.skipif(not (REQUIRE_EXT or _ext.LOADED), reason="CUDA extension not built here")
def test_extension_contains_sm90_device_code():
    import resnet_fused._C as C

    tool = _cuobjdump()
    assert tool, "cuobjdump not found"
    out = subprocess.run([tool, "--list-elf", C.__file__], capture_output=True, text=True, check=True).stdout
    assert "sm_90" in out, out


def test_build_info_names_versions():
    info = resnet_fused.build_info()
    assert info["torch_runtime"] == torch.__version__
    assert info["backends"] == resnet_fused.available_backends()


def test_mismatched_torch_version_is_refused(monkeypatch):
    if _ext.BUILD_INFO is None:
        pytest.skip("package not built")
    monkeypatch.setattr(_ext.BUILD_INFO, "BUILT_WITH_CUDA", True)
    monkeypatch.setattr(_ext.BUILD_INFO, "TORCH_VERSION", "1.0.0+fake")
    ok, why = _ext._load()
    assert not ok
    assert "1.0.0+fake" in why and torch.__version__ in why


def test_mismatched_extension_falls_back_in_a_fresh_process():
    # A fresh interpreter whose build info claims another torch: import warns, names both
    # versions, and the package still works on the remaining backends.
    code = (
        "import sys, types, warnings, torch\n"
        "b = types.ModuleType('resnet_fused._build_info')\n"
        "b.BUILT_WITH_CUDA = True; b.TORCH_VERSION = '1.0.0+fake'; b.SKIP_REASON = ''\n"
        "sys.modules['resnet_fused._build_info'] = b\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import resnet_fused\n"
        "assert any('1.0.0+fake' in str(x.message) and torch.__version__ in str(x.message) for x in w), [str(x.message) for x in w]\n"
        "assert 'cuda' not in resnet_fused.available_backends()\n"
        "x = torch.randn(5)\n"
        "assert torch.equal(resnet_fused.functional.add_relu(x, x), torch.relu(x + x))\n"
        "print('OK')\n"
    )
    if _ext.BUILD_INFO is None:
        pytest.skip("package not built")
    r = run_py(code)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr


def test_set_backend_and_context_manager():
    resnet_fused.set_backend("reference")
    assert resnet_fused.get_backend() == "reference"
    with resnet_fused.use_backend("auto"):
        assert resnet_fused.get_backend() == "auto"
    assert resnet_fused.get_backend() == "reference"


def test_context_manager_restores_on_error():
    resnet_fused.set_backend("auto")
    with pytest.raises(KeyError):
        with resnet_fused.use_backend("reference"):
            raise KeyError("boom")
    assert resnet_fused.get_backend() == "auto"


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        resnet_fused.set_backend("tpu")
    with pytest.raises(ValueError, match="unknown backend"):
        with resnet_fused.use_backend("nope"):
            pass


@pytest.mark.skipif(_ext.LOADED, reason="extension loaded here")
def test_unavailable_backend_raises():
    with pytest.raises(RuntimeError, match="'cuda' is not available"):
        resnet_fused.set_backend("cuda")


def test_unavailable_backend_raises_with_fake_state(monkeypatch):
    monkeypatch.setattr(_ext, "LOADED", False)
    monkeypatch.setattr(_ext, "ERROR", "simulated: not built")
    with pytest.raises(RuntimeError, match="simulated: not built"):
        resnet_fused.set_backend("cuda")


def test_auto_on_cpu():
    x = torch.randn(3)
    expected = "triton" if _triton.interpreting() else "reference"
    assert _backends.resolve("op", x) == expected


def test_cuda_backend_refuses_cpu_tensors(monkeypatch):
    monkeypatch.setattr(_ext, "LOADED", True)
    resnet_fused._backends._current = "cuda"
    with pytest.raises(RuntimeError, match="'cuda' backend runs CUDA tensors"):
        _backends.resolve("op", torch.randn(3))


def test_env_var_selects_backend():
    r = run_py("import resnet_fused; print(resnet_fused.get_backend())", RESNET_FUSED_BACKEND="reference")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "reference"


def test_env_var_bogus_raises():
    r = run_py("import resnet_fused", RESNET_FUSED_BACKEND="bogus")
    assert r.returncode != 0
    assert "RESNET_FUSED_BACKEND" in r.stderr and "bogus" in r.stderr


@pytest.mark.skipif(not _triton.HAS_TRITON, reason="triton not importable")
def test_triton_on_cpu_without_interpreter_raises():
    code = ("import torch, resnet_fused\n"
            "resnet_fused.set_backend('triton')\n"
            "try:\n"
            "    resnet_fused.functional.add_relu(torch.ones(3), torch.ones(3))\n"
            "except RuntimeError as e:\n"
            "    print('RAISED', e)\n")
    r = run_py(code, TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 0, r.stderr
    assert "RAISED" in r.stdout and "TRITON_INTERPRET" in r.stdout
