"""The embedded NitroFusion demo's world: scikit-learn's bundled 8x8 handwritten digits, a small
class-conditional diffusers UNet teacher, a one-step student, and a digits classifier for the metrics.

Everything here runs on a CPU in seconds to minutes and needs no download: the images come from
`sklearn.datasets.load_digits` (1,797 real 8x8 digits shipped with scikit-learn) and the trained teacher,
student and classifier are small safetensors files under `nitrokernels/digits/assets/` (fp16 storage), written by
`python/train_digits_teacher.py` (teacher + classifier) and `nitrokernels demo` (student).

Choices (all documented, all overridable):
  * resolution 16x16, 1 channel, values in [-1, 1]: the 8x8 digits upsampled bilinearly. 16x16 lets the
    UNet (and so the discriminator's heads) see two resolutions (16, 8) while a training step stays cheap.
  * "pixel-space latents": the UNet works on the images directly (no VAE), in the role SDXL's latents play.
  * the "text encoder" is an `nn.Embedding` over 11 tokens: labels 0-9 and 10 = the empty prompt; its output
    is `encoder_hidden_states` [B, 1, D], one token the UNet cross-attends to.
  * noise schedule: Stable Diffusion's (1000 steps, scaled_linear 0.00085 -> 0.012, epsilon prediction), so
    the same TimestepShiftLCMScheduler defaults serve SDXL and the digits.
  * metrics: class accuracy of generated samples under a classifier trained on the real digits, and the
    Frechet distance between generated and real images in that classifier's feature space (an FID analogue).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DIGITS_RESOLUTION = 16
NUM_CLASSES = 10
EMPTY_LABEL = 10  # the "empty prompt" token (unconditional features / classifier-free guidance)
EMBED_DIM = 64

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
TEACHER_ASSET = "digits_teacher.safetensors"
STUDENT_ASSET = "digits_student.safetensors"
CLASSIFIER_ASSET = "digits_classifier.safetensors"

# Stable Diffusion's noise schedule (shared with TimestepShiftLCMScheduler's defaults).
NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon")

# A small class-conditional UNet: conv_in + 2 down blocks (16 -> 8) + mid block (attention at 8x8); 1.0 M
# parameters. Its encoder + mid block gives the discriminator 5 feature maps (channels, size):
#   (32,16) conv_in, (32,16) block0 resnet, (32,8) block0 downsample, (64,8) block1, (64,8) mid
# -- every map is >= 8x8, so every head has at least one downsampling layer (HeadPool's rule) with global
# heads (ending at 4x4) and local heads of local_size 4.
DIGITS_UNET_CONFIG = dict(
    sample_size=DIGITS_RESOLUTION, in_channels=1, out_channels=1, layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=EMBED_DIM, attention_head_dim=8, norm_num_groups=16,
)


# ------------------------------------------------------------------------------------------------ data
def load_digits(resolution: int = DIGITS_RESOLUTION, split: str | None = None, seed: int = 0):
    """The 1,797 real digits as (images [N, 1, R, R] float32 in [-1, 1], labels [N] int64).

    `split`: None = all, "train" / "test" = a fixed stratified 80/20 split (by `seed`), used to report the
    classifier's held-out accuracy.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    data = _sk_load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)  # [N,1,8,8] in [0,1]
    labels = torch.from_numpy(data.target.astype(np.int64))
    if resolution != 8:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    images = (images * 2 - 1).clamp(-1, 1)
    if split is not None:
        if split not in ("train", "test"):
            raise ValueError(f"load_digits: split must be None, 'train' or 'test', got {split!r}")
        rng = np.random.RandomState(seed)
        test_mask = np.zeros(len(labels), dtype=bool)
        for c in range(NUM_CLASSES):
            idx = np.flatnonzero(data.target == c)
            test_mask[rng.choice(idx, size=len(idx) // 5, replace=False)] = True
        keep = torch.from_numpy(test_mask if split == "test" else ~test_mask)
        images, labels = images[keep], labels[keep]
    return images, labels


# ------------------------------------------------------------------------------------------ models
def make_digits_unet(**overrides):
    """A freshly initialised digits UNet (a diffusers UNet2DConditionModel); `overrides` edit the config."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{**DIGITS_UNET_CONFIG, **overrides})


class DigitsEncoder(nn.Module):
    """The digits' "text encoder": label [B] (0-9, 10 = empty prompt) -> encoder_hidden_states [B, 1, D]."""

    def __init__(self, num_tokens: int = NUM_CLASSES + 1, dim: int = EMBED_DIM):
        super().__init__()
        self.embedding = nn.Embedding(num_tokens, dim)
        nn.init.normal_(self.embedding.weight, std=1.0)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels, device=self.embedding.weight.device).long().reshape(-1)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.embedding.num_embeddings):
            raise ValueError(f"DigitsEncoder: labels must be in [0, {self.embedding.num_embeddings - 1}] "
                             f"({EMPTY_LABEL} = empty prompt), got {labels.min().item()}..{labels.max().item()}")
        return self.embedding(labels).unsqueeze(1)

    def empty(self, batch: int) -> torch.Tensor:
        """Empty-prompt hidden states [batch, 1, D]."""
        return self(torch.full((batch,), EMPTY_LABEL, dtype=torch.long))


