"""NitroFusion's pieces in a training loop of your own (no NitroDistiller): the dynamic discriminator with its
pool of heads, the sampled AdamW for the heads and the shifted-LCM one-step student, on the shipped digits
teacher. Runs on a CPU in about a minute; on a GPU the heads run the fused grouped kernels.

    python python/own_training_loop.py --steps 100 --out runs/own-loop

Prints the losses every 10 steps and saves a grid of one-step samples before/after (rows: digits 0-9).
"""
import argparse
import copy
import os

import torch

from nitrokernels.nitro import DynamicDiscriminator, TimestepShiftLCMScheduler, sample
from nitrokernels.digits import data as digits
from nitrokernels.optim import SampledAdamW, clip_grad_norm_

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--steps", type=int, default=100, help="training iterations (default 100)")
parser.add_argument("--batch", type=int, default=8, help="images per iteration (default 8)")
parser.add_argument("--out", default="runs/own-loop", help="folder for the sample grid PNG")
args = parser.parse_args()
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)

teacher, encoder, _ = digits.load_pretrained_teacher(device)            # frozen; also the D backbone
student = copy.deepcopy(teacher).train().requires_grad_(True)            # one-step student, from the teacher
scheduler = TimestepShiftLCMScheduler(**digits.NOISE_SCHEDULE, shift=250)
disc = DynamicDiscriminator(teacher, pool_sizes=4, hidden=32, num_groups=8, local_size=4,
                            head_backend=None if device == "cuda" else "eager")  # CPU: skip Triton's interpreter
heads_opt = SampledAdamW(disc.head_parameters(), lr=5e-4, betas=(0.5, 0.999), weight_decay=0.0)
student_opt = torch.optim.AdamW(student.parameters(), lr=5e-5, betas=(0.5, 0.999))


def one_step(unet, noise, cond):
    return sample(lambda x, t: unet(x, t, **cond).sample, scheduler, noise, steps=1)


def grid_row(unet):
    with torch.no_grad():
        noise = torch.randn(10, 1, 16, 16, generator=torch.Generator().manual_seed(1)).to(device)
        return one_step(unet, noise, {"encoder_hidden_states": encoder(torch.arange(10, device=device))}).cpu()


before = grid_row(student)
for step in range(args.steps):
    labels = torch.randint(0, 10, (args.batch,), device=device)
    with torch.no_grad():
        cond = {"encoder_hidden_states": encoder(labels)}
        uncond = {"encoder_hidden_states": encoder.empty(args.batch).to(device)}
    noise = torch.randn(args.batch, 1, 16, 16, device=device)
    real = digits.teacher_sample(teacher, encoder, labels, steps=4, noise=noise)   # the teacher's multi-step x0
    fake = one_step(student, noise, cond)                                          # gradients reach the student

    selection = disc.sample()                 # every t* group, one head per level per kind, from the pool
    d_out = disc.d_loss(real, fake.detach(), cond, uncond, selection=selection)
    d_out.d_loss.backward()                   # sparse gradients: only the sampled heads' rows
    clip_grad_norm_(disc.head_parameters(), 10.0)   # torch's clip_grad_norm_ refuses sparse gradients
    heads_opt.step()
    heads_opt.zero_grad()
    disc.record_updates(selection)            # head ages: refresh only re-initialises heads that have learnt

    g_out = disc.g_loss(fake, cond, uncond, selection=selection)
    g_out.g_loss.backward()                   # through the frozen backbone into `fake`, then the student
    student_opt.step()
    student_opt.zero_grad()
    disc.refresh(optimizer=heads_opt)         # ~1% of the old-enough heads re-initialised, AdamW rows reset
    if step % 10 == 0 or step == args.steps - 1:
        print(f"step {step:4d}  d_loss {d_out.d_loss.item():.3f}  g_loss {g_out.g_loss.item():.3f}")

os.makedirs(args.out, exist_ok=True)
torch.save(disc.heads_state_dict(), os.path.join(args.out, "heads.pt"))   # the pool and head ages, not the backbone
digits.save_grid_png(path := os.path.join(args.out, "one_step_before_after.png"), [before, grid_row(student)])
print(path)
