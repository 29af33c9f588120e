"""load_pipeline / prepare_pipeline / the generate CLI on a tiny random-weight SDXL-style pipeline (two CLIP
text encoders with a local byte-level vocabulary, text_time conditioning, a small VAE): built and saved into a
tmp folder, nothing downloaded. CPU by default; the CUDA-graph and bf16 checks run where there is a GPU.

On the CPU the fused blocks' ops run their eager references (what a CPU user gets; the test session turns on
Triton's interpreter, far too slow for whole pipelines), except in the one `slow` test that runs the normal
dispatch (Triton kernels, interpreted on a CPU) end to end. The kernels themselves have their own tests."""
import argparse
import os

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import StableDiffusionXLPipeline  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from nitrokernels.nitro import generate  # noqa: E402
from nitrokernels.nitro.pipeline import (GraphedPipelineParts, UNetWeightsError, load_pipeline,  # noqa: E402
                                         make_random_sdxl_pipeline)
from nitrokernels.nitro.scheduler import TimestepShiftLCMScheduler  # noqa: E402

PROMPT = "a watercolor fox"
SHIFT = 250


@pytest.fixture(autouse=True)
def eager_kernels_on_cpu(request):
    if torch.cuda.is_available() or "slow" in request.keywords:
        yield
        return
    from nitrokernels.ops.dispatch import use_backend

    with use_backend("eager"):
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(base folder, NitroSD-style UNet file): the file holds different weights than the base UNet."""
    root = tmp_path_factory.mktemp("tiny_sdxl")
    pipe = make_random_sdxl_pipeline("tiny", device="cpu", seed=0)
    base = root / "base"
    pipe.save_pretrained(base)
    g = torch.Generator().manual_seed(1)
    student = {k: (v + 0.05 * torch.randn(v.shape, generator=g)).contiguous() for k, v in pipe.unet.state_dict().items()}
    unet_file = root / "nitrosd-tiny_unet.safetensors"
    save_file(student, unet_file)
    return base, unet_file


def plain_diffusers(base, unet_file, device="cpu", dtype=torch.float32):
    """Stock diffusers: the same folder and UNet weights, our scheduler, no nitrokernels patches or graphs."""
    pipe = StableDiffusionXLPipeline.from_pretrained(base, local_files_only=True).to(device)
    pipe.unet.load_state_dict(load_file(unet_file))
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        torch.nn.Module.to(module, dtype=dtype)
    pipe.scheduler = TimestepShiftLCMScheduler.from_config(pipe.scheduler.config, shift=SHIFT, timesteps_mode="model")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe, steps, seed=0, prompt=PROMPT, size=32):
    return pipe(prompt, num_inference_steps=steps, guidance_scale=0.0, output_type="pt", height=size, width=size,
                generator=torch.Generator().manual_seed(seed)).images.float()


@pytest.fixture(scope="module")
def fused(tiny):
    base, unet_file = tiny
    return load_pipeline(base, unet_weights=unet_file, shift=SHIFT, device="cpu", dtype=torch.float32, patch=True)


@pytest.fixture(scope="module")
def plain(tiny):
    return plain_diffusers(*tiny)


def test_loads_with_scheduler_weights_and_patches(tiny, fused):
    base, unet_file = tiny
    assert isinstance(fused, StableDiffusionXLPipeline)
    assert isinstance(fused.scheduler, TimestepShiftLCMScheduler)
    assert fused.scheduler.config.shift == SHIFT and fused.scheduler.config.timesteps_mode == "model"
    state = load_file(unet_file)
    for key, value in fused.unet.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not any(p.is_meta for p in fused.unet.parameters())
    assert len(fused.nitro_patches) == 2
    assert fused.nitro_patches[0].patched, fused.nitro_patches[0].summary()  # something was fused in the UNet
    assert fused.nitro_graphs is None


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_fused_matches_plain_diffusers(fused, plain, steps):
    got, expected = images(fused, steps), images(plain, steps)
    assert got.shape == (1, 3, 32, 32)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)  # measured: 0 (eager refs)


@pytest.mark.slow
def test_fused_kernels_match_plain_diffusers(fused, plain):
    """The normal dispatch (Triton kernels; interpreted on a CPU), 1 step (at 32x32, as every test here)."""
    got, expected = images(fused, 1), images(plain, 1)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)  # measured: 4e-7


def test_step_counts_share_weights_and_differ(fused):
    unet = fused.unet
    outs = [images(fused, steps) for steps in (1, 2, 4)]
    assert fused.unet is unet  # nothing reloaded between step counts
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


def test_same_seed_same_image(fused):
    a, b, c = images(fused, 2, seed=7), images(fused, 2, seed=7), images(fused, 2, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_unet_weights_are_used(tiny, fused):
    base, _ = tiny
    base_only = load_pipeline(base, device="cpu", patch=False)
    assert not torch.equal(images(base_only, 1), images(fused, 1))


class FakeGraphed:
    """nitrokernels.graphed stand-in for CPU: runs the module eagerly and records the signatures (tensor shapes
    and dtypes, constant values) that a real GraphedModule would capture one graph for."""

    def __init__(self, module):
        self.module = module
        self.signatures = set()

    def __call__(self, *args, **kwargs):
        leaves, spec = torch.utils._pytree.tree_flatten((args, kwargs))
        self.signatures.add((str(spec), tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else x
                                              for x in leaves)))
        return self.module(*args, **kwargs)


def test_graph_wrapping_plumbing_on_cpu(tiny):
    """One UNet signature and one VAE signature serve every step of 1-4-step runs (the timestep is a tensor
    input), outputs equal the eager pipeline's, and remove() restores the eager methods."""
    pipe = load_pipeline(tiny[0], unet_weights=tiny[1], device="cpu", patch=False)
    eager = {steps: images(pipe, steps) for steps in (1, 4)}
    parts = GraphedPipelineParts(pipe, graphed_fn=FakeGraphed)
    assert "forward" in pipe.unet.__dict__ and "decode" in pipe.vae.__dict__
    for steps in (1, 2, 3, 4):
        out = images(pipe, steps)
        if steps in eager:
            assert torch.equal(out, eager[steps])
    assert len(parts.unet.signatures) == 1 and len(parts.vae.signatures) == 1
    assert parts.eager_calls == {"unet": 0, "vae": 0}
    parts.remove()
    assert "forward" not in pipe.unet.__dict__ and "decode" not in pipe.vae.__dict__
    assert torch.equal(images(pipe, 1), eager[1])


