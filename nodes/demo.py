"""ZImageTurboDemoConditioning: DEMO / TEST ONLY. Deterministic stand-in text features for tiny models.

ComfyUI's CLIPLoader only builds the real Qwen3-4B text encoder (2560-wide features). The pack's tests and its
offline demo run tiny Z-Image models (e.g. 48-wide caption features) that no real encoder fits, so this node makes
CONDITIONING from hashed word vectors: each lower-cased word maps to a fixed pseudo-random vector (seeded by the
SHA-256 of the word), so the same prompt always gives the same features and different prompts differ. It carries no
language understanding at all; never use it with a real model for real images.
"""

from __future__ import annotations

import hashlib
import re

import torch
from typing_extensions import override

from comfy_api.latest import io

from .types import ZIMAGE_MODEL

_WORD = re.compile(r"\w+", re.UNICODE)


def hashed_features(text: str, width: int) -> torch.Tensor:
    """[1, L, width] features: a start token plus one vector per word, L >= 1."""
    words = ["<start>"] + [w.lower() for w in _WORD.findall(text)]
    rows = []
    for word in words:
        seed = int.from_bytes(hashlib.sha256(word.encode("utf-8")).digest()[:8], "little")
        rows.append(torch.randn(width, generator=torch.Generator().manual_seed(seed)))
    return torch.stack(rows)[None]


class ZImageTurboDemoConditioning(io.ComfyNode):
    @classmethod
    @override
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZImageTurboDemoConditioning",
            display_name="Z-Image Demo Conditioning (test only, no text encoder)",
            category="ZImageTurbo/demo",
            description="DEMO / TEST ONLY: deterministic hashed word vectors as CONDITIONING, for the pack's tiny "
                        "test and demo models where no real Qwen3-4B text encoder fits. It does not understand "
                        "language; for real images use CLIPLoader (qwen_3_4b, type lumina2) + CLIPTextEncode.",
            inputs=[
                io.String.Input("text", multiline=True, default="a photo of a cat",
                                tooltip="Prompt; each word becomes one fixed pseudo-random feature vector."),
                io.Int.Input("width", default=2560, min=8, max=8192,
                             tooltip="Feature width (the released model reads 2560). Ignored when a model is "
                                     "connected: its caption width is used."),
                ZIMAGE_MODEL.Input("model", optional=True,
                                   tooltip="Optional: take the feature width from this model."),
            ],
            outputs=[io.Conditioning.Output("CONDITIONING", display_name="CONDITIONING",
                                            tooltip="Stand-in text conditioning for the Z-Image sampler/trainer.")],
        )

    @classmethod
    @override
    def execute(cls, text, width, model=None) -> io.NodeOutput:
        if model is not None:
            width = model.config.cap_feat_dim
        return io.NodeOutput([[hashed_features(text, width), {}]])
