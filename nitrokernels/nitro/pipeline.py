"""NitroSD inference: a diffusers pipeline from local files, with the shifted LCM scheduler, nitrokernels' fused
UNet / VAE blocks and (optionally) CUDA-graph replay of the UNet and the VAE decoder.

    pipe = load_pipeline("/models/sdxl-base", unet_weights="/models/nitrosd-realism_unet.safetensors", shift=250)
    image = pipe("a photo of a cat", num_inference_steps=1, guidance_scale=0.0).images[0]   # 1..4 steps

* `base_model` is a diffusers pipeline folder (`model_index.json`, e.g. a local snapshot of
  stabilityai/stable-diffusion-xl-base-1.0, or any Stable Diffusion-style pipeline with a UNet2DConditionModel);
  nothing is downloaded (`local_files_only=True`).
* `unet_weights` is a NitroSD-style UNet checkpoint: one safetensors file holding the diffusers state dict of the
  base model's UNet (nitrosd-realism_unet.safetensors / nitrosd-vibrant_unet.safetensors). Its keys and shapes
  are checked against the UNet config of `base_model` before anything is loaded; the UNet is built on the meta
  device and takes the file's tensors directly (the base UNet weights are never read).
* The scheduler is TimestepShiftLCMScheduler built from the base model's scheduler config (its beta schedule and
  prediction type) with `shift` (250 NitroSD-Realism, 500 NitroSD-Vibrant) and timesteps_mode="model" (a diffusers
  pipeline feeds `scheduler.timesteps` to the UNet). NitroFusion uses no classifier-free guidance: call the
  pipeline with guidance_scale=0 (diffusers' SDXL default of 5 would run the UNet twice per step).
* One set of weights serves 1, 2, 3 or 4 steps: `num_inference_steps` is a call argument, nothing is reloaded.
* `cuda_graph=True` replays CUDA graphs (nitrokernels.graphed) of the UNet forward and the VAE decode: one capture
  per input signature (batch, resolution, dtype), shared by every step of every step count (the timestep is a
  graph input). Calls with extras the graphs do not cover (ControlNet residuals, attention masks, ...) run eager.
  A float16 VAE that diffusers would upcast around each decode (force_upcast, as SDXL's) is kept in float32.

`make_random_sdxl_pipeline` builds random-weight SDXL-shaped pipelines ("tiny" for tests, "sdxl" for benchmarks)
with a small local CLIP vocabulary, so nothing here needs a download.
"""
from __future__ import annotations

import inspect
import json
import os
import tempfile
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Union

import torch
from torch import nn

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

from nitrokernels.nitro.scheduler import TimestepShiftLCMScheduler

__all__ = ["GraphedPipelineParts", "UNetWeightsError", "check_unet_weights", "file_sha256", "load_lora_adapter",
           "load_pipeline", "load_unet_state", "load_unet_weights", "lora_config", "make_random_sdxl_pipeline",
           "prepare_pipeline", "read_json_object", "read_unet_state", "resolve_device", "resolve_dtype",
           "tensors_sha256", "verify_safetensors"]

# safetensors metadata key of the tensors' digest in files nitrokernels writes (tensors_sha256)
SHA256_METADATA_KEY = "nitrokernels.tensors_sha256"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_FIRST = 5  # how many offending keys an error message names


class UNetWeightsError(ValueError):
    """A UNet safetensors file is unreadable or does not fit the base model's UNet (names the file and keys)."""


def resolve_device(device=None) -> torch.device:
    """None -> cuda when available, else cpu; a bad name, or a CUDA device this torch / machine does not have,
    raises ValueError naming it."""
    try:
        dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1): {err}") from None
    from nitrokernels.cli import cuda_device_problem

    problem = cuda_device_problem(dev)
    if problem:
        raise ValueError(f"device {device!r}: {problem} (use device='cpu')")
    return dev


def read_json_object(path: Union[str, os.PathLike], what: str, error: type = ValueError) -> Dict[str, Any]:
    """The JSON object in `path`; raises `error` naming `what` and the file when it is unreadable, not JSON or not
    an object (the one reader of the model / config JSON files of load_pipeline and `nitrokernels distill`)."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as err:  # (json's and UnicodeDecodeError are ValueErrors)
        raise error(f"{what} {path} is not valid JSON or not readable ({err})") from None
    if not isinstance(data, dict):
        raise error(f"{what} {path} must hold a JSON object, got a {type(data).__name__}")
    return data


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """None -> bfloat16 on CUDA, float32 elsewhere; strings like "bf16" / "float16" are accepted."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        name = dtype.lower().replace("torch.", "")
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
        return _DTYPES[name]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return dtype


def _dtype_keyword() -> str:
    """diffusers renamed from_pretrained's torch_dtype to dtype (the old name warns)."""
    try:
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401
    except ImportError:
        return "torch_dtype"
    return "dtype"


