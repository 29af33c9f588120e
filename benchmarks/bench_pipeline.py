"""End-to-end NitroSD inference at SDXL size (issue 6): the nitrokernels pipeline vs plain diffusers, same run.

Run: `pytest benchmarks/bench_pipeline.py --benchmark-only` on a GPU (skipped without one). Setup builds SDXL-size
random weights directly on the GPU in bf16 (about a minute): the SDXL UNet (2.6 B parameters), SDXL's VAE, and
text encoders shaped like CLIP ViT-L + OpenCLIP bigG at full depth (local byte-level tokenizers; 77 tokens either
way). 1024² images, batch 1, no classifier-free guidance (NitroFusion), output_type="pt" (images stay on the GPU).

Variants (all share the text encoders; each has its own copy of the same UNet / VAE weights):
  fused           load_pipeline's path: patch_unet + patch_vae, CUDA graphs of the UNet and VAE decode
  eager           plain diffusers StableDiffusionXLPipeline with the same scheduler, eager
  fused_no_graph  the fused blocks without CUDA graphs     } attribute the gain between
  graph_no_fused  CUDA graphs of diffusers' own blocks      } kernels and graph replay

Cases:
  pipeline/e2e/{1,4}step   pipe(prompt, num_inference_steps=n, guidance_scale=0): text encoders + n UNet
                           forwards + n scheduler steps + VAE decode. Notes: each stage's share of the total
                           (from the stage cases below) for fused and eager, and the image difference to eager.
  pipeline/stage/text_encoders, pipeline/stage/unet, pipeline/stage/vae_decode: one stage alone, same inputs the
                           pipeline gives it. Floors (UNet, VAE): the FLOPs counted by torch's FlopCounterMode.
"""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers", reason="the pipeline benchmark builds a diffusers StableDiffusionXLPipeline")
pytest.importorskip("transformers", reason="the pipeline benchmark's text encoders are transformers models")

DTYPE = torch.bfloat16
PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"
RESOLUTION = 1024
VARIANTS = ("fused", "eager", "fused_no_graph", "graph_no_fused")
STAGES = ("text_encoders", "unet", "vae_decode")
_STAGE_MS: dict = {}  # stage -> {variant: ms}, filled by the stage cases, read by the end-to-end notes


def build_pipelines(size: str = "sdxl", device="cuda", dtype=DTYPE, variants=VARIANTS) -> dict:
    """{variant: pipeline} with the same random weights (see the module docstring)."""
    from nitrokernels.nitro.pipeline import make_random_sdxl_pipeline, prepare_pipeline

    base = make_random_sdxl_pipeline(size, device=device, dtype=dtype, seed=0)
    options = {"fused": (True, True), "eager": (False, False), "fused_no_graph": (True, False),
               "graph_no_fused": (False, True)}
    pipes = {}
    for name in variants:  # copies first: prepare_pipeline patches modules in place
        components = dict(base.components, scheduler=type(base.scheduler).from_config(base.scheduler.config))
        if name != "eager":  # eager takes the base modules, every other variant its own copy of them
            components.update(unet=copy.deepcopy(base.unet), vae=copy.deepcopy(base.vae))
        pipes[name] = type(base)(**components)
        pipes[name].set_progress_bar_config(disable=True)
    for name, pipe in pipes.items():
        patch, graph = options[name]
        prepare_pipeline(pipe, shift=250, patch=patch, cuda_graph=graph)
    return pipes


def run_pipeline(pipe, steps: int, seed: int = 0):
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=0.0, height=RESOLUTION, width=RESOLUTION,
                output_type="pt", generator=torch.Generator().manual_seed(seed)).images