# ---------------------------------------------------------------------------------------------- errors
def test_missing_paths(tiny, tmp_path):
    base, unet_file = tiny
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pipeline(tmp_path / "nowhere", device="cpu")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(tmp_path, device="cpu")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_pipeline(unet_file, device="cpu")
    missing = tmp_path / "nitrosd-realism_unet.safetensors"
    with pytest.raises(FileNotFoundError, match="nitrosd-realism_unet.safetensors"):
        load_pipeline(base, unet_weights=missing, device="cpu")


def test_corrupt_safetensors(tiny, tmp_path):
    base, unet_file = tiny
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(UNetWeightsError, match="garbage.safetensors.*not a readable safetensors file"):
        load_pipeline(base, unet_weights=garbage, device="cpu")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(unet_file.read_bytes()[:-1000])
    with pytest.raises(UNetWeightsError, match="truncated.safetensors"):
        load_pipeline(base, unet_weights=truncated, device="cpu")


def test_mismatched_safetensors(tiny, tmp_path):
    base, unet_file = tiny
    state = load_file(unet_file)
    keys = sorted(state)
    dropped = dict(state)
    del dropped[keys[3]]
    extra = dict(state, **{"lora.down.weight": torch.zeros(2, 2)})
    reshaped = dict(state, **{keys[0]: torch.zeros(1, *state[keys[0]].shape)})
    cases = [(dropped, rf"1 missing key\(s\): {keys[3]}"), (extra, r"1 unexpected key\(s\): lora.down.weight"),
             (reshaped, rf"1 shape mismatch\(es\): {keys[0]} \(file \[1, ")]
    for i, (bad, pattern) in enumerate(cases):
        path = tmp_path / f"bad{i}.safetensors"
        save_file(bad, path)
        with pytest.raises(UNetWeightsError, match=rf"bad{i}.safetensors does not fit .*{pattern}"):
            load_pipeline(base, unet_weights=path, device="cpu")


