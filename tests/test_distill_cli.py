"""`nitrokernels distill` (issue 13): the CLI end to end on the digits preset and on a tiny SDXL-shaped pipeline
folder made here (UNet with text_time embeddings, two CLIP text encoders + tokenizers), resume, config-file /
flag precedence, refused paths and values (exit 2 before any model is loaded), and --dry-run."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from nitrokernels import cli  # noqa: E402
from nitrokernels.nitro import distill_cli  # noqa: E402
from nitrokernels.nitro.distiller import DistillConfig  # noqa: E402

FAST_DISC = {"t_star": [10, 500], "pool_sizes": 1, "heads_sampled": 1, "t_star_sampled": 1, "hidden": 8,
             "num_groups": 4, "local_size": 4, "refresh_rate": 0.0, "head_backend": "eager"}


# a regression warm-up of 1 iteration (DistillConfig.regression_steps, where this DistillConfig has the field)
WARMUP = ["--regression-steps", 1] if "regression_steps" in {f.name for f in dataclasses.fields(DistillConfig)} else []
LOSSES = ("d_loss", "g_loss", "regression_loss")


def run_cli(*argv):
    return cli.main(["distill", *map(str, argv)])


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _no_training(monkeypatch):
    """Any model loading fails the test: bad inputs must be refused before."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the bad input was refused")
    monkeypatch.setattr(distill_cli, "train", boom)
    monkeypatch.setattr(distill_cli, "build_unet", boom)


# ------------------------------------------------------------------------------------------ digits preset
@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    """3 iterations straight, and 2 + a resumed 1 (batch 2, the preset's discriminator)."""
    root = tmp_path_factory.mktemp("distill")
    common = ["--preset", "digits", "--batch-size", 2, "--no-progress", "--log-every", 1, *WARMUP]
    straight, split = root / "straight", root / "split"
    assert run_cli(*common, "--out", straight, "--steps", 3) == 0
    assert run_cli(*common, "--out", split, "--steps", 2) == 0
    # the resumed run needs no repeated flags: <out>/config.json is its base
    assert run_cli("--out", split, "--steps", 3, "--resume") == 0
    return straight, split


