"""NitroFusion distillation: a multi-step teacher makes "real" x0 from noise, the one-step student makes "fake"
x̂0 from the same noise, and a DynamicDiscriminator (frozen teacher encoder + pooled heads) trains both
adversarially -- no regression term. NitroFusion fine-tunes students that are already distilled; for a student
copied from an undistilled teacher, DistillConfig.regression_steps first fits it to the teacher's paired
solutions (a warm-up of its own iterations, before the adversarial ones; see NitroDistiller._regression_step).

    bank = PromptBank(cond={"encoder_hidden_states": text_embs}, uncond={"encoder_hidden_states": empty_emb})
    distiller = NitroDistiller(teacher, student, teacher_scheduler, bank,
                               DistillConfig(steps=2000, batch_size=5, grad_accum=20, shift=250, out_dir="runs/x"))
    distiller.train()                      # resumes from runs/x/checkpoint.pt when it exists (resume=True)

One iteration (DistillConfig.steps of them):
  1. draw the heads of this iteration (DynamicDiscriminator.sample: t* groups + heads per level per kind);
  2. discriminator phase, d_steps times (DMD2 uses 5 critic updates per generator update): for each of
     grad_accum fresh micro-batches: prompts, noise x_T, teacher x0 (multi-step, no grad; the d_steps rounds'
     in one batched teacher call), student x̂0 (no grad), d_loss backward; then one SampledAdamW step of the
     sampled heads, and their update counts;
  3. generator phase, on the last discriminator round's micro-batches (same noise, prompts, student inputs):
     student x̂0 with grad, g_loss through the frozen backbone and the just-updated heads (held constant),
     backward; clip, AdamW step, EMA;
  4. refresh ~refresh_rate of the pool among the heads old enough (re-initialised with their optimiser rows).

Which step the student trains ("bottom-up refinement": 1-4 steps from the same weights). With
train_steps=(1,) the student is always called once, at the shifted timestep floor(999 * shift / 1000) on pure
noise, and its output becomes x̂0 by TimestepShiftLCMScheduler's 1-step rule. With several step counts (default
(1, 2, 4)) each micro-batch draws n from train_steps and a step i in [0, n) (uniformly), runs the student's
first i steps of the n-step schedule without gradient (backward simulation, as DMD2's multi-step models: the
student's own earlier steps make the input, re-noised to the LCM timestep exactly as the sampler does), and
trains step i at its model timestep; x̂0 is that step's denoised estimate. So the student is trained at exactly
the (timestep, input distribution) pairs that nitrokernels.nitro.sampling.sample feeds it at 1..4 steps.

Exact resume: every random draw comes from two generators owned by the distiller (one on the host for
prompt and t* choices, one on the device for noise and head ids) whose states are checkpointed together
with the step, student, EMA, heads, both optimisers, the LR schedulers and the grad scaler, so a resumed run
continues the identical loss curve. Checkpoints are written to a temporary file and moved into place with
os.replace (a crash mid-write leaves the previous checkpoint intact; tmp files of dead writers are removed).
A checkpoint holds only tensors, numbers, strings and containers: it is read with torch.load(weights_only=True),
so an untrusted file cannot run code, and a sha256 digest of every value (state_digest) is verified. A corrupt or
edited file, one of the older pickled format (convert_legacy_checkpoint converts trusted ones), or one written
for a different configuration / model is refused with a clear error, after checking every entry and before
anything is modified. On resume, log.jsonl rows of steps after the checkpoint (written before a kill) are dropped.

Conditioning is anything the UNets take as kwargs: {"encoder_hidden_states": ...} for a class- or
text-conditional UNet; add {"added_cond_kwargs": {"text_embeds": ..., "time_ids": ...}} for SDXL. The
"uncond" kwargs (the empty prompt) feed the discriminator's unconditional heads and the teacher's
classifier-free guidance.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import logging
import math
import os
import pickle
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn as nn

from nitrokernels.nitro.discriminator import DynamicDiscriminator, t_star_accuracy_keys

if TYPE_CHECKING:
    from nitrokernels.nitro.scheduler import TimestepShiftLCMScheduler

__all__ = ["DistillConfig", "NitroDistiller", "PromptBank", "CheckpointError", "load_unet_weights", "save_image_grid",
           "convert_legacy_checkpoint", "read_checkpoint", "state_digest", "walk_tensors"]

log = logging.getLogger("nitrokernels")
CHECKPOINT_FORMAT = "nitrokernels-nitrofusion-distill-v2"
# v1 files held numpy / pickled objects and need torch.load(weights_only=False): refused (convert_legacy_checkpoint)
LEGACY_FORMATS = ("nitrokernels-nitrofusion-distill-v1",)
CHECKPOINT_NAME = "checkpoint.pt"

# Config fields that may differ between a checkpoint and the run that resumes it (everything else must match).
# What a log row holds besides the diagnostics: adversarial iterations have d_loss and g_loss, warm-up
# iterations (DistillConfig.regression_steps) regression_loss; grad_norm where the student's gradient is clipped.
LOSS_KEYS = ("d_loss", "g_loss", "regression_loss", "grad_norm")
_RESUMABLE_FIELDS = {"steps", "log_every", "sample_every", "checkpoint_every", "out_dir", "progress", "resume",
                     "device", "sample_count"}


class CheckpointError(RuntimeError):
    """A checkpoint is corrupt, of another format, or was written for a different configuration / model."""


@dataclass
class DistillConfig:
    """Everything a NitroFusion distillation run needs; every field has a documented default.

    Optimisation: lr_student / lr_heads (AdamW / SampledAdamW; DMD2 used 5e-7 on SDXL, the paper does not
    say), betas, weight decay, warmup_steps (linear LR warm-up of both), grad_clip (max grad norm of the
    student; None = off), ema_decay (None = no EMA), batch_size x grad_accum images per update (paper: 5 x 20).
    Method: shift (timestep shift of the student: it is called at floor(999 * shift / 1000)), teacher_steps and
    teacher_guidance (the teacher's multi-step sampler; guidance 1 = none), refresh_every (iterations between
    pool refreshes; the rate is the discriminator's refresh_rate), d_steps (discriminator updates per generator
    update), train_steps (the step counts the student is trained for, by backward simulation; (1,) = one step),
    regression_steps (a pre-distillation warm-up: the first N iterations fit the student's x̂0 at its drawn step to
    the teacher's sampler's result from the same input by mean squared error, no discriminator; 0 = none, the
    paper's purely adversarial run), regression_lr (the student's learning rate in the warm-up; None = lr_student),
    continuation_steps (the teacher's sampler grid, in steps over the whole schedule, for a later step's warm-up
    target, the teacher continued from that step's input; None = teacher_steps. A finer grid makes those targets
    better samples than the first step's, which is what lets more student steps refine: on the digits the
    teacher's 4-step sample re-noised at 749/499/249 and continued on a 20-step grid reaches Frechet 17.4, on the
    4-step grid 27.0), warmup_heads_every (every N-th warm-up iteration also trains the sampled heads, teacher
    sample vs the student's x̂0 of that iteration, so they enter the adversarial phase trained rather than fresh;
    0 = heads untouched).
    NitroFusion fine-tunes students that are already distilled (DMD2, Hyper-SDXL); a student copied from an
    undistilled teacher gets that starting point from this warm-up. The adversarial iterations after it have no
    regression term.
    discriminator: kwargs of DynamicDiscriminator (when the distiller builds it; see its docstring).
    Precision: mixed_precision "no" | "bf16" | "fp16" (autocast of every UNet forward, on CUDA or the CPU;
    fp16 uses a GradScaler, whose state is checkpointed).
    Bookkeeping: seed, device, out_dir (checkpoints, log.jsonl, sample grids; None = none), log_every,
    sample_every (sample-grid PNG every N iterations; 0 = only at the end), sample_count, checkpoint_every (0 =
    only at the end), resume (continue from out_dir/checkpoint.pt when present), progress (tqdm bar).
    """

    steps: int = 1000
    batch_size: int = 5
    grad_accum: int = 1
    lr_student: float = 1e-5
    lr_heads: float = 1e-4
    betas_student: tuple[float, float] = (0.9, 0.999)
    betas_heads: tuple[float, float] = (0.9, 0.999)
    weight_decay_student: float = 0.0
    weight_decay_heads: float = 0.01
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    ema_decay: float | None = None
    shift: float = 250
    teacher_steps: int = 4
    teacher_guidance: float = 1.0
    refresh_every: int = 1
    d_steps: int = 1
    train_steps: tuple[int, ...] = (1, 2, 4)
    regression_steps: int = 0
    regression_lr: float | None = None
    warmup_heads_every: int = 0
    continuation_steps: int | None = None
    discriminator: dict = field(default_factory=dict)
    mixed_precision: str = "no"
    seed: int = 0
    device: str | None = None
    out_dir: str | None = None
    log_every: int = 10
    sample_every: int = 0
    sample_count: int = 20
    checkpoint_every: int = 0
    resume: bool = True
    progress: bool = True

    def __post_init__(self):
        def positive_int(name, low=1):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"DistillConfig.{name} must be an int >= {low}, got {value!r}")

        for name in ("batch_size", "grad_accum", "teacher_steps", "refresh_every", "sample_count", "d_steps"):
            positive_int(name)
        for name in ("steps", "log_every", "sample_every", "checkpoint_every", "warmup_steps", "regression_steps",
                     "warmup_heads_every"):
            positive_int(name, 0)
        def finite_number(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"DistillConfig.{name} must be a finite number, got {value!r}")

        for name in ("lr_student", "lr_heads", "weight_decay_student", "weight_decay_heads"):
            finite_number(name)
            if not getattr(self, name) >= 0:
                raise ValueError(f"DistillConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.continuation_steps is not None:
            positive_int("continuation_steps")
        if self.regression_lr is not None:
            finite_number("regression_lr")
            if not self.regression_lr > 0:
                raise ValueError(f"DistillConfig.regression_lr must be > 0 or None, got {self.regression_lr!r}")
        finite_number("teacher_guidance")
        finite_number("shift")
        for name in ("betas_student", "betas_heads"):
            value = getattr(self, name)
            try:
                betas = tuple(value)
            except TypeError:
                betas = ()
            if len(betas) != 2 or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0
                                      for b in betas):
                raise ValueError(f"DistillConfig.{name} must be two numbers in [0, 1), got {value!r}")
            setattr(self, name, tuple(float(b) for b in betas))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63 - 12345:
            raise ValueError(f"DistillConfig.seed must be an int in [0, 2**63 - 12345), got {self.seed!r}")
        for name in ("resume", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DistillConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.out_dir is not None and not isinstance(self.out_dir, (str, os.PathLike)):
            raise ValueError(f"DistillConfig.out_dir must be a path or None, got {self.out_dir!r}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError, ValueError) as err:
                raise ValueError(f"DistillConfig.device {self.device!r} is not a torch device ({err})") from None
        try:
            self.train_steps = tuple(self.train_steps)
        except TypeError:
            raise ValueError(f"DistillConfig.train_steps must be a tuple of step counts, got {self.train_steps!r}") from None
        if not self.train_steps or any(isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1000
                                       for n in self.train_steps) or len(set(self.train_steps)) != len(self.train_steps):
            raise ValueError(f"DistillConfig.train_steps must be distinct ints in [1, 1000] (e.g. (1, 2, 4) or (1,)), "
                             f"got {self.train_steps!r}")
        if not 0 < self.shift <= 1000:
            raise ValueError(f"DistillConfig.shift must be in (0, 1000] (NitroSD: 250 Realism, 500 Vibrant), got {self.shift!r}")
        for name in ("ema_decay", "grad_clip"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"DistillConfig.{name} must be a number or None, got {value!r}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"DistillConfig.ema_decay must be in [0, 1) or None, got {self.ema_decay!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"DistillConfig.grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"DistillConfig.mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if not isinstance(self.discriminator, Mapping):
            raise ValueError("DistillConfig.discriminator must be a dict of DynamicDiscriminator kwargs")
        self.discriminator = dict(self.discriminator)

    def fingerprint(self) -> dict:
        """The fields a resumed run must share with its checkpoint (JSON-able)."""
        return {k: _jsonable(v) for k, v in dataclasses.asdict(self).items() if k not in _RESUMABLE_FIELDS}


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.dtype):
        return str(value)
    return value


# --------------------------------------------------------------------------------------------- prompts
class PromptBank:
    """A bank of precomputed conditioning: `cond` holds N prompts ([N, ...] tensors, nested dicts allowed, e.g.
    SDXL's added_cond_kwargs), `uncond` the empty prompt ([1, ...] tensors, expanded to the batch).

    `bank(batch, generator)` draws `batch` prompt indices uniformly (host generator) and returns
    (cond kwargs, uncond kwargs, indices). Labels of the class-conditional digits are the indices 0-9.
    """

    def __init__(self, cond: Mapping, uncond: Mapping | None = None):
        sizes = {v.shape[0] for _, v in _walk(cond)}
        if len(sizes) != 1:
            raise ValueError(f"PromptBank: every cond tensor needs the same number of prompts, got sizes {sorted(sizes)}")
        self.size = sizes.pop()
        if self.size < 1:
            raise ValueError("PromptBank: the bank is empty")
        if uncond is not None:
            bad = [k for k, v in _walk(uncond) if v.shape[0] != 1]
            if bad:
                raise ValueError(f"PromptBank: uncond tensors must have batch 1 (the empty prompt), {bad} do not")
        self.cond, self.uncond = cond, uncond

    def __len__(self):
        return self.size

    def indices(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.size, (batch,), generator=generator)

    def take(self, indices: torch.Tensor, device=None):
        idx = indices.cpu()
        cond = _map(self.cond, lambda v: v[idx.to(v.device)].to(device) if device is not None else v[idx.to(v.device)])
        uncond = None if self.uncond is None else _map(
            self.uncond, lambda v: v.expand(len(idx), *v.shape[1:]).to(device) if device is not None
            else v.expand(len(idx), *v.shape[1:]))
        return cond, uncond

    def __call__(self, batch: int, generator: torch.Generator | None = None, device=None):
        idx = self.indices(batch, generator)
        cond, uncond = self.take(idx, device)
        return cond, uncond, idx


def walk_tensors(kwargs: Mapping, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted name, tensor) of every tensor in nested conditioning kwargs, depth first in insertion order:
    {"a": t, "added_cond_kwargs": {"time_ids": u}} -> ("a", t), ("added_cond_kwargs.time_ids", u). Non-tensor
    leaves are skipped."""
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            yield prefix + key, value
        elif isinstance(value, Mapping):
            yield from walk_tensors(value, prefix + key + ".")


_walk = walk_tensors  # the old private name (kept for callers that import it)


def _map(kwargs, fn):
    return {k: (fn(v) if isinstance(v, torch.Tensor) else _map(v, fn) if isinstance(v, Mapping) else v)
            for k, v in kwargs.items()}


def _cat_conds(conds: list[Mapping]) -> dict:
    """The conditioning kwargs of several micro-batches as one batch (tensors concatenated, nested dicts too)."""
    first = conds[0]
    return {k: (torch.cat([c[k] for c in conds]) if isinstance(v, torch.Tensor)
                else _cat_conds([c[k] for c in conds]) if isinstance(v, Mapping) else v) for k, v in first.items()}


# --------------------------------------------------------------------------------------------- weights
def __getattr__(name: str):
    # load_unet_weights lives in nitro.pipeline (one loader, one set of errors); this name is the same function,
    # resolved on first use so that importing the trainer does not import diffusers (pipeline's scheduler does)
    if name == "load_unet_weights":
        from nitrokernels.nitro.pipeline import load_unet_weights

        return load_unet_weights
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def image_grid(images: torch.Tensor, nrow: int = 10, pad: int = 1):
    """Images [N, C, H, W] in [-1, 1] (C = 1 or 3; other counts: the first channel) -> a uint8 numpy grid,
    [H', W'] for one channel or [H', W', 3], `pad` black pixels between and around the tiles."""
    images = images.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    if images.shape[1] not in (1, 3):
        images = images[:, :1]
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.zeros(c, rows * (h + pad) + pad, nrow * (w + pad) + pad, dtype=torch.uint8)
    for i in range(n):
        y, x = divmod(i, nrow)
        grid[:, pad + y * (h + pad):pad + y * (h + pad) + h, pad + x * (w + pad):pad + x * (w + pad) + w] = images[i]
    return grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()


def save_image_grid(images: torch.Tensor, path: str, nrow: int = 10, scale: int = 4, pad: int = 1) -> str:
    """Save images [N, C, H, W] in [-1, 1] (C = 1 or 3; other counts: the first channel) as a PNG grid,
    upscaled `scale`x with nearest neighbour; written atomically."""
    from PIL import Image

    img = Image.fromarray(image_grid(images, nrow=nrow, pad=pad))
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)
    return path


