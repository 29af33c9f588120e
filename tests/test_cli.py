"""The command line: every subcommand has --help, `info` reports the installation, `bench` skips without a GPU."""
import json
import os
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


@pytest.mark.parametrize("gpu", [True, False])
def test_bench_unknown_suite_is_refused(monkeypatch, capsys, gpu):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert cli.main(["bench", "no_such_suite"]) == 2  # on a CPU machine too (it used to exit 0 there)
    err = capsys.readouterr().err
    assert "unknown suite(s) ['no_such_suite']" in err and "available: [" in err and "heads" in err


# ------------------------------------------------------------------------------ bad values: one line, exit 2
def _refused(capsys, argv, *needles):
    status = cli.main(argv)
    captured = capsys.readouterr()
    assert status == 2, (argv, captured)
    assert "Traceback" not in captured.err
    for needle in needles:
        assert needle in captured.err, (argv, captured.err)


def test_bad_common_options_are_refused_without_a_traceback(capsys, tmp_path):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    for command in (["demo"], ["generate", "--prompt", "3"]):
        _refused(capsys, command + ["--device", "bogus"], "--device 'bogus' is not a torch device")
        _refused(capsys, command + ["--seed", str(2 ** 64)], "--seed must be in")
        _refused(capsys, command + ["--seed", "-1"], "--seed must be in")
        _refused(capsys, command + ["--out", str(afile / "sub")], f"{afile} is a file")
        _refused(capsys, command + ["--out", str(afile)], "is not a folder")
    _refused(capsys, ["demo", "--threads", "-1"], "--threads must be >= 1, got -1")
    _refused(capsys, ["demo", "--threads", "0"], "--threads must be >= 1, got 0")
    if not torch.cuda.is_available():
        _refused(capsys, ["demo", "--device", "cuda"], "--device cuda: ", "(use --device cpu)")
    _refused(capsys, ["demo", "--save-student", str(afile / "s.safetensors")], f"{afile} is a file")