def stage_inputs(pipe, device):
    """The tensors the pipeline hands its UNet (first step) and VAE decoder, built the pipeline's own way."""
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device=device, do_classifier_free_guidance=False)
    size = RESOLUTION // pipe.vae_scale_factor
    latents = torch.randn(1, pipe.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    latents = latents.to(device=device, dtype=prompt_embeds.dtype)
    time_ids = pipe._get_add_time_ids((RESOLUTION, RESOLUTION), (0, 0), (RESOLUTION, RESOLUTION),
                                      dtype=prompt_embeds.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    pipe.scheduler.set_timesteps(1, device=device)
    return dict(sample=latents, timestep=pipe.scheduler.timesteps[0], encoder_hidden_states=prompt_embeds,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.to(device)})


def stage_calls(pipe, inputs) -> dict:
    """{stage: zero-argument callable} running one stage of `pipe` on `inputs`."""
    device = inputs["sample"].device
    return {
        "text_encoders": lambda: pipe.encode_prompt(PROMPT, device=device, do_classifier_free_guidance=False),
        "unet": lambda: pipe.unet(**inputs, return_dict=False)[0],
        "vae_decode": lambda: pipe.vae.decode(inputs["sample"] / pipe.vae.config.scaling_factor,
                                              return_dict=False)[0],
    }


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


@pytest.fixture(scope="module")
def setup():
    if not torch.cuda.is_available():
        pytest.skip("benchmarks need a CUDA GPU")
    with torch.no_grad():
        pipes = build_pipelines()
        inputs = stage_inputs(pipes["eager"], torch.device("cuda"))
        calls = {name: stage_calls(pipe, inputs) for name, pipe in pipes.items()}
        flops = {stage: count_flops(calls["eager"][stage]) for stage in ("unet", "vae_decode")}
    return pipes, calls, flops


@pytest.mark.parametrize("stage", STAGES)
def test_stage(nk_bench, setup, stage):
    pipes, calls, flops = setup
    with torch.no_grad():
        fused, eager = calls["fused"][stage](), calls["eager"][stage]()
        first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731 (encode_prompt -> tuple)
        diff = (first(fused).float() - first(eager).float()).abs().max().item()
        result = nk_bench.compare(
            f"pipeline/stage/{stage}", {"resolution": RESOLUTION, "batch": 1, "dtype": "bf16"},
            {name: calls[name][stage] for name in VARIANTS}, flops=flops.get(stage, 0.0), dtype=DTYPE,
            warmup=3, reps=20, notes=f"max |fused - eager| = {diff:.3g}" + (
                "; the text encoders are not patched or graphed (same modules in every variant)"
                if stage == "text_encoders" else ""))
    _STAGE_MS[stage] = result.ms


@pytest.mark.parametrize("steps", [1, 4])
def test_end_to_end(nk_bench, setup, steps):
    pipes, _, _ = setup
    with torch.no_grad():
        images = {name: run_pipeline(pipe, steps).float() for name, pipe in pipes.items()}
        diffs = {name: (img - images["eager"]).abs().max().item() for name, img in images.items() if name != "eager"}
        result = nk_bench.compare(
            f"pipeline/e2e/{steps}step", {"resolution": RESOLUTION, "batch": 1, "dtype": "bf16", "steps": steps,
                                          "guidance_scale": 0.0},
            {name: (lambda pipe=pipe: run_pipeline(pipe, steps)) for name, pipe in pipes.items()},
            dtype=DTYPE, warmup=2, reps=10)
    notes = ["max |image - eager image| (0..1 scale): " + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items())]
    if len(_STAGE_MS) == len(STAGES):
        for variant in ("fused", "eager"):
            total = result.ms[variant]
            parts = {"text_encoders": _STAGE_MS["text_encoders"][variant],
                     "unet": steps * _STAGE_MS["unet"][variant], "vae_decode": _STAGE_MS["vae_decode"][variant]}
            parts["other (scheduler, latents, postprocess)"] = total - sum(parts.values())
            notes.append(f"{variant} {total:.1f} ms = " + ", ".join(
                f"{k} {v:.1f} ms ({100 * v / total:.0f}%)" for k, v in parts.items()))
    result.notes = "; ".join(notes)
    print(f"\n[pipeline/e2e/{steps}step] " + " | ".join(f"{k} {v:.1f} ms" for k, v in result.ms.items())
          + f" | speedup vs eager {result.speedup['eager']:.2f}x\n  " + "\n  ".join(notes))