def make_noise_scheduler():
    """The training noise schedule (diffusers DDPMScheduler) of the digits teacher."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**NOISE_SCHEDULE, clip_sample=False)


def make_teacher_scheduler():
    """The teacher's multi-step sampler: DDIM with "trailing" spacing, so 1 step starts at t=999 from pure noise."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**NOISE_SCHEDULE, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")


@torch.no_grad()
def teacher_sample(unet, encoder: DigitsEncoder, labels: torch.Tensor, steps: int, *, noise: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, guidance_scale: float = 1.0, scheduler=None,
                   batch_size: int = 512) -> torch.Tensor:
    """DDIM samples of the teacher for `labels` ([N] in 0-9) in `steps` steps -> images [N, 1, R, R] in [-1, 1].

    `guidance_scale` > 1 applies classifier-free guidance against the empty prompt (1 = none).
    """
    scheduler = scheduler or make_teacher_scheduler()
    device = next(unet.parameters()).device
    labels = torch.as_tensor(labels).long().to(device)
    size = unet.config.sample_size
    if noise is None:
        noise = torch.randn((len(labels), unet.config.in_channels, size, size), generator=generator,
                            device=generator.device if generator is not None else "cpu")
    noise = noise.to(device)
    outputs = []
    for start in range(0, len(labels), batch_size):
        lab, x = labels[start:start + batch_size], noise[start:start + batch_size]
        cond = encoder(lab)
        if guidance_scale != 1.0:
            cond = torch.cat([cond, encoder.empty(len(lab)).to(cond)])
        scheduler.set_timesteps(steps, device=device)
        for t in scheduler.timesteps:
            inp = torch.cat([x, x]) if guidance_scale != 1.0 else x
            eps = unet(inp, t, encoder_hidden_states=cond).sample
            if guidance_scale != 1.0:
                eps_c, eps_u = eps.chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            x = scheduler.step(eps, t, x).prev_sample
        outputs.append(x)
    return torch.cat(outputs).clamp(-1, 1)