def test_digits_preset_writes_the_run_folder(digits_runs):
    straight, _ = digits_runs
    for name in ("checkpoint.pt", "log.jsonl", "loss.png", "samples_000003.png", "config.json",
                 "student/config.json", "student/diffusion_pytorch_model.safetensors"):
        assert (straight / name).exists(), name
    rows = _rows(straight / "log.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["d_loss"] > 0 and r["g_loss"] > 0 for r in rows[len(WARMUP) // 2:])   # adversarial iterations
    saved = json.loads((straight / "config.json").read_text())
    assert saved["run"]["preset"] == "digits" and saved["distill"]["batch_size"] == 2
    assert saved["distill"]["d_steps"] == 2


def test_resume_continues_exactly(digits_runs):
    straight, split = digits_runs
    a, b = _rows(straight / "log.jsonl"), _rows(split / "log.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert [ra.get(k) for k in LOSSES] == [rb.get(k) for k in LOSSES], (ra, rb)
    assert all("d_loss" in r for r in a[len(WARMUP) // 2:])
    from safetensors.torch import load_file

    wa = load_file(straight / "student" / "diffusion_pytorch_model.safetensors")
    wb = load_file(split / "student" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_existing_checkpoint_needs_resume(digits_runs, capsys, monkeypatch):
    straight, _ = digits_runs
    _no_training(monkeypatch)
    assert run_cli("--preset", "digits", "--out", straight, "--steps", 4) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err


def test_resume_with_changed_config_is_refused(digits_runs, capsys):
    straight, _ = digits_runs
    code = run_cli("--preset", "digits", "--batch-size", 2, "--no-progress", "--out", straight, "--steps", 4,
                   "--resume", "--lr-student", 1e-3)
    assert code == 2
    assert "lr_student" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ config files
def _resolve(*argv):
    import argparse

    parser = argparse.ArgumentParser()
    distill_cli.add_arguments(parser)
    return distill_cli.resolve(parser.parse_args(list(map(str, argv))))


def test_fsdp_flag_and_file_setting_reach_the_run(tmp_path):
    """--fsdp (or `fsdp = true` in the config file) is the run's sharding, recorded in <out>/config.json's run."""
    assert _resolve("--preset", "digits", "--out", tmp_path / "a").fsdp is False
    spec = _resolve("--preset", "digits", "--out", tmp_path / "b", "--fsdp")
    assert spec.fsdp is True and spec.run["fsdp"] is True
    (tmp_path / "c.toml").write_text("preset = 'digits'\nfsdp = true\n")
    assert _resolve("--config", tmp_path / "c.toml", "--out", tmp_path / "c").fsdp is True
    assert _resolve("--config", tmp_path / "c.toml", "--out", tmp_path / "c", "--no-fsdp").fsdp is False  # flag wins


@pytest.mark.parametrize("fmt", ["toml", "yaml"])
def test_config_file_and_flag_precedence(tmp_path, fmt):
    if fmt == "toml":
        text = ('preset = "digits"\nbatch-size = 3\nlr_student = 0.001\nbetas_student = [0.1, 0.2]\n'
                'train_steps = [1]\nema_decay = 0.99\n[discriminator]\nhidden = 16\nt_star_sampled = 1\n')
    else:
        pytest.importorskip("yaml")
        text = ('preset: digits\nbatch-size: 3\nlr_student: 0.001\nbetas_student: [0.1, 0.2]\n'
                'train_steps: [1]\nema_decay: 0.99\ndiscriminator:\n  hidden: 16\n  t_star_sampled: 1\n')
    path = tmp_path / f"run.{fmt}"
    path.write_text(text)
    spec = _resolve("--config", path, "--out", tmp_path / "o", "--lr-student", 2e-3, "--discriminator",
                    '{"hidden": 24}', "--ema-decay", "none")
    f = spec.fields
    assert f["batch_size"] == 3                      # file over the preset (16)
    assert f["lr_student"] == 2e-3                   # flag over the file
    assert f["betas_student"] == (0.1, 0.2) and f["train_steps"] == (1,)
    assert f["ema_decay"] is None                    # "none" flag over the file's 0.99
    assert f["d_steps"] == 2                         # the preset's (DistillConfig's default is 1)
    disc = f["discriminator"]
    assert disc["hidden"] == 24 and disc["t_star_sampled"] == 1 and disc["pool_sizes"] == 4  # flag > file > preset
    assert spec.preset == "digits" and spec.out == str(tmp_path / "o")


def test_every_distill_config_field_has_a_flag():
    import argparse
    import dataclasses

    from nitrokernels.nitro.distiller import DistillConfig

    parser = argparse.ArgumentParser()
    distill_cli.add_arguments(parser)
    text = parser.format_help()
    for f in dataclasses.fields(DistillConfig):
        flag = {"out_dir": "--out", "discriminator": "--discriminator", "resume": "--resume"}.get(
            f.name, "--" + f.name.replace("_", "-"))
        assert flag in text, f.name
    with pytest.raises(SystemExit) as exc:
        cli.main(["distill", "--help"])
    assert exc.value.code == 0


# ------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("case", ["no_teacher", "bad_config_field", "bad_value", "bad_disc", "preset_and_teacher",
                                  "bad_toml", "bad_jsonl", "safetensors_no_config", "no_out", "value_from_file",
                                  "disc_value", "student_mismatch", "bad_unet_config", "fsdp_lora",
                                  "fsdp_not_bool"])
def test_bad_input_names_the_file_or_field(tmp_path, capsys, monkeypatch, case):
    _no_training(monkeypatch)
    out = ["--out", tmp_path / "run"]
    if case == "no_teacher":
        argv, expect = ["--teacher", tmp_path / "missing", "--prompts", "p.txt", *out], "missing: no such file"
    elif case == "bad_config_field":
        (tmp_path / "c.toml").write_text("preset = 'digits'\nbatch_sise = 2\n")
        argv, expect = ["--config", tmp_path / "c.toml", *out], "c.toml: unknown field 'batch_sise'"
    elif case == "bad_value":
        argv, expect = ["--preset", "digits", "--batch-size", 0, *out], "DistillConfig.batch_size must be"
    elif case == "bad_disc":
        argv, expect = ["--preset", "digits", "--discriminator", '{"hiden": 3}', *out], "discriminator field 'hiden'"
    elif case == "preset_and_teacher":
        argv, expect = ["--preset", "digits", "--teacher", tmp_path, *out], "--teacher is not used with --preset"
    elif case == "bad_toml":
        (tmp_path / "c.toml").write_text("batch_size = = 2\n")
        argv, expect = ["--config", tmp_path / "c.toml", *out], "c.toml: not valid TOML"
    elif case == "bad_jsonl":
        pipe = make_tiny_sdxl(tmp_path / "pipe")
        (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n{"text": "no prompt"}\n')
        argv, expect = ["--teacher", pipe, "--prompts", tmp_path / "p.jsonl", *out], "p.jsonl: line 2"
    elif case == "safetensors_no_config":
        (tmp_path / "u.safetensors").write_bytes(b"")
        argv, expect = ["--teacher", tmp_path / "u.safetensors", "--prompts", "p.txt", *out], "needs --unet-config"
    elif case == "disc_value":
        (tmp_path / "c.toml").write_text("preset = 'digits'\n[discriminator]\nheads_sampled = 9\n")
        argv, expect = ["--config", tmp_path / "c.toml", *out], "heads_sampled"
    elif case == "student_mismatch":
        pipe = make_tiny_sdxl(tmp_path / "pipe")
        other = tmp_path / "other"
        other.mkdir()
        cfg = json.load(open(os.path.join(pipe, "unet", "config.json")))
        (other / "config.json").write_text(json.dumps({**cfg, "in_channels": 3}))
        (other / "diffusion_pytorch_model.safetensors").write_bytes(b"")
        (tmp_path / "p.txt").write_text("a cat\n")
        argv, expect = ["--teacher", pipe, "--student", other, "--prompts", tmp_path / "p.txt", *out], \
            "in_channels=3 but the teacher's"
    elif case == "bad_unet_config":
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel",
                                                     "down_block_types": ["NoSuchBlock2D"]}))
        argv, expect = ["--teacher", bad, "--dry-run"], "not a UNet2DConditionModel config"
    elif case == "no_out":
        argv, expect = ["--preset", "digits"], "--out DIR is required"
    elif case == "fsdp_lora":
        pytest.importorskip("peft")
        argv, expect = ["--preset", "digits", "--fsdp", "--lora-rank", 2, *out], "--fsdp shards a fully trained"
    elif case == "fsdp_not_bool":
        (tmp_path / "c.toml").write_text("preset = 'digits'\nfsdp = 'yes'\n")
        argv, expect = ["--config", tmp_path / "c.toml", *out], "fsdp must be true or false, got 'yes' (from"
    else:
        (tmp_path / "c.yaml").write_text("preset: digits\nshift: 2000\n")
        argv, expect = ["--config", tmp_path / "c.yaml", *out], "DistillConfig.shift must be in (0, 1000]"
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err
    assert expect in err, err
    if case == "value_from_file":
        assert "(from " in err and "c.yaml" in err


# ------------------------------------------------------------------------------------------ tiny SDXL folder
def _tiny_tokenizer(folder, max_length):
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tok = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                        model_max_length=max_length, pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    return len(vocab)


def _tiny_text_encoder(folder, encoder, tokenizer, cls, max_length=8, **config):
    """A tiny CLIP text encoder (width 32, 2 layers) + its tokenizer saved under folder/encoder, folder/tokenizer."""
    from transformers import CLIPTextConfig

    vocab = _tiny_tokenizer(os.path.join(folder, tokenizer), max_length)
    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, **config)
    cls(cfg).save_pretrained(os.path.join(folder, encoder))


