"""The build path: every CUDA source compiles (nvcc, sm_90a, torch headers) and setup.py degrades cleanly."""
import importlib.util
import os

import pytest

from nitrokernels import build_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_setup_module():
    spec = importlib.util.spec_from_file_location("nitrokernels_setup", os.path.join(REPO, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # main() only runs as __main__
    return module


def test_there_are_cuda_sources_to_build():
    sources = [os.path.relpath(p, REPO) for p in build_check.cuda_sources()]
    assert "csrc/bindings.cpp" in sources
    assert any(p.endswith(".cu") for p in sources), sources


@pytest.mark.skipif(build_check.find_nvcc() is None, reason="nvcc not installed")
def test_every_cuda_source_compiles_for_sm90a():
    results = build_check.check(build_check.cuda_sources(), arch="sm_90a", jobs=2)
    failures = {os.path.relpath(path, REPO): output[-3000:] for path, code, output in results if code != 0}
    assert not failures, "\n\n".join(f"{path}:\n{out}" for path, out in failures.items())


def test_setup_skips_the_extension_with_a_reason_on_cpu_torch(monkeypatch):
    import torch

    setup = _load_setup_module()
    monkeypatch.delenv("NITROKERNELS_BUILD_EXT", raising=False)
    ext, info = setup._extension_plan()
    if torch.version.cuda is None:
        assert ext is None and not info["built"]
        assert "CPU-only" in info["reason"]
    monkeypatch.setenv("NITROKERNELS_BUILD_EXT", "0")
    ext, info = setup._extension_plan()
    assert ext is None and "NITROKERNELS_BUILD_EXT=0" in info["reason"]


def test_forced_build_without_cuda_fails_loudly(monkeypatch, tmp_path):
    import torch

    if torch.version.cuda is not None:
        pytest.skip("this torch has CUDA: the forced build would succeed")
    setup = _load_setup_module()
    monkeypatch.setenv("NITROKERNELS_BUILD_EXT", "1")
    monkeypatch.setattr(setup, "BUILD_INFO", str(tmp_path / "info.json"))
    with pytest.raises(SystemExit, match="cannot be built"):
        setup.main()