def test_one_load_unet_weights(tiny, tmp_path):
    """nitro.distiller.load_unet_weights IS nitro.pipeline.load_unet_weights: one loader for a module (filled in
    place, training state kept) or a UNet config folder (built on meta, frozen), with one set of errors for both;
    the old pipeline call form (path, unet_config_dir, unet_class, dtype) still works with a DeprecationWarning."""
    import warnings

    from diffusers import UNet2DConditionModel

    from nitrokernels.nitro import distiller, pipeline

    assert distiller.load_unet_weights is pipeline.load_unet_weights
    base, unet_file = tiny
    expected = load_file(unet_file)
    config_dir = base / "unet"

    def fresh():
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir)).train()

    def same(unet):
        return all(torch.equal(v, expected[k]) for k, v in unet.state_dict().items())

    module = fresh()
    assert pipeline.load_unet_weights(module, unet_file) is module and same(module)
    assert module.training and all(p.requires_grad for p in module.parameters())  # a student stays trainable
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new forms do not warn
        built = pipeline.load_unet_weights(config_dir, unet_file, dtype=torch.float64)
    assert not built.training and not any(p.requires_grad for p in built.parameters())
    assert next(built.parameters()).dtype == torch.float64
    with pytest.warns(DeprecationWarning, match="pass the UNet .or its config folder. first"):
        old = pipeline.load_unet_weights(unet_file, config_dir, UNet2DConditionModel, torch.float32)
    assert same(old) and not old.training

    prefixed = tmp_path / "prefixed.safetensors"
    save_file({f"model.{k}": v for k, v in expected.items()}, prefixed)
    assert same(pipeline.load_unet_weights(fresh(), prefixed, prefix="model."))
    folder = tmp_path / "student"
    pipeline.load_unet_weights(fresh(), unet_file).save_pretrained(folder)  # a UNet folder (`distill`'s student/)
    assert same(pipeline.load_unet_weights(fresh(), folder))

    extra = tmp_path / "extra.safetensors"
    save_file(dict(expected, **{"lora.down.weight": torch.zeros(2, 2)}), extra)
    assert same(pipeline.load_unet_weights(fresh(), extra, strict=False))  # unexpected keys skipped
    shapes = tmp_path / "shapes.safetensors"
    key = sorted(expected)[0]
    save_file(dict(expected, **{key: torch.zeros(1, *expected[key].shape)}), shapes)
    for target in (fresh(), config_dir):  # the same errors for a module and a config folder
        with pytest.raises(UNetWeightsError, match=r"extra.safetensors does not fit the UNet2DConditionModel "
                                                   r".*1 unexpected key\(s\): lora.down.weight"):
            pipeline.load_unet_weights(target, extra)
        with pytest.raises(UNetWeightsError, match=rf"shapes.safetensors does not fit .*1 shape mismatch.*{key}"):
            pipeline.load_unet_weights(target, shapes, strict=False)  # shapes are checked even when not strict
        with pytest.raises(FileNotFoundError, match="UNet weights .*missing.safetensors do not exist"):
            pipeline.load_unet_weights(target, tmp_path / "missing.safetensors")
    untouched = fresh()
    before = {k: v.clone() for k, v in untouched.state_dict().items()}
    with pytest.raises(UNetWeightsError):
        pipeline.load_unet_weights(untouched, shapes)
    assert all(torch.equal(v, before[k]) for k, v in untouched.state_dict().items())
    with pytest.raises(TypeError, match="a UNet module or its config folder"):
        pipeline.load_unet_weights(None, unet_file)


def test_bad_options(tiny):
    base, _ = tiny
    with pytest.raises(ValueError, match="shift"):
        load_pipeline(base, shift=0, device="cpu")
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        load_pipeline(base, device="cpu", cuda_graph=True)
    with pytest.raises(ValueError, match="dtype"):
        load_pipeline(base, device="cpu", dtype="int8")


# ------------------------------------------------------------------------------------------ generate CLI
def cli_args(**overrides):
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    argv = []
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return parser.parse_args(argv)


def digits_student(tmp_path):
    """The shipped digits student if `nitrokernels demo` has written it, else a random-weight one (the CLI
    path is the same; only the drawings differ)."""
    digits = pytest.importorskip("nitrokernels.digits.data")
    if os.path.exists(digits.asset_path(digits.STUDENT_ASSET)):
        return None
    torch.manual_seed(0)
    path = str(tmp_path / "student.safetensors")
    digits.save_asset(path, {"unet": digits.make_digits_unet(), "encoder": digits.DigitsEncoder()}, {"shift": 250})
    return path


def test_generate_digits_writes_pngs(tmp_path, capsys):
    from PIL import Image

    student = digits_student(tmp_path)
    extra = {"unet": student} if student else {}
    out = tmp_path / "out"
    args = cli_args(prompt="7", steps=2, seed=3, out=out, num_images=2, device="cpu", **extra)
    assert generate.run(args) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "7-2step-seed3.png"), str(out / "7-2step-seed4.png")]
    for path in printed:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] == im.size[1] > 16
    # deterministic: the same seed writes the same picture
    again = tmp_path / "again"
    assert generate.run(cli_args(prompt="7", steps=2, seed=3, out=again, device="cpu", **extra)) == 0
    assert (again / "7-2step-seed3.png").read_bytes() == (out / "7-2step-seed3.png").read_bytes()


