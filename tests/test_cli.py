"""The command line: every subcommand has --help, `info` reports the installation, `bench` skips without a GPU."""
import json
import subprocess
import sys

import pytest
import torch

from nitrokernels import cli
from nitrokernels.ops import dispatch


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "nitrokernels", *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.parametrize("command", ["info", "demo", "generate", "bench"])
def test_every_subcommand_has_help(command):
    proc = run_cli(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert f"usage: nitrokernels {command}" in proc.stdout


def test_top_level_help_lists_the_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("info", "demo", "generate", "bench"):
        assert command in proc.stdout


def test_info_reports_versions_extension_and_ops():
    proc = run_cli("info")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"torch        {torch.__version__}" in out
    assert "extension _C" in out
    assert "ops on" in out


def test_info_json_names_a_backend_for_every_registered_op():
    from nitrokernels import info

    data = json.loads(run_cli("info", "--json").stdout)
    info.import_op_modules()
    assert set(data["ops"]) == set(dispatch.REGISTRY)
    for name, entry in data["ops"].items():
        assert entry.get("selected") in dispatch.BACKENDS, (name, entry)
    assert all(status in ("ok", "absent") for status in data["op_modules"].values()), data["op_modules"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_bench_without_gpu_skips_cleanly():
    proc = run_cli("bench")
    assert proc.returncode == 0
    assert "no CUDA GPU" in proc.stdout


def test_bench_unknown_suite_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit, match="unknown suite"):
        cli.main(["bench", "no_such_suite"])
