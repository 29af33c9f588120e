"""`nitrokernels generate`: 1-4-step images from NitroSD weights (local paths), or from the embedded digits model.

    nitrokernels generate --model /models/sdxl-base --unet /models/nitrosd-realism_unet.safetensors \\
        --prompt "a lighthouse at dusk" --steps 1 --seed 0 --out out/
    nitrokernels generate --prompt 7 --steps 4 --num-images 8 --out out/     # the embedded digits student

Writes one PNG per image (image i uses seed + i) and prints each path on stdout. Errors (missing or corrupt
weights, prompts the model cannot take) are printed on stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

# Kept light at import time: the CLI imports this module to build its parser.

DIGIT_PROMPTS = tuple(str(d) for d in range(10)) + ("",)
EXIT_USAGE = 2


class GenerateError(Exception):
    """A user-facing problem (bad prompt, missing file, ...): printed without a traceback."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True,
                        help="text prompt; with the embedded digits model (no --model): a digit 0-9, or \"\" for the "
                             "empty prompt")
    parser.add_argument("--steps", type=int, default=1, choices=range(1, 5), metavar="{1,2,3,4}",
                        help="sampling steps, 1-4, all from the same weights (default 1)")
    parser.add_argument("--shift", type=float, default=None,
                        help="timestep shift of the LCM scheduler: the UNet sees floor(t*shift/1000). Default 250 "
                             "(NitroSD-Realism; use 500 for NitroSD-Vibrant); the digits student's own shift "
                             "without --model")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the first image (image i: seed + i)")
    parser.add_argument("--out", default="out", help="folder for the PNGs (created if missing; default ./out)")
    parser.add_argument("--model", default=None,
                        help="base model: a local diffusers pipeline folder (e.g. an SDXL base snapshot). Without "
                             "it the embedded digits student is used")
    parser.add_argument("--unet", default=None,
                        help="student UNet weights: a NitroSD-style UNet .safetensors file, a UNet folder "
                             "(<out>/student of `nitrokernels distill`) or a training checkpoint (<out>/checkpoint.pt "
                             "of `nitrokernels demo` / `distill`: its student; read without running any code). "
                             "Without --model: the digits student (`demo --save-student` .safetensors, a digits "
                             "run's checkpoint.pt or student/); default: the shipped digits student")
    parser.add_argument("--lora", default=None, metavar="PATH",
                        help="a LoRA adapter written by `nitrokernels distill --lora-rank` (<out>/student_lora), "
                             "loaded (peft) into the base UNet: the --model's own (or --unet); without --model the "
                             "digits teacher, which the digits preset's adapter was trained on")
    parser.add_argument("--fuse-lora", action="store_true",
                        help="merge the --lora adapter into the UNet's weights (as fast as the base UNet)")
    parser.add_argument("--unet-sha256", default=None, metavar="HEX",
                        help="verify the --unet file against this sha256 (as `sha256sum` prints it) before loading; "
                             "files nitrokernels wrote also carry a digest of their tensors, always verified")
    parser.add_argument("--num-images", type=int, default=1, help="how many images (default 1)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="weights / compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="replay CUDA graphs of the UNet and VAE decode (CUDA only)")
    parser.add_argument("--no-patch", action="store_true", help="run diffusers' own blocks (no fused kernels)")


def digit_label(prompt: str) -> int:
    """The digits model's label for a prompt: "0".."9" -> 0..9, "" -> 10 (empty prompt); anything else refused."""
    from nitrokernels.digits.data import EMPTY_LABEL

    text = prompt.strip()
    if text not in DIGIT_PROMPTS:
        raise GenerateError(f"the embedded digits model only understands the prompts 0-9 (one digit) and \"\" (the "
                            f"empty prompt), got {prompt!r}; pass --model PATH for a text-to-image model")
    return EMPTY_LABEL if text == "" else int(text)


def _slug(prompt: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48].rstrip("-")
    return slug or "empty"


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="generating", unit="image", file=sys.stderr, disable=total < 2)


def _image_path(args, seed: int) -> str:
    return os.path.join(args.out, f"{_slug(args.prompt)}-{args.steps}step-seed{seed}.png")


