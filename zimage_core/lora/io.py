"""Reading any supported LoRA file and writing the one export format of this pack (safetensors only, never pickle).

Export format: `diffusion_model.<diffusers module path>.lora_A.weight` / `.lora_B.weight`, plus `.alpha` where alpha
differs from the rank. It is ai-toolkit's layout, the one form that ComfyUI's Z-Image key map (which slices the q/k/v
deltas into its fused qkv), diffusers' Z-Image loader (which folds .alpha into A/B) and DiffSynth (which strips
`diffusion_model.`) all read with the same effect."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..safetensors_io import SafetensorsFile
from .formats import is_adapter_key, normalise
from .weights import LoraError, LoraWeights

EXPORT_FORMAT = "zimage-turbo-nodes/lora-v1"
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def load_lora(path: str | os.PathLike) -> LoraWeights:
    """Read a .safetensors LoRA of any supported producer, normalised to the model's module names."""
    path = Path(path)
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise LoraError(f"{path}: pickle files ({path.suffix}) are never loaded, because unpickling can run code; "
                        f"use the .safetensors version of this LoRA")
    try:
        file = SafetensorsFile(path)
    except (ValueError, OSError) as err:
        raise LoraError(f"cannot load LoRA: {err}") from None
    keys = file.keys()
    if not keys:
        raise LoraError(f"{path} holds no tensors, so it is not a LoRA")
    if not any(is_adapter_key(k) for k in keys):
        hint = (" It looks like a full model checkpoint: load it as a model instead."
                if any(k.endswith(".weight") for k in keys) else "")
        raise LoraError(f"{path} is not a LoRA: none of its {len(keys)} tensors has a LoRA key suffix "
                        f"(lora_A/lora_B, lora_down/lora_up, alpha, diff, lokr_*, hada_*); first keys: {keys[:3]}.{hint}")
    tensors = {k: file.read(k) for k in keys}
    return normalise(tensors, _with_peft_folder_config(path, dict(file.metadata)), source=str(path))


PEFT_ADAPTER_FILE, PEFT_CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"


def _with_peft_folder_config(path: Path, metadata: dict) -> dict:
    """peft's save_pretrained (and diffusion-pipe) keep lora_alpha out of the tensors, in an adapter_config.json
    beside adapter_model.safetensors; read it there (as diffusers reads its metadata copy) so the scale is exact.
    Only for that file name: a renamed copy in a loras folder has no reliable config next to it."""
    config = path.with_name(PEFT_CONFIG_FILE)
    if path.name != PEFT_ADAPTER_FILE or "lora_adapter_metadata" in metadata or not config.is_file():
        return metadata
    try:
        text = config.read_text()
        json.loads(text)
    except (OSError, ValueError) as err:
        raise LoraError(f"{config}: the peft adapter config next to {path.name} cannot be read: {err}") from None
    return {**metadata, "lora_adapter_metadata": text, "zimage.peft_config": str(config)}


def save_lora(lora: LoraWeights, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write `lora` in the export format. Metadata always records rank, alpha, targets, base_model, scheme and the
    format tag (caller values win; non-strings are stored as JSON). ComfyUI full-size `.diff`/`.diff_b` deltas are
    written as such (only ComfyUI reads those); LoKr/LoHa cannot be written as A/B without approximating and are
    refused. The file is written next to its destination and renamed, so a crash never leaves half a LoRA."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    alphas = set()
    for module_path, module in lora.modules.items():
        if module.kind in ("lokr", "loha"):
            raise LoraError(f"save_lora: module {module_path} of {lora.name} is a {module.kind} adapter, which the "
                            f"LoRA export format cannot hold without approximation")
        base = f"diffusion_model.{module_path}"
        if module.kind == "lora":
            tensors[f"{base}.lora_A.weight"] = module.down
            tensors[f"{base}.lora_B.weight"] = module.up
            alphas.add(module.alpha if module.alpha is not None else float(module.rank))
            if module.alpha is not None and module.alpha != module.rank:
                tensors[f"{base}.alpha"] = torch.tensor(float(module.alpha))
        elif module.diff is not None:
            tensors[f"{base}.diff"] = module.diff
        if module.diff_b is not None:
            tensors[f"{base}.diff_b"] = module.diff_b
    # copies: fused-qkv splits share storage, which safetensors refuses to write
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    targets = sorted({re.sub(r"^(layers|noise_refiner|context_refiner)\.\d+\.", "", p) for p in lora.modules})
    info = {"format": "pt", "zimage.format": EXPORT_FORMAT, "rank": str(lora.rank),
            "alpha": json.dumps(sorted(alphas)[0] if len(alphas) == 1 else sorted(alphas)),
            "targets": ",".join(targets), "base_model": "Z-Image-Turbo", "scheme": "lora",
            "source_format": lora.format}
    for key, value in (metadata or {}).items():
        info[str(key)] = value if isinstance(value, str) else json.dumps(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=info)
    os.replace(tmp, path)
    return path
