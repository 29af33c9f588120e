"""Drop the fused blocks into a diffusers UNet you already have, check them, and serve it graphed.

    python python/patch_your_unet.py /models/sdxl-base/unet       # a local diffusers UNet folder
    python python/patch_your_unet.py                              # a small random SDXL-style UNet

Patches the loaded instance (attention processors, GEGLU, ResnetBlock2D GroupNorm+SiLU), prints what was
patched or skipped and why, compares the output with the unpatched model on the same inputs, and on a GPU
captures the patched one-step forward in a CUDA graph and times eager / patched / patched+graphed.
"""
import argparse
import time

import torch
from diffusers import UNet2DConditionModel

import nitrokernels

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("unet", nargs="?", help="local diffusers UNet folder (default: a small random SDXL-style UNet)")
parser.add_argument("--size", type=int, default=None, help="latent size (default: the UNet's sample_size)")
args = parser.parse_args()
cuda = torch.cuda.is_available()
device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
torch.manual_seed(0)

if args.unet:
    unet = UNet2DConditionModel.from_pretrained(args.unet, local_files_only=True)
else:  # SDXL's layout (text_time conditioning, linear projections, GEGLU) at toy width
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)
unet = unet.to(device, dtype).eval()
cfg, size = unet.config, args.size or unet.config.sample_size
inputs = dict(sample=torch.randn(1, cfg.in_channels, size, size, device=device, dtype=dtype),
              timestep=torch.tensor([249], device=device),
              encoder_hidden_states=torch.randn(1, 77, cfg.cross_attention_dim, device=device, dtype=dtype))
if cfg.addition_embed_type == "text_time":
    text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    inputs["added_cond_kwargs"] = dict(text_embeds=torch.randn(1, text_dim, device=device, dtype=dtype),
                                       time_ids=torch.tensor([[8.0 * size] * 2 + [0, 0] + [8.0 * size] * 2],
                                                             device=device, dtype=dtype))


def timed(fn, repeats=5 if cuda else 1):
    with torch.no_grad():
        out = fn()  # warm-up (Triton compiles on first use)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            out = fn()
        if cuda:
            torch.cuda.synchronize()
    return out, (time.perf_counter() - start) / repeats * 1e3


plain, t_plain = timed(lambda: unet(**inputs).sample)
handle = nitrokernels.patch_unet(unet)
print(handle.summary())
fused, t_fused = timed(lambda: unet(**inputs).sample)
print(f"max |patched - plain| = {(fused - plain).abs().max().item():.3g}   (max |plain| = {plain.abs().max().item():.3g})")
print(f"eager {t_plain:.1f} ms   patched {t_fused:.1f} ms   ({device}, {str(dtype).replace('torch.', '')})")
if not cuda:
    print("(no GPU: the fused ops run their eager fallbacks here; `nitrokernels info` says which backend runs and why)")
if cuda:
    graphed = nitrokernels.graphed(unet, **inputs)
    replay, t_graph = timed(lambda: graphed(**inputs).sample)
    print(f"patched + CUDA graph {t_graph:.1f} ms; max |graph - patched| = {(replay - fused).abs().max().item():.3g}")
handle.revert()  # the original modules and processors are back (bit-identical outputs)