def test_generate_digits_draws_the_prompted_digit(tmp_path, capsys):
    digits = pytest.importorskip("nitrokernels.digits.data")
    for asset in (digits.STUDENT_ASSET, digits.CLASSIFIER_ASSET):
        if not os.path.exists(digits.asset_path(asset)):
            pytest.skip(f"{asset} is not shipped yet (written by `nitrokernels demo` / train_digits_teacher.py)")
    from PIL import Image

    classifier = digits.load_pretrained_classifier()
    assert generate.run(cli_args(prompt="7", steps=1, out=tmp_path, num_images=16, device="cpu")) == 0
    pixels = []
    for path in capsys.readouterr().out.split():
        grid = np.asarray(Image.open(path), dtype=np.float32)  # 1-pixel border, upscaled 8x (nearest)
        pixels.append(grid[8:-8:8, 8:-8:8] / 127.5 - 1)
    batch = torch.from_numpy(np.stack(pixels))[:, None]
    assert batch.shape[-1] == digits.DIGITS_RESOLUTION
    accuracy = digits.classifier_accuracy(classifier, batch, torch.full((len(batch),), 7))
    assert accuracy >= 0.5, f"only {accuracy:.0%} of the generated sevens are classified as 7"


@pytest.mark.parametrize("prompt", ["cat", "77", "-1", "seven"])
def test_generate_digits_refuses_other_prompts(tmp_path, capsys, prompt):
    assert generate.run(cli_args(prompt=prompt, out=tmp_path / "o", device="cpu")) == 2
    err = capsys.readouterr().err
    assert "only understands the prompts 0-9" in err and repr(prompt) in err
    assert not (tmp_path / "o").exists()


def test_generate_with_model(tiny, tmp_path, capsys):
    from PIL import Image

    base, unet_file = tiny
    args = cli_args(prompt="A red Bicycle!", steps=1, seed=5, out=tmp_path, model=base, unet=unet_file, device="cpu")
    assert generate.run(args) == 0
    (path,) = capsys.readouterr().out.split()
    assert os.path.basename(path) == "a-red-bicycle-1step-seed5.png"
    with Image.open(path) as im:
        assert im.size == (64, 64)


def test_generate_errors(tiny, tmp_path, capsys):
    base, _ = tiny
    missing = tmp_path / "nope.safetensors"
    assert generate.run(cli_args(prompt="x", model=base, unet=missing, out=tmp_path, device="cpu")) == 2
    assert "nope.safetensors" in capsys.readouterr().err
    long_prompt = "word " * 100
    assert generate.run(cli_args(prompt=long_prompt, model=base, out=tmp_path, device="cpu")) == 2
    assert "tokens" in capsys.readouterr().err
    assert generate.run(cli_args(prompt="1", out=tmp_path, device="cpu", num_images=0)) == 2
    assert "--num-images" in capsys.readouterr().err
    assert generate.run(cli_args(prompt="1", out=tmp_path, device="cpu", shift=0)) == 2
    assert "shift" in capsys.readouterr().err


# ------------------------------------------------------------------- a run's student: folder, checkpoint, LoRA
def test_unet_weights_from_a_unet_folder_and_a_checkpoint(tiny, plain, tmp_path):
    """unet_weights= a save_pretrained UNet folder (<out>/student) or a NitroDistiller checkpoint.pt (its student,
    read weights_only with its digest; shift=None takes the checkpoint's shift) give the plain pipeline's images."""
    from diffusers import UNet2DConditionModel

    from nitrokernels.nitro.distiller import CHECKPOINT_FORMAT, state_digest

    base, unet_file = tiny
    student = load_file(unet_file)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(base, "unet"))
    unet.load_state_dict(student)
    unet.save_pretrained(tmp_path / "student")
    state = {"format": CHECKPOINT_FORMAT, "config": {"shift": 500}, "step": 3, "student": student}
    state["digest"] = state_digest(state)
    torch.save(state, tmp_path / "checkpoint.pt")
    expected = images(plain, 1)
    for weights, shift in ((tmp_path / "student", SHIFT), (tmp_path / "checkpoint.pt", None)):
        pipe = load_pipeline(base, unet_weights=weights, shift=shift, device="cpu", patch=False)
        assert pipe.scheduler.config.shift == (SHIFT if shift else 500)
        pipe.scheduler = TimestepShiftLCMScheduler.from_config(pipe.scheduler.config, shift=SHIFT)
        torch.testing.assert_close(images(pipe, 1), expected, rtol=0, atol=2e-5)
    with pytest.raises(UNetWeightsError, match="UNet folder"):
        load_pipeline(base, unet_weights=tmp_path, device="cpu", patch=False)   # a folder without config.json


