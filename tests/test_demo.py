"""`nitrokernels demo --quick` end to end (the CI-size main job) and the shipped digits assets."""
import argparse
import json
import os

import pytest
import torch

from nitrokernels import use_backend
from nitrokernels.digits import data as digits, demo


def test_shipped_assets_load_and_are_small():
    for name in (digits.TEACHER_ASSET, digits.CLASSIFIER_ASSET, digits.STUDENT_ASSET):
        path = digits.asset_path(name)
        assert os.path.getsize(path) < 5 * 2**20, f"{name} should stay under 5 MB"
    teacher, encoder, meta = digits.load_pretrained_teacher()
    assert meta["seed"] == 0 and not any(p.requires_grad for p in teacher.parameters())
    student, _, smeta = digits.load_pretrained_student()
    assert "shift" in smeta
    x = torch.randn(2, 1, digits.DIGITS_RESOLUTION, digits.DIGITS_RESOLUTION)
    with torch.no_grad():
        assert student(x, 249, encoder_hidden_states=encoder(torch.tensor([3, 7]))).sample.shape == x.shape
    classifier = digits.load_pretrained_classifier()
    images, labels = digits.load_digits(split="test")
    assert digits.classifier_accuracy(classifier, images, labels) > 0.95


def test_digits_data_encoder_and_metrics():
    images, labels = digits.load_digits()
    assert images.shape == (1797, 1, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert len(digits.load_digits(split="train")[0]) + len(digits.load_digits(split="test")[0]) == 1797
    enc = digits.DigitsEncoder()
    assert enc(torch.tensor([0, 10])).shape == (2, 1, digits.EMBED_DIM)
    with pytest.raises(ValueError, match="labels must be in"):
        enc(torch.tensor([11]))
    a = torch.randn(400, 8)
    assert abs(digits.frechet_distance(a, a)) < 1e-6
    assert digits.frechet_distance(a, a + 3) == pytest.approx(9 * 8, rel=1e-3)


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--quick", "--out", str(tmp_path), "--no-progress", "--device", "cpu"])
    # The eager backends: under TRITON_INTERPRET=1 the dispatcher would otherwise interpret every Triton
    # kernel of the whole demo (minutes); fused-vs-eager equality is test_distiller's job.
    with use_backend("eager"):
        assert demo.run(args) == 0
    out = capsys.readouterr().out
    assert "class accuracy" in out and "Frechet distance" in out
    for name in ("metrics.json", "samples.png", "loss.png", "train/log.jsonl", "train/checkpoint.pt"):
        assert (tmp_path / name).exists(), name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["teacher"]) == {"1", "4", "25"} and set(metrics["student"]) == {"1", "2", "4"}
    for group in ("teacher", "student"):
        for m in metrics[group].values():
            assert 0.0 <= m["accuracy"] <= 1.0 and m["frechet"] >= 0.0
    assert metrics["heads"]["pool"] == 240 and metrics["heads"]["sampled_per_iteration"] == 60
    assert metrics["train_steps"] == [1, 2, 4] and metrics["d_steps"] == 2
    summary = metrics["discriminator"]
    for key in ("d_accuracy", "logit_gap", "head_age", "global_conditional/d_accuracy"):
        assert key in summary["mean"] and key in summary["last_quarter"]
    assert 0.0 <= summary["mean"]["d_accuracy"] <= 1.0 and summary["mean"]["head_age"] >= 0.0
    assert "discriminator: accuracy" in out and "--quick: 8 iterations, the student is barely trained" in out
    from PIL import Image

    assert Image.open(tmp_path / "samples.png").size[0] > 100


@pytest.mark.parametrize("flag", ["--batch-size", "--steps", "--eval-per-class"])
def test_demo_refuses_zero_sizes(flag, capsys):
    """`--batch-size 0` used to run with the default 16 (issue 16): zero sizes are refused before any model loads."""
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    assert demo.run(parser.parse_args(["--quick", flag, "0", "--no-progress"])) == 2
    assert "must be >= 1" in capsys.readouterr().out


def test_save_student_without_a_path_refused_outside_a_checkout(monkeypatch, capsys):
    """An installed package's shipped asset is not overwritten by `--save-student` without a PATH (issue 16)."""
    monkeypatch.setattr(demo, "_in_source_checkout", lambda: False)
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    assert demo.run(parser.parse_args(["--quick", "--save-student", "--no-progress"])) == 2
    assert "give a PATH" in capsys.readouterr().out


def _row(step, warmup, acc):
    row = {"step": step, "d_loss": 1.0, "d_accuracy": acc, "logit_gap": acc - 0.5, "head_age": float(step),
           "global_conditional/d_accuracy": acc, "global_conditional/logit_gap": acc - 0.5}
    return {**row, "regression_loss": 0.1} if warmup else {**row, "g_loss": 0.5}


def test_discriminator_summary_and_plot_cover_heads_trained_in_the_warmup(tmp_path):
    """With DistillConfig.warmup_heads_every the warm-up's rows carry discriminator diagnostics too: the summary
    reports the run and each phase, the plot draws them (no generator loss in those rows)."""
    history = ([{"step": 1, "regression_loss": 0.2}] + [_row(s, True, 0.8) for s in (2, 3, 4)]
               + [_row(s, False, 0.6) for s in (5, 6, 7, 8)])
    summary = demo.discriminator_summary(history)
    assert summary["mean"]["d_accuracy"] == pytest.approx((3 * 0.8 + 4 * 0.6) / 7, abs=1e-4)
    assert summary["phases"]["warm-up"]["d_accuracy"] == pytest.approx(0.8)
    assert summary["phases"]["adversarial"]["d_accuracy"] == pytest.approx(0.6)
    assert summary["last_quarter"]["d_accuracy"] == pytest.approx(0.6)
    text = demo.format_discriminator_summary(summary)
    assert "warm-up 0.80" in text and "adversarial 0.60" in text
    assert os.path.getsize(demo.save_loss_png(str(tmp_path / "loss.png"), history)) > 1000
    adversarial_only = demo.discriminator_summary(history[:1] + history[4:])
    assert list(adversarial_only["phases"]) == ["adversarial"]


def test_accuracy_per_t_star_is_averaged_over_the_iterations_that_drew_it(tmp_path):
    """Each iteration draws a subset of the t* groups, so a group's mean is over the rows that have it (not over
    every row, and not only the keys of the first row)."""
    history = [{**_row(1, False, 0.6), "d_accuracy_t10": 0.7, "d_accuracy_t500": 0.5},
               {**_row(2, False, 0.6), "d_accuracy_t10": 0.9, "d_accuracy_t250": 0.4},
               {**_row(3, False, 0.6), "d_accuracy_t250": 0.6, "d_accuracy_t500": 0.5}]
    mean = demo.discriminator_summary(history)["mean"]
    assert (mean["d_accuracy_t10"], mean["d_accuracy_t250"], mean["d_accuracy_t500"]) == pytest.approx((0.8, 0.5, 0.5))
    text = demo.format_discriminator_summary(demo.discriminator_summary(history))
    assert "t* 10 0.80; t* 250 0.50; t* 500 0.50" in text
    plain = tmp_path / "plain.png"
    demo.save_loss_png(str(plain), [_row(1, False, 0.6), _row(2, False, 0.6)])
    with_t_star = demo.save_loss_png(str(tmp_path / "t.png"), history)
    from PIL import Image

    with Image.open(plain) as a, Image.open(with_t_star) as b:
        assert b.size[1] > a.size[1], "the per-t* panel is drawn below the other two"
