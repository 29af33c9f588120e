"""One full NitroFusion iteration at SDXL size (issue 5): fused path vs all-eager path, same run.

Setup (random weights; the SDXL UNet config is written below, no download): batch 5 at 1024² (latents
4x128x128), SDXL text conditioning (encoder_hidden_states [5, 77, 2048], text_embeds [5, 1280], time_ids),
a DynamicDiscriminator over the teacher's encoder + mid block (10 feature levels) with a 480-head pool
(4 t* x 3 kinds x 10 levels x 4 heads, hidden 256) of which 30 are sampled per iteration (1 t* group x 3 kinds
x 10 levels x 1), 1% refreshed per iteration. One iteration = NitroDistiller.train_step(): teacher sampling
(TEACHER_STEPS DDIM steps, no grad), discriminator phase (student x̂0 without grad, backbone on real/fake x
prompt/empty prompt, sampled heads forward+backward, SampledAdamW), generator phase (student forward+backward
through the frozen backbone and the constant heads, AdamW), pool refresh. Everything in bf16 (UNets, heads,
optimiser states), autocast bf16.

Variants:
  fused   default dispatch: heads on the grouped Triton kernels, SampledAdamW on its CUDA/Triton path, the
          teacher and student UNets patched with nitrokernels.patch_unet (fused GroupNorm+SiLU, attention, GEGLU)
  eager   the same iteration with every nitrokernels op forced to its eager reference
          (nitrokernels.use_backend("eager")) and the UNets unpatched (stock diffusers modules)

Memory: teacher 5 GB + student 5 GB + grads 5 GB + AdamW 10 GB (bf16) + activations; fits an 80 GB H100.
NITROKERNELS_BENCH_SMALL=1 runs a small config instead (a smoke test of the benchmark itself).
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("diffusers", reason="the NitroFusion iteration benchmark builds diffusers UNets")

SMALL = os.environ.get("NITROKERNELS_BENCH_SMALL", "0") == "1"
BATCH = 2 if SMALL else 5
TEACHER_STEPS = 1
DTYPE = torch.bfloat16

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the UNet NitroSD-Realism/Vibrant fine-tune)
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SMALL_UNET_CONFIG = dict(
    SDXL_UNET_CONFIG, sample_size=32, block_out_channels=(64, 128, 256), transformer_layers_per_block=(1, 1, 1),
    attention_head_dim=(2, 4, 8), cross_attention_dim=256, addition_time_embed_dim=32,
    projection_class_embeddings_input_dim=256 + 6 * 32,
)
DISCRIMINATOR = dict(t_star=(10, 250, 500, 750), pool_sizes=4, heads_sampled=1, t_star_sampled=1, refresh_rate=0.01,
                     local_size=8, hidden=256, num_groups=32, head_dtype=DTYPE)


def build(device="cuda", patched=True):
    """(distiller, undo) for one variant; the UNets are fresh random SDXL-config models in bf16."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from nitrokernels.nitro.distiller import DistillConfig, NitroDistiller, PromptBank

    config = SMALL_UNET_CONFIG if SMALL else SDXL_UNET_CONFIG
    torch.manual_seed(0)
    teacher = UNet2DConditionModel(**config).to(device=device, dtype=DTYPE)
    student = copy.deepcopy(teacher)
    size, text_dim = config["sample_size"] * 8, config["cross_attention_dim"]
    pooled_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=DTYPE)
    bank = PromptBank(
        {"encoder_hidden_states": torch.randn(16, 77, text_dim, dtype=DTYPE),
         "added_cond_kwargs": {"text_embeds": torch.randn(16, pooled_dim, dtype=DTYPE), "time_ids": time_ids.repeat(16, 1)}},
        {"encoder_hidden_states": torch.zeros(1, 77, text_dim, dtype=DTYPE),
         "added_cond_kwargs": {"text_embeds": torch.zeros(1, pooled_dim, dtype=DTYPE), "time_ids": time_ids}})
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, timestep_spacing="trailing")
    disc = dict(DISCRIMINATOR)
    if SMALL:
        disc.update(hidden=32, num_groups=8, local_size=4)
    cfg = DistillConfig(steps=10**9, batch_size=BATCH, teacher_steps=TEACHER_STEPS, lr_student=1e-6, lr_heads=1e-5,
                        mixed_precision="bf16", device=str(device), progress=False, log_every=0, discriminator=disc)
    handles = []
    if patched:
        from nitrokernels import patch_unet

        handles = [patch_unet(teacher, strict=False), patch_unet(student, strict=False)]
    distiller = NitroDistiller(teacher, student, scheduler, bank, cfg)

    def undo():
        for handle in handles:
            handle.revert()

    return distiller, undo


def test_nitro_iteration_sdxl(nk_bench):
    from nitrokernels import use_backend

    fused, _ = build(patched=True)
    eager, _ = build(patched=False)
    assert fused.disc.num_heads == (480 if not SMALL else 480) and fused.disc.heads_per_iteration == 30

    def run_fused():
        fused.train_step()

    def run_eager():
        with use_backend("eager"):
            eager.train_step()

    nk_bench.compare(
        "nitro_iteration_sdxl", {"batch": BATCH, "latent": SDXL_UNET_CONFIG["sample_size"] if not SMALL else 32,
                                 "pool": 480, "sampled": 30, "teacher_steps": TEACHER_STEPS, "dtype": "bf16"},
        {"fused": run_fused, "eager": run_eager}, warmup=2, reps=5, memory=True,
        notes="full NitroDistiller.train_step (teacher DDIM, D phase, G phase, refresh); fused = patched UNets + "
              "grouped head kernels; eager = stock UNets + eager references")


if __name__ == "__main__":  # a CPU smoke run of the small config: python benchmarks/bench_nitro_iteration.py
    if not SMALL:
        raise SystemExit("set NITROKERNELS_BENCH_SMALL=1 for the CPU smoke run")
    DTYPE = torch.float32
    DISCRIMINATOR["head_dtype"] = DTYPE
    distiller, undo = build(device="cpu", patched=False)
    print(distiller.disc.num_heads, distiller.disc.heads_per_iteration, distiller.train_step()["d_loss"])