@dataclass
class _MicroBatch:
    """One micro-batch: prompts, the starting noise x_T, and the schedule step the student trains on it
    (`steps`, `index`) with that step's input `x` (x_T itself for index 0)."""

    noise: torch.Tensor
    cond: Mapping
    uncond: Mapping | None
    steps: int
    index: int
    x: torch.Tensor


def _progress_fields(row: dict) -> dict:
    """The progress bar's summary of a log row: losses, discriminator accuracy, real-fake logit gap, head age."""
    if "regression_loss" in row:
        fields = {"warm-up mse": f"{row['regression_loss']:.4f}"}
    else:
        fields = {"d": f"{row['d_loss']:.3f}", "g": f"{row['g_loss']:.3f}"}
    for key, label, fmt in (("d_accuracy", "acc", "{:.2f}"), ("logit_gap", "gap", "{:+.2f}"), ("head_age", "age", "{:.1f}")):
        if key in row:
            fields[label] = fmt.format(row[key])
    return fields


def _step_diagnostics(d_diag, g_diag=None) -> dict:
    """Per-kind diagnostics of an iteration ("<kind>/<name>") plus their means over kinds ("d_accuracy",
    "logit_gap", "head_age") and the accuracy of each sampled t* group ("d_accuracy_t<t*>"): what a GAN user
    watches to see the discriminator keep up. g_diag: None in an iteration without a generator update (a
    regression warm-up's)."""
    flat = {f"{k}/{n}": v for k, st in d_diag.diagnostics.items() for n, v in st.items() if n != "heads"}
    flat.update(t_star_accuracy_keys(d_diag.t_star_accuracy))
    if g_diag is not None:
        flat.update({f"{k}/{n}": v for k, st in g_diag.diagnostics.items() for n, v in st.items() if n == "g_loss"})
    for name in ("d_accuracy", "logit_gap", "head_age"):
        values = [st[name] for st in d_diag.diagnostics.values() if name in st]
        if values:
            flat[name] = torch.stack([torch.as_tensor(v).float() for v in values]).mean()
    return flat


