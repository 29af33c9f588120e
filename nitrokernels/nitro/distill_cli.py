"""`nitrokernels distill`: NitroFusion training of a one-step student from local models, on 1 to N processes.

    nitrokernels distill --preset digits --out runs/digits --steps 20          # the embedded digits teacher, CPU
    nitrokernels distill --teacher sdxl-dmd2/ --prompts prompts.txt --out runs/x --mixed-precision bf16
    nitrokernels distill --config run.toml --out runs/x --resume               # continue exactly
    nitrokernels distill --teacher sdxl/ --prompts p.txt --out runs/x --dry-run --world-size 8   # memory per GPU
    torchrun --nproc_per_node=2 -m nitrokernels distill --preset digits --out runs/x --steps 20
    torchrun --nproc_per_node=8 -m nitrokernels distill --teacher sdxl/ --prompts p.txt --out runs/x --fsdp

Models (local paths only): --teacher / --student are each a diffusers pipeline folder (model_index.json: its
unet/ and scheduler/ are used), a UNet folder (config.json + *.safetensors) or one .safetensors file (with
--unet-config, default: the --pipeline's unet/config.json). The student defaults to a copy of the teacher.
Text encoders, tokenizers, VAE (sample grids) and the scheduler come from --pipeline (default: the teacher when
it is a pipeline folder): SD1.5/2 (tokenizer/ + text_encoder/) or SDXL (also tokenizer_2/ + text_encoder_2/; the
pooled text_embeds and time_ids go to added_cond_kwargs).
Prompts: a .txt file (one per line) or .jsonl ({"prompt": ...} per line), encoded once into
<out>/prompt_embeddings.safetensors (re-used on resume; refused if the prompt file changed: its sha256 is stored).
Configuration: every DistillConfig field is a flag (--batch-size, --lr-student, ...), and a TOML (.toml) or
YAML (.yaml/.yml) --config file may set them (same names, '_' or '-') plus teacher, student, pipeline,
unet_config, prompts, preset, teacher_sampler, teacher_dtype, fsdp, and a [discriminator] table of DynamicDiscriminator
kwargs; flags win over the file, the file over the preset, the preset over DistillConfig's defaults.
Writes under --out: checkpoint.pt (atomic; --resume continues from it), log.jsonl, samples_*.png, loss.png,
config.json (the resolved run configuration), student/ (and student_ema/) as diffusers UNet folders.
Bad paths or values: one message naming the file or field, exit status 2, before any model is loaded.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import sys
import types
import typing

from nitrokernels.cli import UsageError

PRESETS = ("digits",)
SAMPLERS = ("saved", "ddim", "euler", "dpm", "lcm")
DTYPES = ("auto", "fp32", "bf16", "fp16")
EMBED_CACHE = "prompt_embeddings.safetensors"
CACHE_FORMAT = "nitrokernels-prompt-embeddings-v1"
# keys a config file may hold besides DistillConfig's fields (argparse dest names)
RUN_KEYS = ("preset", "teacher", "student", "pipeline", "unet_config", "prompts", "teacher_sampler", "teacher_dtype",
            "out", "world_size", "fsdp", "lora_rank", "lora_alpha", "lora_targets")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# DistillConfig fields that are not generated as --<field> flags (own flags or set by the command)
_OWN_FIELDS = {"out_dir": "--out", "discriminator": "--discriminator / [discriminator] table", "resume": "--resume"}


# ---------------------------------------------------------------------------------------------- flags
def _field_kind(tp):
    """(argparse kwargs, parser) for a DistillConfig field's annotation."""
    origin, targs = typing.get_origin(tp), typing.get_args(tp)
    optional = origin in (typing.Union, types.UnionType) and type(None) in targs
    if optional:
        rest = [a for a in targs if a is not type(None)]
        tp = rest[0] if len(rest) == 1 else str
        origin, targs = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}, "bool"
    if origin is tuple:
        elem = targs[0] if targs else float
        nargs = "+" if (len(targs) == 2 and targs[1] is Ellipsis) or not targs else len(targs)
        return {"type": elem if elem in (int, float) else str, "nargs": nargs, "metavar": elem.__name__.upper()}, \
            "tuple"
    if tp in (int, float, str):
        if optional:
            def parse(text, _tp=tp):
                return None if text.lower() in ("none", "null", "off") else _tp(text)
            parse.__name__ = tp.__name__
            return {"type": parse, "metavar": f"{tp.__name__.upper()}|none"}, "optional"
        return {"type": tp, "metavar": tp.__name__.upper()}, "scalar"
    if tp is dict or origin is dict:
        return {"type": json.loads, "metavar": "JSON"}, "dict"

    def literal(text):
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    return {"type": literal, "metavar": "VALUE"}, "literal"


def _distill_fields():
    from nitrokernels.nitro.distiller import DistillConfig

    hints = typing.get_type_hints(DistillConfig)
    return [(f, hints.get(f.name, str)) for f in dataclasses.fields(DistillConfig)]