def test_lora_adapter_loads_into_the_pipeline_unet(tiny, tmp_path, capsys):
    """load_pipeline(lora=<distill --lora-rank's student_lora>) equals the in-memory LoRA student; fuse_lora merges
    it (no peft layers left, same images); `generate --lora` runs it. The adapter is written by the distill
    command's own saver (save_lora_student) from a peft-wrapped base UNet with trained-looking (non-zero) B."""
    pytest.importorskip("peft")
    from nitrokernels.nitro import distill_cli

    base, _ = tiny
    lora = {"rank": 2, "alpha": 4.0, "targets": list(distill_cli.LORA_TARGETS)}
    ref = StableDiffusionXLPipeline.from_pretrained(base, local_files_only=True)
    distill_cli.add_lora(ref.unet, lora)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in ref.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    folder = distill_cli.save_lora_student(ref.unet, str(tmp_path / "student_lora"), lora)
    ref.scheduler = TimestepShiftLCMScheduler.from_config(ref.scheduler.config, shift=SHIFT, timesteps_mode="model")
    ref.set_progress_bar_config(disable=True)
    expected = images(ref, 1)
    base_only = images(load_pipeline(base, shift=SHIFT, device="cpu", patch=False), 1)
    assert (expected - base_only).abs().max() > 1e-3          # the adapter matters
    pipe = load_pipeline(base, shift=SHIFT, device="cpu", patch=True, lora=folder)
    torch.testing.assert_close(images(pipe, 1), expected, rtol=0, atol=2e-5)
    fused = load_pipeline(base, shift=SHIFT, device="cpu", patch=False, lora=folder, fuse_lora=True)
    assert not any("lora" in k or "base_layer" in k for k in fused.unet.state_dict())
    torch.testing.assert_close(images(fused, 1), expected, rtol=0, atol=1e-4)
    with pytest.raises(FileNotFoundError, match="LoRA adapter"):
        load_pipeline(base, device="cpu", lora=tmp_path / "nope")
    args = cli_args(prompt="a fox", out=tmp_path / "o", model=base, lora=folder, device="cpu", no_patch=True)
    assert generate.run(args) == 0, capsys.readouterr().err
    assert len(list((tmp_path / "o").glob("*.png"))) == 1


# ------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_cuda_graph_replay_matches_eager_gpu(tiny):
    base, unet_file = tiny
    eager = load_pipeline(base, unet_weights=unet_file, device="cuda", dtype=torch.float32, patch=True)
    graphed = load_pipeline(base, unet_weights=unet_file, device="cuda", dtype=torch.float32, patch=True,
                            cuda_graph=True)
    for steps in (1, 2, 3, 4):
        torch.testing.assert_close(images(graphed, steps), images(eager, steps), rtol=0, atol=1e-5)
    assert graphed.nitro_graphs.unet.captures == 1 and graphed.nitro_graphs.vae.captures == 1
    assert torch.equal(images(graphed, 2, seed=4), images(graphed, 2, seed=4))


@pytest.mark.gpu
def test_cuda_graph_float16_upcast_vae_gpu(tiny):
    """SDXL-style VAEs (force_upcast) in float16: kept in float32 under graphs, so repeated calls replay."""
    base, unet_file = tiny
    pipe = load_pipeline(base, unet_weights=unet_file, device="cuda", dtype=torch.float16, cuda_graph=True)
    assert pipe.vae.dtype == torch.float32 and pipe.unet.dtype == torch.float16
    first, second = images(pipe, 2), images(pipe, 2)
    assert torch.isfinite(first).all() and torch.equal(first, second)
    assert pipe.nitro_graphs.vae.captures == 1


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_fused_bf16_vs_plain_gpu(tiny, cuda_graph):
    """bf16 fused (+graphed) error against plain fp32 stays within 2x plain bf16's error (+ a small floor)."""
    base, unet_file = tiny
    reference = images(plain_diffusers(base, unet_file, "cuda", torch.float32), 4)
    plain_bf16 = images(plain_diffusers(base, unet_file, "cuda", torch.bfloat16), 4)
    fused = images(load_pipeline(base, unet_weights=unet_file, device="cuda", dtype=torch.bfloat16,
                                 cuda_graph=cuda_graph), 4)
    err_fused = (fused - reference).abs().max().item()
    err_plain = (plain_bf16 - reference).abs().max().item()
    assert err_fused <= 2 * err_plain + 1e-2, (err_fused, err_plain)