def _is_digits_asset(path: str) -> bool:
    """A file `demo --save-student` wrote (safetensors with "unet." and "encoder." groups)."""
    if not path.endswith(".safetensors") or not os.path.isfile(path):
        return False
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
    except Exception:
        return False
    return any(k.startswith("encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)


def _load_digits_unet(args, device, dtype):
    """(unet, encoder, shift or None) for the digits model: the shipped student, a `demo --save-student` asset, or
    any student weights read_unet_state takes (a run's checkpoint.pt, student/ folder, plain .safetensors) in
    the digits UNet with the shipped encoder; with --lora the adapter on that UNet (default: the teacher)."""
    from nitrokernels.digits import data as digits
    from nitrokernels.nitro.pipeline import load_lora_adapter, load_unet_state, read_unet_state

    sha = getattr(args, "unet_sha256", None)
    if args.unet is not None and not os.path.exists(args.unet):
        raise GenerateError(f"digits student weights {args.unet} do not exist")
    if args.unet is None and args.lora is None or args.unet is not None and _is_digits_asset(args.unet):
        unet, encoder, metadata = digits.load_pretrained_student(device="cpu", path=args.unet, expected_sha256=sha)
        shift = metadata.get("shift")
    else:
        # the teacher's UNet (its config and encoder; the student is a copy of it) takes the student's weights
        unet, encoder, metadata = digits.load_pretrained_teacher(device="cpu")
        shift = None
        if args.unet is not None:
            state, info = read_unet_state(args.unet, sha)
            load_unet_state(unet, state, args.unet)
            shift = info.get("shift")
    if args.lora is not None:
        from nitrokernels.nitro.pipeline import _run_shift

        load_lora_adapter(unet, args.lora, fuse=args.fuse_lora)
        shift = shift if args.unet is not None else _run_shift(args.lora)
    for module in (unet, encoder):
        module.to(device=device)
        if dtype != next(module.parameters()).dtype:
            module.to(dtype=dtype)
    return unet, encoder, shift


def _run_digits(args, device, dtype) -> list:
    import torch

    from nitrokernels.digits import data as digits
    from nitrokernels.nitro.sampling import sample
    from nitrokernels.nitro.scheduler import TimestepShiftLCMScheduler

    label = digit_label(args.prompt)
    if args.cuda_graph:
        raise GenerateError("--cuda-graph applies to --model pipelines; the digits model runs eager")
    try:
        unet, encoder, recorded_shift = _load_digits_unet(args, device, dtype)
    except (FileNotFoundError, GenerateError) as err:
        raise GenerateError(f"no digits student weights: {err}") from err
    except ModuleNotFoundError:  # an optional extra (peft for --lora): the CLI names it
        raise
    except Exception as err:  # a corrupt or foreign file
        what = args.unet or args.lora or digits.asset_path(digits.STUDENT_ASSET)
        raise GenerateError(f"could not load the digits student from {what}: {type(err).__name__}: {err}") from err
    if not args.no_patch:
        from nitrokernels.patch import patch_unet

        patch_unet(unet)
    shift = args.shift if args.shift is not None else recorded_shift if recorded_shift is not None else 250
    scheduler = TimestepShiftLCMScheduler(**digits.NOISE_SCHEDULE, shift=shift)
    hidden = encoder(torch.tensor([label], device=device))
    size, channels = unet.config.sample_size, unet.config.in_channels
    paths = []
    with torch.no_grad(), _progress(args.num_images) as bar:
        for i in range(args.num_images):
            seed = args.seed + i
            generator = torch.Generator().manual_seed(seed)
            noise = torch.randn((1, channels, size, size), generator=generator).to(device=device, dtype=dtype)
            image = sample(lambda x, t: unet(x, t, encoder_hidden_states=hidden).sample, scheduler, noise,
                           args.steps, generator)
            paths.append(digits.save_grid_png(_image_path(args, seed), image.float(), nrow=1, scale=8))
            print(paths[-1], flush=True)
            bar.update()
    return paths


def _run_pipeline(args, device, dtype) -> list:
    import torch

    from nitrokernels.nitro.pipeline import UNetWeightsError, load_pipeline

    try:
        pipe = load_pipeline(args.model, args.unet, shift=args.shift, device=device, dtype=dtype,
                             patch=not args.no_patch, cuda_graph=args.cuda_graph,
                             unet_sha256=getattr(args, "unet_sha256", None), lora=args.lora,
                             fuse_lora=args.fuse_lora)
    except (FileNotFoundError, UNetWeightsError) as err:
        raise GenerateError(str(err)) from err
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is not None:
        count = len(tokenizer(args.prompt).input_ids)
        if count > tokenizer.model_max_length:
            raise GenerateError(f"the prompt is {count} tokens (with start/end) but the text encoder takes at most "
                                f"{tokenizer.model_max_length}; shorten it")
    paths = []
    with _progress(args.num_images) as bar:
        for i in range(args.num_images):
            seed = args.seed + i
            image = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=0.0,
                         generator=torch.Generator().manual_seed(seed)).images[0]
            path = _image_path(args, seed)
            image.save(path)
            paths.append(path)
            print(path, flush=True)
            bar.update()
    return paths


def run(args) -> int:
    """Generate `args.num_images` images; returns the exit status (0, or 2 with a message on stderr)."""
    try:
        if args.num_images < 1:
            raise GenerateError(f"--num-images must be at least 1, got {args.num_images}")
        if not 1 <= args.steps <= 4:
            raise GenerateError(f"--steps must be 1, 2, 3 or 4, got {args.steps}")
        if not (0 <= args.seed and args.seed + args.num_images <= 2 ** 63):
            raise GenerateError(f"--seed must be in [0, 2**63 - num_images], got {args.seed}")
        if args.fuse_lora and args.lora is None:
            raise GenerateError("--fuse-lora needs --lora PATH")
        for flag, path in (("--unet", args.unet), ("--lora", args.lora)):
            if path is not None and not os.path.exists(path):
                raise GenerateError(f"{flag} {path} does not exist")
        from nitrokernels.nitro.pipeline import resolve_device, resolve_dtype
        from nitrokernels.nitro.scheduler import TimestepShiftLCMScheduler

        if args.shift is not None:
            TimestepShiftLCMScheduler(shift=args.shift)  # refuses a shift outside (0, 1000] before loading

        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        if args.cuda_graph and device.type != "cuda":
            raise GenerateError(f"--cuda-graph needs a CUDA device (device is {device})")
        if args.model is None:
            digit_label(args.prompt)  # refuse a bad prompt before loading anything
        os.makedirs(args.out, exist_ok=True)
        if args.model is None:
            _run_digits(args, device, dtype)
        else:
            _run_pipeline(args, device, dtype)
    except (GenerateError, FileNotFoundError, ValueError) as err:  # ValueError: bad shift / dtype / weights file
        print(f"nitrokernels generate: {err}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nitrokernels generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