TINY_SDXL_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                      use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                      transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=6 * 8 + 16,
                      cross_attention_dim=32 + 32, norm_num_groups=8)


def make_tiny_sdxl(folder, seed=0):
    """An SDXL-shaped diffusers pipeline folder with random weights: unet/, scheduler/, text_encoder(_2)/ and
    tokenizer(_2)/ (no VAE: the sample grids show latents)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = str(folder)
    if os.path.exists(os.path.join(folder, "model_index.json")):
        return folder
    torch.manual_seed(seed)
    UNet2DConditionModel(**TINY_SDXL_UNET).save_pretrained(os.path.join(folder, "unet"))
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, timestep_spacing="trailing").save_pretrained(os.path.join(folder, "scheduler"))
    for enc, tok, cls in (("text_encoder", "tokenizer", CLIPTextModel),
                          ("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection)):
        _tiny_text_encoder(folder, enc, tok, cls, projection_dim=16)
    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.30.0",
             "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDIMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "vae": [None, None]}
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f)
    return folder


def tiny_run(tmp_path, make_pipeline, prompts_text, prompts_name="p.txt"):
    """(pipeline folder, prompt file holding prompts_text, run folder) of a distill run on a tiny pipeline."""
    prompts = tmp_path / prompts_name
    prompts.write_text(prompts_text)
    return make_pipeline(tmp_path / "pipe"), prompts, tmp_path / "run"


def test_tiny_sdxl_pipeline_folder_trains_and_caches_prompts(tmp_path, capsys):
    pipe, prompts, out = tiny_run(tmp_path, make_tiny_sdxl, "a red cat\na blue dog\n\nthe number 7\n")
    argv = ["--teacher", pipe, "--prompts", prompts, "--out", out, "--batch-size", 2, "--teacher-steps", 2,
            "--train-steps", 1, 2, "--no-progress", "--log-every", 1, "--sample-count", 2,
            "--discriminator", json.dumps(FAST_DISC)]
    assert run_cli(*argv, "--steps", 2) == 0, capsys.readouterr().err
    rows = _rows(out / "log.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(r["d_loss"] > 0 for r in rows)
    assert (out / "checkpoint.pt").exists() and (out / "samples_000002.png").exists()
    assert (out / "student" / "config.json").exists()

    from safetensors import safe_open

    with safe_open(str(out / distill_cli.EMBED_CACHE), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        ehs = f.get_tensor("cond.encoder_hidden_states")
        pooled = f.get_tensor("cond.added_cond_kwargs.text_embeds")
        time_ids = f.get_tensor("cond.added_cond_kwargs.time_ids")
    assert meta["prompts_sha256"] == distill_cli.file_sha256(prompts) and meta["count"] == "3"
    assert "uncond.encoder_hidden_states" in keys and "uncond.added_cond_kwargs.text_embeds" in keys
    assert ehs.shape == (3, 8, 64) and pooled.shape == (3, 16)                # both encoders' widths concatenated
    assert time_ids.tolist()[0] == [128.0, 128.0, 0.0, 0.0, 128.0, 128.0]      # 16 latent x the VAE's 8

    # the cached embeddings are what the pipeline's own encoders give (SDXL's recipe: penultimate layers + pooled)
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    tok = AutoTokenizer.from_pretrained(os.path.join(pipe, "tokenizer_2"))
    enc = CLIPTextModelWithProjection.from_pretrained(os.path.join(pipe, "text_encoder_2"))
    ids = tok(["a blue dog"], padding="max_length", max_length=8, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        o = enc(ids, output_hidden_states=True)
    torch.testing.assert_close(pooled[1:2], o.text_embeds)
    torch.testing.assert_close(ehs[1:2, :, 32:], o.hidden_states[-2])

    # resume reuses the cache; a changed prompt file is refused with a clear message
    assert run_cli(*argv, "--steps", 3, "--resume") == 0
    assert [r["step"] for r in _rows(out / "log.jsonl")] == [1, 2, 3]
    prompts.write_text("something else\n")
    capsys.readouterr()
    assert run_cli(*argv, "--steps", 4, "--resume") == 2
    assert "changed since" in capsys.readouterr().err


def test_single_safetensors_teacher_with_pipeline(tmp_path, capsys):
    """--teacher file.safetensors + --pipeline (the unet config, encoders and scheduler come from the folder)."""
    import shutil

    pipe, prompts, out = tiny_run(tmp_path, make_tiny_sdxl, '{"prompt": "a cat"}\n{"prompt": "a dog"}\n', "p.jsonl")
    weights = tmp_path / "teacher_unet.safetensors"
    shutil.copy(os.path.join(pipe, "unet", "diffusion_pytorch_model.safetensors"), weights)
    disc = dict(FAST_DISC, t_star=[500], pool_sizes={"global_conditional": 1})
    code = run_cli("--teacher", weights, "--pipeline", pipe, "--prompts", prompts, "--out", out, "--steps", 1,
                   "--batch-size", 1, "--teacher-steps", 1, "--train-steps", 1, "--no-progress",
                   "--sample-count", 1, "--teacher-sampler", "euler", "--discriminator", json.dumps(disc))
    assert code == 0, capsys.readouterr().err
    assert len(_rows(out / "log.jsonl")) == 1


# ------------------------------------------------------------------------------------------ dry run
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                 cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)


def test_dry_run_digits(capsys, monkeypatch):
    _no_training(monkeypatch)
    assert run_cli("--preset", "digits", "--dry-run", "--batch-size", 4) == 0
    out = capsys.readouterr().out
    assert "student 1.0M params" in out and "240 heads" in out
    table = [line.split() for line in out.splitlines() if line.strip().startswith(("1 ", "2 ", "8 "))]
    assert [row[:2] for row in table] == [["1", "ddp"], ["1", "fsdp"], ["2", "ddp"], ["2", "fsdp"],
                                          ["8", "ddp"], ["8", "fsdp"]]


def test_dry_run_sdxl_from_config_on_meta(tmp_path, capsys, monkeypatch):
    """SDXL-size numbers from a UNet config alone (no weights, nothing allocated): the 2.57 B-parameter UNet."""
    unet = tmp_path / "sdxl_unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **SDXL_UNET}))
    monkeypatch.setattr(distill_cli, "train", lambda *a: 1 / 0)
    assert run_cli("--teacher", unet, "--dry-run", "--batch-size", 2, "--mixed-precision", "bf16",
                   "--world-size", 8) == 0
    out = capsys.readouterr().out
    assert "student 2567.5M params" in out and "480 heads" in out
    rows = {tuple(line.split()[:2]): [float(v) for v in line.split()[2:]] for line in out.splitlines()
            if line.strip().startswith("8 ")}
    ddp, fsdp = rows[("8", "ddp")], rows[("8", "fsdp")]
    gib = 2 ** 30
    # params: fp32 student + bf16 teacher + heads; FSDP shards the student's weights, grads and AdamW states
    heads = float(out.split("heads ")[1].split("M")[0]) * 1e6
    assert abs(ddp[0] - (2567463684 * 4 + 2567463684 * 2 + heads * 4) / gib) < 0.05
    n = 2567463684
    assert abs((ddp[1] - fsdp[1]) - 4 * n * 7 / 8 / gib) < 0.05          # fp32 gradients, 7/8 of them elsewhere
    assert abs((ddp[2] - fsdp[2]) - 8 * n * 7 / 8 / gib) < 0.05          # AdamW's two fp32 moments
    assert 1.0 < ddp[3] < 100.0          # activations of batch 2 at 1024^2, fused attention


@pytest.mark.parametrize("sampler", distill_cli.SAMPLERS)
def test_teacher_samplers_from_the_pipeline_schedule(tmp_path, sampler):
    """--teacher-sampler: the saved scheduler or DDIM/Euler/DPM/LCM built from its noise schedule, each usable for
    a 4-step teacher run (set_timesteps + step)."""
    pipe = make_tiny_sdxl(tmp_path / "pipe")
    spec = _resolve("--teacher", pipe, "--dry-run", "--teacher-sampler", sampler, "--discriminator",
                    json.dumps(FAST_DISC))
    sched = distill_cli.make_teacher_scheduler(spec)
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.beta_end == 0.012
    sched.set_timesteps(4)
    assert len(sched.timesteps) == 4
    x = torch.randn(1, 4, 8, 8) * getattr(sched, "init_noise_sigma", 1.0)
    gen = torch.Generator().manual_seed(0)
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t)
        kwargs = {"generator": gen} if sampler in ("lcm",) else {}
        x = sched.step(torch.zeros_like(inp), t, x, **kwargs).prev_sample
    assert torch.isfinite(x).all()


def test_lora_student_trains_only_the_adapter_and_resumes(tmp_path, capsys):
    """--lora-rank: only the adapter trains (the base weights stay the teacher's), the checkpoint resumes exactly,
    and <out>/student_lora/ loads into a fresh UNet that computes what the trained student does."""
    pytest.importorskip("peft")
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    pipe, prompts, _ = tiny_run(tmp_path, make_tiny_sdxl, "a cat\na dog\n")
    common = ["--teacher", pipe, "--prompts", prompts, "--batch-size", 1, "--teacher-steps", 1, "--train-steps", 1,
              "--no-progress", "--log-every", 1, "--sample-count", 1, "--lora-rank", 4, "--lr-student", 1e-2,
              "--discriminator", json.dumps(FAST_DISC)]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_cli(*common, "--out", straight, "--steps", 3) == 0, capsys.readouterr().err
    assert run_cli(*common, "--out", split, "--steps", 2) == 0
    assert run_cli(*common, "--out", split, "--steps", 3, "--resume") == 0
    a = [json.loads(line) for line in open(straight / "log.jsonl")]
    b = [json.loads(line) for line in open(split / "log.jsonl")]
    assert [(r["d_loss"], r["g_loss"]) for r in a] == [(r["d_loss"], r["g_loss"]) for r in b]

    lora = load_file(straight / "student_lora" / "pytorch_lora_weights.safetensors")
    assert lora and all("lora" in k for k in lora)
    assert max(v.abs().max().item() for k, v in lora.items() if "lora_B" in k) > 0   # B moved off its zero init
    ckpt = torch.load(straight / "checkpoint.pt", weights_only=True)
    base = UNet2DConditionModel.from_pretrained(os.path.join(pipe, "unet")).state_dict()
    student = ckpt["student"]
    for k, v in base.items():          # every base weight unchanged (peft names them <module>.base_layer.<param>)
        key = k if k in student else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(student[key], v), k
    assert len(ckpt["opt_student"]["param_groups"][0]["params"]) == len(lora)     # AdamW over the adapter only

    fresh = distill_cli.load_lora_student(UNet2DConditionModel.from_pretrained(os.path.join(pipe, "unet")),
                                          str(straight / "student_lora"))
    trained = distill_cli.add_lora(UNet2DConditionModel.from_pretrained(os.path.join(pipe, "unet")),
                                   json.load(open(straight / "student_lora" / "lora_config.json")))
    trained.load_state_dict(student)
    x = torch.randn(1, 4, 16, 16)
    cond = {"encoder_hidden_states": torch.randn(1, 8, 64),
            "added_cond_kwargs": {"text_embeds": torch.randn(1, 16), "time_ids": torch.ones(1, 6)}}
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, 249, **cond).sample, trained(x, 249, **cond).sample)


def test_patch_unet_keeps_a_lora_students_output():
    """patch_unet on a LoRA-wrapped student (what --lora-rank trains): the same output as unpatched, adapter included
    (the projections stay peft's LoRA layers). Checked on the ops' eager backend; the Triton / CUDA kernels of the
    patched modules are not run here."""
    pytest.importorskip("peft")
    from diffusers import UNet2DConditionModel

    from nitrokernels.patch import patch_unet

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET).eval()
    distill_cli.add_lora(unet, {"rank": 4, "alpha": 4.0, "targets": list(distill_cli.LORA_TARGETS)})
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    x = torch.randn(1, 4, 16, 16)
    cond = {"encoder_hidden_states": torch.randn(1, 8, 64),
            "added_cond_kwargs": {"text_embeds": torch.randn(1, 16), "time_ids": torch.ones(1, 6)}}
    from nitrokernels.ops.dispatch import use_backend

    with torch.no_grad(), use_backend("eager"):   # the fused modules' eager path (Triton's interpreter is slow)
        ref = unet(x, 249, **cond).sample
        handle = patch_unet(unet)
        out = unet(x, 249, **cond).sample
        unet.disable_adapters()
        base = unet(x, 249, **cond).sample
        handle.revert()
    assert any(status == "patched" for _, kind, status in handle.report if kind == "attention")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (base - ref).abs().max() > 1e-3      # the adapter does change the output, and the patched UNet kept it


def test_dry_run_with_lora_counts_only_the_adapter_as_trained(capsys, monkeypatch):
    pytest.importorskip("peft")
    _no_training(monkeypatch)
    full = distill_cli.memory_estimate(_resolve("--preset", "digits", "--dry-run"), [1])
    spec = _resolve("--preset", "digits", "--dry-run", "--lora-rank", 2)
    lora = distill_cli.memory_estimate(spec, [1])
    n, a = full["student_params"], lora["lora_params"]
    assert 0 < a < n / 10
    f, m = full["per_gpu"][1]["ddp"], lora["per_gpu"][1]["ddp"]
    assert m["params"] - f["params"] == 4 * a                 # the base weights stay, the adapter is added
    assert f["grads"] - m["grads"] == pytest.approx(4 * (n - a))          # gradients of the adapter only
    assert f["optimizer"] - m["optimizer"] == pytest.approx(8 * (n - a))  # and its AdamW moments
    assert run_cli("--preset", "digits", "--dry-run", "--lora-rank", 2, "--world-size", 2) == 0
    assert "LoRA rank 2:" in capsys.readouterr().out


def make_tiny_sd(folder, seed=0):
    """An SD1.5-shaped pipeline folder: one CLIP text encoder (last hidden state), a UNet without added
    conditioning, and a tiny VAE (factor 2) that decodes the sample grids."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = str(folder)
    torch.manual_seed(seed)
    UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                         attention_head_dim=4, norm_num_groups=8).save_pretrained(os.path.join(folder, "unet"))
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  sample_size=32).save_pretrained(os.path.join(folder, "vae"))
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False).save_pretrained(os.path.join(folder, "scheduler"))
    _tiny_text_encoder(folder, "text_encoder", "tokenizer", CLIPTextModel)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"],
                   "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]},
                  f)
    return folder


