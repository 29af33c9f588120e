"""Train the digits teacher (a class-conditional diffusion UNet) and the digits classifier, and write the
shipped assets under nitrokernels/digits/assets/ (fp16 safetensors):

    python python/train_digits_teacher.py --threads 1     # seed 0: the shipped checkpoints (1500 teacher steps;
                                                          # ~8 min on one idle core, ~15 min on a busy machine)
    python python/train_digits_teacher.py --steps 200 --out /tmp/assets   # a quick look

Reproducible: every random draw comes from `--seed` (default 0) via torch.manual_seed and explicit
generators, on the CPU with torch.use_deterministic_algorithms; the result is bit-identical for the same
seed, torch version (2.13 CPU) and thread count; another thread count changes the floating-point summation
order and so the last bits of the weights. The shipped files were made in two runs, seed 0:
`--only classifier` (2 threads, the default) and `--only teacher --threads 1`. The data are scikit-learn's bundled 8x8 digits
upsampled to 16x16 (nitrokernels.digits.data.load_digits); nothing is downloaded.

Teacher recipe: epsilon-prediction DDPM loss on Stable Diffusion's noise schedule, AdamW (lr 1e-3, 100-step
warm-up, cosine decay), batch 64, the label replaced by the empty prompt (10) 10% of the time (so the
teacher has empty-prompt features for the discriminator's unconditional heads, and classifier-free guidance
works), EMA 0.995 of the weights is what is saved. Classifier recipe: a small CNN on an 80% split with shift
+ noise augmentation; its held-out accuracy is printed and stored in the asset's metadata.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nitrokernels.digits import data as digits  # noqa: E402


def train_teacher(steps: int, seed: int, batch_size: int = 64, lr: float = 1e-3, ema_decay: float = 0.995,
                  p_uncond: float = 0.1, log=print):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = digits.load_digits()
    unet = digits.make_digits_unet()
    encoder = digits.DigitsEncoder()
    noise_sched = digits.make_noise_scheduler()
    alphas = noise_sched.alphas_cumprod
    params = list(unet.parameters()) + list(encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    warmup = min(100, steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    ema_unet, ema_encoder = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(encoder).requires_grad_(False)
    start = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        x0, lab = images[idx], labels[idx].clone()
        lab[torch.rand(batch_size, generator=gen) < p_uncond] = digits.EMPTY_LABEL
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(xt, t, encoder_hidden_states=encoder(lab)).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for src, dst in ((unet, ema_unet), (encoder, ema_encoder)):
                for p_ema, p in zip(dst.parameters(), src.parameters()):
                    p_ema.lerp_(p, 1 - decay)
        if step % 25 == 0 or step == steps - 1:
            log(f"teacher step {step + 1}/{steps}: loss {loss.item():.4f}  ({time.time() - start:.0f}s)")
    return ema_unet.eval(), ema_encoder.eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500, help="teacher training steps (default 1500)")
    parser.add_argument("--classifier-epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=digits.ASSETS_DIR, help="where the assets go (default: the package's)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--eval-count", type=int, default=500,
                        help="teacher samples scored at 1/4/25 steps after training (default 500)")
    parser.add_argument("--only", choices=("all", "classifier", "teacher"), default="all",
                        help="train only one of the two (the teacher's report then needs the classifier asset in --out)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()

    if args.only in ("all", "classifier"):
        classifier, held_out = digits.train_classifier(epochs=args.classifier_epochs, seed=args.seed)
        digits.save_asset(os.path.join(args.out, digits.CLASSIFIER_ASSET), {"classifier": classifier},
                          {"resolution": digits.DIGITS_RESOLUTION, "held_out_accuracy": held_out, "seed": args.seed,
                           "epochs": args.classifier_epochs})
        print(f"classifier held-out accuracy {held_out:.4f}  ({time.time() - t0:.0f}s)")
        if args.only == "classifier":
            return 0
    else:
        classifier = digits.load_pretrained_classifier(path=os.path.join(args.out, digits.CLASSIFIER_ASSET))

    unet, encoder = train_teacher(args.steps, args.seed)
    evaluator = digits.DigitsEvaluator(classifier)
    labels = torch.arange(args.eval_count) % 10
    gen = torch.Generator().manual_seed(args.seed + 1)
    noise = torch.randn(args.eval_count, 1, digits.DIGITS_RESOLUTION, digits.DIGITS_RESOLUTION, generator=gen)
    scores = {}
    for steps in (1, 4, 25):
        m = evaluator(digits.teacher_sample(unet, encoder, labels, steps, noise=noise), labels)
        scores[steps] = {"accuracy": m.accuracy, "frechet": m.frechet}
        print(f"teacher {steps:2d} steps: accuracy {m.accuracy:.3f}  Frechet {m.frechet:.2f}")
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in digits.DIGITS_UNET_CONFIG.items()}
    digits.save_asset(os.path.join(args.out, digits.TEACHER_ASSET), {"unet": unet, "encoder": encoder},
                      {"unet_config": config, "noise_schedule": digits.NOISE_SCHEDULE, "seed": args.seed,
                       "steps": args.steps, "ddim_scores": scores, "sampler": "DDIM trailing, no guidance"})
    print(f"wrote {args.out}  ({time.time() - t0:.0f}s total)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
