"""The optional extension: a missing or mismatched build is reported clearly and nothing else breaks."""
import warnings

import pytest
import torch

from nitrokernels import _ext


@pytest.fixture
def fresh_ext(monkeypatch):
    recorded = _ext.build_info  # the cached original; tests replace it with monkeypatch
    _ext._load.cache_clear()
    recorded.cache_clear()
    yield
    _ext._load.cache_clear()
    recorded.cache_clear()


def test_not_built_reports_the_recorded_reason(fresh_ext, monkeypatch):
    monkeypatch.setattr(_ext, "build_info", lambda: {"built": False, "reason": "torch 2.13.0 is a CPU-only build"})
    assert not _ext.extension_available()
    assert "CPU-only build" in _ext.extension_status()
    assert _ext.compiled_archs() == []


def test_torch_version_mismatch_warns_once_and_disables(fresh_ext, monkeypatch):
    monkeypatch.setattr(_ext, "build_info", lambda: {"built": True, "torch": "1.0.0", "torch_cuda": "12.4"})
    with pytest.warns(RuntimeWarning, match="built against torch 1.0.0"):
        assert _ext.extension() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cached: no second warning
        assert not _ext.extension_available()
    assert "reinstall" in _ext.extension_status()


def test_import_failure_is_a_warning_not_an_error(fresh_ext, monkeypatch):
    monkeypatch.setattr(_ext, "build_info", lambda: {"built": True, "torch": torch.__version__})
    with pytest.warns(RuntimeWarning, match="Triton and eager backends still work"):
        assert _ext.extension() is None  # no _C.so in a CPU checkout
    assert _ext.extension_status().startswith("import failed")


def test_env_switch_disables(fresh_ext, monkeypatch):
    monkeypatch.setenv("NITROKERNELS_DISABLE_EXT", "1")
    assert _ext.extension_status() == "disabled by NITROKERNELS_DISABLE_EXT"
