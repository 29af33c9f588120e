"""The runnable recipes in python/ work as documented (public API only), on tiny settings.

Each runs in a subprocess like a user would run it; the CPU test session's Triton interpreter is turned off
for them (they then take the eager fallbacks, which is what a CPU user without it gets)."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_recipe(name: str, *args: str, timeout: int = 300) -> str:
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "python", name), *map(str, args)], env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(ROOT, "python")) if f.endswith(".py")))
def test_every_recipe_has_help(name):
    assert "usage:" in run_recipe(name, "--help")


def test_own_training_loop(tmp_path):
    out = run_recipe("own_training_loop.py", "--steps", 3, "--batch", 2, "--out", tmp_path)
    assert "step    0  d_loss" in out and "step    2  d_loss" in out
    assert (tmp_path / "one_step_before_after.png").stat().st_size > 0


def test_patch_your_unet():
    out = run_recipe("patch_your_unet.py")
    assert "attention 8/8" in out and "resnet 8/8" in out
    diff = float(out.split("max |patched - plain| = ")[1].split()[0])
    assert diff <= 1e-4


def test_generate_nitrosd(tmp_path):
    pytest.importorskip("transformers")
    from safetensors.torch import save_file

    from nitrokernels.nitro.pipeline import make_random_sdxl_pipeline

    pipe = make_random_sdxl_pipeline("tiny", device="cpu", seed=0)
    pipe.save_pretrained(tmp_path / "base")
    save_file({k: v.contiguous() for k, v in pipe.unet.state_dict().items()}, tmp_path / "unet.safetensors")
    out = run_recipe("generate_nitrosd.py", tmp_path / "base", tmp_path / "unet.safetensors", "a fox", tmp_path / "out")
    for steps in (1, 4):
        assert (tmp_path / "out" / f"nitrosd-{steps}step.png").stat().st_size > 0
        assert f"nitrosd-{steps}step.png" in out


def test_train_digits_teacher_quick_run(tmp_path):
    out = run_recipe("train_digits_teacher.py", "--steps", 3, "--classifier-epochs", 1, "--eval-count", 20,
                     "--out", tmp_path)
    written = sorted(os.listdir(tmp_path))
    assert sorted(f for f in written if f.endswith(".safetensors")) == ["digits_classifier.safetensors",
                                                                        "digits_teacher.safetensors"], written
    assert "teacher 25 steps: accuracy" in out


def test_separability_probe_tells_a_separable_pair_from_an_inseparable_one(tmp_path):
    """The probe is the evidence for the demo's discriminator ceiling, so it must be able to fail both ways: the
    1-step teacher (Frechet 123 against the 4-step teacher's 25) is found out, the 4-step teacher from other noise
    (the same distribution) is not."""
    accuracy = {}
    for fake in ("teacher:1", "teacher:4"):
        path = tmp_path / f"{fake.replace(':', '')}.json"
        run_recipe("separability_probe.py", "--fake", fake, "--count", 400, "--epochs", 25, "--t-star", "none",
                   "--json", path)
        with open(path) as f:
            accuracy[fake] = json.load(f)["accuracy"]["none"]
    assert accuracy["teacher:1"] > 0.75, accuracy       # measured 0.88
    assert 0.35 < accuracy["teacher:4"] < 0.65, accuracy  # measured 0.475 (160 held-out samples)
