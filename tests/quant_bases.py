"""Tiny bases stored in each weight format the trainer is tested on (tests/test_training_quantized.py), loaded the
way a user loads them: a file written by the formats' reference writers (gguf-py's GGUFWriter, comfy-kitchen's
quantizers; tests/gguf_fixtures.py, tests/comfy_quant_fixtures.py) and read by `load_transformer`.

One architecture for all (gguf_fixtures.tiny_256: dim 256, FFN 512, so every block Linear's input width suits
GGUF's K-quant blocks), with the same seeded random weights before each format stores them."""

from __future__ import annotations

from pathlib import Path

import torch

from gguf_fixtures import tiny_256, write_gguf
from zimage_core.checkpoint import load_transformer
from zimage_core.quant.fp8 import to_fp8_storage

# base -> what the trained LoRA's metadata records as the base's format (the formats of its quantized Linears)
BASES = {
    "fp32": "float32",
    "fp8": "fp8_channel",
    "Q8_0": "gguf:Q8_0",
    "Q4_K": "gguf:Q4_K",
    "nvfp4": "comfy:nvfp4",
    "int8": "comfy:int8_tensorwise_convrot64",
}


def _file(fmt: str, folder: Path) -> Path:
    """The base's file in `folder`, written once."""
    if fmt in ("Q8_0", "Q4_K"):
        path = folder / f"tiny_{fmt}.gguf"
        if not path.is_file():
            write_gguf(path, tiny_256(0), fmt)  # city96's rules: the main layers' 2-D weights in `fmt`
        return path
    from comfy_quant_fixtures import write_file

    path = folder / f"tiny_{fmt}.safetensors"
    if not path.is_file():
        write_file(tiny_256(0), path, recipes=({"nvfp4": "nvfp4", "int8": "int8_convrot"}[fmt],))
    return path


def base_model(fmt: str, folder: Path):
    """A fresh base in `fmt` (fp32 compute on the CPU)."""
    if fmt in ("fp32", "fp8"):
        model = tiny_256(0)
        return to_fp8_storage(model) if fmt == "fp8" else model
    return load_transformer(_file(fmt, folder), dtype=torch.float32, device="cpu")