def _default_text(f):
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "required"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from nitrokernels.nitro.distiller import DistillConfig

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.epilog = "DistillConfig (what the field flags mean):\n" + (DistillConfig.__doc__ or "")
    run = parser.add_argument_group("run")
    run.add_argument("--preset", choices=PRESETS, default=None,
                     help="digits: the embedded digits teacher/encoder/labels (runs on a CPU, no files needed)")
    run.add_argument("--teacher", metavar="PATH", help="pipeline folder, UNet folder or .safetensors of the teacher")
    run.add_argument("--student", metavar="PATH", help="the student's initial weights (same forms; default: a copy "
                                                       "of the teacher)")
    run.add_argument("--pipeline", metavar="PATH", help="diffusers pipeline folder for text encoders, tokenizers, "
                                                        "VAE and scheduler (default: the teacher, if a pipeline)")
    run.add_argument("--unet-config", metavar="PATH", help="config.json (or a folder holding one) for .safetensors "
                                                           "UNet files")
    run.add_argument("--prompts", metavar="FILE", help="prompts: .txt (one per line) or .jsonl ({\"prompt\": ...})")
    run.add_argument("--teacher-sampler", choices=SAMPLERS, default=None,
                     help="the teacher's multi-step sampler: the pipeline's saved scheduler (default) or DDIM / "
                          "Euler / DPM-Solver++ / LCM built from its noise schedule (trailing spacing)")
    run.add_argument("--teacher-dtype", choices=DTYPES, default=None,
                     help="dtype of the frozen teacher (auto: bf16/fp16 with that --mixed-precision, else fp32)")
    run.add_argument("--config", metavar="FILE", help="TOML or YAML file of the settings (flags win)")
    run.add_argument("--out", metavar="DIR", help="run folder (checkpoints, log.jsonl, grids, loss.png)")
    run.add_argument("--resume", action="store_true",
                     help="continue from <out>/checkpoint.pt (without it an existing checkpoint is refused)")
    run.add_argument("--discriminator", type=json.loads, metavar="JSON", default=None,
                     help="DynamicDiscriminator kwargs as JSON, merged over the config file's [discriminator] table")
    run.add_argument("--dry-run", action="store_true",
                     help="print per-GPU parameter / gradient / optimiser-state / activation estimates (models "
                          "built on the meta device from their configs) and exit")
    run.add_argument("--world-size", type=int, default=None,
                     help="processes for --dry-run (default: WORLD_SIZE of torchrun, else 1, 2 and 8)")
    run.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None,
                     help="under torchrun: shard the student (and its EMA) over the processes with FSDP2 "
                          "(fully_shard: 1/N of its weights, gradients and AdamW states per GPU) instead of "
                          "replicating it (DDP, the default); checkpoints stay unsharded, so --resume may switch "
                          "(--no-fsdp); not with --lora-rank")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    lora = parser.add_argument_group("LoRA student (needs peft: pip install 'nitrokernels[lora]')")
    lora.add_argument("--lora-rank", type=int, default=None,
                      help="train a LoRA adapter of this rank on the student's attention projections instead of all "
                           "its weights (written to <out>/student_lora/)")
    lora.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    lora.add_argument("--lora-targets", nargs="+", default=None, metavar="MODULE",
                      help=f"module names the adapter wraps (default {' '.join(LORA_TARGETS)})")
    fields = parser.add_argument_group("DistillConfig fields (see below; --no-X turns a boolean off)")
    for f, tp in _distill_fields():
        if f.name in _OWN_FIELDS:
            continue
        kwargs, _ = _field_kind(tp)
        # SUPPRESS: an absent flag leaves no attribute, so a given "none" (None) still wins over the file
        fields.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS,
                            help=f"DistillConfig.{f.name} (default {_default_text(f)})", **kwargs)


# ---------------------------------------------------------------------------------------------- config
def _read_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"--config {path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".toml":
            import tomllib

            with open(path, "rb") as f:
                data = tomllib.load(f)
        elif ext in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise UsageError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml); or use "
                                 f"a .toml file") from None
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        else:
            raise UsageError(f"--config {path}: unknown format {ext!r} (use .toml, .yaml or .yml)")
    except UsageError:
        raise
    except Exception as err:  # tomllib.TOMLDecodeError, yaml.YAMLError
        raise UsageError(f"--config {path}: not valid {ext[1:].upper()} ({err})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a table of settings, got {type(data).__name__}")
    fields = {f.name for f, _ in _distill_fields()}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name == "out_dir":
            name = "out"
        if name not in fields and name not in RUN_KEYS:
            known = sorted((fields - {"out_dir"}) | set(RUN_KEYS))
            raise UsageError(f"--config {path}: unknown field {key!r} (known: {', '.join(known)})")
        if name == "discriminator" and not isinstance(value, dict):
            raise UsageError(f"--config {path}: field 'discriminator' must be a table of DynamicDiscriminator kwargs")
        out[name] = value
    return out


@dataclasses.dataclass
class RunSpec:
    """Everything the command resolved before loading a model."""

    preset: str | None
    teacher: "UNetSource | None"
    student: "UNetSource | None"
    pipeline: str | None
    prompts: str | None
    sampler: str
    teacher_dtype: str
    out: str
    resume: bool
    fields: dict
    sources: dict
    lora: dict | None = None
    run: dict | None = None       # the run-level settings as given (written to <out>/config.json)
    fsdp: bool = False            # shard the student with FSDP2 (DistributedNitroDistiller(fsdp=True))


def _value_source(name, sources):
    src = sources.get(name)
    return f" (from {src})" if src else ""


