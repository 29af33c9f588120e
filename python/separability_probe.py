"""How separable are a student's samples from its teacher's, at each of the discriminator's noise levels t*?

A fresh small CNN (the "probe"), conditioned on the digit label, is trained to tell the teacher's DDIM samples
(real) from the fake samples, both re-noised to t* as the DynamicDiscriminator re-noises them, and its held-out
accuracy is printed per t*. Whatever its heads, a discriminator that sees x_t* cannot do much better than a
probe trained to convergence on a fixed student: so this is the ceiling on the d_accuracy a NitroFusion run can
show at those t* (with t* = 500 / 750 the noise hides the difference and every probe sits at chance).

    python python/separability_probe.py                       # the shipped digits student vs the 4-step teacher
    python python/separability_probe.py --fake teacher:1      # a control that IS separable (1-step teacher)
    python python/separability_probe.py --fake teacher:4      # a control that is not (the same distribution)

Runs on a CPU in about a minute with the defaults.
"""
import argparse
import json

import torch
from torch import nn

from nitrokernels.digits import data as digits
from nitrokernels.nitro import TimestepShiftLCMScheduler, sample

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--fake", default="student",
                    help="'student' (the shipped one-step student, or --student PATH) or 'teacher:N' (the "
                         "teacher's N-step DDIM samples from other noise) (default student)")
parser.add_argument("--student", default=None, help="a student written by `nitrokernels demo --save-student PATH`")
parser.add_argument("--real-steps", type=int, default=4, help="DDIM steps of the teacher's real samples (default 4)")
parser.add_argument("--count", type=int, default=3000, help="real and fake samples each (default 3000; 80%% train)")
parser.add_argument("--epochs", type=int, default=15, help="probe training epochs (default 15)")
parser.add_argument("--t-star", default="none,10,250,500,750",
                    help="comma-separated noise levels; 'none' = the clean samples (default none,10,250,500,750)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--json", default=None, help="also write {t*: accuracy} to this file")
args = parser.parse_args()
if args.count < 10 or args.epochs < 1 or args.real_steps < 1:
    parser.error("--count must be >= 10, --epochs and --real-steps >= 1")
t_stars = [None if t.strip() == "none" else int(t) for t in args.t_star.split(",")]
if any(t is not None and not 0 <= t < 1000 for t in t_stars):
    parser.error(f"--t-star: noise levels are timesteps in [0, 1000), got {args.t_star}")
torch.manual_seed(args.seed)
CHUNK = 100   # samples per forward (the CPU's fastest batch for the digits UNet)

teacher, encoder, _ = digits.load_pretrained_teacher()
teacher = teacher.to(memory_format=torch.channels_last)
labels = torch.arange(args.count) % digits.NUM_CLASSES
gen = torch.Generator().manual_seed(args.seed + 5)
shape = (args.count, teacher.config.in_channels, teacher.config.sample_size, teacher.config.sample_size)
real_noise, fake_noise = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def student_samples(noise):
    student, _, meta = digits.load_pretrained_student(path=args.student)
    student = student.to(memory_format=torch.channels_last)
    scheduler = TimestepShiftLCMScheduler(**digits.NOISE_SCHEDULE, shift=meta["shift"])
    hidden = encoder(labels)
    return torch.cat([sample(lambda z, t, h=hidden[i:i + CHUNK]: student(z, t, encoder_hidden_states=h).sample,
                             scheduler, noise[i:i + CHUNK], 1, None).float()
                      for i in range(0, len(noise), CHUNK)]).clamp(-1, 1)


with torch.no_grad():
    real = digits.teacher_sample(teacher, encoder, labels, args.real_steps, noise=real_noise, batch_size=CHUNK)
    if args.fake == "student":
        fake = student_samples(fake_noise)
    elif args.fake.startswith("teacher:") and args.fake[8:].isdigit() and int(args.fake[8:]) >= 1:
        fake = digits.teacher_sample(teacher, encoder, labels, int(args.fake[8:]), noise=fake_noise, batch_size=CHUNK)
    else:
        parser.error(f"--fake must be 'student' or 'teacher:N' with N >= 1, got {args.fake!r}")
noise_schedule = digits.make_teacher_scheduler()


def probe_accuracy(t_star):
    """Held-out accuracy of a fresh label-conditioned CNN trained on real vs fake re-noised to t_star."""
    torch.manual_seed(args.seed + 1)
    x, y = torch.cat([real, fake]), torch.cat([torch.ones(args.count), torch.zeros(args.count)])
    onehot = nn.functional.one_hot(torch.cat([labels, labels]), digits.NUM_CLASSES).float()
    if t_star is not None:   # the discriminator's re-noising (the noise schedule's x_t), fixed per sample
        x = noise_schedule.add_noise(x, torch.randn_like(x), torch.full((len(x),), t_star))
    order = torch.randperm(len(x))
    x, y, onehot = x[order], y[order], onehot[order]
    n_train = int(0.8 * len(x))
    size = x.shape[-1]
    net = nn.Sequential(nn.Conv2d(x.shape[1] + digits.NUM_CLASSES, 32, 3, padding=1), nn.SiLU(),
                        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
                        nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(),
                        nn.Flatten(), nn.Linear(64 * ((size + 3) // 4) ** 2, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def logits(lo, hi):
        cond = onehot[lo:hi, :, None, None].expand(-1, -1, size, size)
        return net(torch.cat([x[lo:hi], cond], 1)).squeeze(1)

    for _ in range(args.epochs):
        for lo in range(0, n_train, 64):
            hi = min(lo + 64, n_train)
            loss = nn.functional.binary_cross_entropy_with_logits(logits(lo, hi), y[lo:hi])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return ((logits(n_train, len(x)) > 0).float() == y[n_train:]).float().mean().item()


results = {}
print(f"probe: teacher {args.real_steps}-step (real) vs {args.fake} (fake), {args.count} each, "
      f"{args.epochs} epochs; held-out accuracy (chance 0.5):")
for t_star in t_stars:
    results["none" if t_star is None else str(t_star)] = acc = probe_accuracy(t_star)
    print(f"  t* {'clean' if t_star is None else t_star:>5}: {acc:.3f}", flush=True)
noised = [v for k, v in results.items() if k != "none"]
if noised:
    print(f"  mean over the noised t*: {sum(noised) / len(noised):.3f}  (the ceiling on a discriminator's mean "
          f"d_accuracy at these t*)")
if args.json:
    with open(args.json, "w") as f:
        json.dump({"fake": args.fake, "real_steps": args.real_steps, "count": args.count, "epochs": args.epochs,
                   "accuracy": results}, f, indent=2)
