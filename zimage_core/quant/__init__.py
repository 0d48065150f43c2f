"""Quantized transformer weights: one Linear (`QuantizedLinear`) that keeps a weight exactly as its file stores it,
one table of formats (`FORMATS`, merged from the family modules), the detection of a file's family, and the shared
code that swaps a model's Linears for QuantizedLinears holding a file's tensors.

Families (one module each): `fp8` (this pack's fp8 storage and ComfyUI's scaled fp8, also made from bf16 at load
with `weight_storage="fp8_e4m3fn"`), `gguf` (llama.cpp's container: city96 / stable-diffusion.cpp files),
`comfy_quant` (ComfyUI's mixed-precision safetensors) and `svdquant` (nunchaku's SVDQuant int4). A family module
exposes `FORMATS` (format key -> Format) and, where it reads its own files, a reader registered in `READERS`:
`reader(path) -> QuantizedFile`. Families that are detected but have no reader are refused by name when loaded (see
`zimage_core.checkpoint.load_transformer`).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from . import comfy_quant, fp8, gguf, svdquant
from .linear import COMPUTE_PATHS, Format, QuantizedLinear, is_quantized, replace_module, weight_shape
from .stored import QuantizedFile, StoredWeight

FORMATS: dict[str, Format] = {**fp8.FORMATS, **gguf.FORMATS, **comfy_quant.FORMATS, **svdquant.FORMATS}

# family -> what a user calls such a file (error messages)
FAMILIES = {
    "safetensors": "a plain or fp8 safetensors checkpoint",
    "gguf": "a GGUF file (llama.cpp container)",
    "comfy_quant": "a ComfyUI mixed-precision (comfy_quant) safetensors file",
    "svdquant": "a nunchaku SVDQuant safetensors file",
}


READERS: dict[str, Callable[[Path], QuantizedFile]] = {
    "gguf": gguf.read_gguf, "comfy_quant": comfy_quant.read_comfy_quant, "svdquant": svdquant.read_svdquant}


def detect_family(path: str | os.PathLike) -> str:
    """The family of a checkpoint (a key of FAMILIES), from its suffix / magic bytes and, for safetensors, its
    header: `_quantization_metadata` or `.comfy_quant` tensors (ComfyUI), `.qweight` + `.proj_down` (nunchaku)."""
    path = Path(path)
    if path.is_dir():
        return "safetensors"
    if path.suffix.lower() == ".gguf":
        return "gguf"
    with open(path, "rb") as f:
        if f.read(4) == b"GGUF":
            return "gguf"
    from ..safetensors_io import SafetensorsFile

    header = SafetensorsFile(path)
    keys = header.tensors
    if "_quantization_metadata" in header.metadata or any(k.endswith(".comfy_quant") for k in keys):
        return "comfy_quant"
    if any(k.endswith(".qweight") for k in keys) and any(k.endswith(".proj_down") for k in keys):
        return "svdquant"
    return "safetensors"


@torch.no_grad()
def install_quantized(model: nn.Module, weights: dict[str, StoredWeight], device) -> list[str]:
    """Swap each Linear named in `weights` for a QuantizedLinear holding that weight's tensors (moved to `device`),
    then give every parameter still on the meta device empty storage on `device` (for the caller to fill). `model`
    is a meta-device model in the compute dtype. Every path and shape is checked before anything is swapped."""
    for path, stored in weights.items():
        old = model.get_submodule(path) if _has(model, path) else None
        if not isinstance(old, nn.Linear):
            raise ValueError(f"quantized weight {path}.weight: the model has no Linear {path}")
        if (old.out_features, old.in_features) != tuple(stored.shape):
            raise ValueError(f"quantized weight {path}.weight has shape {list(stored.shape)}, the model's Linear "
                             f"is [{old.out_features}, {old.in_features}]")
    moved: dict[int, tuple[weakref.ref, Tensor]] = {}  # a tensor shared by the parts of a fused weight: moved once

    def move(t: Tensor) -> Tensor:  # copied off the file map; the weak reference guards against a reused id()
        entry = moved.get(id(t))
        if entry is None or entry[0]() is not t:
            entry = moved[id(t)] = (weakref.ref(t), t.to(device, copy=True))
        return entry[1]

    for path, stored in weights.items():
        old = model.get_submodule(path)
        bias = None if old.bias is None else torch.empty_like(old.bias, device=device)
        tensors = {name: move(t) for name, t in stored.tensors.items()}
        stored.tensors.clear()  # a reader's own tensors (e.g. SVDQuant's unpacked ones) are freed as we go
        replace_module(model, path, QuantizedLinear(old.in_features, old.out_features, stored.format, tensors, bias))
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                module._parameters[name] = nn.Parameter(torch.empty_like(param, device=device),
                                                        requires_grad=param.requires_grad)
    return list(weights)


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


__all__ = ["COMPUTE_PATHS", "FAMILIES", "FORMATS", "Format", "QuantizedFile", "QuantizedLinear", "READERS",
           "StoredWeight", "detect_family", "install_quantized", "is_quantized",
           "weight_shape"]