def _unet_out(output):
    return output.sample if hasattr(output, "sample") else output[0] if isinstance(output, (tuple, list)) else output


# --------------------------------------------------------------------------------------------- trainer
def _check_models(teacher, student, teacher_scheduler, prompts, config) -> None:
    """Constructor checks of NitroDistiller: what would otherwise fail deep inside the first step."""
    if not isinstance(config, DistillConfig):
        raise TypeError(f"NitroDistiller: config must be a DistillConfig, got {type(config).__name__}")
    for name, model in (("teacher", teacher), ("student", student)):
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"NitroDistiller: {name} must be a diffusers UNet (an nn.Module with .config), "
                            f"got {type(model).__name__}")
        if next(model.parameters(), None) is None:
            raise ValueError(f"NitroDistiller: {name} has no parameters")

    def cfg(model, key):
        c = model.config
        return c.get(key) if isinstance(c, Mapping) else getattr(c, key, None)

    for key in ("in_channels", "out_channels", "sample_size", "cross_attention_dim"):
        t, s = cfg(teacher, key), cfg(student, key)
        if t is not None and s is not None and t != s:
            raise ValueError(f"NitroDistiller: student {key}={s!r} but teacher {key}={t!r}; the student must take the "
                             f"teacher's inputs and conditioning (e.g. a copy of the teacher)")
    if teacher_scheduler is None or not all(hasattr(teacher_scheduler, a) for a in ("set_timesteps", "step")):
        raise TypeError(f"NitroDistiller: teacher_scheduler must be a diffusers scheduler (set_timesteps, step, "
                        f"timesteps), got {type(teacher_scheduler).__name__}")
    if prompts is None or not callable(prompts):
        raise TypeError(f"NitroDistiller: prompts must be a PromptBank (or a callable (batch, generator, device) -> "
                        f"(cond, uncond, indices)), got {type(prompts).__name__}")
    if config.teacher_guidance != 1.0 and isinstance(prompts, PromptBank) and prompts.uncond is None:
        raise ValueError(f"NitroDistiller: teacher_guidance={config.teacher_guidance} needs the empty prompt: the "
                         f"PromptBank has no uncond kwargs")
    if isinstance(prompts, PromptBank):
        width = cfg(teacher, "cross_attention_dim")
        for part, kwargs in (("cond", prompts.cond), ("uncond", prompts.uncond or {})):
            ehs = kwargs.get("encoder_hidden_states")
            if isinstance(width, int) and isinstance(ehs, torch.Tensor) and ehs.shape[-1] != width:
                raise ValueError(f"NitroDistiller: the PromptBank's {part} encoder_hidden_states have width "
                                 f"{ehs.shape[-1]} (shape {tuple(ehs.shape)}) but the teacher's cross_attention_dim "
                                 f"is {width}")