def resolve(args) -> RunSpec:
    """Merge preset < config file < flags, check every path and value; raises UsageError (nothing loaded)."""
    from nitrokernels.nitro.distiller import DistillConfig

    file_cfg = _read_config_file(args.config) if args.config else {}
    sources = {k: args.config for k in file_cfg}
    # --resume: the run's own <out>/config.json is the layer under the file and the flags (no need to repeat them)
    saved_run, saved_distill, saved_path = {}, {}, None
    out_dir = args.out or file_cfg.get("out")
    if args.resume and out_dir and os.path.isfile(os.path.join(out_dir, "config.json")):
        saved_path = os.path.join(out_dir, "config.json")
        saved = _read_json(saved_path, "--resume: the run's configuration")
        saved_run = saved.get("run") if isinstance(saved.get("run"), dict) else {}
        saved_distill = saved.get("distill") if isinstance(saved.get("distill"), dict) else {}

    def pick(name, default=None):
        value = getattr(args, name, None)
        if value is not None and value is not False:
            sources[name] = "--" + name.replace("_", "-")
            return value
        if name in file_cfg:
            return file_cfg[name]
        if saved_run.get(name) is not None:
            sources[name] = saved_path
            return saved_run[name]
        return default

    preset = pick("preset")
    if preset is not None and preset not in PRESETS:
        raise UsageError(f"preset {preset!r}{_value_source('preset', sources)}: unknown (choose from {PRESETS})")
    out = pick("out")
    if not out and not args.dry_run:
        raise UsageError("--out DIR is required (the run folder)")
    teacher_path, student_path = pick("teacher"), pick("student")
    pipeline, unet_config, prompts = pick("pipeline"), pick("unet_config"), pick("prompts")
    sampler = pick("teacher_sampler", "saved")
    teacher_dtype = pick("teacher_dtype", "auto")
    if sampler not in SAMPLERS:
        raise UsageError(f"teacher_sampler {sampler!r}{_value_source('teacher_sampler', sources)}: choose from {SAMPLERS}")
    if teacher_dtype not in DTYPES:
        raise UsageError(f"teacher_dtype {teacher_dtype!r}{_value_source('teacher_dtype', sources)}: choose from {DTYPES}")

    teacher = student = None
    if preset == "digits":
        for name, value in (("teacher", teacher_path), ("student", student_path), ("pipeline", pipeline),
                            ("prompts", prompts), ("unet_config", unet_config)):
            if value:
                raise UsageError(f"--{name.replace('_', '-')} is not used with --preset digits (the embedded "
                                 f"teacher, encoder and labels 0-9 are)")
    else:
        if not teacher_path:
            raise UsageError("give --teacher PATH (a diffusers pipeline folder, a UNet folder or a .safetensors "
                             "file) or --preset digits")
        if pipeline and not os.path.isfile(os.path.join(pipeline, "model_index.json")):
            raise UsageError(f"--pipeline {pipeline}: not a diffusers pipeline folder (no model_index.json)")
        need = not args.dry_run
        teacher = resolve_unet(teacher_path, unet_config, pipeline, "teacher", need)
        pipeline = pipeline or teacher.pipeline
        student = resolve_unet(student_path, unet_config or teacher.config_file, pipeline, "student", need) \
            if student_path else None
        if not pipeline and args.dry_run:
            pass
        elif not pipeline:
            raise UsageError(f"--teacher {teacher_path} is not a pipeline folder: give --pipeline PATH (a diffusers "
                             f"pipeline folder with the text encoders and tokenizers)")
        if pipeline:
            check_pipeline(pipeline)
        if not prompts and not args.dry_run:
            raise UsageError("give --prompts FILE (.txt, one prompt per line, or .jsonl with {\"prompt\": ...})")
        if prompts:
            read_prompts(prompts)  # checked now: a bad line fails before any model is loaded

    # DistillConfig: DistillConfig defaults < preset < the resumed run's config.json < file < flags
    base = {}
    if preset == "digits":
        from nitrokernels.digits import demo

        device = vars(args).get("device") or file_cfg.get("device") or ("cuda" if _cuda() else "cpu")
        steps = vars(args).get("steps", file_cfg.get("steps", saved_distill.get("steps", demo.DEFAULT["steps"])))
        # the demo's settings for this many iterations (some of them, e.g. a warm-up share, scale with it)
        base = dataclasses.asdict(demo.demo_config(steps if isinstance(steps, int) and steps >= 0 else
                                                   demo.DEFAULT["steps"], demo.DEFAULT["batch_size"], 0, None,
                                                   str(device)))
        base["device"] = None
    fields = {}
    for f, tp in _distill_fields():
        if f.name in ("out_dir", "resume"):
            continue
        if f.name not in _OWN_FIELDS and f.name in vars(args):
            sources[f.name] = "--" + f.name.replace("_", "-")
            fields[f.name] = getattr(args, f.name)
        elif f.name in file_cfg:
            fields[f.name] = file_cfg[f.name]
        elif f.name in saved_distill and f.name != "discriminator":
            fields[f.name] = saved_distill[f.name]
            sources[f.name] = saved_path
        elif f.name in base:
            fields[f.name] = base[f.name]
    disc = dict(base.get("discriminator", {}))
    disc.update(saved_distill.get("discriminator", {}) if isinstance(saved_distill.get("discriminator"), dict) else {})
    disc.update(file_cfg.get("discriminator", {}))
    if args.discriminator is not None:
        if not isinstance(args.discriminator, dict):
            raise UsageError("--discriminator must be a JSON object of DynamicDiscriminator kwargs")
        disc.update(args.discriminator)
        sources["discriminator"] = "--discriminator"
    check_discriminator_kwargs(disc, sources)
    fields["discriminator"] = disc
    lora = None
    rank = pick("lora_rank")
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise UsageError(f"lora_rank must be an int >= 1, got {rank!r}{_value_source('lora_rank', sources)}")
        alpha = pick("lora_alpha", rank)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise UsageError(f"lora_alpha must be a number > 0, got {alpha!r}{_value_source('lora_alpha', sources)}")
        targets = pick("lora_targets", list(LORA_TARGETS))
        if isinstance(targets, str) or not targets or not all(isinstance(t, str) for t in targets):
            raise UsageError(f"lora_targets must be a list of module names, got {targets!r}"
                             f"{_value_source('lora_targets', sources)}")
        import importlib.util

        if importlib.util.find_spec("peft") is None:
            raise UsageError("--lora-rank needs the peft library, which is not installed: "
                             "pip install 'nitrokernels[lora]'")
        lora = {"rank": rank, "alpha": float(alpha), "targets": list(targets)}
    elif pick("lora_alpha") is not None or pick("lora_targets") is not None:
        raise UsageError("--lora-alpha / --lora-targets need --lora-rank")
    fsdp = pick("fsdp", False) if getattr(args, "fsdp", None) is None else args.fsdp  # --no-fsdp is a choice too
    if not isinstance(fsdp, bool):
        raise UsageError(f"fsdp must be true or false, got {fsdp!r}{_value_source('fsdp', sources)}")
    if fsdp and lora:
        raise UsageError("--fsdp shards a fully trained student; a LoRA student (--lora-rank) trains few parameters "
                         "and gains nothing from it: drop --fsdp (DDP replicates the student)")
    resume = bool(args.resume)
    try:
        config = DistillConfig(**{**fields, "out_dir": out, "resume": resume})
    except (ValueError, TypeError) as err:
        import re

        m = re.search(r"DistillConfig\.(\w+)", str(err))
        where = _value_source(m.group(1), sources) if m else ""
        raise UsageError(f"{err}{where}") from None
    if out and not args.dry_run:
        ckpt = os.path.join(out, "checkpoint.pt")
        if os.path.exists(ckpt) and not resume:
            raise UsageError(f"--out {out} already holds a checkpoint ({ckpt}): pass --resume to continue it, or "
                             f"choose a new folder")
        if resume and not os.path.exists(ckpt):
            raise UsageError(f"--resume: no checkpoint to continue at {ckpt}")
    run = {"preset": preset, "teacher": teacher_path, "student": student_path, "pipeline": pipeline,
           "unet_config": unet_config, "prompts": prompts, "teacher_sampler": sampler, "teacher_dtype": teacher_dtype,
           "lora_rank": lora and lora["rank"], "lora_alpha": lora and lora["alpha"],
           "lora_targets": lora and lora["targets"], "fsdp": fsdp}
    spec = RunSpec(preset, teacher, student, pipeline, prompts, sampler, teacher_dtype, out, resume,
                   dataclasses.asdict(config), sources, lora, run, fsdp)
    check_models_on_meta(spec)
    return spec


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def check_discriminator_kwargs(kwargs: dict, sources: dict) -> None:
    import inspect

    from nitrokernels.nitro.discriminator import DynamicDiscriminator

    params = inspect.signature(DynamicDiscriminator.__init__).parameters
    allowed = [p for p in params if p not in ("self", "backbone_unet")]
    for key in kwargs:
        if key not in allowed:
            raise UsageError(f"discriminator field {key!r}{_value_source('discriminator', sources)} is not a "
                             f"DynamicDiscriminator argument (known: {', '.join(allowed)})")
    if "head_dtype" in kwargs and isinstance(kwargs["head_dtype"], str):
        import torch

        dtype = getattr(torch, kwargs["head_dtype"].replace("torch.", ""), None)
        if not isinstance(dtype, torch.dtype):
            raise UsageError(f"discriminator field 'head_dtype': {kwargs['head_dtype']!r} is not a torch dtype")
        kwargs["head_dtype"] = dtype