def _first(items: Sequence, n: int = _FIRST) -> str:
    shown = ", ".join(str(x) for x in list(items)[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


# --------------------------------------------------------------------------------------------- digests
def file_sha256(path: Union[str, os.PathLike]) -> str:
    """sha256 of a file's bytes (what `sha256sum` prints and model hubs publish)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensors_sha256(tensors: Dict[str, torch.Tensor]) -> str:
    """sha256 over {name: tensor} in name order (name, dtype, shape, bytes): what nitrokernels stores in the
    metadata of the safetensors files it writes (SHA256_METADATA_KEY) and verifies on load."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_hex(expected_sha256) -> str:
    if not isinstance(expected_sha256, str) or len(expected_sha256.strip()) != 64 or \
            any(c not in "0123456789abcdef" for c in expected_sha256.strip().lower()):
        raise ValueError(f"expected_sha256 must be 64 hex digits (a sha256 of the file), got {expected_sha256!r}")
    return expected_sha256.strip().lower()


def verify_safetensors(path: Union[str, os.PathLike], tensors: Optional[Dict[str, torch.Tensor]] = None,
                       expected_sha256: Optional[str] = None) -> bool:
    """Check a safetensors file: its bytes against `expected_sha256` (when given: for files of others), and its
    tensors (`tensors` = the file's loaded contents, read here when None) against the digest in its metadata
    (files nitrokernels wrote). Raises UNetWeightsError on a mismatch; returns whether a metadata digest was
    verified (False: the file carries none)."""
    path = os.fspath(path)
    if expected_sha256 is not None:
        expected = _check_hex(expected_sha256)
        actual = file_sha256(path)
        if actual != expected:
            raise UNetWeightsError(f"{path}: sha256 {actual} does not match expected_sha256 {expected} (a corrupt, "
                                   f"truncated or different file)")
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            stored = (f.metadata() or {}).get(SHA256_METADATA_KEY)
            if stored is not None and tensors is None:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise UNetWeightsError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from err
    if stored is None:
        return False
    actual = tensors_sha256(tensors)
    if actual != stored:
        raise UNetWeightsError(f"{path} is corrupt: its tensors' sha256 is {actual[:16]}..., the file records "
                               f"{stored[:16]}... (flipped or edited bytes)")
    return True


# --------------------------------------------------------------------------------------------- UNet file
def _read_safetensors_header(path: str) -> Dict[str, tuple]:
    """{key: shape} of a safetensors file, without reading the tensors; UNetWeightsError if unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as err:  # safetensors raises SafetensorError / OSError / ValueError for broken files
        raise UNetWeightsError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err}). Expected "
                               "a NitroSD-style UNet checkpoint (the diffusers UNet state dict in safetensors "
                               "format); the file may be truncated or corrupt.") from err


def check_unet_weights(path: str, unet: nn.Module) -> None:
    """Raise UNetWeightsError naming `path` and the first offending keys unless the file's keys and shapes
    are exactly those of `unet.state_dict()` (works on a meta-device UNet)."""
    _check_fits(path, _read_safetensors_header(path), unet)


def _check_fits(path: str, found: Dict[str, tuple], unet: nn.Module, strict: bool = True) -> None:
    """UNetWeightsError naming `path` and the first offending keys unless `found` ({key: shape}) fits `unet`:
    the same keys (strict) and the same shape for every key both hold."""
    expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    missing = sorted(set(expected) - set(found)) if strict else []
    unexpected = sorted(set(found) - set(expected)) if strict else []
    wrong = [f"{k} (file {list(found[k])}, model {list(expected[k])})"
             for k in sorted(set(found) & set(expected)) if found[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_first(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {_first(wrong)}")
    if problems:
        raise UNetWeightsError(f"{path} does not fit the {type(unet).__name__} ({len(expected)} tensors "
                               f"expected, {len(found)} in the file): " + "; ".join(problems))


def load_unet_weights(unet: Union[nn.Module, str, os.PathLike], path: Union[str, os.PathLike],
                      prefix: Optional[str] = None, strict: bool = True, expected_sha256: Optional[str] = None, *,
                      dtype: Optional[torch.dtype] = None, unet_class: Optional[type] = None) -> nn.Module:
    """Load the UNet weights `path` into `unet` and return the UNet: the one loader of load_pipeline, `nitrokernels
    distill` and nitrokernels.nitro.distiller.load_unet_weights (the same function).

    unet: a UNet module, filled in place (its train mode and requires_grad untouched; on the meta device it takes
      the file's tensors), or a UNet folder holding config.json (e.g. <base model>/unet): a `unet_class` (default
      diffusers' UNet2DConditionModel) is built from it on the meta device -- no random init, no base weights
      read -- and returned in eval mode without gradients.
    path: a .safetensors file of a UNet state dict (a leading "unet." on every key is stripped; `prefix`: take the
      keys under that prefix instead, "model.diffusion_model." is NOT converted: use diffusers-format weights), a
      diffusers UNet folder or a NitroDistiller checkpoint.pt (see read_unet_state).
    strict: the file holds exactly the UNet's keys (False: missing / unexpected keys are skipped); shapes always
      have to match. dtype: the loaded tensors' dtype (default: a module's own, a built UNet's the file's).
    expected_sha256: the file's published sha256, checked before anything is loaded; a digest nitrokernels stored
      is always verified (verify_safetensors). A .safetensors file's keys and shapes are checked on its header
      before its tensors are read.
    Raises FileNotFoundError, or UNetWeightsError (a ValueError) naming the file and its first offending keys,
    before the UNet is modified. The old nitro.pipeline call form load_unet_weights(path, unet_config_dir,
    unet_class, dtype) still works, with a DeprecationWarning.
    """
    unet, path, prefix, strict, unet_class, dtype = _legacy_load_call(unet, path, prefix, strict, unet_class, dtype)
    return _load_unet(unet, path, prefix=prefix, strict=strict, expected_sha256=expected_sha256, dtype=dtype,
                      unet_class=unet_class)[0]


def _legacy_load_call(unet, path, prefix, strict, unet_class, dtype):
    """nitro.pipeline's old load_unet_weights(path, unet_config_dir, unet_class=None, dtype=None) -> the new form."""
    if not isinstance(unet, (nn.Module, str, os.PathLike)):
        raise TypeError(f"load_unet_weights: unet must be a UNet module or its config folder, got "
                        f"{type(unet).__name__}")
    if isinstance(unet, nn.Module) or not os.fspath(unet).endswith(".safetensors") or \
            not os.path.isfile(os.path.join(os.fspath(path), "config.json")):
        return unet, path, prefix, strict, unet_class, dtype
    import warnings

    warnings.warn("load_unet_weights(path, unet_config_dir, ...) is deprecated: pass the UNet (or its config folder) "
                  "first, load_unet_weights(unet_config_dir, path, unet_class=..., dtype=...)", DeprecationWarning,
                  stacklevel=3)
    if prefix is not None and not isinstance(prefix, str):  # the old third positional: unet_class
        unet_class, prefix = prefix, None
    if not isinstance(strict, bool):  # the old fourth positional: dtype
        dtype, strict = strict, True
    return path, unet, prefix, strict, unet_class, dtype


def _unet_keys(state: Dict[str, Any], prefix: Optional[str] = None) -> Dict[str, Any]:
    """The UNet's entries of a safetensors file's {key: tensor or shape}: under `prefix` (stripped) when given;
    else all of them, without a leading "unet." every key has, or a digits asset's "unet." group."""
    if prefix:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if state and all(k.startswith("unet.") for k in state):
        return {k[len("unet."):]: v for k, v in state.items()}
    if any(k.startswith("unet.") for k in state) and any(k.startswith("encoder.") for k in state):
        return {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}  # a digits asset
    return state


def _load_unet(unet, path, *, prefix=None, strict=True, expected_sha256=None, dtype=None, unet_class=None
               ) -> tuple:
    """load_unet_weights -> (unet, info of read_unet_state)."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"UNet weights {path} do not exist")
    if expected_sha256 is not None:
        _check_hex(expected_sha256)
    config = None
    if not isinstance(unet, nn.Module):
        config_dir = os.fspath(unet)
        if not os.path.isfile(os.path.join(config_dir, "config.json")):
            raise FileNotFoundError(f"{config_dir}/config.json does not exist: load_unet_weights takes a UNet "
                                    f"module or a UNet folder with its config.json")
        if unet_class is None:
            from diffusers import UNet2DConditionModel as unet_class
        config = unet_class.load_config(config_dir)
        with torch.device("meta"):
            unet = unet_class.from_config(config)
    if os.path.isfile(path) and path.endswith(".safetensors"):
        _check_fits(path, _unet_keys(_read_safetensors_header(path), prefix), unet, strict)  # before any tensor
        try:
            state = load_file(path, device="cpu")
        except Exception as err:
            raise UNetWeightsError(f"{path}: reading the tensors failed ({type(err).__name__}: {err})") from err
        verify_safetensors(path, state, expected_sha256)
        state, info = _unet_keys(state, prefix), {"source": "safetensors", "shift": _run_shift(path), "config_dir": None}
    else:
        if prefix:
            raise ValueError(f"load_unet_weights: prefix= selects keys of a .safetensors file; {path} is not one")
        state, info = read_unet_state(path, expected_sha256)
        _check_fits(path, {k: tuple(v.shape) for k, v in state.items()}, unet, strict)
    if config is not None:
        return _unet_from_state(unet_class, config, unet, state, dtype, strict), info
    own = unet.state_dict()
    state = {k: v.to(dtype or own[k].dtype) if v.is_floating_point() else v for k, v in state.items() if k in own}
    unet.load_state_dict(state, strict=strict, assign=any(t.is_meta for t in own.values()))
    return unet, info


def _unet_from_state(unet_class, config, unet: nn.Module, state: Dict[str, torch.Tensor],
                     dtype: Optional[torch.dtype], strict: bool = True) -> nn.Module:
    """Fill the meta-device `unet` (built from `config`) with the checked `state`."""
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if not strict:
        own = unet.state_dict()
        state = {k: v for k, v in state.items() if k in own}
    unet.load_state_dict(state, strict=strict, assign=True)
    still_meta = [name for name, t in list(unet.named_parameters()) + list(unet.named_buffers()) if t.is_meta]
    if still_meta:  # a tensor outside the state dict (a non-persistent buffer, a key strict=False skipped): build
        real = unet_class.from_config(config)  # it for real instead
        real.load_state_dict(state, strict=strict)
        unet = real.to(dtype) if dtype is not None else real
    return unet.eval().requires_grad_(False)


def _lora_keys(keys) -> list:
    return [k for k in keys if "lora_" in k or ".base_layer." in k]


def read_unet_state(path: Union[str, os.PathLike], expected_sha256: Optional[str] = None
                    ) -> tuple:
    """(state dict, info) of the UNet weights in `path`, for inference. `path` is one of
      * a .safetensors file of a UNet state dict (diffusers key names; a leading "unet." on every key is
        stripped; a digits asset's "unet." group is taken);
      * a diffusers UNet folder (config.json + its .safetensors, as `save_pretrained` writes: e.g. <out>/student
        of `nitrokernels distill`);
      * a NitroDistiller checkpoint (<out>/checkpoint.pt of `nitrokernels demo` / `nitrokernels distill`): its
        "student" entry. Read with torch.load(weights_only=True) -- a checkpoint cannot run code -- and its
        content digest verified (nitro.distiller's checkpoint reader).
    A digest nitrokernels stored is always verified; `expected_sha256` (the file's sha256) is checked first.
    info: {"source": "safetensors" | "folder" | "checkpoint", "shift": the run's timestep shift when recorded
    (the checkpoint's config, or the run's config.json beside a student folder / file), "config_dir": the UNet
    folder when there is one}. Raises FileNotFoundError or UNetWeightsError (a ValueError) naming the file.
    """
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"UNet weights {path} do not exist")
    if expected_sha256 is not None:
        _check_hex(expected_sha256)
    info: Dict[str, Any] = {"source": "safetensors", "shift": _run_shift(path), "config_dir": None}
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        preferred = [n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
                     if n in names]
        if not os.path.isfile(os.path.join(path, "config.json")) or not (preferred or len(names) == 1):
            raise UNetWeightsError(f"{path}: a UNet folder holds config.json and one .safetensors file (as "
                                   f"save_pretrained writes); found {sorted(os.listdir(path))[:8]}")
        if expected_sha256 is not None:
            raise UNetWeightsError(f"{path}: a sha256 is checked on a file; pass the .safetensors file inside")
        info.update(source="folder", config_dir=path)
        path = os.path.join(path, (preferred or names)[0])
    if not path.endswith(".safetensors"):
        from nitrokernels.nitro.distiller import CheckpointError, read_checkpoint

        if expected_sha256 is not None and file_sha256(path) != _check_hex(expected_sha256):
            raise UNetWeightsError(f"{path}: sha256 {file_sha256(path)} does not match expected_sha256 "
                                   f"{_check_hex(expected_sha256)} (a corrupt, truncated or different file)")
        import zipfile

        if not zipfile.is_zipfile(path):  # what torch.save writes (a pickle alone is refused below anyway)
            raise UNetWeightsError(f"{path}: not a .safetensors file, a UNet folder or a torch checkpoint "
                                   f"(NitroDistiller's checkpoint.pt); the file may be truncated or corrupt")
        try:
            checkpoint = read_checkpoint(path)
        except CheckpointError as err:
            raise UNetWeightsError(f"{err}. UNet weights are a .safetensors file, a UNet folder or a "
                                   f"NitroDistiller checkpoint.pt") from None
        state = checkpoint.get("student")
        if not isinstance(state, dict) or not state:
            raise UNetWeightsError(f"checkpoint {path} holds no student weights")
        lora = _lora_keys(state)
        if lora:
            raise UNetWeightsError(f"checkpoint {path} is of a LoRA student (keys such as {lora[0]!r}); load the "
                                   f"base UNet and the adapter the run wrote instead: --lora <out>/student_lora "
                                   f"(load_pipeline(..., lora=...))")
        config = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else {}
        info.update(source="checkpoint", shift=config.get("shift", info["shift"]), step=checkpoint.get("step"))
        return dict(state), info
    try:
        state = load_file(path, device="cpu")
    except Exception as err:
        raise UNetWeightsError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from err
    verify_safetensors(path, state, expected_sha256)
    return _unet_keys(state), info


def _run_shift(path: str) -> Optional[float]:
    """The timestep shift in the config.json of the `nitrokernels distill` run folder holding `path`, if any."""
    parent = os.path.dirname(os.path.abspath(path))
    for folder in (parent, os.path.dirname(parent)):
        config = os.path.join(folder, "config.json")
        if os.path.isfile(config):
            try:
                data = read_json_object(config, "run config")
            except ValueError:
                continue
            shift = data.get("distill", {}).get("shift") if isinstance(data.get("distill"), dict) else None
            if isinstance(shift, (int, float)) and not isinstance(shift, bool):
                return float(shift)
    return None


def load_unet_state(unet: nn.Module, state: Dict[str, torch.Tensor], path: str,
                    dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Load `state` (from read_unet_state) into `unet` after checking every key and shape (UNetWeightsError naming
    `path` otherwise); a meta-device UNet takes the tensors directly. Returns the UNet (eval, frozen)."""
    _check_fits(path, {k: tuple(v.shape) for k, v in state.items()}, unet)
    own = unet.state_dict()
    state = {k: v.to(dtype or own[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
    unet.load_state_dict(state, strict=True, assign=any(t.is_meta for t in own.values()))
    return unet.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ LoRA
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
LORA_CONFIG = "lora_config.json"


def lora_config(lora: Dict[str, Any]):
    """The peft LoraConfig of a `nitrokernels distill --lora-rank` adapter ({"rank", "alpha", "targets"}, as its
    lora_config.json holds); B starts at zero, so a freshly wrapped UNet computes what it did."""
    from peft import LoraConfig

    for key in ("rank", "alpha", "targets"):
        if key not in lora:
            raise ValueError(f"LoRA config {dict(lora)} has no {key!r} (expected rank, alpha, targets)")
    return LoraConfig(r=int(lora["rank"]), lora_alpha=float(lora["alpha"]), target_modules=list(lora["targets"]),
                      init_lora_weights=True)


def load_lora_adapter(unet: nn.Module, path: Union[str, os.PathLike], *, fuse: bool = False,
                      adapter_name: str = "default") -> nn.Module:
    """Wrap `unet` with the LoRA adapter `nitrokernels distill --lora-rank` wrote (peft) and load its weights.

    path: the adapter folder (<out>/student_lora: pytorch_lora_weights.safetensors + lora_config.json) or the
    .safetensors file in it. Every adapter key must be one this UNet has and vice versa (UNetWeightsError naming
    the first ones otherwise); a digest nitrokernels stored is verified. fuse: merge the adapter into the base
    weights and drop the peft wrappers (a plain UNet, as fast as the base; the adapter can no longer be turned
    off). Returns `unet` (eval mode, frozen).
    """
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = os.fspath(path)
    folder, weights = (path, os.path.join(path, LORA_WEIGHTS)) if os.path.isdir(path) else (os.path.dirname(path), path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"LoRA adapter {path} does not exist")
    for needed in (weights, os.path.join(folder, LORA_CONFIG)):
        if not os.path.isfile(needed):
            raise FileNotFoundError(f"LoRA adapter {path}: {needed} is missing (a `nitrokernels distill --lora-rank` "
                                    f"run writes {LORA_WEIGHTS} and {LORA_CONFIG} to <out>/student_lora)")
    config = read_json_object(os.path.join(folder, LORA_CONFIG), "LoRA config")
    try:
        state = load_file(weights, device="cpu")
    except Exception as err:
        raise UNetWeightsError(f"{weights}: not a readable safetensors file ({type(err).__name__}: {err})") from err
    verify_safetensors(weights, state)
    unet.add_adapter(lora_config(config), adapter_name=adapter_name)
    expected = set(get_peft_model_state_dict(unet, adapter_name=adapter_name))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise UNetWeightsError(f"LoRA adapter {weights} does not fit this UNet: {len(missing)} missing key(s) "
                               f"{_first(missing)}; {len(unexpected)} unexpected key(s) {_first(unexpected)}")
    set_peft_model_state_dict(unet, state, adapter_name=adapter_name)
    if fuse:
        unet.fuse_lora(lora_scale=1.0)
        unet.unload_lora()
    return unet.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------ CUDA graphs
class _UNetCall(nn.Module):
    """What the UNet graph captures: the UNet's forward with the pipeline's tensor arguments, -> the output."""

    def __init__(self, unet: nn.Module, forward):
        super().__init__()
        self.unet = unet
        self._forward = forward

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs, timestep_cond):
        return self._forward(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                             timestep_cond=timestep_cond, added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]


class _DecodeCall(nn.Module):
    """What the VAE graph captures: vae.decode(z) -> image tensor."""

    def __init__(self, vae: nn.Module, decode):
        super().__init__()
        self.vae = vae
        self._decode = decode
        self._dtype = vae.dtype

    def forward(self, z):
        return self._decode(z.to(self._dtype), return_dict=False)[0]


class GraphedPipelineParts:
    """CUDA-graph replay installed on a pipeline's UNet (forward) and VAE (decode); `.remove()` undoes it.

    `.unet` / `.vae` are the GraphedModules (`.captures` counts captures, `.num_graphs` the graphs kept);
    `.eager_calls` counts UNet / VAE calls that fell back to eager because of arguments the graphs do not cover.
    """

    def __init__(self, pipe, graphed_fn=None):
        if graphed_fn is None:
            from nitrokernels.graph import graphed as graphed_fn
        self._pipe = pipe
        self.eager_calls = {"unet": 0, "vae": 0}
        unet, vae = pipe.unet, pipe.vae
        # (module, attribute, value in the instance __dict__ before us or None): what remove() restores
        self._saved = [(unet, "forward", unet.__dict__.get("forward")), (vae, "decode", vae.__dict__.get("decode"))]
        self._unet_forward = unet.forward
        self._vae_decode = vae.decode
        self.unet = graphed_fn(_UNetCall(unet, self._unet_forward))
        self.vae = graphed_fn(_DecodeCall(vae, self._vae_decode))
        unet.forward = self._graphed_unet_forward
        vae.decode = self._graphed_decode

    def _graphed_unet_forward(self, sample, timestep, encoder_hidden_states, class_labels=None, timestep_cond=None,
                              attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None,
                              down_block_additional_residuals=None, mid_block_additional_residual=None,
                              down_intrablock_additional_residuals=None, encoder_attention_mask=None,
                              return_dict: bool = True):
        extras = (class_labels, attention_mask, cross_attention_kwargs, down_block_additional_residuals,
                  mid_block_additional_residual, down_intrablock_additional_residuals, encoder_attention_mask)
        if any(x is not None for x in extras) or torch.is_grad_enabled():
            self.eager_calls["unet"] += 1
            return self._unet_forward(sample, timestep, encoder_hidden_states, class_labels=class_labels,
                                      timestep_cond=timestep_cond, attention_mask=attention_mask,
                                      cross_attention_kwargs=cross_attention_kwargs,
                                      added_cond_kwargs=added_cond_kwargs,
                                      down_block_additional_residuals=down_block_additional_residuals,
                                      mid_block_additional_residual=mid_block_additional_residual,
                                      down_intrablock_additional_residuals=down_intrablock_additional_residuals,
                                      encoder_attention_mask=encoder_attention_mask, return_dict=return_dict)
        # The timestep changes every step: make it a [B] tensor on the device so it is a graph input.
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1).expand(sample.shape[0]).contiguous()
        out = self.unet(sample, t, encoder_hidden_states, added_cond_kwargs, timestep_cond)
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)

    def _graphed_decode(self, z, return_dict: bool = True, generator=None):
        # AutoencoderKL.decode takes `generator` (SD pipelines pass it) but does not use it.
        if torch.is_grad_enabled():
            self.eager_calls["vae"] += 1
            return self._vae_decode(z, return_dict=return_dict)
        image = self.vae(z)
        if not return_dict:
            return (image,)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=image)

    def remove(self):
        """Put the eager UNet forward and VAE decode back (the graphs are dropped with this object)."""
        for module, name, before in self._saved:
            if before is None:
                module.__dict__.pop(name, None)
            else:
                setattr(module, name, before)


# ------------------------------------------------------------------------------------------- pipelines
def prepare_pipeline(pipe, *, shift: Union[int, float] = 250, patch: bool = True, cuda_graph: bool = False):
    """Turn a loaded diffusers pipeline into a NitroSD one, in place, and return it.

    Sets the TimestepShiftLCMScheduler (from the pipeline's scheduler config, `shift`, timesteps_mode="model");
    with `patch`, installs nitrokernels.patch_unet / patch_vae (handles in `pipe.nitro_patches`); with
    `cuda_graph`, replays CUDA graphs of the UNet and the VAE decode (`pipe.nitro_graphs`, a
    GraphedPipelineParts).
    """
    if getattr(pipe, "unet", None) is None or getattr(pipe, "vae", None) is None:
        raise ValueError(f"{type(pipe).__name__} has no UNet or no VAE; NitroSD needs a UNet2DCondition pipeline "
                         "(Stable Diffusion / SDXL)")
    # Keep the base model's noise schedule; drop the other scheduler's own settings (diffusers warns about them
    # when the config comes from a live scheduler rather than a file).
    accepted = inspect.signature(TimestepShiftLCMScheduler.__init__).parameters
    config = {k: v for k, v in pipe.scheduler.config.items() if k in accepted}
    pipe.scheduler = TimestepShiftLCMScheduler.from_config(config, shift=shift, timesteps_mode="model")
    pipe.nitro_patches = []
    if patch:
        from nitrokernels.patch import patch_unet, patch_vae

        pipe.nitro_patches = [patch_unet(pipe.unet), patch_vae(pipe.vae)]
    pipe.nitro_graphs = None
    if cuda_graph:
        device = pipe.unet.device
        if device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the pipeline on a CUDA device, it is on {device}")
        vae = pipe.vae
        if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            # diffusers would cast this VAE to float32 around every decode, moving its weights away from the
            # captured graph; keep it in float32 instead (the graphed decode casts the latents).
            nn.Module.to(vae, dtype=torch.float32)
        pipe.nitro_graphs = GraphedPipelineParts(pipe)
    return pipe


def load_pipeline(base_model: Union[str, os.PathLike], unet_weights: Union[str, os.PathLike, None] = None, *,
                  shift: Union[int, float, None] = None, device: Union[str, torch.device, None] = None,
                  dtype: Union[str, torch.dtype, None] = None, patch: bool = True, cuda_graph: bool = False,
                  variant: Optional[str] = None, unet_sha256: Optional[str] = None,
                  lora: Union[str, os.PathLike, None] = None, fuse_lora: bool = False) -> "DiffusionPipeline":
    """A NitroSD diffusers pipeline from local files (see the module docstring).

    base_model: diffusers pipeline folder (SDXL or any UNet2DCondition pipeline). unet_weights: optional
    student UNet weights: a NitroSD-style UNet safetensors file, a diffusers UNet folder (<out>/student of
    `nitrokernels distill`) or a NitroDistiller checkpoint.pt (its student; see read_unet_state). shift: the
    scheduler's timestep shift; None: the shift recorded with unet_weights / lora (a checkpoint's config or the
    run's config.json), else 250. device: default CUDA if available. dtype: default bfloat16 on CUDA, float32 on
    CPU. patch: fused UNet + VAE blocks. cuda_graph: CUDA-graph replay of the UNet and VAE decode (CUDA only).
    variant: the base model's weight variant (e.g. "fp16" for diffusion_pytorch_model.fp16.safetensors).
    unet_sha256: the published sha256 of the unet_weights file, verified before it is loaded. lora: a LoRA
    adapter written by `nitrokernels distill --lora-rank` (<out>/student_lora), loaded into the UNet with peft
    (load_lora_adapter); fuse_lora: merge it into the UNet's weights.

    Call the result with guidance_scale=0 and num_inference_steps in 1..4.
    """
    from diffusers import DiffusionPipeline

    base_model = os.fspath(base_model)
    if not os.path.isdir(base_model):
        raise FileNotFoundError(f"base model folder {base_model} does not exist" if not os.path.exists(base_model)
                                else f"base model path {base_model} is not a folder (expected a diffusers pipeline "
                                     "folder with model_index.json)")
    index_path = os.path.join(base_model, "model_index.json")
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"{base_model} has no model_index.json: expected a diffusers pipeline folder "
                                "(pipeline.save_pretrained(...) or a local snapshot of e.g. "
                                "stabilityai/stable-diffusion-xl-base-1.0)")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, got device={device}")
    if lora is not None and not os.path.exists(os.fspath(lora)):
        raise FileNotFoundError(f"LoRA adapter {os.fspath(lora)} does not exist")
    if fuse_lora and lora is None:
        raise ValueError("fuse_lora=True needs lora=PATH")
    recorded = [_run_shift(os.fspath(p)) for p in (unet_weights, lora) if p is not None]
    if shift is not None:
        TimestepShiftLCMScheduler(shift=shift)  # validate the shift before loading gigabytes

    if unet_sha256 is not None and unet_weights is None:
        raise ValueError("unet_sha256 is the digest of unet_weights; pass unet_weights too")
    index = read_json_object(index_path, "the diffusers pipeline index (component name -> [library, class])")
    components: Dict[str, Any] = {}
    if unet_weights is not None:
        entry = index.get("unet") or [None, None]
        if not isinstance(entry, (list, tuple)) or len(entry) < 2:
            raise ValueError(f"{index_path}: 'unet' must be [library, class name], got {entry!r}")
        library, class_name = entry[:2]
        if class_name is None:
            raise ValueError(f"{index_path} lists no unet component; unet_weights needs a UNet pipeline")
        if library != "diffusers":
            raise ValueError(f"{index_path}: the unet is {library}.{class_name}; only diffusers UNets are supported")
        import diffusers

        if not isinstance(class_name, str) or not hasattr(diffusers, class_name):
            raise ValueError(f"{index_path}: the unet class {class_name!r} is not a diffusers class")
        unet_dir = os.path.join(base_model, "unet")
        if not os.path.isfile(os.path.join(unet_dir, "config.json")):
            raise FileNotFoundError(f"{unet_dir}/config.json is missing: the UNet config of the base model is "
                                    "needed to load unet_weights")
        unet_class = getattr(diffusers, class_name)
        components["unet"], info = _load_unet(unet_dir, unet_weights, expected_sha256=unet_sha256, dtype=dtype,
                                              unet_class=unet_class)
        recorded.insert(0, info.get("shift"))  # a checkpoint's own config first
    if shift is None:
        shift = next((v for v in recorded if v is not None), 250)
        TimestepShiftLCMScheduler(shift=shift)
    pipe = DiffusionPipeline.from_pretrained(base_model, local_files_only=True, variant=variant,
                                             **{_dtype_keyword(): dtype}, **components)
    if lora is not None:
        load_lora_adapter(pipe.unet, lora, fuse=fuse_lora)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return prepare_pipeline(pipe, shift=shift, patch=patch, cuda_graph=cuda_graph)


# --------------------------------------------------------------------------------- random-weight pipelines
def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: each of the 256 bytes -> a printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_level_clip_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """A CLIPTokenizer over single byte-level characters (no merges): it tokenizes any text offline.
    2 + 2 * 256 tokens (<|startoftext|>, <|endoftext|>, then c and c</w> for each byte character)."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    kwargs = dict(model_max_length=model_max_length, pad_token=pad_token)
    if "vocab" in inspect.signature(CLIPTokenizer.__init__).parameters:  # transformers >= 5: in-memory vocab
        return CLIPTokenizer(vocab=vocab, merges=[], **kwargs)
    with tempfile.TemporaryDirectory() as tmp:  # transformers 4: files (read once, at construction)
        with open(os.path.join(tmp, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(tmp, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
        return CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"), **kwargs)


# (hidden, layers, heads, intermediate, activation) of SDXL's two text encoders: CLIP ViT-L and OpenCLIP ViT-bigG.
_SDXL_TEXT = ((768, 12, 12, 3072, "quick_gelu"), (1280, 32, 20, 5120, "gelu"))


def make_random_sdxl_pipeline(size: str = "tiny", *, device=None, dtype=torch.float32, seed: int = 0,
                              text_layers: Optional[int] = None):
    """A StableDiffusionXLPipeline with random weights and a local byte-level tokenizer (no download).

    size="sdxl": the SDXL UNet (2.6 B parameters, 1024² images / 128² latents), SDXL's VAE and text encoders
    shaped like CLIP ViT-L + bigG (`text_layers` caps their depth; None = full depth). size="tiny": an SDXL-shaped
    toy (two text encoders, text_time conditioning, 64² images) for CPU tests. The scheduler is SDXL's
    EulerDiscreteScheduler config, as in the real base model. Modules are created directly on `device`.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if size not in ("tiny", "sdxl"):
        raise ValueError(f"size must be 'tiny' or 'sdxl', got {size!r}")
    device = resolve_device(device)
    tokenizer = _byte_level_clip_tokenizer()
    tokenizer_2 = _byte_level_clip_tokenizer(pad_token="!")
    if size == "sdxl":
        text = _SDXL_TEXT
        projection_dim, vocab_size = 1280, 49408
        unet_kwargs = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                           transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                           addition_time_embed_dim=256, norm_num_groups=32)
        vae_kwargs = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                          sample_size=1024, scaling_factor=0.13025, force_upcast=True)
    else:
        text = ((32, 2, 4, 37, "quick_gelu"), (32, 2, 4, 37, "gelu"))
        projection_dim, vocab_size = 32, len(tokenizer)
        unet_kwargs = dict(sample_size=32, block_out_channels=(32, 64), layers_per_block=1,
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                           transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4),
                           addition_time_embed_dim=8, norm_num_groups=8)
        vae_kwargs = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=64,
                          scaling_factor=0.13025)
    encoders = []
    for hidden, layers, heads, intermediate, act in text:
        encoders.append(CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=text_layers or layers,
            num_attention_heads=heads, intermediate_size=intermediate, hidden_act=act, projection_dim=projection_dim,
            max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    cross_attention_dim = text[0][0] + text[1][0]
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(
            in_channels=4, out_channels=4, cross_attention_dim=cross_attention_dim, use_linear_projection=True,
            addition_embed_type="text_time",
            projection_class_embeddings_input_dim=6 * unet_kwargs["addition_time_embed_dim"] + projection_dim,
            **unet_kwargs)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * len(vae_kwargs["block_out_channels"]),
                            up_block_types=("UpDecoderBlock2D",) * len(vae_kwargs["block_out_channels"]),
                            **vae_kwargs)
        text_encoder = CLIPTextModel(encoders[0])
        text_encoder_2 = CLIPTextModelWithProjection(encoders[1])
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
    for module in (unet, vae, text_encoder, text_encoder_2):
        # nn.Module.to: diffusers' ModelMixin.to warns about fp32-kept modules even when there are none
        nn.Module.to(module, dtype=dtype).eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
