"""Which Z-Image a checkpoint is: Turbo (distilled to 8 steps at cfg 1) or base (not distilled).

Tongyi-MAI's Z-Image (base) and Z-Image-Turbo share the architecture and every tensor name and shape, so the weights
cannot tell them apart; the file names the community uses do: Comfy-Org ships `z_image_turbo_bf16.safetensors` and,
for base, `z_image_bf16.safetensors` (also `z_image.safetensors` in ComfyUI's template); the diffusers repositories
are `Tongyi-MAI/Z-Image-Turbo` and `Tongyi-MAI/Z-Image`. ostris' Z-Image-De-Turbo is a de-distilled Turbo, sampled
like base. Anything else (community fine-tunes, mostly of Turbo) is taken for Turbo; callers offer an override."""

from __future__ import annotations

import re

from .sampling import BASE, QUALITY, SamplerPreset

VARIANTS = ("turbo", "base")
# the slower reference recipe of each variant, next to TURBO (8 steps, cfg 1): what validation compares against
REFERENCE_RECIPE: dict[str, SamplerPreset] = {"turbo": QUALITY, "base": BASE}
LABELS = {"turbo": "Z-Image-Turbo", "base": "Z-Image base"}

_DE_TURBO = re.compile(r"de_?turbo")
_BASE_NAME = re.compile(r"(^|_)(z_?image)(_(bf16|fp16|fp32|fp8\w*|base|v\d+\w*))*$|(^|_)base($|_)")


def detect_variant(name: str) -> str:
    """'turbo' or 'base' from a checkpoint's file or folder name (see the module docstring for the rule)."""
    stem = re.sub(r"\.(safetensors|sft)$", "", name.strip().rstrip("/").split("/")[-1].lower())
    stem = re.sub(r"[^a-z0-9]+", "_", stem).strip("_")
    if _DE_TURBO.search(stem):
        return "base"
    if "turbo" in stem:
        return "turbo"
    return "base" if _BASE_NAME.search(stem) else "turbo"


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"model variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    return variant
