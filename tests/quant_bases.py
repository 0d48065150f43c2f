"""Tiny bases stored in each weight format the trainer is tested on (tests/test_training_quantized.py).

One architecture for all: dim 256 and an FFN of 512, so every block Linear's input width is a multiple of 256 (what
GGUF's K-quants need), with the same seeded random weights (zimage_core.testing) before each format stores them."""

from __future__ import annotations

import torch

from zimage_core.quant.fp8 import to_fp8_storage
from zimage_core.testing import tiny_model

CONFIG = dict(dim=256, ffn_hidden_dim=512, n_heads=2, axes_dims=(32, 48, 48))

# format key -> what the trained LoRA's metadata records as the base's format
BASES = {
    "fp32": "float32",
    "fp8": "fp8_channel",
}


def base_model(fmt: str):
    model = tiny_model(0, **CONFIG)
    if fmt == "fp8":
        to_fp8_storage(model)
    elif fmt != "fp32":
        raise KeyError(fmt)
    return model