# ---------------------------------------------------------------------------------------------- paths
@dataclasses.dataclass
class UNetSource:
    """Where a UNet's config and weights are (resolved, not loaded)."""

    path: str
    config_file: str
    weights: str
    scheduler_dir: str | None = None
    pipeline: str | None = None


def _weights_in(folder: str) -> str | None:
    names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    for preferred in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        if preferred in names:
            return os.path.join(folder, preferred)
    return os.path.join(folder, names[0]) if len(names) == 1 else None


def _read_json(path: str, what: str) -> dict:
    from nitrokernels.nitro.pipeline import read_json_object

    return read_json_object(path, what, error=UsageError)


def resolve_unet(path: str, unet_config: str | None, pipeline: str | None, role: str,
                 need_weights: bool = True) -> UNetSource:
    """Find the config and weights of a --teacher / --student PATH (UsageError naming the file otherwise).
    need_weights=False (--dry-run): a UNet folder may hold its config.json alone."""
    flag = f"--{role}"
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path}: no such file or folder")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "model_index.json")):
            index = _read_json(os.path.join(path, "model_index.json"), f"{flag}: pipeline index")
            if "unet" not in index or not os.path.isdir(os.path.join(path, "unet")):
                raise UsageError(f"{flag} {path}: the pipeline has no unet/ folder (model_index.json lists "
                                 f"{sorted(k for k in index if not k.startswith('_'))})")
            src = resolve_unet(os.path.join(path, "unet"), None, None, role, need_weights)
            sched = os.path.join(path, "scheduler")
            src.path, src.pipeline = path, path
            src.scheduler_dir = sched if os.path.isfile(os.path.join(sched, "scheduler_config.json")) else None
            return src
        config = os.path.join(path, "config.json")
        if not os.path.isfile(config):
            if os.path.isdir(os.path.join(path, "unet")):
                return resolve_unet(os.path.join(path, "unet"), None, None, role, need_weights)
            raise UsageError(f"{flag} {path}: a folder without model_index.json (a pipeline) or config.json "
                             f"(a UNet folder)")
        _read_json(config, f"{flag}: UNet config")
        weights = _weights_in(path)
        if weights is None and need_weights:
            raise UsageError(f"{flag} {path}: no (or several) .safetensors weight files beside config.json")
        return UNetSource(path, config, weights or "")
    if not path.endswith(".safetensors"):
        raise UsageError(f"{flag} {path}: a single file must be a .safetensors UNet (diffusers key names)")
    if unet_config is None and pipeline:
        unet_config = os.path.join(pipeline, "unet", "config.json")
    if unet_config is None:
        raise UsageError(f"{flag} {path}: a .safetensors file needs --unet-config (its UNet config.json) or "
                         f"--pipeline (whose unet/config.json is used)")
    if os.path.isdir(unet_config):
        unet_config = os.path.join(unet_config, "config.json")
    if not os.path.isfile(unet_config):
        raise UsageError(f"--unet-config {unet_config}: no such file")
    _read_json(unet_config, "--unet-config")
    return UNetSource(path, unet_config, path)


def check_pipeline(pipeline: str) -> None:
    index = _read_json(os.path.join(pipeline, "model_index.json"), "--pipeline: pipeline index")
    for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        if enc not in index or index[enc] in (None, [None, None]):
            if enc == "text_encoder":
                raise UsageError(f"--pipeline {pipeline}: model_index.json has no text_encoder")
            continue
        for sub in (enc, tok):
            if not os.path.isdir(os.path.join(pipeline, sub)):
                raise UsageError(f"--pipeline {pipeline}: model_index.json lists {sub} but there is no {sub}/ folder")
        if not os.path.isfile(os.path.join(pipeline, enc, "config.json")):
            raise UsageError(f"--pipeline {pipeline}: {enc}/config.json is missing")