def test_tiny_sd15_pipeline_folder_with_vae_grids(tmp_path, capsys):
    from PIL import Image
    from safetensors import safe_open
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe, prompts, out = tiny_run(tmp_path, make_tiny_sd, "a cat\na dog\n")
    code = run_cli("--teacher", pipe, "--prompts", prompts, "--out", out, "--steps", 1, "--batch-size", 1,
                   "--teacher-steps", 1, "--train-steps", 1, "--no-progress", "--sample-count", 2,
                   "--discriminator", json.dumps(FAST_DISC))
    assert code == 0, capsys.readouterr().err
    with safe_open(str(out / distill_cli.EMBED_CACHE), "pt") as f:
        keys = set(f.keys())
        ehs = f.get_tensor("cond.encoder_hidden_states")
    assert keys == {"cond.encoder_hidden_states", "uncond.encoder_hidden_states"}   # no added_cond_kwargs for SD
    tok = CLIPTokenizer.from_pretrained(os.path.join(pipe, "tokenizer"))
    enc = CLIPTextModel.from_pretrained(os.path.join(pipe, "text_encoder"))
    with torch.no_grad():
        ref = enc(tok(["a dog"], padding="max_length", max_length=8, return_tensors="pt").input_ids).last_hidden_state
    torch.testing.assert_close(ehs[1:2], ref)
    grid = Image.open(out / "samples_000001.png")
    assert grid.mode == "RGB" and grid.size == ((2 * (32 + 1) + 1) * 4, (32 + 1 + 1) * 4)   # VAE-decoded 32x32


