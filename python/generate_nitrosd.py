"""NitroSD in a few lines: one pipeline from local files, 1-step and 4-step images from the same weights.

    python python/generate_nitrosd.py /models/sdxl-base /models/nitrosd-realism_unet.safetensors "a lighthouse" out/
(use --shift 500 with nitrosd-vibrant_unet.safetensors)
"""
import argparse
import os

import torch

from nitrokernels.nitro import load_pipeline

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("base_model"), parser.add_argument("unet_weights"), parser.add_argument("prompt")
parser.add_argument("out", nargs="?", default="out"), parser.add_argument("--shift", type=float, default=250)
args = parser.parse_args()

pipe = load_pipeline(args.base_model, unet_weights=args.unet_weights, shift=args.shift,
                     cuda_graph=torch.cuda.is_available())  # fused UNet/VAE blocks; bf16 on a GPU
os.makedirs(args.out, exist_ok=True)
for steps in (1, 4):  # no reloading: the step count is a call argument; NitroFusion uses no CFG
    image = pipe(args.prompt, num_inference_steps=steps, guidance_scale=0.0,
                 generator=torch.Generator().manual_seed(0)).images[0]
    image.save(path := os.path.join(args.out, f"nitrosd-{steps}step.png"))
    print(path)
