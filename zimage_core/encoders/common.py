"""What the text and image encoders share: their error type, the optional-dependency import, safetensors reading
and the identity that keys the cache."""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

import torch

from ..safetensors_io import SafetensorsFile

HEADLESS_DEPENDENCIES = "pip install 'transformers>=4.56' 'diffusers>=0.35' tqdm"
_ID_SAMPLE = 1 << 20  # bytes hashed at each end of a weights file (its header alone does not tell weights apart)


class EncoderError(ValueError):
    """A text encoder, tokenizer or VAE cannot be used (the message names the file)."""


def require(module: str, purpose: str):
    """Import an optional dependency of the headless path, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise EncoderError(f"{purpose} needs the Python package '{module}', an optional dependency of the headless "
                           f"path (the ComfyUI nodes do not need it): {HEADLESS_DEPENDENCIES}  [{exc}]") from exc


def open_safetensors(path: Path) -> SafetensorsFile:
    try:
        return SafetensorsFile(path)
    except (FileNotFoundError, ValueError) as exc:
        raise EncoderError(str(exc)) from exc


def common_prefix(keys: list[str], prefixes: tuple[str, ...]) -> str:
    """The first of `prefixes` that every key starts with ('' if none)."""
    for prefix in prefixes:
        if keys and all(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def read_state_dict(file: SafetensorsFile, prefix: str, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """All tensors of `file` with `prefix` removed, minus keys containing any of `skip`. fp8-stored weights are
    up-cast to bf16; ComfyUI's scaled fp8 (a per-tensor scale next to each weight) is refused rather than guessed."""
    if any(k.endswith(("scale_weight", "weight_scale")) or k == "scaled_fp8" for k in file.keys()):
        raise EncoderError(f"{file.path} is a scaled-fp8 checkpoint; the headless encoder needs the bf16 / fp16 / fp32 "
                           "file")
    out = {}
    for key in file.keys():
        if any(s in key for s in skip):
            continue
        value = file.read(key)
        if value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            value = value.to(torch.bfloat16)
        out[key[len(prefix):]] = value
    return out


def weights_id(paths: list[Path]) -> str:
    """A short identity of model files from the size and the first and last MiB (header included) of each, so a
    fine-tune or another seed gets another identity while a copy elsewhere keeps it; reading whole 8 GB files to hash
    them would cost more than encoding a small dataset."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        size = path.stat().st_size
        digest.update(str(size).encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(_ID_SAMPLE))
            handle.seek(max(0, size - _ID_SAMPLE))
            digest.update(handle.read(_ID_SAMPLE))
    return digest.hexdigest()[:16]


def read_component_config(folder: Path, what: str, example: str) -> tuple[Path, dict]:
    """(path, contents) of the config.json of a transformers / diffusers component folder such as `example`."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise EncoderError(f"{what} folder {folder} has no config.json (expected a folder such as {example})")
    return config_file, json.loads(config_file.read_text(encoding="utf-8"))


def safetensors_files(folder: Path, what: str) -> list[Path]:
    """The .safetensors weights of a transformers / diffusers component folder (pickles are never loaded)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        extra = f" (only pickled weights {pickles}, which this pack never loads: convert them to .safetensors)" \
            if pickles else ""
        raise EncoderError(f"{what} folder {folder} holds no .safetensors weights{extra}")
    return files