# ----------------------------------------------------------------------------------------- classifier
class DigitsClassifier(nn.Module):
    """A small CNN trained on the real digits; `features(x)` (the penultimate layer) defines the Frechet distance."""

    feature_dim = 128

    def __init__(self, resolution: int = DIGITS_RESOLUTION):
        super().__init__()
        self.resolution = resolution
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 32, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
            nn.Flatten(), nn.Linear(64 * (resolution // 4) ** 2, self.feature_dim), nn.SiLU(),
        )
        self.head = nn.Linear(self.feature_dim, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def augment(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Light augmentation for the classifier: random shifts of up to 1 pixel and a little noise."""
    n = images.shape[0]
    shifts = torch.randint(-1, 2, (n, 2), generator=generator)
    out = torch.empty_like(images)
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    r = images.shape[-1]
    for i in range(n):
        dy, dx = int(shifts[i, 0]) + 1, int(shifts[i, 1]) + 1
        out[i] = padded[i, :, dy:dy + r, dx:dx + r]
    return (out + 0.05 * torch.randn(out.shape, generator=generator)).clamp(-1, 1)


def train_classifier(epochs: int = 30, seed: int = 0, batch_size: int = 64, lr: float = 2e-3, log=print):
    """Train a DigitsClassifier on the train split (augmented); returns (classifier, held-out accuracy)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x_train, y_train = load_digits(split="train")
    x_test, y_test = load_digits(split="test")
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x_train) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        for start in range(0, len(perm), batch_size):
            idx = perm[start:start + batch_size]
            loss = F.cross_entropy(model(augment(x_train[idx], gen)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0 or epoch == epochs - 1:
            acc = classifier_accuracy(model, x_test, y_test)
            log(f"classifier epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}, held-out accuracy {acc:.4f}")
    model.eval()
    return model, classifier_accuracy(model, x_test, y_test)


@torch.no_grad()
def classifier_accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pred = model(images.to(device)).argmax(-1).cpu()
    model.train(was_training)
    return (pred == labels.cpu()).float().mean().item()


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ([N, D] each): the FID formula."""
    from scipy import linalg

    a = np.asarray(torch.as_tensor(feats_a).double().cpu())
    b = np.asarray(torch.as_tensor(feats_b).double().cpu())
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(covmean).all():  # near-singular product: regularise as pytorch-fid does
        offset = np.eye(a.shape[1]) * 1e-6
        covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


@dataclass
class DigitsMetrics:
    """Class accuracy (fraction of samples the classifier assigns to the prompted digit) and Frechet distance."""

    accuracy: float
    frechet: float
    count: int


class DigitsEvaluator:
    """Scores generated digits against the real ones with a trained DigitsClassifier."""

    def __init__(self, classifier: DigitsClassifier | None = None, device="cpu"):
        self.device = torch.device(device)
        self.classifier = (classifier or load_pretrained_classifier()).to(self.device).eval()
        real, _ = load_digits()
        self.real_features = self.features(real)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        out = [self.classifier.features(images[i:i + 1024].to(self.device).float()).cpu()
               for i in range(0, len(images), 1024)]
        return torch.cat(out)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> DigitsMetrics:
        feats = self.features(images.clamp(-1, 1))
        pred = self.classifier.head(feats.to(self.device)).argmax(-1).cpu()
        acc = (pred == torch.as_tensor(labels).cpu()).float().mean().item()
        return DigitsMetrics(accuracy=acc, frechet=frechet_distance(feats, self.real_features), count=len(images))


# ------------------------------------------------------------------------------------------- assets
def asset_path(name: str) -> str:
    return os.path.join(ASSETS_DIR, name)


def save_asset(path: str, modules: dict[str, nn.Module], metadata: dict, dtype=torch.float16):
    """Write {prefix.param: tensor} of the modules to safetensors (fp16 storage) with JSON metadata, atomically."""
    from safetensors.torch import save_file

    tensors = {}
    for prefix, module in modules.items():
        for key, value in module.state_dict().items():
            value = value.detach().cpu()
            tensors[f"{prefix}.{key}"] = (value.to(dtype) if value.is_floating_point() else value).contiguous()
    from nitrokernels.nitro.pipeline import SHA256_METADATA_KEY, tensors_sha256

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"nitrokernels": json.dumps(metadata, sort_keys=True),
                                      SHA256_METADATA_KEY: tensors_sha256(tensors)})
    os.replace(tmp, path)


def read_asset(path: str, expected_sha256: str | None = None) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Read a file written by save_asset -> ({prefix: state_dict (float32)}, metadata). The tensors' digest that
    save_asset stores is verified (files without one, older ones, load unverified); `expected_sha256`: the
    file's sha256 (for files of others), checked first. A mismatch raises UNetWeightsError (a ValueError)."""
    from safetensors import safe_open

    from nitrokernels.nitro.pipeline import verify_safetensors

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist (write it with python/train_digits_teacher.py or "
                                f"`nitrokernels demo`)")
    raw: dict[str, torch.Tensor] = {}
    with safe_open(path, framework="pt") as f:
        metadata = json.loads((f.metadata() or {}).get("nitrokernels", "{}"))
        for key in f.keys():
            raw[key] = f.get_tensor(key)
    verify_safetensors(path, raw, expected_sha256)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in raw.items():
        prefix, _, name = key.partition(".")
        groups.setdefault(prefix, {})[name] = value.float() if value.is_floating_point() else value
    return groups, metadata


def _load_unet_and_encoder(path: str, device, dtype, expected_sha256=None):
    groups, metadata = read_asset(path, expected_sha256)
    config = {**DIGITS_UNET_CONFIG, **{k: (tuple(v) if isinstance(v, list) else v)
                                       for k, v in metadata.get("unet_config", {}).items()}}
    unet = make_digits_unet(**config)
    unet.load_state_dict(groups["unet"])
    encoder = DigitsEncoder(dim=config["cross_attention_dim"])
    encoder.load_state_dict(groups["encoder"])
    for module in (unet, encoder):
        module.to(device=device)
        if dtype != torch.float32:  # (diffusers warns about any .to(dtype) of a UNet; skip the no-op one)
            module.to(dtype=dtype)
        module.eval().requires_grad_(False)
    return unet, encoder, metadata


def load_pretrained_teacher(device="cpu", dtype=torch.float32, path: str | None = None,
                            expected_sha256: str | None = None):
    """The shipped digits teacher -> (unet, encoder, metadata); frozen, in eval mode. expected_sha256: see
    read_asset."""
    return _load_unet_and_encoder(path or asset_path(TEACHER_ASSET), device, dtype, expected_sha256)


def load_pretrained_student(device="cpu", dtype=torch.float32, path: str | None = None,
                            expected_sha256: str | None = None):
    """The shipped one-step digits student (distilled by `nitrokernels demo`) -> (unet, encoder, metadata).

    metadata["shift"] is the timestep shift it was trained at (the LCM scheduler's `shift`).
    """
    return _load_unet_and_encoder(path or asset_path(STUDENT_ASSET), device, dtype, expected_sha256)


def load_pretrained_classifier(device="cpu", path: str | None = None,
                               expected_sha256: str | None = None) -> DigitsClassifier:
    groups, metadata = read_asset(path or asset_path(CLASSIFIER_ASSET), expected_sha256)
    model = DigitsClassifier(resolution=metadata.get("resolution", DIGITS_RESOLUTION))
    model.load_state_dict(groups["classifier"])
    return model.to(device).eval().requires_grad_(False)


def prompt_bank(encoder: nn.Module):
    """The distiller's PromptBank for the digits: the ten labels' embeddings as the conditions, the empty-prompt
    token's as the unconditional one (encoder: the digits "text encoder", on any device; the bank is on its)."""
    from nitrokernels.nitro.distiller import PromptBank

    with torch.no_grad():
        device = next(encoder.parameters()).device
        cond = encoder(torch.arange(NUM_CLASSES, device=device))
        empty = encoder(torch.tensor([EMPTY_LABEL], device=device))
    return PromptBank({"encoder_hidden_states": cond}, {"encoder_hidden_states": empty})


def sample_grid(images: torch.Tensor, nrow: int = 10, pad: int = 1) -> np.ndarray:
    """Images [N, 1, R, R] in [-1, 1] -> a uint8 grid [H, W] (white digits on black)."""
    from nitrokernels.nitro.distiller import image_grid

    return image_grid(images, nrow=nrow, pad=pad)


def save_grid_png(path: str, rows: Sequence[torch.Tensor] | torch.Tensor, nrow: int = 10, scale: int = 4):
    """Save images (or a list of row groups) as a PNG grid, upscaled `scale`x with nearest neighbour."""
    from nitrokernels.nitro.distiller import save_image_grid

    images = torch.cat(list(rows)) if isinstance(rows, (list, tuple)) else rows
    return save_image_grid(images, path, nrow=nrow, scale=scale)
