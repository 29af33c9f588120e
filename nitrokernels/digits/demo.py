"""`nitrokernels demo`: NitroFusion end to end on scikit-learn's handwritten digits, on a CPU in minutes.

    nitrokernels demo                    # distil, evaluate, write ./nitro-demo/{metrics.json,samples.png,loss.png}
    nitrokernels demo --quick            # CI size: a few iterations, small evaluation (well under a minute)
    nitrokernels demo --device cuda      # the same on a GPU, where the heads run on the fused kernels

What it does:
  1. loads the shipped digits teacher (a class-conditional diffusers UNet, sampled with DDIM) and the digits
     classifier (nitrokernels/digits/assets/, written by python/train_digits_teacher.py);
  2. distils a 1-4-step student (initialised from the teacher) with NitroDistiller: first a regression warm-up
     (2/3 of the iterations: the student's x̂0 fitted to the teacher's DDIM solution from the same input, the
     distilled starting point NitroFusion fine-tunes), then NitroFusion's adversarial training: the teacher's DDIM
     samples are "real", the student's samples "fake", and a DynamicDiscriminator -- the frozen
     teacher encoder + mid block with a pool of 240 heads (4 t* x 3 kinds x 5 levels x 4), 60 sampled per
     iteration (2 t* groups x 3 kinds x 5 levels x 2), two discriminator updates per generator update, 1% of the
     heads with >= 16 updates refreshed per iteration -- trains both adversarially, the student for 1, 2 and 4
     steps;
  3. evaluates the teacher at 1/4/25 DDIM steps and the student at 1/2/4 steps (TimestepShiftLCMScheduler
     through nitrokernels.nitro.sampling.sample) on the same noise: class accuracy of the samples under the
     classifier and the Frechet distance to the real digits in the classifier's feature space;
  4. prints the table and writes metrics.json, samples.png (one row per model/steps, digits 0-9 left to
     right), loss.png and the training log/checkpoint under --out.
`--save-student` writes the student as the shipped asset that `nitrokernels generate --prompt 7` uses.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from nitrokernels.nitro.plots import save_loss_png  # noqa: F401  (the demo's loss.png; also demo.save_loss_png)

# Demo settings (chosen for a 2-core CPU; see run()). QUICK is the CI size.
DEFAULT = dict(steps=450, batch_size=16, eval_per_class=50)
# The first 2/3 of the iterations are the regression warm-up (DistillConfig.regression_steps): the distilled
# starting point NitroFusion fine-tunes (the paper starts from DMD2 / Hyper-SDXL students); the rest adversarial.
WARMUP_FRACTION = 2 / 3
REGRESSION_LR = 2e-4    # the student's learning rate in the warm-up
LR_STUDENT = 1e-5       # ... and in the adversarial phase
LR_HEADS = 1e-3
QUICK = dict(steps=8, batch_size=16, eval_per_class=10)
SHIFT = 250
TEACHER_STEPS_TRAIN = 4  # DDIM steps of the teacher for the "real" samples during distillation
CONTINUATION_STEPS = 8   # the teacher's grid for the warm-up targets of the student's later (2nd-4th) steps
# Evaluation runs the models on chunks of this many samples: per sample, batch 50-100 forwards of the digits UNet
# were 1.2-1.5x faster than batch 500 on the 2-core CPU (channels_last; cache-sized activations).
EVAL_BATCH = 100


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=None,
                        help=f"distillation iterations, the regression warm-up's {WARMUP_FRACTION:.0%}% included "
                             f"(default {DEFAULT['steps']}; {QUICK['steps']} with --quick)")
    parser.add_argument("--out", default="nitro-demo", help="output folder (default ./nitro-demo)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="CI size: few iterations, small evaluation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the run (default 0)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per iteration (default 16)")
    parser.add_argument("--eval-per-class", type=int, default=None,
                        help="evaluation samples per digit (default 50; 10 quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--save-student", nargs="?", const="__asset__", default=None, metavar="PATH",
                        help="also save the student (fp16 safetensors); without PATH: the package's shipped asset "
                             "(source checkouts only)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def demo_config(steps: int, batch_size: int, seed: int, out_dir: str | None, device: str, progress: bool = True):
    """The DistillConfig the demo trains with (also used by the tests).

    Chosen from measured runs on this 2-core CPU (see the README and issue 11's notes). The first 2/3 of the
    iterations are a paired regression warm-up (regression_lr 2e-4): 600 of them alone give a one-step Frechet
    distance of 33-36; 300 of them + 150 adversarial iterations at lr_student 1e-5 give 28.6-29.5 (at 5e-5 / 1e-4
    the adversarial phase degraded the student to 64 / 82). Heads: two t* groups x two heads per level per
    iteration, two discriminator updates per generator update, refresh only of heads with >= 16 updates (one t*
    group and one head per level left them ~3 updates old). The student trains for 1, 2 and 4 steps; a later
    step's warm-up target continues the teacher on an 8-step grid (continuation_steps=8; seed 0: one-step Frechet
    31.1, 2/4-step 26.1/26.4; the teacher's own 4-step grid gave 29.5/30.4/33.6, the 4-step student worse than
    the one-step one, and a 20-step grid 33.5/24.9/23.6). Those comparisons ran with the models in the default
    layout; in channels_last (run() converts them: the same math, other float rounding) seed 0 gives
    29.6/24.8/25.5. d_steps=1 instead of 2 gave 59.4/61.7/66.6.
    """
    from nitrokernels.nitro.distiller import DistillConfig

    return DistillConfig(
        steps=steps, regression_steps=round(steps * WARMUP_FRACTION), regression_lr=REGRESSION_LR,
        batch_size=batch_size, grad_accum=1, lr_student=LR_STUDENT, lr_heads=LR_HEADS,
        betas_student=(0.5, 0.999), betas_heads=(0.5, 0.999), weight_decay_heads=0.0, grad_clip=1.0,
        ema_decay=None, shift=SHIFT, teacher_steps=TEACHER_STEPS_TRAIN, continuation_steps=CONTINUATION_STEPS,
        teacher_guidance=1.0, seed=seed,
        device=device, out_dir=out_dir, log_every=10, sample_every=0, sample_count=20, checkpoint_every=0,
        resume=False, progress=progress, d_steps=2, train_steps=(1, 2, 4),
        discriminator=dict(t_star=(10, 250, 500, 750), pool_sizes=4, heads_sampled=2, t_star_sampled=2,
                           refresh_rate=0.01, refresh_min_updates=16, local_size=4, hidden=32, num_groups=8,
                           loss="nonsaturating",
                           # on a CPU the heads run on the eager reference (never Triton's slow interpreter, even
                           # when TRITON_INTERPRET=1 is set, as in the test suite); on a GPU: the fused kernels
                           head_backend=None if str(device).startswith("cuda") else "eager"),
    )


def evaluate(teacher, student, encoder, evaluator, per_class: int, seed: int, shift: float, device,
             teacher_steps=(1, 4, 25), student_steps=(1, 2, 4)):
    """{"teacher": {steps: metrics}, "student": {...}} plus the samples of the first 10 of each (digits 0-9)."""
    import torch

    from nitrokernels.digits import data as digits
    from nitrokernels.nitro.sampling import sample
    from nitrokernels.nitro.scheduler import TimestepShiftLCMScheduler

    n = per_class * digits.NUM_CLASSES
    labels = torch.arange(n) % digits.NUM_CLASSES
    gen = torch.Generator().manual_seed(seed + 777)
    size, channels = teacher.config.sample_size, teacher.config.in_channels
    noise = torch.randn(n, channels, size, size, generator=gen)
    results, rows = {"teacher": {}, "student": {}}, []
    with torch.no_grad():
        for steps in teacher_steps:
            images = digits.teacher_sample(teacher, encoder, labels, steps, noise=noise, batch_size=EVAL_BATCH).cpu()
            m = evaluator(images, labels)
            results["teacher"][steps] = {"accuracy": m.accuracy, "frechet": m.frechet}
            rows.append((f"teacher {steps} step{'s' if steps > 1 else ''} (DDIM)", images[:10]))
        scheduler = TimestepShiftLCMScheduler(**digits.NOISE_SCHEDULE, shift=shift)
        hidden = encoder(labels.to(device))
        for steps in student_steps:
            outs = []
            sgen = torch.Generator().manual_seed(seed + 999)
            for start in range(0, n, EVAL_BATCH):
                x = noise[start:start + EVAL_BATCH].to(device)
                h = hidden[start:start + EVAL_BATCH]
                outs.append(sample(lambda z, t: student(z, t, encoder_hidden_states=h).sample, scheduler, x, steps,
                                   sgen).float().cpu())
            images = torch.cat(outs).clamp(-1, 1)
            m = evaluator(images, labels)
            results["student"][steps] = {"accuracy": m.accuracy, "frechet": m.frechet}
            rows.append((f"student {steps} step{'s' if steps > 1 else ''} (NitroFusion)", images[:10]))
    return results, rows


def format_table(results: dict) -> str:
    lines = [f"{'model':<10}{'steps':>6}{'class accuracy':>17}{'Frechet distance':>19}"]
    for model in ("teacher", "student"):
        for steps, m in results[model].items():
            lines.append(f"{model:<10}{steps:>6}{m['accuracy'] * 100:>16.1f}%{m['frechet']:>19.2f}")
    return "\n".join(lines)


def save_samples_png(path: str, rows) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(rows), 1, figsize=(6.4, 0.75 * len(rows) + 0.3))
    for ax, (title, images) in zip(np.atleast_1d(axes), rows):
        strip = np.concatenate([np.pad(((im[0].numpy() + 1) * 127.5).clip(0, 255), 1) for im in images], axis=1)
        ax.imshow(strip, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(title, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def discriminator_summary(history: list[dict]) -> dict:
    """Means of the discriminator diagnostics (overall, per head kind and per t* group -- each over the iterations
    that drew it) over every iteration that trained the heads, over each phase (the regression warm-up's, when its
    heads trained; the adversarial one's), and over the last quarter of the run."""
    from nitrokernels.nitro.discriminator import t_star_of_key

    history = [r for r in history if "d_loss" in r]
    if not history:
        return {}
    quarter = history[-max(1, len(history) // 4):]
    phases = {"warm-up": [r for r in history if "regression_loss" in r],
              "adversarial": [r for r in history if "regression_loss" not in r]}
    keys = sorted({k for r in history for k in r if k in ("d_accuracy", "logit_gap", "head_age")
                   or k.endswith(("/d_accuracy", "/logit_gap")) or t_star_of_key(k) is not None})

    def mean(rows, key):
        values = [r[key] for r in rows if key in r]
        return round(sum(values) / len(values), 4) if values else None

    return {"mean": {k: mean(history, k) for k in keys}, "last_quarter": {k: mean(quarter, k) for k in keys},
            "phases": {name: {k: mean(rows, k) for k in keys} for name, rows in phases.items() if rows}}


def format_discriminator_summary(summary: dict) -> str:
    if not summary:
        return ""
    from nitrokernels.nitro.discriminator import t_star_of_key

    m, q = summary["mean"], summary["last_quarter"]
    kinds = sorted({k.split("/")[0] for k in m if "/" in k})
    per_kind = ", ".join(f"{kind} {m[f'{kind}/d_accuracy']:.2f}" for kind in kinds)
    t_star_keys = sorted((t_star_of_key(k), k) for k in m if t_star_of_key(k) is not None)
    per_t_star = "".join(f"; t* {t} {m[k]:.2f}" for t, k in t_star_keys)
    phases = "".join(f"{name} {p['d_accuracy']:.2f}, " for name, p in summary.get("phases", {}).items())
    return (f"discriminator: accuracy {m['d_accuracy']:.2f} over the run ({phases}last quarter {q['d_accuracy']:.2f}; chance "
            f"0.50; {per_kind}{per_t_star}), real-fake logit gap {m['logit_gap']:+.2f}, mean age of the sampled "
            f"heads {m['head_age']:.1f} updates")


def _in_source_checkout() -> bool:
    """Whether this package runs from a git checkout (where the shipped assets are made), not an install."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.exists(os.path.join(os.path.dirname(package), ".git"))


def run(args) -> int:
    import copy

    import torch

    from nitrokernels.digits import data as digits
    from nitrokernels.nitro.distiller import LOSS_KEYS, NitroDistiller

    t_start = time.time()
    settings = dict(QUICK if args.quick else DEFAULT)
    steps = args.steps if args.steps is not None else settings["steps"]
    batch = args.batch_size if args.batch_size is not None else settings["batch_size"]     # 0 is refused below
    per_class = args.eval_per_class if args.eval_per_class is not None else settings["eval_per_class"]
    if steps < 1 or batch < 1 or per_class < 2:
        print("nitrokernels demo: --steps and --batch-size must be >= 1 and --eval-per-class >= 2")
        return 2
    if args.save_student == "__asset__" and not _in_source_checkout():
        print("nitrokernels demo: --save-student without a PATH replaces the package's shipped student asset, "
              "which is only done in a source checkout; give a PATH (e.g. --save-student student.safetensors)")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)

    teacher, encoder, teacher_meta = digits.load_pretrained_teacher(device=device)
    # channels_last (the student, a copy, inherits it): the convolutions' native layout on CPUs (oneDNN) and GPUs
    # (tensor cores); measured on the 2-core CPU: batch-16 forward 38 vs 73 ms, adversarial iteration 0.90 vs 1.10 s
    teacher = teacher.to(memory_format=torch.channels_last)
    encoder_cpu = copy.deepcopy(encoder).cpu()
    evaluator = digits.DigitsEvaluator(digits.load_pretrained_classifier(), device=device)
    student = copy.deepcopy(teacher)
    config = demo_config(steps, batch, args.seed, os.path.join(args.out, "train"), str(device),
                         progress=not args.no_progress)
    distiller = NitroDistiller(teacher, student, digits.make_teacher_scheduler(), digits.prompt_bank(encoder_cpu), config)
    disc = distiller.disc
    print(f"NitroFusion digits demo on {device}: teacher {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M "
          f"params; discriminator: {len(disc.levels)} feature levels {list(disc.levels)}, {disc.num_heads} heads "
          f"({len(disc.t_star)} t* x {len(disc.kinds)} kinds x {len(disc.levels)} levels x 4), "
          f"{disc.heads_per_iteration} sampled per iteration; student called at t={distiller.student_t} "
          f"(shift {config.shift}); {steps} iterations of batch {batch}: {config.regression_steps} of regression "
          f"warm-up, then {steps - config.regression_steps} adversarial", flush=True)

    t_train = time.time()
    history = distiller.train()
    train_seconds = time.time() - t_train
    student.eval().requires_grad_(False)

    t_eval = time.time()
    results, rows = evaluate(teacher, student, encoder, evaluator, per_class, args.seed, config.shift, device)
    eval_seconds = time.time() - t_eval

    table = format_table(results)
    disc_summary = discriminator_summary(history)
    print()
    if args.quick:
        print(f"(--quick: {steps} iterations, the student is barely trained -- these numbers check the plumbing, "
              f"not the method; run without --quick for the real demo)")
    print(table)
    print(format_discriminator_summary(disc_summary))
    t1, t25, s1 = results["teacher"][1], results["teacher"][25], results["student"][1]
    print(f"\none-step student vs one-step teacher: accuracy {(s1['accuracy'] - t1['accuracy']) * 100:+.1f} points "
          f"({t1['accuracy'] * 100:.1f}% -> {s1['accuracy'] * 100:.1f}%), Frechet {t1['frechet']:.1f} -> "
          f"{s1['frechet']:.1f}; vs the 25-step teacher: {(s1['accuracy'] - t25['accuracy']) * 100:+.1f} points")

    paths = {
        "samples": save_samples_png(os.path.join(args.out, "samples.png"), rows),
        "loss": save_loss_png(os.path.join(args.out, "loss.png"), history),
    }
    metrics = {
        "teacher": {str(k): v for k, v in results["teacher"].items()},
        "student": {str(k): v for k, v in results["student"].items()},
        "eval_samples": per_class * digits.NUM_CLASSES,
        "iterations": steps, "batch_size": batch, "shift": config.shift, "device": str(device),
        "heads": {"pool": disc.num_heads, "sampled_per_iteration": disc.heads_per_iteration,
                  "levels": [list(level) for level in disc.levels]},
        "seconds": {"train": round(train_seconds, 1), "eval": round(eval_seconds, 1),
                    "total": round(time.time() - t_start, 1)},
        "quick": bool(args.quick), "seed": args.seed,
        "final_losses": {k: v for k, v in history[-1].items() if k in LOSS_KEYS} if history else {},
        "discriminator": disc_summary, "train_steps": list(config.train_steps), "d_steps": config.d_steps,
        "regression_steps": config.regression_steps,
    }
    if args.save_student:
        path = digits.asset_path(digits.STUDENT_ASSET) if args.save_student == "__asset__" else args.save_student
        unet_config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in digits.DIGITS_UNET_CONFIG.items()}
        digits.save_asset(path, {"unet": student, "encoder": encoder},
                          {"unet_config": unet_config, "shift": config.shift, "iterations": steps, "seed": args.seed,
                           "metrics": metrics["student"], "noise_schedule": digits.NOISE_SCHEDULE})
        paths["student"] = path
    metrics["files"] = paths
    metrics["seconds"]["total"] = round(time.time() - t_start, 1)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"\nwrote {os.path.join(args.out, 'metrics.json')}, {paths['samples']}, {paths['loss']}"
          + (f", {paths['student']}" if "student" in paths else "")
          + f"  (train {train_seconds:.0f}s, eval {eval_seconds:.0f}s, total {time.time() - t_start:.0f}s)")
    return 0