def read_prompts(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise UsageError(f"--prompts {path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if ext == ".jsonl":
                try:
                    row = json.loads(line)
                except ValueError as err:
                    raise UsageError(f"--prompts {path}: line {n} is not JSON ({err})") from None
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                    raise UsageError(f"--prompts {path}: line {n} has no string \"prompt\" field")
                prompts.append(row["prompt"])
            elif ext in (".txt", ""):
                prompts.append(line.rstrip("\n"))
            else:
                raise UsageError(f"--prompts {path}: unknown format {ext!r} (use .txt or .jsonl)")
    if not prompts:
        raise UsageError(f"--prompts {path}: no prompts in the file")
    return prompts


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes (nitro.pipeline.file_sha256; imported lazily: this module stays light)."""
    from nitrokernels.nitro.pipeline import file_sha256 as sha256_of_file

    return sha256_of_file(path)


# ---------------------------------------------------------------------------------------------- loading
def _torch_dtype(name: str, mixed_precision: str):
    import torch

    if name == "auto":
        name = {"bf16": "bf16", "fp16": "fp16"}.get(mixed_precision, "fp32")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _unet_config(src: UNetSource) -> dict:
    from diffusers import UNet2DConditionModel

    if os.path.basename(src.config_file) == "config.json":
        return UNet2DConditionModel.load_config(os.path.dirname(src.config_file))
    return _read_json(src.config_file, "UNet config")


def meta_unet(src: UNetSource):
    """The UNet of `src` built from its config on the meta device (no weights read, nothing allocated);
    UsageError naming the config file when diffusers cannot build it."""
    import torch
    from diffusers import UNet2DConditionModel

    try:
        with torch.device("meta"):
            return UNet2DConditionModel.from_config(_unet_config(src))
    except Exception as err:
        raise UsageError(f"{src.config_file}: not a UNet2DConditionModel config diffusers can build "
                         f"({type(err).__name__}: {err})") from None


def build_unet(src: UNetSource):
    """The UNet of `src` with its weights (load_unet_weights: every key and shape checked)."""
    from diffusers import UNet2DConditionModel

    from nitrokernels.nitro.distiller import load_unet_weights

    unet = UNet2DConditionModel.from_config(_unet_config(src))
    return load_unet_weights(unet, src.weights)


def make_teacher_scheduler(spec: RunSpec):
    import diffusers

    sched_dir = spec.teacher.scheduler_dir if spec.teacher and spec.teacher.scheduler_dir else None
    if sched_dir is None and spec.pipeline and os.path.isfile(os.path.join(spec.pipeline, "scheduler",
                                                                           "scheduler_config.json")):
        sched_dir = os.path.join(spec.pipeline, "scheduler")
    if sched_dir is not None:
        cfg = _read_json(os.path.join(sched_dir, "scheduler_config.json"), "scheduler config")
        cls = getattr(diffusers, str(cfg.get("_class_name")), None) or diffusers.DDIMScheduler
        saved = cls.from_pretrained(sched_dir)
    else:  # Stable Diffusion's noise schedule
        saved = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False)
    if spec.sampler == "saved":
        return saved
    cls = {"ddim": diffusers.DDIMScheduler, "euler": diffusers.EulerDiscreteScheduler,
           "dpm": diffusers.DPMSolverMultistepScheduler, "lcm": diffusers.LCMScheduler}[spec.sampler]
    return cls.from_config(saved.config, timestep_spacing="trailing")


def _load_text_encoders(pipeline: str, device):
    import transformers

    pairs = []
    for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        if not os.path.isdir(os.path.join(pipeline, enc)):
            continue
        cfg = _read_json(os.path.join(pipeline, enc, "config.json"), "text encoder config")
        arch = (cfg.get("architectures") or ["CLIPTextModel"])[0]
        cls = getattr(transformers, arch, None) or transformers.CLIPTextModel
        model = cls.from_pretrained(os.path.join(pipeline, enc)).to(device).eval().requires_grad_(False)
        tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(pipeline, tok))
        pairs.append((tokenizer, model))
    return pairs


def encode_prompts(prompts: list[str], pipeline: str, unet_config, device="cpu", batch: int = 16) -> dict:
    """{"cond": {...}, "uncond": {...}} of the prompts and the empty prompt, as the pipeline's own text encoders
    make them: SD1.5/2: encoder_hidden_states = the last hidden state; SDXL (addition_embed_type "text_time"):
    the penultimate hidden states of both encoders concatenated, added_cond_kwargs text_embeds (the second
    encoder's pooled projection) and time_ids (H, W, 0, 0, H, W) at the UNet's resolution x the VAE factor."""
    import torch

    pairs = _load_text_encoders(pipeline, device)
    sdxl = getattr(unet_config, "addition_embed_type", None) == "text_time" or \
        (isinstance(unet_config, dict) and unet_config.get("addition_embed_type") == "text_time")

    @torch.no_grad()
    def encode(texts):
        hidden, pooled = [], None
        for tokenizer, model in pairs:
            ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            out = model(ids, output_hidden_states=True)
            if sdxl:
                hidden.append(out.hidden_states[-2])
                pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
            else:
                hidden.append(out.last_hidden_state)
        return torch.cat(hidden, dim=-1).float().cpu(), (None if pooled is None else pooled.float().cpu())

    def to_kwargs(hidden, pooled, n):
        kwargs = {"encoder_hidden_states": hidden}
        if sdxl:
            vae_factor = _vae_factor(pipeline)
            sample = unet_config["sample_size"] if isinstance(unet_config, dict) else unet_config.sample_size
            size = float(sample * vae_factor)
            time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]]).expand(n, 6).clone()
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        return kwargs

    hs, ps = [], []
    for start in range(0, len(prompts), batch):
        h, p = encode(prompts[start:start + batch])
        hs.append(h)
        ps.append(p)
    hidden = torch.cat(hs)
    pooled = torch.cat(ps) if sdxl else None
    empty_h, empty_p = encode([""])
    return {"cond": to_kwargs(hidden, pooled, len(prompts)), "uncond": to_kwargs(empty_h, empty_p, 1)}


def _vae_factor(pipeline: str | None) -> int:
    cfg = os.path.join(pipeline or "", "vae", "config.json")
    if pipeline and os.path.isfile(cfg):
        return 2 ** (len(_read_json(cfg, "VAE config").get("block_out_channels", [0, 0, 0, 0])) - 1)
    return 8


def _unflatten(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def cached_prompt_bank(spec: RunSpec, unet_config, ctx, device="cpu"):
    """The PromptBank of spec.prompts: read from <out>/prompt_embeddings.safetensors when it was made from the
    same file (sha256), else encoded (rank 0) and written there; a cache of another prompt file is refused."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from nitrokernels.nitro.distiller import PromptBank, walk_tensors

    path = os.path.join(spec.out, EMBED_CACHE)
    digest = file_sha256(spec.prompts)
    if ctx.is_main and not os.path.exists(path):
        prompts = read_prompts(spec.prompts)
        bank = encode_prompts(prompts, spec.pipeline, unet_config, device)
        flat = {f"cond.{k}": v.contiguous() for k, v in walk_tensors(bank["cond"])}
        flat.update({f"uncond.{k}": v.contiguous() for k, v in walk_tensors(bank["uncond"])})
        os.makedirs(spec.out, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file(flat, tmp, metadata={"format": CACHE_FORMAT, "prompts_sha256": digest, "count": str(len(prompts)),
                                       "prompts_file": os.path.abspath(spec.prompts),
                                       "pipeline": os.path.abspath(spec.pipeline)})
        os.replace(tmp, path)
    ctx.barrier()
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != CACHE_FORMAT:
            raise UsageError(f"{path}: not a prompt-embedding cache of this version; delete it to re-encode")
        if meta.get("prompts_sha256") != digest:
            raise UsageError(f"--prompts {spec.prompts} changed since {path} was encoded from it (sha256 "
                             f"{digest[:12]}... vs {meta.get('prompts_sha256', '?')[:12]}...): a resumed run must "
                             f"train on the same prompts; use a new --out, or delete {path} for a new run")
        flat = {k: f.get_tensor(k) for k in f.keys()}
    tree = _unflatten(flat)
    return PromptBank(tree["cond"], tree["uncond"]), int(meta.get("count", 0))


# ---------------------------------------------------------------------------------------------- dry run
def _meta_models(spec: RunSpec, config):
    """(teacher, student) UNets on the meta device (configs only)."""
    if spec.preset == "digits":
        import torch
        from diffusers import UNet2DConditionModel

        from nitrokernels.digits import data as digits

        with torch.device("meta"):
            teacher = UNet2DConditionModel.from_config(digits.DIGITS_UNET_CONFIG)
            student = UNet2DConditionModel.from_config(digits.DIGITS_UNET_CONFIG)
        return teacher, student
    return meta_unet(spec.teacher), meta_unet(spec.student or spec.teacher)


def check_models_on_meta(spec: RunSpec) -> None:
    """What NitroDistiller and DynamicDiscriminator would refuse after loading, checked on meta-device models built
    from the configs: the student must take the teacher's inputs, the discriminator kwargs must fit the teacher."""
    import torch

    from nitrokernels.nitro.discriminator import DynamicDiscriminator

    teacher, student = _meta_models(spec, None)
    for key in ("in_channels", "out_channels", "sample_size", "cross_attention_dim", "addition_embed_type"):
        t, s = getattr(teacher.config, key, None), getattr(student.config, key, None)
        if t != s:
            raise UsageError(f"--student {spec.student.config_file}: {key}={s!r} but the teacher's "
                             f"({spec.teacher.config_file}) is {t!r}; the student must take the teacher's inputs")
    try:
        with torch.device("meta"):
            DynamicDiscriminator(teacher, **spec.fields["discriminator"])
    except (ValueError, TypeError) as err:
        raise UsageError(f"discriminator{_value_source('discriminator', spec.sources)}: {err}") from None


class _FlashAttention:
    """scaled_dot_product_attention that saves what a fused (flash / memory-efficient) kernel saves for backward
    (q, k, v, out and a [B, H, L] log-sum-exp), not the [L, L] matrix of the math path: used on the meta device
    to count activations as a GPU run holds them."""

    def __enter__(self):
        import torch
        import torch.nn.functional as F

        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v):
                out = torch.empty_like(q)
                lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
                ctx.save_for_backward(q, k, v, out, lse)
                return out

            @staticmethod
            def backward(ctx, grad):
                q, k, v, _, _ = ctx.saved_tensors
                return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

        self._orig = F.scaled_dot_product_attention

        def sdpa(q, k, v, *args, **kwargs):
            return Fn.apply(q, k, v)
        F.scaled_dot_product_attention = sdpa
        return self

    def __exit__(self, *exc):
        import torch.nn.functional as F

        F.scaled_dot_product_attention = self._orig


def _saved_bytes(fn, exclude) -> int:
    """Bytes of the tensors autograd saves for backward while fn() runs (each tensor once, parameters excluded)."""
    import torch

    seen: dict = {}
    skip = {id(p) for p in exclude}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(base) not in skip and id(t) not in skip:
            seen[id(base)] = (base, base.numel() * base.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _FlashAttention():
        fn()
    return sum(size for _, size in seen.values())


def memory_estimate(spec: RunSpec, world_sizes) -> dict:
    """Per-GPU bytes of parameters, gradients, optimiser states and activations of a run (see the README)."""
    import torch

    from nitrokernels.nitro.discriminator import DynamicDiscriminator
    from nitrokernels.nitro.distiller import DistillConfig

    config = DistillConfig(**{**spec.fields, "out_dir": None})
    teacher, student = _meta_models(spec, config)
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision, torch.float32)
    teacher_dtype = _torch_dtype(spec.teacher_dtype, config.mixed_precision)
    disc_kwargs = dict(config.discriminator)
    with torch.device("meta"):
        disc = DynamicDiscriminator(teacher, **disc_kwargs)
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters())
    heads = list(disc.head_parameters())
    n_heads = sum(p.numel() for p in heads)
    head_bytes = torch.tensor([], dtype=disc.head_dtype).element_size()
    sampled_fraction = disc.heads_per_iteration / max(1, disc.num_heads)
    rows = sum(p.shape[0] for p in heads)

    # activations of the generator phase (the peak: the student's graph + the backbone's and heads' graphs on
    # the student's x0, for every sampled t* group and conditioning), one micro-batch, on the meta device
    b = config.batch_size
    cfg = student.config
    res = disc.resolution
    x = torch.zeros(b, cfg.in_channels, res, res, device="meta", dtype=compute, requires_grad=True)
    width = cfg.cross_attention_dim if isinstance(cfg.cross_attention_dim, int) else cfg.cross_attention_dim[0]
    cond = {"encoder_hidden_states": torch.zeros(b, 77 if spec.preset is None else 1, width, device="meta",
                                                 dtype=compute)}
    if getattr(cfg, "addition_embed_type", None) == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        cond["added_cond_kwargs"] = {"text_embeds": torch.zeros(b, pooled, device="meta", dtype=compute),
                                     "time_ids": torch.zeros(b, 6, device="meta", dtype=compute)}
    student.to(compute)
    teacher.to(compute)
    t = torch.full((b,), 249, device="meta", dtype=torch.long)
    params = list(student.parameters()) + list(teacher.parameters()) + heads
    student_act = _saved_bytes(lambda: student(x, t, **cond), params)
    selection = disc.sample(device="meta")
    disc_act = _saved_bytes(lambda: disc.g_loss(x, cond, cond, selection=selection), params)

    n_train = n_student  # trained student parameters: all of them, or the LoRA adapter's
    n_lora = 0
    if spec.lora:
        with torch.device("meta"):
            add_lora(student, spec.lora)
        n_lora = sum(p.numel() for n, p in student.named_parameters() if is_lora_parameter(n))
        n_train = n_lora
    f32 = 4
    rows_out = {}
    for w in world_sizes:
        entry = {}
        for mode in ("ddp", "fsdp"):
            shard = w if mode == "fsdp" else 1
            p = (n_student + n_lora) * f32 / shard + n_teacher * teacher_dtype.itemsize + n_heads * head_bytes
            if config.ema_decay is not None:
                p += (n_student + n_lora) * f32 / shard
            g = n_train * f32 / shard + sampled_fraction * n_heads * head_bytes
            o = 2 * n_train * f32 / shard + 2 * n_heads * f32 + rows * f32
            a = student_act + disc_act
            entry[mode] = {"params": p, "grads": g, "optimizer": o, "activations": a, "total": p + g + o + a}
        rows_out[w] = entry
    return {"student_params": n_student, "teacher_params": n_teacher, "head_params": n_heads,
            "heads": disc.num_heads, "heads_per_iteration": disc.heads_per_iteration,
            "activations": {"student": student_act, "discriminator": disc_act}, "batch_size": b,
            "resolution": res, "mixed_precision": config.mixed_precision, "teacher_dtype": str(teacher_dtype),
            "lora": spec.lora, "lora_params": n_lora, "per_gpu": rows_out}


def format_memory(est: dict) -> str:
    gib = 2 ** 30
    lines = [f"student {est['student_params'] / 1e6:.1f}M params (trained, fp32 master weights), teacher "
             f"{est['teacher_params'] / 1e6:.1f}M ({est['teacher_dtype']}, frozen; also the discriminator's "
             f"backbone), heads {est['head_params'] / 1e6:.1f}M in {est['heads']} heads, {est['heads_per_iteration']} "
             f"sampled per iteration"
             + (f"; LoRA rank {est['lora']['rank']}: {est['lora_params'] / 1e6:.2f}M trained adapter parameters "
                f"(the student's own weights frozen)" if est.get("lora") else ""),
             f"batch {est['batch_size']} per GPU at latent {est['resolution']}x{est['resolution']}, mixed precision "
             f"{est['mixed_precision']}; activations of the generator phase: student "
             f"{est['activations']['student'] / gib:.2f} GiB + discriminator (backbone + heads on the student's "
             f"x0) {est['activations']['discriminator'] / gib:.2f} GiB",
             "",
             f"{'GPUs':>4}  {'mode':<5}{'params':>10}{'grads':>10}{'optim':>10}{'activ.':>10}{'total':>10}  (GiB per GPU)"]
    for w, entry in est["per_gpu"].items():
        for mode, m in entry.items():
            lines.append(f"{w:>4}  {mode:<5}" + "".join(f"{m[k] / gib:>10.2f}" for k in
                                                        ("params", "grads", "optimizer", "activations", "total")))
    lines += ["", "ddp: the student replicated (DistributedDataParallel); fsdp: its parameters, gradients and AdamW "
              "states sharded over the GPUs (FSDP2 fully_shard, `distill --fsdp`; an estimate, not measured on GPUs). "
              "Teacher and heads are replicated in both; the heads' gradients are their sampled rows. Not "
              "counted: CUDA context and allocator slack (~1-3 GiB; DDP's buckets are the gradients themselves, "
              "gradient_as_bucket_view), the teacher's no-grad sampling and the discriminator phase (both below "
              "the generator phase's peak). Activations assume fused (flash) attention."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- run
def _write_json(path: str, data) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def run(args) -> int:
    try:
        spec = resolve(args)
    except UsageError as err:
        print(f"nitrokernels distill: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        if args.world_size is not None:
            worlds = [args.world_size]
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
            worlds = [int(os.environ["WORLD_SIZE"])]
        else:
            worlds = [1, 2, 8]
        print(format_memory(memory_estimate(spec, worlds)))
        return 0
    return train(spec, args)


def train(spec: RunSpec, args) -> int:
    import copy

    import torch

    from nitrokernels.nitro.plots import save_loss_png
    from nitrokernels.nitro.distiller import DistillConfig
    from nitrokernels.nitro.distributed import DistributedNitroDistiller, init_distributed

    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = init_distributed()
    fields = dict(spec.fields)
    device = ctx.device(fields.get("device"))
    fields.update(device=str(device), out_dir=spec.out, resume=spec.resume)
    config = DistillConfig(**fields)
    if ctx.is_main:
        os.makedirs(spec.out, exist_ok=True)
        _write_json(os.path.join(spec.out, "config.json"),
                    {"run": spec.run, "distill": config.fingerprint() | {"steps": config.steps},
                     "world_size": ctx.world_size})
    ctx.barrier()
    torch.manual_seed(config.seed)
    decode = None
    if spec.preset == "digits":
        from nitrokernels.digits import data as digits

        teacher, encoder, _ = digits.load_pretrained_teacher(device=device)
        student = copy.deepcopy(teacher)
        bank = digits.prompt_bank(copy.deepcopy(encoder).cpu())
        scheduler = digits.make_teacher_scheduler()
        info = "digits preset: labels 0-9"
    else:
        dtype = _torch_dtype(spec.teacher_dtype, config.mixed_precision)
        teacher = build_unet(spec.teacher)
        student = build_unet(spec.student) if spec.student else copy.deepcopy(teacher)  # fp32
        teacher.to(device=device)
        if dtype != torch.float32:
            teacher.to(dtype=dtype)
        bank, count = cached_prompt_bank(spec, teacher.config, ctx)
        scheduler = make_teacher_scheduler(spec)
        decode = _vae_decoder(spec.pipeline, device)
        info = f"{count} prompts from {spec.prompts}"
    trainable = None
    if spec.lora:
        student = add_lora(student, spec.lora)
        trainable = is_lora_parameter
    distiller = DistributedNitroDistiller(teacher, student, scheduler, bank, config, decode=decode, ctx=ctx,
                                          trainable=trainable, fsdp=spec.fsdp)
    if ctx.is_main:
        disc = distiller.disc
        print(f"nitrokernels distill: {ctx.world_size} process(es) on {device}"
              f"{' (student sharded: FSDP2)' if distiller.fsdp else ''}; {info}; student "
              f"{sum(p.numel() for p in student.parameters()) / 1e6:.2f}M params; {disc.num_heads} heads, "
              f"{disc.heads_per_iteration} sampled per iteration; batch {config.batch_size} per process x "
              f"{config.grad_accum} accumulation; {config.steps} iterations -> {spec.out}", flush=True)
    from nitrokernels.nitro.distiller import CheckpointError

    try:
        history = distiller.train()
    except CheckpointError as err:
        print(f"nitrokernels distill: {err}", file=sys.stderr)
        return 2
    # the final weights, unsharded (under --fsdp gathering them is a collective of every rank; rank 0 gets them)
    weights = None if spec.lora else {"student": distiller.full_student_state_dict(),
                                      "student_ema": None if distiller.ema is None else
                                      distiller.full_student_state_dict(ema=True)}
    if ctx.is_main:
        if history:
            try:
                save_loss_png(os.path.join(spec.out, "loss.png"), history)
            except Exception as err:  # a plot must not fail a finished run
                print(f"nitrokernels distill: warning: loss.png not written ({type(err).__name__}: {err})",
                      file=sys.stderr)
        if spec.lora:
            save_lora_student(student, os.path.join(spec.out, "student_lora"), spec.lora)
            if distiller.ema is not None:
                save_lora_student(distiller.ema, os.path.join(spec.out, "student_ema_lora"), spec.lora)
        else:
            for name, state in weights.items():
                if state is not None:
                    save_unet_folder(student, state, os.path.join(spec.out, name))
        last = history[-1] if history else {}
        losses = ", ".join(f"{k} {last[k]:.4f}" for k in ("d_loss", "g_loss", "regression_loss") if k in last)
        print(f"nitrokernels distill: {distiller.step} iterations done ({losses}); wrote {spec.out}/checkpoint.pt, "
              f"log.jsonl, loss.png, samples_{distiller.step:06d}.png, {'student_lora' if spec.lora else 'student'}/",
              flush=True)
    ctx.barrier()
    if ctx.distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def save_unet_folder(unet, state: dict, folder: str) -> str:
    """A diffusers UNet folder (config.json + diffusion_pytorch_model.safetensors, what save_pretrained writes) of
    `unet`'s config with the weights `state` (e.g. gathered from an FSDP2-sharded student)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    unet.save_config(folder)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    tmp = os.path.join(folder, f"diffusion_pytorch_model.safetensors.tmp-{os.getpid()}")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    return folder


def add_lora(unet, lora: dict):
    """Wrap `unet`'s target modules with a peft LoRA adapter ("default"; B initialised to zero, so the wrapped
    UNet computes what it did)."""
    from nitrokernels.nitro.pipeline import lora_config

    unet.add_adapter(lora_config(lora))
    return unet


def save_lora_student(unet, folder: str, lora: dict) -> str:
    """Write the LoRA adapter of `unet` to `folder` as diffusers does (pytorch_lora_weights.safetensors) with the
    lora_config.json that nitro.pipeline.load_lora_adapter reads back (`generate --lora`)."""
    from nitrokernels.nitro.pipeline import LORA_CONFIG

    unet.save_lora_adapter(folder)
    _write_json(os.path.join(folder, LORA_CONFIG), lora)
    return folder


def is_lora_parameter(name: str) -> bool:
    """Whether a student parameter belongs to the LoRA adapter (what --lora-rank trains)."""
    return "lora_" in name


def load_lora_student(unet, folder: str):
    """A UNet with the adapter a `distill --lora-rank` run wrote to <out>/student_lora/ (same config), for
    inference (eval, frozen): nitro.pipeline.load_lora_adapter, every key checked."""
    from nitrokernels.nitro.pipeline import load_lora_adapter

    return load_lora_adapter(unet, folder)


def _vae_decoder(pipeline: str | None, device):
    if not pipeline or not os.path.isfile(os.path.join(pipeline, "vae", "config.json")):
        return None
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(os.path.join(pipeline, "vae")).to(device).eval().requires_grad_(False)
    factor = getattr(vae.config, "scaling_factor", 0.18215)

    @torch.no_grad()
    def decode(latents):
        return vae.decode(latents.to(vae.dtype) / factor).sample.float()
    return decode