def test_generate_invalid_model_index_names_the_file(capsys, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{not json")
    _refused(capsys, ["generate", "--prompt", "a cat", "--model", str(model), "--device", "cpu",
                      "--out", str(tmp_path / "o")], "model_index.json is not valid JSON")
    (model / "model_index.json").write_text("[1, 2]")
    _refused(capsys, ["generate", "--prompt", "a cat", "--model", str(model), "--device", "cpu",
                      "--out", str(tmp_path / "o")], "model_index.json must hold a JSON object")


def test_generate_verifies_the_unet_sha256(capsys, tmp_path):
    from nitrokernels.digits import data as digits
    from nitrokernels.nitro.pipeline import file_sha256

    asset = digits.asset_path(digits.STUDENT_ASSET)
    base = ["generate", "--prompt", "3", "--device", "cpu", "--out", str(tmp_path), "--unet", asset]
    _refused(capsys, base + ["--unet-sha256", "0" * 64], "does not match expected_sha256")
    _refused(capsys, base + ["--unet-sha256", "xyz"], "64 hex digits")
    assert cli.main(base + ["--unet-sha256", file_sha256(asset)]) == 0
    assert list(tmp_path.glob("*.png"))


def test_generate_main_refuses_bad_device_and_seed(capsys, tmp_path):
    from nitrokernels.nitro import generate

    assert generate.main(["--prompt", "3", "--device", "bogus", "--out", str(tmp_path)]) == 2
    assert "device 'bogus' is not a torch device" in capsys.readouterr().err
    assert generate.main(["--prompt", "3", "--seed", str(2 ** 64), "--out", str(tmp_path)]) == 2
    assert "--seed must be in" in capsys.readouterr().err


def test_info_is_callable_every_time_and_runs_as_a_module():
    """nk.info() keeps working after the submodule was imported (issue 16), and `python -m nitrokernels.info`
    prints the report."""
    code = ("import nitrokernels as nk; a = nk.info(); import nitrokernels.info; b = nk.info(); "
            "assert a.keys() == b.keys() and nk.info.collect().keys() == a.keys(); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    proc = subprocess.run([sys.executable, "-m", "nitrokernels.info"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("nitrokernels "), proc.stderr


def test_version_and_info_with_an_invalid_forced_backend():
    from nitrokernels import __version__

    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"nitrokernels {__version__}"
    proc = run_cli("info", env={**os.environ, "NITROKERNELS_BACKEND": "bogus"})
    assert proc.returncode == 0, proc.stderr
    assert "NITROKERNELS_BACKEND=invalid" in proc.stdout and "bogus" in proc.stdout


def test_a_missing_optional_dependency_names_the_extra(monkeypatch, capsys):
    """A lazy import of an optional dependency inside a command: one line naming the module and the extra."""
    from nitrokernels.nitro import generate

    def run(args):
        raise ModuleNotFoundError("No module named 'diffusers'", name="diffusers")
    monkeypatch.setattr(generate, "run", run)
    monkeypatch.delenv("NITROKERNELS_DEBUG", raising=False)
    assert cli.main(["generate", "--prompt", "7"]) == 2
    err = capsys.readouterr().err
    assert "'diffusers'" in err and "pip install 'nitrokernels[nitro]'" in err
    monkeypatch.setattr(generate, "run", lambda args: __import__("no_such_module_xyz"))
    with pytest.raises(ModuleNotFoundError):        # not an optional dependency: a real bug, raised
        cli.main(["generate", "--prompt", "7"])


# ------------------------------------------------------------------ generate --unet: a run's student weights
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A 1-iteration `nitrokernels distill --preset digits` run folder (checkpoint.pt, student/, config.json):
    `nitrokernels demo --out` writes the same NitroDistiller checkpoint.pt."""
    pytest.importorskip("diffusers")
    out = tmp_path_factory.mktemp("digits_run") / "run"
    assert cli.main(["distill", "--preset", "digits", "--batch-size", "2", "--steps", "1", "--regression-steps", "1",
                     "--no-progress", "--out", str(out)]) == 0
    return out


def test_generate_unet_takes_a_runs_checkpoint_folder_and_safetensors(digits_run, tmp_path, capsys):
    """--unet <out>/checkpoint.pt, <out>/student and the .safetensors inside give the same image, from the
    checkpoint's student weights (in the digits UNet, with the shipped encoder) and the run's shift."""
    import argparse

    from nitrokernels.nitro import generate

    checkpoint = torch.load(digits_run / "checkpoint.pt", weights_only=True)
    pngs = []
    for i, unet in enumerate([digits_run / "checkpoint.pt", digits_run / "student",
                              digits_run / "student" / "diffusion_pytorch_model.safetensors"]):
        out = tmp_path / str(i)
        assert cli.main(["generate", "--prompt", "7", "--unet", str(unet), "--no-patch", "--device", "cpu",
                         "--out", str(out)]) == 0, capsys.readouterr().err
        pngs.append((out / "7-1step-seed0.png").read_bytes())
        args = argparse.Namespace(unet=str(unet), lora=None, fuse_lora=False, unet_sha256=None)
        model, _, shift = generate._load_digits_unet(args, torch.device("cpu"), torch.float32)
        assert shift == checkpoint["config"]["shift"]
        for key, value in checkpoint["student"].items():
            assert torch.equal(model.state_dict()[key], value), (unet, key)
    assert pngs[0] == pngs[1] == pngs[2]
    _refused(capsys, ["generate", "--prompt", "7", "--unet", str(tmp_path / "nope.pt"), "--out", str(tmp_path)],
             "--unet", "does not exist")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    _refused(capsys, ["generate", "--prompt", "7", "--unet", str(tmp_path / "garbage.pt"), "--out", str(tmp_path)],
             "garbage.pt", "not a .safetensors file, a UNet folder or a torch checkpoint")


@pytest.mark.parametrize("command", [["generate", "--prompt", "3"], ["demo"],
                                     ["distill", "--preset", "digits", "--steps", "1"]])
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_device_cuda_without_cuda_is_one_line(monkeypatch, capsys, tmp_path, command, device):
    """On a CPU-only torch (or machine) every command taking --device says so in one line, exit 2."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _refused(capsys, command + ["--device", device, "--out", str(tmp_path / "o")], f"--device {device}", "CUDA",
             "--device cpu")


def test_generate_module_and_load_pipeline_refuse_cuda_without_cuda(monkeypatch, capsys, tmp_path):
    from nitrokernels.nitro import generate
    from nitrokernels.nitro.pipeline import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert generate.main(["--prompt", "3", "--device", "cuda", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "device 'cuda'" in err and "CUDA" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="device 'cuda:1'.*CUDA"):
        resolve_device("cuda:1")
    assert resolve_device(None).type == "cpu"