def test_lora_distill_then_generate_lora_equals_the_in_memory_student(tmp_path, capsys, monkeypatch):
    """distill --preset digits --lora-rank (2 iterations) -> generate --lora <out>/student_lora draws the image the
    trained in-memory student draws (same sampler, seed, shift); --fuse-lora the same within fp32 rounding."""
    pytest.importorskip("peft")
    import numpy as np
    from PIL import Image

    from nitrokernels.digits import data as digits
    from nitrokernels.nitro import generate

    students = []
    add_lora = distill_cli.add_lora
    monkeypatch.setattr(distill_cli, "add_lora", lambda unet, lora: students.append(add_lora(unet, lora)) or unet)
    out = tmp_path / "run"
    assert run_cli("--preset", "digits", "--batch-size", 2, "--steps", 2, *WARMUP, "--lora-rank", 2,
                   "--lr-student", 1e-2, "--no-progress", "--out", out) == 0, capsys.readouterr().err
    (student,) = students
    assert (out / "student_lora" / "lora_config.json").exists()
    assert max(p.abs().max().item() for n, p in student.named_parameters() if "lora_B" in n) > 0  # it trained

    def draw(folder, *extra):
        assert cli.main(["generate", "--prompt", "7", "--steps", "2", "--no-patch", "--device", "cpu",
                         "--out", str(folder), *extra]) == 0, capsys.readouterr().err
        return np.asarray(Image.open(folder / "7-2step-seed0.png")).astype(int)

    loaded = draw(tmp_path / "loaded", "--lora", str(out / "student_lora"))
    fused = draw(tmp_path / "fused", "--lora", str(out / "student_lora"), "--fuse-lora")
    _, encoder, _ = digits.load_pretrained_teacher()
    monkeypatch.setattr(generate, "_load_digits_unet", lambda args, device, dtype: (student.eval(), encoder, None))
    in_memory = draw(tmp_path / "in_memory")
    assert np.array_equal(loaded, in_memory)
    assert np.abs(fused - in_memory).max() <= 1  # one 8-bit level: merged weights round differently