class NitroDistiller:
    """NitroFusion adversarial distillation of a one-step student; see the module docstring.

    Args:
        teacher: a diffusers UNet (frozen here) used with `teacher_scheduler` (any diffusers scheduler, e.g.
            DDIM) for `config.teacher_steps` steps to make real x0.
        student: the UNet to train (initialised from given weights; e.g. a copy of the teacher, or
            load_unet_weights(...)).
        teacher_scheduler: a diffusers scheduler instance for the teacher.
        prompts: a PromptBank (or any callable (batch, host_generator, device) -> (cond, uncond, indices)).
        config: DistillConfig.
        discriminator: a DynamicDiscriminator (default: built over the teacher with config.discriminator).
        student_scheduler: the TimestepShiftLCMScheduler that defines the student's x0 (default: built with
            config.shift and the teacher scheduler's noise schedule).
        decode: latents -> images in [-1, 1] for the sample grids (e.g. a VAE decode); default: identity.
        grid_prompts: indices into the PromptBank for the sample grid (default: the first sample_count, cycled).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, teacher_scheduler: Any,
                 prompts: PromptBank | Callable[..., tuple], config: DistillConfig,
                 discriminator: DynamicDiscriminator | None = None,
                 student_scheduler: TimestepShiftLCMScheduler | None = None,
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None, grid_prompts: torch.Tensor | None = None):
        from nitrokernels.nitro.scheduler import TimestepShiftLCMScheduler

        _check_models(teacher, student, teacher_scheduler, prompts, config)
        self.config = config
        self.device = torch.device(config.device or next(student.parameters()).device)
        self.teacher = teacher.to(self.device).requires_grad_(False).eval()
        self.student = student.to(self.device).train()
        if student is teacher or any(p is q for p, q in zip(student.parameters(), teacher.parameters())):
            raise ValueError("NitroDistiller: teacher and student must be different modules (pass a copy of the "
                             "teacher as the student, e.g. copy.deepcopy(teacher))")
        self.student.requires_grad_(True)
        self.teacher_scheduler = teacher_scheduler
        self.prompts = prompts
        self.decode = decode
        if discriminator is None:
            kwargs = dict(config.discriminator)
            if "alphas_cumprod" not in kwargs and hasattr(teacher_scheduler, "alphas_cumprod"):
                kwargs["alphas_cumprod"] = teacher_scheduler.alphas_cumprod
            # the heads' initial weights come from config.seed (not from whatever the global RNG holds)
            devices = [self.device.index or 0] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(config.seed + 2)
                discriminator = DynamicDiscriminator(self.teacher, **kwargs)
        if not isinstance(discriminator, DynamicDiscriminator):
            raise TypeError(f"NitroDistiller: discriminator must be a DynamicDiscriminator, got "
                            f"{type(discriminator).__name__}")
        for key in ("in_channels", "cross_attention_dim"):
            mine = getattr(student.config, key, None)
            theirs = getattr(discriminator.backbone.config, key, None)
            if mine is not None and theirs is not None and mine != theirs:
                raise ValueError(f"NitroDistiller: the discriminator's backbone has {key}={theirs!r} but the student "
                                 f"has {key}={mine!r}; build the discriminator over the teacher")
        self.disc = discriminator.to(self.device)
        if student_scheduler is None:
            sched_cfg = getattr(teacher_scheduler, "config", {})
            keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
            kwargs = {k: sched_cfg[k] for k in keys if k in sched_cfg and sched_cfg[k] is not None}
            student_scheduler = TimestepShiftLCMScheduler(shift=config.shift, **kwargs)
        self.student_scheduler = student_scheduler
        self.student_scheduler.set_timesteps(1)
        self.student_lcm_t = int(self.student_scheduler.lcm_timesteps[0])
        self.student_t = int(self.student_scheduler.model_timesteps[0])

        mp = config.mixed_precision
        if self.device.type not in ("cuda", "cpu") and mp != "no":
            log.info("NitroDistiller: mixed_precision=%s is turned off on %s (autocast runs on CUDA and CPU here)",
                     mp, self.device)
            mp = "no"
        self.amp_dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mp]
        # fp16 needs loss scaling (its range underflows small gradients); bf16 has fp32's range and does not
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=(mp == "fp16"))

        self.opt_student = torch.optim.AdamW(self.student.parameters(), lr=config.lr_student,
                                             betas=config.betas_student, weight_decay=config.weight_decay_student)
        self.opt_heads = self._make_heads_optimizer()
        warm = config.warmup_steps

        def ramp(step):
            return min(1.0, (step + 1) / warm) if warm else 1.0

        self.sched_student = torch.optim.lr_scheduler.LambdaLR(self.opt_student, ramp)
        self.sched_heads = torch.optim.lr_scheduler.LambdaLR(self.opt_heads, ramp)
        self.ema = None
        if config.ema_decay is not None:
            self.ema = copy.deepcopy(self.student).requires_grad_(False).eval()

        self.host_gen = torch.Generator().manual_seed(config.seed)
        self.dev_gen = torch.Generator(self.device).manual_seed(config.seed + 1)
        self.step = 0
        self.history: list[dict] = []
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._grid_noise, self._grid_idx = self._grid_inputs(grid_prompts)
        self._teacher_step_takes_generator = "generator" in inspect.signature(teacher_scheduler.step).parameters
        self._check_paired_targets()

    def _make_heads_optimizer(self):
        params = list(self.disc.head_parameters())
        try:
            from nitrokernels.optim import SampledAdamW

            return SampledAdamW(params, lr=self.config.lr_heads, betas=self.config.betas_heads,
                                weight_decay=self.config.weight_decay_heads)
        except ImportError as err:  # pragma: no cover - SampledAdamW is part of the package
            log.warning("NitroDistiller: SampledAdamW unavailable (%s); using torch AdamW on dense gradients", err)
            return torch.optim.AdamW(params, lr=self.config.lr_heads, betas=self.config.betas_heads,
                                     weight_decay=self.config.weight_decay_heads)

    def _grid_inputs(self, grid_prompts):
        n = self.config.sample_count
        gen = torch.Generator().manual_seed(self.config.seed + 12345)
        shape = self._latent_shape(n)
        noise = torch.randn(shape, generator=gen)
        size = len(self.prompts) if hasattr(self.prompts, "__len__") else None
        if grid_prompts is None:
            grid_prompts = torch.arange(n) % max(size or n, 1)
        grid = torch.as_tensor(grid_prompts)
        # checked now: a bad grid would otherwise fail at the first sample grid, possibly after the whole run
        if grid.dim() != 1 or len(grid) != n or grid.is_floating_point() or grid.dtype == torch.bool:
            raise ValueError(f"NitroDistiller: grid_prompts must be {n} (config.sample_count) integer prompt "
                             f"indices, got {grid.dtype} {tuple(grid.shape)}")
        if size is not None and n and (int(grid.min()) < 0 or int(grid.max()) >= size):
            raise ValueError(f"NitroDistiller: grid_prompts must lie in [0, {size}) (the PromptBank's prompts), "
                             f"got min {int(grid.min())}, max {int(grid.max())}")
        return noise, grid.long()

    def _latent_shape(self, batch):
        cfg = self.student.config
        return (batch, cfg.in_channels, self.disc.resolution, self.disc.resolution)

    # ---------------------------------------------------------------------------------------- models
    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def student_x0(self, noise: torch.Tensor, cond: Mapping, model: nn.Module | None = None) -> torch.Tensor:
        """One-step x̂0 of the student from pure noise: called at the shifted timestep, the LCM 1-step rule."""
        return self.student_denoise(noise, cond, 1, 0, model)

    def student_denoise(self, x: torch.Tensor, cond: Mapping, steps: int, index: int,
                        model: nn.Module | None = None) -> torch.Tensor:
        """The student's x̂0 at step `index` of the `steps`-step schedule from that step's input `x` (float32)."""
        model = model or self.student
        sched = self.student_scheduler
        sched.set_timesteps(steps)
        t = torch.full((x.shape[0],), int(sched.model_timesteps[index]), dtype=torch.long, device=x.device)
        with self._autocast():
            out = _unet_out(model(x, t, **cond)).float()
        return sched.denoise(out, index, x.float())

    @torch.no_grad()
    def simulate_input(self, noise: torch.Tensor, cond: Mapping, steps: int, index: int) -> torch.Tensor:
        """Backward simulation: the input of step `index` of the `steps`-step schedule, made by the student's own
        first `index` steps from `noise` (no gradient), re-noised as the sampler does (noise from the device
        generator). index 0 returns `noise`."""
        x = noise.float()
        sched = self.student_scheduler
        for i in range(index):
            denoised = self.student_denoise(x, cond, steps, i)
            a_next = float(sched.alphas_cumprod[int(sched.lcm_timesteps[i + 1])])
            z = torch.randn(x.shape, generator=self.dev_gen, device=self.device)
            x = a_next ** 0.5 * denoised + (1 - a_next) ** 0.5 * z
        return x

    @torch.no_grad()
    def teacher_x0(self, noise: torch.Tensor, cond: Mapping, uncond: Mapping | None,
                   start_t: int | None = None, steps: int | None = None) -> torch.Tensor:
        """The teacher's multi-step sample from `noise` (its scheduler, `steps` (default config.teacher_steps),
        optional CFG). With `start_t`, `noise` is a partly noised input at that timestep (the variance-preserving
        x_t of the noise schedule) and the teacher's sampler continues from it: the timesteps <= start_t of its
        `steps`-step grid (start_t must be one of them; see _check_paired_targets)."""
        sched = self.teacher_scheduler
        guidance = self.config.teacher_guidance
        if guidance != 1.0 and uncond is None:
            raise ValueError("NitroDistiller: teacher_guidance != 1 needs the empty prompt (uncond) in the prompts")
        sched.set_timesteps(steps or self.config.teacher_steps, device=noise.device)
        timesteps = sched.timesteps
        if start_t is None:
            x = noise * getattr(sched, "init_noise_sigma", 1.0)
        else:
            x = noise
            timesteps = [t for t in timesteps if int(t) <= start_t]
        both = _cat_conds([cond, uncond]) if guidance != 1.0 else cond
        extra = {"generator": self.dev_gen} if self._teacher_step_takes_generator else {}
        for t in timesteps:
            inp = torch.cat([x, x]) if guidance != 1.0 else x
            inp = sched.scale_model_input(inp, t) if hasattr(sched, "scale_model_input") else inp
            with self._autocast():
                out = _unet_out(self.teacher(inp, t, **both)).float()
            if guidance != 1.0:
                c, u = out.chunk(2)
                out = u + guidance * (c - u)
            x = sched.step(out, t, x, **extra).prev_sample
        return x.float()

    # ------------------------------------------------------------------------------------------ step
    def _draw_step(self) -> tuple[int, int]:
        """(steps, index) of the schedule step a micro-batch trains (see the module docstring)."""
        choices = self.config.train_steps
        steps = choices[int(torch.randint(len(choices), (), generator=self.host_gen))] if len(choices) > 1 else choices[0]
        index = int(torch.randint(steps, (), generator=self.host_gen)) if steps > 1 else 0
        return steps, index

    def _micro_batches(self) -> list[_MicroBatch]:
        cfg = self.config
        batches = []
        for _ in range(cfg.grad_accum):
            cond, uncond, idx = self.prompts(cfg.batch_size, self.host_gen, self.device)
            noise = torch.randn(self._latent_shape(cfg.batch_size), generator=self.dev_gen, device=self.device)
            steps, index = self._draw_step()
            x = self.simulate_input(noise, cond, steps, index)
            batches.append(_MicroBatch(noise, cond, uncond, steps, index, x))
        return batches

    def train_step(self) -> dict:
        """One NitroFusion iteration (see the module docstring). Returns detached loss tensors."""
        with self.disc.backend_context():  # forward AND backward of the heads on the discriminator's backend
            return self._train_step()

    def _train_step(self) -> dict:
        cfg = self.config
        if self.step < cfg.regression_steps:
            return self._regression_step()
        selection = self.disc.sample(generator=self.dev_gen, host_generator=self.host_gen)
        scale = 1.0 / cfg.grad_accum
        # discriminator phase: the sampled heads learn teacher x0 (real) vs student x̂0 (fake), d_steps updates
        rounds = [self._micro_batches() for _ in range(cfg.d_steps)]
        reals = self._teacher_reals(rounds)
        for batches, real in zip(rounds, reals):
            d_total, d_diag = self._discriminator_update(batches, selection, scale, real)
        # generator phase: the student learns to fool the (updated, now constant) sampled heads
        g_total, g_diag = 0.0, None
        self.opt_student.zero_grad(set_to_none=True)
        for mb in batches:
            fake = self.student_denoise(mb.x, mb.cond, mb.steps, mb.index)
            with self._autocast():
                out = self.disc.g_loss(fake, mb.cond, mb.uncond, selection=selection, generator=self.dev_gen)
            self.scaler.scale(out.g_loss * scale).backward()
            g_total = g_total + out.g_loss.detach() * scale
            g_diag = out if g_diag is None else g_diag
        grad_norm = self._student_update()
        self._end_heads_iteration()
        result = {"d_loss": d_total, "g_loss": g_total, "t_star": d_diag.t_star,
                  "student_t": [int(self._model_t(mb.steps, mb.index)) for mb in batches]}
        if grad_norm is not None:
            result["grad_norm"] = grad_norm.detach()
        result["diagnostics"] = _step_diagnostics(d_diag, g_diag)
        return result

    def _end_heads_iteration(self) -> None:
        """After an iteration that trained the heads: their LR schedule advances (it counts the iterations that
        trained them) and, every refresh_every iterations, the pool's old heads are refreshed."""
        self.sched_heads.step()
        if self.config.refresh_every and self.step % self.config.refresh_every == 0:
            self.disc.refresh(optimizer=self.opt_heads, generator=self.host_gen)

    def _student_update(self, lr: float | None = None):
        """The student's optimiser step on its accumulated gradients (clip, AdamW, its LR schedule, EMA; the
        iteration count advances), at `lr` (x the schedule's factor) instead of lr_student when given. Returns the
        gradient norm before clipping (None without clipping)."""
        cfg = self.config
        self.scaler.unscale_(self.opt_student)
        grad_norm = None
        if cfg.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.grad_clip)
        scheduled = [g["lr"] for g in self.opt_student.param_groups]
        if lr is not None:
            factor = self.sched_student.lr_lambdas[0](self.sched_student.last_epoch)   # the warm-up ramp
            for g in self.opt_student.param_groups:
                g["lr"] = lr * factor
        self.scaler.step(self.opt_student)
        for g, value in zip(self.opt_student.param_groups, scheduled):
            g["lr"] = value
        self.scaler.update()
        self.opt_student.zero_grad(set_to_none=True)
        self.sched_student.step()
        if self.ema is not None:
            self._update_ema()
        self.step += 1
        return grad_norm

    def _regression_step(self) -> dict:
        """A warm-up iteration (config.regression_steps): the student's x̂0 at its drawn schedule step (backward
        simulation, as in the adversarial phase) fitted by mean squared error to the teacher's solution from the
        SAME input: for the first step the teacher's sample from the same noise, for a later step the teacher's
        sampler continued from that step's re-noised input at its LCM timestep (teacher_x0(start_t=...)). A
        later step's input carries fresh noise that the first step's target does not depend on: regressing the
        teacher's x0 from the starting noise there teaches the mean (blur; measured on the digits: 2-step
        Frechet 140-225 after such a warm-up). The discriminator is not used by the student; every
        config.warmup_heads_every-th iteration its sampled heads take one update on this iteration's samples
        (real: the teacher's sample from the same noise -- the regression target for a first step; fake: the
        student's x̂0, from before its update), with the adversarial phase's refresh."""
        cfg = self.config
        scale = 1.0 / cfg.grad_accum
        total = 0.0
        batches = self._micro_batches()
        train_heads = cfg.warmup_heads_every > 0 and (self.step + 1) % cfg.warmup_heads_every == 0
        reals, fakes = [], []
        self.opt_student.zero_grad(set_to_none=True)
        for mb in batches:
            if mb.index == 0:
                real = self.teacher_x0(mb.noise, mb.cond, mb.uncond)
            else:
                real = self.teacher_x0(mb.x, mb.cond, mb.uncond, start_t=self._lcm_t(mb.steps, mb.index),
                                       steps=cfg.continuation_steps)
            fake = self.student_denoise(mb.x, mb.cond, mb.steps, mb.index)
            loss = torch.nn.functional.mse_loss(fake, real)
            self.scaler.scale(loss * scale).backward()
            total = total + loss.detach() * scale
            if train_heads:  # the discriminator's real is always the teacher's sample from the starting noise
                reals.append(real if mb.index == 0 else self.teacher_x0(mb.noise, mb.cond, mb.uncond))
                fakes.append(fake.detach())
        grad_norm = self._student_update(cfg.regression_lr)
        result = {"regression_loss": total, "t_star": [], "diagnostics": {},
                  "student_t": [int(self._model_t(mb.steps, mb.index)) for mb in batches]}
        if train_heads:
            selection = self.disc.sample(generator=self.dev_gen, host_generator=self.host_gen)
            result["d_loss"], d_diag = self._discriminator_update(batches, selection, scale, reals, fakes)
            self._end_heads_iteration()
            result["t_star"], result["diagnostics"] = d_diag.t_star, _step_diagnostics(d_diag)
        if grad_norm is not None:
            result["grad_norm"] = grad_norm.detach()
        return result

    def _teacher_reals(self, rounds: list[list[_MicroBatch]]) -> list[list[torch.Tensor]]:
        """The teacher's samples (discriminator reals) from the noise of every micro-batch of the d_steps rounds,
        as rounds[r][j]: the rounds' micro-batches j run as one teacher call of d_steps x batch_size. The teacher
        is fixed, so the values are those of one call per micro-batch; a batched call costs less (digits demo, the
        2-core CPU: a batch-32 forward 56 ms vs 2 x 49 ms at batch 16). Grouped by j, not all at once, so a
        grad_accum run's teacher batch stays d_steps x batch_size."""
        reals = [[None] * len(batches) for batches in rounds]
        for j in range(len(rounds[0])):
            group = [batches[j] for batches in rounds]
            uncond = None if group[0].uncond is None else _cat_conds([mb.uncond for mb in group])
            out = self.teacher_x0(torch.cat([mb.noise for mb in group]), _cat_conds([mb.cond for mb in group]), uncond)
            for r, part in enumerate(out.split([mb.noise.shape[0] for mb in group])):
                reals[r][j] = part
        return reals

    def _discriminator_update(self, batches, selection, scale, reals, fakes=None):
        """One heads optimiser step on `batches` (accumulated): reals[i] is micro-batch i's real (the teacher's
        sample from its noise, see _teacher_reals), fakes[i] its fake (default: the student's x̂0 at its step,
        made here without gradient). Returns (loss, first micro-batch's output)."""
        d_total, d_diag = 0.0, None
        self.opt_heads.zero_grad(set_to_none=True)
        for i, mb in enumerate(batches):
            real = reals[i]
            if fakes is not None:
                fake = fakes[i]
            else:
                with torch.no_grad():
                    fake = self.student_denoise(mb.x, mb.cond, mb.steps, mb.index)
            with self._autocast():
                out = self.disc.d_loss(real, fake, mb.cond, mb.uncond, selection=selection, generator=self.dev_gen)
            self.scaler.scale(out.d_loss * scale).backward()
            d_total = d_total + out.d_loss.detach() * scale
            d_diag = out if d_diag is None else d_diag
        self.scaler.step(self.opt_heads)
        self.scaler.update()  # one scaler update per optimiser step (several heads steps per iteration)
        self.opt_heads.zero_grad(set_to_none=True)
        self.disc.record_updates(selection)
        return d_total, d_diag

    def _lcm_t(self, steps: int, index: int) -> int:
        self.student_scheduler.set_timesteps(steps)
        return int(self.student_scheduler.lcm_timesteps[index])

    def _check_paired_targets(self) -> None:
        """A regression warm-up of later steps continues the teacher's sampler from the student's LCM timesteps:
        they must be timesteps of that sampler, whose latents must be the schedule's x_t (init_noise_sigma 1)."""
        cfg = self.config
        later = sorted({self._lcm_t(n, i) for n in cfg.train_steps for i in range(1, n)})
        if not cfg.regression_steps or not later:
            return
        sched = self.teacher_scheduler
        grid_steps = cfg.continuation_steps or cfg.teacher_steps
        sched.set_timesteps(grid_steps)
        grid = {int(t) for t in sched.timesteps}
        missing = [t for t in later if t not in grid]
        if missing or float(getattr(sched, "init_noise_sigma", 1.0)) != 1.0:
            raise ValueError(
                f"NitroDistiller: regression_steps with train_steps={cfg.train_steps} fits later steps to the teacher's "
                f"sampler continued from the student's LCM timesteps {later}; the teacher's {type(sched).__name__} "
                f"with {'continuation' if cfg.continuation_steps else 'teacher'}_steps={grid_steps} has timesteps "
                f"{sorted(grid, reverse=True)}"
                + (f" (missing {missing})" if missing else " but scales its latents (init_noise_sigma != 1)")
                + ". Use a variance-preserving sampler whose timesteps contain them (e.g. DDIM with "
                  "timestep_spacing='trailing' and teacher_steps / continuation_steps a multiple of max(train_steps)), "
                  "or train_steps=(1,)")

    def _model_t(self, steps: int, index: int) -> int:
        self.student_scheduler.set_timesteps(steps)
        return int(self.student_scheduler.model_timesteps[index])

    @torch.no_grad()
    def _update_ema(self):
        decay = self.config.ema_decay
        for p_ema, p in zip(self.ema.parameters(), self.student.parameters()):
            p_ema.lerp_(p.detach(), 1 - decay)
        for b_ema, b in zip(self.ema.buffers(), self.student.buffers()):
            b_ema.copy_(b)

    # ----------------------------------------------------------------------------------------- loop
    def train(self, steps: int | None = None, callback: Callable[[int, dict], None] | None = None) -> list[dict]:
        """Run until `steps` (default config.steps) iterations are done in total (resuming from out_dir's
        checkpoint first when config.resume). Returns the per-iteration history (floats)."""
        cfg = self.config
        total = cfg.steps if steps is None else steps
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            raise ValueError(f"NitroDistiller.train: steps must be an int >= 0, got {total!r}")
        if cfg.out_dir:
            os.makedirs(cfg.out_dir, exist_ok=True)
            path = os.path.join(cfg.out_dir, CHECKPOINT_NAME)
            if cfg.resume and os.path.exists(path) and self.step == 0:
                self.load_checkpoint(path)
                log.info("NitroDistiller: resumed from %s at step %d", path, self.step)
            _remove_stale_tmp_files(path)
            # rows of steps after the state we continue from (written before a kill, before their checkpoint)
            # would be repeated: drop them, and a half-written last line
            _truncate_log(os.path.join(cfg.out_dir, "log.jsonl"), self.step)
        bar = None
        if cfg.progress and self.step < total:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.step, desc="NitroFusion", dynamic_ncols=True, leave=False)
        start = time.time()
        try:
            while self.step < total:
                result = self.train_step()
                self._pending.append((self.step, result))
                if callback is not None:
                    callback(self.step, result)
                if bar is not None:
                    bar.update(1)
                if (cfg.log_every and self.step % cfg.log_every == 0) or self.step == total:
                    rows = self._flush_log(time.time() - start)
                    if bar is not None and rows:
                        bar.set_postfix(_progress_fields(rows[-1]))
                if cfg.out_dir and cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.save_samples()
                if cfg.out_dir and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        self._flush_log(time.time() - start)
        if cfg.out_dir:
            self.save_samples()
            self.save_checkpoint()
        return self.history

    def _flush_log(self, elapsed: float) -> list[dict]:
        if not self._pending:
            return []
        keys = []
        tensors = []
        for step, result in self._pending:
            row_keys = [k for k in LOSS_KEYS if k in result] + sorted(result["diagnostics"])
            keys.append((step, result["t_star"], result.get("student_t"), row_keys))
            tensors += [torch.as_tensor(result[k] if k in result else result["diagnostics"][k]).detach().float()
                        .reshape(()).cpu() for k in row_keys]
        values = torch.stack(tensors).tolist()  # one host sync for everything pending
        rows, i = [], 0
        for step, t_star, student_t, row_keys in keys:
            row = {"step": step, "t_star": list(t_star)}
            if student_t is not None:
                row["student_t"] = list(student_t)
            for k in row_keys:
                row[k] = values[i]
                i += 1
            row["elapsed_s"] = round(elapsed, 3)
            rows.append(row)
        self._pending.clear()
        self.history.extend(rows)
        if self.config.out_dir:
            with open(os.path.join(self.config.out_dir, "log.jsonl"), "a") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
        return rows

    # -------------------------------------------------------------------------------------- samples
    @torch.no_grad()
    def sample_one_step(self, noise: torch.Tensor, indices: torch.Tensor, use_ema: bool = True) -> torch.Tensor:
        """The student's one-step x̂0 from `noise` for the prompts `indices` of the PromptBank, in eval mode and
        without gradient (the EMA weights when `use_ema` and the run keeps an EMA); train mode is restored."""
        model = self.ema if (use_ema and self.ema is not None) else self.student
        was = model.training
        model.eval()
        cond, _ = self.prompts.take(indices, self.device)
        x0 = self.student_x0(noise.to(self.device), cond, model=model)
        model.train(was)
        return x0

    def save_samples(self, path: str | None = None) -> str | None:
        """Sample grid PNG of the student's one-step samples on fixed noise and prompts."""
        if path is None:
            if not self.config.out_dir:
                return None
            path = os.path.join(self.config.out_dir, f"samples_{self.step:06d}.png")
        images = self.sample_one_step(self._grid_noise, self._grid_idx)
        if self.decode is not None:
            images = self.decode(images)
        return save_image_grid(images, path, nrow=min(10, len(images)))

    # ----------------------------------------------------------------------------------- checkpoint
    def _model_signature(self) -> dict:
        def shapes(module):
            return {k: list(v.shape) for k, v in module.state_dict().items()}

        digest = hashlib.sha256(json.dumps({"student": shapes(self.student), "heads": shapes(self.disc.pools)},
                                           sort_keys=True).encode()).hexdigest()
        return {"shapes_sha256": digest, "levels": [list(l) for l in self.disc.levels], "t_star": list(self.disc.t_star),
                "num_heads": self.disc.num_heads}

    def state_dict(self) -> dict:
        """Everything a resumed run needs, as plain containers, numbers, strings and tensors only (what
        torch.load(weights_only=True) reads back; no pickled objects)."""
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        np_state = np.random.get_state()
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.fingerprint(),
            "model": self._model_signature(),
            "step": self.step,
            **self._student_states(),
            "heads": self.disc.heads_state_dict(),
            "opt_heads": self.opt_heads.state_dict(),
            "sched_student": _plain(self.sched_student.state_dict()),
            "sched_heads": _plain(self.sched_heads.state_dict()),
            "scaler": self.scaler.state_dict(),
            "rng": {"host": self.host_gen.get_state(), "device": self.dev_gen.get_state(),
                    "torch": torch.get_rng_state(), "cuda": cuda_rng, "python": random.getstate(),
                    "numpy": [str(np_state[0]), torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                              int(np_state[3]), float(np_state[4])]},
            "history": self.history,
        }

    def _student_states(self) -> dict:
        """The student's, its EMA's and its optimiser's state dicts (a sharded student gathers them)."""
        return {"student": self.student.state_dict(), "ema": None if self.ema is None else self.ema.state_dict(),
                "opt_student": self.opt_student.state_dict()}

    def _load_student_states(self, state: dict) -> None:
        """Load what _student_states returned (validated before)."""
        self.student.load_state_dict(state["student"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.opt_student.load_state_dict(state["opt_student"])

    def save_checkpoint(self, path: str | None = None) -> str:
        """Write the full training state atomically (tmp file + fsync + os.replace), with a sha256 digest of
        every value (state_digest) that load_checkpoint verifies."""
        if path is None and not self.config.out_dir:
            raise ValueError("NitroDistiller.save_checkpoint: pass a path (config.out_dir is None)")
        self._flush_log(0.0) if self._pending else None
        path = path or os.path.join(self.config.out_dir, CHECKPOINT_NAME)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        _remove_stale_tmp_files(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        state = self.state_dict()
        state["digest"] = state_digest(state)
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    def load_checkpoint(self, path: str) -> None:
        """Restore everything saved by save_checkpoint. The file is read with torch.load(weights_only=True)
        (a checkpoint cannot run code), its digest is verified, and every entry is checked against this run
        (keys, shapes, dtypes of the student, EMA, heads, both optimisers' states, schedulers, scaler, RNG states)
        before anything is modified. Refuses (CheckpointError, nothing modified) a corrupt or tampered file,
        another or an older format (see convert_legacy_checkpoint), or a checkpoint of a different
        configuration or model."""
        state = _read_checkpoint(path)
        mine, theirs = self.config.fingerprint(), state.get("config", {})
        if not isinstance(theirs, dict):
            raise CheckpointError(f"checkpoint {path}: 'config' is a {type(theirs).__name__}, expected a dict")
        # a field added to DistillConfig after the checkpoint was written counts as its default there
        defaults = DistillConfig(**{f.name: getattr(self.config, f.name) for f in dataclasses.fields(DistillConfig)
                                    if f.name in _RESUMABLE_FIELDS}).fingerprint()
        theirs = {**{k: v for k, v in defaults.items() if k not in theirs}, **theirs}
        diff = sorted(k for k in set(mine) | set(theirs) if _jsonable(mine.get(k)) != _jsonable(theirs.get(k)))
        if diff:
            details = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs now {mine.get(k)!r}" for k in diff[:6])
            raise CheckpointError(f"checkpoint {path} was written with a different configuration ({details}); "
                                  f"use a new out_dir or the same settings")
        if state.get("model") != self._model_signature():
            raise CheckpointError(f"checkpoint {path} was written for a different student / discriminator (parameter "
                                  f"shapes or levels differ: {state.get('model')} vs {self._model_signature()})")
        required = ("step", "student", "ema", "heads", "opt_student", "opt_heads", "sched_student", "sched_heads",
                    "scaler", "rng", "history")
        missing = [k for k in required if k not in state]
        if missing:
            raise CheckpointError(f"checkpoint {path} is incomplete (missing {missing}); nothing was loaded")
        if (state.get("ema") is None) != (self.ema is None):
            raise CheckpointError(f"checkpoint {path}: EMA {'present' if state.get('ema') is not None else 'absent'} "
                                  f"but this run has ema_decay={self.config.ema_decay}")
        self._validate_state(path, state)

        self._load_student_states(state)
        self.disc.load_heads_state_dict(state["heads"])
        self.opt_heads.load_state_dict(state["opt_heads"])
        self.sched_student.load_state_dict(state["sched_student"])
        self.sched_heads.load_state_dict(state["sched_heads"])
        self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        self.host_gen.set_state(rng["host"])
        self.dev_gen.set_state(rng["device"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        random.setstate(_as_tuple(rng["python"]))
        np.random.set_state(_numpy_state(rng["numpy"]))
        self.step = int(state["step"])
        self.history = list(state["history"])
        self._pending.clear()

    def _validate_state(self, path: str, state: dict) -> None:
        """Check every entry of a checkpoint against this run without modifying anything (CheckpointError)."""
        def fail(what):
            raise CheckpointError(f"checkpoint {path}: {what}; nothing was loaded")

        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            fail(f"'step' must be an int >= 0, got {step!r}")
        _check_tensor_dict(fail, "student", state["student"], self.student.state_dict())
        if self.ema is not None:
            _check_tensor_dict(fail, "ema", state["ema"], self.ema.state_dict())
        heads = state["heads"]
        mine = self.disc.heads_state_dict()
        if isinstance(heads, Mapping) and not any(k.startswith("ages.") for k in heads):  # older: no ages
            mine = {k: v for k, v in mine.items() if not k.startswith("ages.")}
        _check_tensor_dict(fail, "heads", heads, mine)
        _check_optimizer_state(fail, "opt_student", state["opt_student"], self.opt_student)
        _check_optimizer_state(fail, "opt_heads", state["opt_heads"], self.opt_heads)
        for name in ("sched_student", "sched_heads"):
            sched = state[name]
            if not isinstance(sched, Mapping) or not isinstance(sched.get("last_epoch"), int) or \
                    not isinstance(sched.get("base_lrs"), (list, tuple)) or \
                    len(sched["base_lrs"]) != len(getattr(self, name).base_lrs):
                fail(f"'{name}' is not a LambdaLR state of {len(getattr(self, name).base_lrs)} param group(s)")
        scaler = state["scaler"]
        if not isinstance(scaler, Mapping) or (self.scaler.is_enabled() and not scaler):
            fail(f"'scaler' is not a GradScaler state (this run: fp16 scaling "
                 f"{'on' if self.scaler.is_enabled() else 'off'})")
        rng = state["rng"]
        if not isinstance(rng, Mapping):
            fail("'rng' is not a dict of generator states")
        missing = [k for k in ("host", "device", "torch", "python", "numpy") if k not in rng]
        if missing:
            fail(f"'rng' lacks {missing}")
        try:
            torch.Generator().set_state(rng["host"])
            torch.Generator(self.device).set_state(rng["device"])
            torch.Generator().set_state(rng["torch"])
            random.Random().setstate(_as_tuple(rng["python"]))
            np.random.RandomState().set_state(_numpy_state(rng["numpy"]))
        except Exception as err:
            fail(f"'rng' holds an invalid generator state ({type(err).__name__}: {err})")
        history = state["history"]
        if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
            fail("'history' is not a list of log rows")


# ----------------------------------------------------------------------------------- checkpoint files
class _Unsafe(Exception):
    pass


def _plain(value):
    """A scheduler's state dict without callables (LambdaLR keeps None for plain functions)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return None if callable(value) else value


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _numpy_state(value):
    if not isinstance(value, (list, tuple)) or len(value) != 5 or not isinstance(value[1], torch.Tensor):
        raise ValueError(f"numpy RNG state must be [name, key tensor, pos, has_gauss, gauss], got {type(value).__name__}")
    return (str(value[0]), value[1].numpy().astype(np.uint32), int(value[2]), int(value[3]), float(value[4]))


def state_digest(state) -> str:
    """sha256 over a checkpoint state (every tensor's dtype, shape and bytes, every other value's repr, in a
    fixed order; a top-level "digest" entry is skipped)."""
    h = hashlib.sha256()

    def feed(value):
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu()
            h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
            if t.numel():
                h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, Mapping):
            h.update(f"D{len(value)}:".encode())
            for k in sorted(value, key=repr):
                feed(k)
                feed(value[k])
        elif isinstance(value, (list, tuple)):
            h.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}:".encode())
            for v in value:
                feed(v)
        elif value is None or isinstance(value, (bool, int, float, str, bytes)):
            h.update(f"{type(value).__name__}:{value!r};".encode())
        else:
            raise _Unsafe(f"a {type(value).__name__} value")

    feed({k: v for k, v in state.items() if k != "digest"} if isinstance(state, Mapping) else state)
    return h.hexdigest()


def read_checkpoint(path: str) -> dict:
    """The state dict of a NitroDistiller checkpoint file (checkpoint.pt): read with torch.load(weights_only=True)
    (no code can run), its format and content digest (state_digest) checked. Raises CheckpointError naming the
    file when it is pickled (an older format), unreadable, of another format or edited. Loads into no model."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"checkpoint {path} holds pickled Python objects that only torch.load(weights_only=False) can read, "
            f"which can run arbitrary code; it was refused. Files of nitrokernels' older format "
            f"({', '.join(LEGACY_FORMATS)}) look like this: if, and only if, you trust where it came from, convert it "
            f"once with nitrokernels.nitro.distiller.convert_legacy_checkpoint(src, dst)") from None
    except Exception as err:  # truncated / garbage / not a torch file
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(err).__name__}: {err}); "
                              f"it was not loaded") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        hint = " (an older format: see convert_legacy_checkpoint)" if found in LEGACY_FORMATS else ""
        raise CheckpointError(f"checkpoint {path} is not a NitroDistiller checkpoint (format {found!r}, expected "
                              f"{CHECKPOINT_FORMAT!r}){hint}")
    stored = state.get("digest")
    if not isinstance(stored, str):
        raise CheckpointError(f"checkpoint {path} has no digest; it was not loaded")
    try:
        actual = state_digest(state)
    except _Unsafe as err:
        raise CheckpointError(f"checkpoint {path} holds {err}, which a checkpoint never does; it was not loaded") from None
    if actual != stored:
        raise CheckpointError(f"checkpoint {path} is corrupt: its content digest is {actual[:16]}..., the file "
                              f"records {stored[:16]}... (flipped or edited bytes); it was not loaded")
    return state


_read_checkpoint = read_checkpoint  # the old private name (kept for callers that import it)


def convert_legacy_checkpoint(src: str, dst: str) -> str:
    """Rewrite a checkpoint of an older format (read with torch.load(weights_only=False): ONLY for files you
    trust, unpickling runs code) as the current weights_only format with a digest. Returns dst."""
    state = torch.load(src, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") not in LEGACY_FORMATS + (CHECKPOINT_FORMAT,):
        raise CheckpointError(f"checkpoint {src} is not a NitroDistiller checkpoint")
    state = dict(state)
    rng = dict(state.get("rng", {}))
    np_state = rng.get("numpy")
    if isinstance(np_state, tuple) and len(np_state) == 5 and isinstance(np_state[1], np.ndarray):
        rng["numpy"] = [str(np_state[0]), torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                        int(np_state[3]), float(np_state[4])]
    state["rng"] = rng
    for name in ("sched_student", "sched_heads"):
        if name in state:
            state[name] = _plain(state[name])
    state.setdefault("history", [])
    state["format"] = CHECKPOINT_FORMAT
    state.pop("digest", None)
    try:
        state["digest"] = state_digest(state)
    except _Unsafe as err:
        raise CheckpointError(f"checkpoint {src} holds {err}; it cannot be converted") from None
    tmp = f"{dst}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, dst)
    return dst


def _truncate_log(path: str, step: int) -> int:
    """Keep the rows of log.jsonl with "step" <= `step` (and that parse); rewrite atomically. Returns the count
    of rows dropped."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
                ok = isinstance(row, dict) and int(row.get("step", 0)) <= step and line.endswith("\n")
            except (ValueError, TypeError):
                ok = False
            if ok:
                kept.append(line)
            else:
                dropped += 1
    if dropped:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        log.info("NitroDistiller: dropped %d log rows after step %d from %s (not in the checkpoint)", dropped, step, path)
    return dropped


def _remove_stale_tmp_files(path: str) -> list[str]:
    """Delete `<path>.tmp-<pid>` files left by writers that died (their pid no longer runs) or by this process."""
    folder, base = os.path.split(os.path.abspath(path))
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(base + ".tmp-"):
            continue
        pid = name[len(base) + 5:]
        if not pid.isdigit():
            continue
        if int(pid) != os.getpid() and (os.name == "nt" or _pid_alive(int(pid))):
            continue  # a live writer (or no safe liveness test on Windows)
        try:
            os.remove(os.path.join(folder, name))
            removed.append(name)
        except OSError:
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: exists, someone else's
        return True
    return True


def _check_tensor_dict(fail, name, theirs, mine) -> None:
    if not isinstance(theirs, Mapping):
        fail(f"'{name}' is a {type(theirs).__name__}, expected a state dict")
    missing = [k for k in mine if k not in theirs]
    unexpected = [k for k in theirs if k not in mine]
    if missing or unexpected:
        fail(f"'{name}' keys differ from this model: {len(missing)} missing {missing[:3]}, "
             f"{len(unexpected)} unexpected {unexpected[:3]}")
    for k, v in mine.items():
        t = theirs[k]
        if not isinstance(t, torch.Tensor):
            fail(f"'{name}.{k}' is a {type(t).__name__}, expected a tensor")
        if t.shape != v.shape or t.dtype != v.dtype:
            fail(f"'{name}.{k}' is {t.dtype} {tuple(t.shape)}, this model has {v.dtype} {tuple(v.shape)}")


def _check_optimizer_state(fail, name, theirs, optimizer) -> None:
    if not isinstance(theirs, Mapping) or not isinstance(theirs.get("state"), Mapping) or \
            not isinstance(theirs.get("param_groups"), (list, tuple)):
        fail(f"'{name}' is not an optimiser state dict (state + param_groups)")
    groups = optimizer.param_groups
    if len(theirs["param_groups"]) != len(groups) or any(
            not isinstance(g, Mapping) or not isinstance(g.get("params"), (list, tuple)) or len(g["params"]) != len(m["params"])
            for g, m in zip(theirs["param_groups"], groups)):
        fail(f"'{name}' has param groups of sizes "
             f"{[len(g.get('params', ())) if isinstance(g, Mapping) else '?' for g in theirs['param_groups']]}, "
             f"this optimiser {[len(g['params']) for g in groups]}")
    params = {i: p for g, m in zip(theirs["param_groups"], groups) for i, p in zip(g["params"], m["params"])}
    for pid, entry in theirs["state"].items():
        if pid not in params:
            fail(f"'{name}' has state for parameter id {pid!r}, which its param groups do not list")
        p = params[pid]
        if not isinstance(entry, Mapping):
            fail(f"'{name}' state of parameter {pid} is a {type(entry).__name__}, expected a dict")
        for key, value in entry.items():
            if key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master", "momentum_buffer"):
                if not isinstance(value, torch.Tensor) or value.shape != p.shape or not value.is_floating_point():
                    found = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
                    fail(f"'{name}' state '{key}' of parameter {pid} is {found}, the parameter is "
                         f"{p.dtype} {tuple(p.shape)}")
            elif key == "step":
                ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) or (
                    isinstance(value, torch.Tensor) and value.shape in ((), (p.shape[0],) if p.dim() else ()))
                if not ok:
                    found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    fail(f"'{name}' state 'step' of parameter {pid} is {found}, expected a scalar or one per row "
                         f"({p.shape[0] if p.dim() else 1})")
