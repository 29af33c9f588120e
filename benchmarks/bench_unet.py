"""SDXL-size UNet2DConditionModel (random weights), 1024x1024 (latent 128x128), bf16, on one GPU.

Forward at batch 1 (one-step inference): eager, eager under a CUDA graph, channels_last, torch.compile,
patched (nitrokernels.patch_unet), and patched + graphed (nitrokernels.graphed) -- the "fused" variant.
Training step (forward + backward) at batch 2: eager vs patched.
FLOPs are counted with torch.utils.flop_counter on the eager model (about 6.76 TFLOP for the forward) and the
floor is that count at this GPU's measured bf16 matmul rate. Peak memory is recorded per variant.

Targets (issue 4): patched + graphed forward <= 18 ms on an H100 (>= 3.6x eager, faster than eager + graph
and than torch.compile); training step >= 1.5x eager.
Set NITROKERNELS_BENCH_COMPILE=0 to leave out the torch.compile baseline (it takes minutes to compile).
"""
import copy
import gc
import os

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402

import nitrokernels as nk  # noqa: E402

# Stable Diffusion XL base 1.0's UNet configuration (the layout NitroSD-Realism / -Vibrant ship in).
SDXL_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
DTYPE = torch.bfloat16
SDXL_FORWARD_TFLOP = 6.76  # the figure measured for this model at 1024^2, batch 1 (used if counting fails)
WITH_COMPILE = os.environ.get("NITROKERNELS_BENCH_COMPILE", "1") not in ("0", "")


def make_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**SDXL_CONFIG)
    return unet.to(DTYPE)


def make_inputs(batch: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(batch)
    kw = dict(device="cuda", dtype=DTYPE, generator=g)
    return dict(sample=torch.randn(batch, 4, 128, 128, **kw),
                timestep=torch.full((batch,), 999, device="cuda", dtype=torch.long),
                encoder_hidden_states=torch.randn(batch, 77, 2048, **kw),
                added_cond_kwargs=dict(text_embeds=torch.randn(batch, 1280, **kw),
                                       time_ids=torch.tensor([[1024.0, 1024.0, 0, 0, 1024.0, 1024.0]] * batch,
                                                             device="cuda", dtype=DTYPE)))


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


@pytest.fixture(scope="module")
def unet():
    if not torch.cuda.is_available():
        pytest.skip("benchmarks need a CUDA GPU")
    model = make_unet()
    yield model
    del model
    gc.collect()
    torch.cuda.empty_cache()


def test_unet_forward_batch1(nk_bench, unet):
    unet.eval().requires_grad_(False)
    inputs = make_inputs(1)
    patched = copy.deepcopy(unet)
    handle = nk.patch_unet(patched)
    channels_last = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    cl_inputs = dict(inputs, sample=inputs["sample"].contiguous(memory_format=torch.channels_last))

    with torch.no_grad():
        flops = count_flops(lambda: unet(**inputs)) or SDXL_FORWARD_TFLOP * 1e12
        graphed_eager = nk.graphed(unet, **inputs)
        graphed_patched = nk.graphed(patched, **inputs)
        variants = {
            "fused": lambda: graphed_patched(**inputs),
            "patched": lambda: patched(**inputs),
            "eager": lambda: unet(**inputs),
            "eager+cuda_graph": lambda: graphed_eager(**inputs),
            "channels_last": lambda: channels_last(**cl_inputs),
        }
        if WITH_COMPILE:
            compiled = torch.compile(unet)
            compiled(**inputs)  # compile outside the timing
            variants["torch.compile"] = lambda: compiled(**inputs)
        result = nk_bench.compare(
            "unet_forward_sdxl_1024", {"batch": 1, "dtype": "bfloat16", "resolution": 1024},
            variants, flops=flops, dtype=DTYPE, memory=True, warmup=3, reps=20,
            notes=f"fused = patch_unet + graphed; {flops / 1e12:.2f} TFLOP counted; patch: "
                  + handle.summary().splitlines()[0])
        # the fused forward computes the same thing (bf16; compared loosely, the kernels round differently)
        ref = unet(**inputs).sample.float()
        out = graphed_patched(**inputs).sample.float()
    rel = ((out - ref).norm() / ref.norm()).item()
    result.notes += f"; relative L2 difference fused vs eager {rel:.2e}"
    assert rel < 5e-2, rel
    handle.revert()
    del patched, channels_last, graphed_eager, graphed_patched, variants
    gc.collect()
    torch.cuda.empty_cache()


def test_unet_training_step_batch2(nk_bench, unet):
    unet.train().requires_grad_(True)
    inputs = make_inputs(2)
    patched = copy.deepcopy(unet)
    handle = nk.patch_unet(patched)
    grad_out = torch.randn(2, 4, 128, 128, device="cuda", dtype=DTYPE)

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(**inputs).sample.backward(grad_out)
        return run

    flops = count_flops(step(unet)) or 3 * 2 * SDXL_FORWARD_TFLOP * 1e12
    nk_bench.compare("unet_train_step_sdxl_1024", {"batch": 2, "dtype": "bfloat16", "resolution": 1024},
                     {"fused": step(patched), "eager": step(unet)}, flops=flops, dtype=DTYPE, memory=True,
                     warmup=2, reps=10,
                     notes=f"forward + backward, bf16 parameters; {flops / 1e12:.2f} TFLOP counted; patch: "
                           + handle.summary().splitlines()[0])
    handle.revert()
    unet.zero_grad(set_to_none=True)
    del patched
    gc.collect()
    torch.cuda.empty_cache()
