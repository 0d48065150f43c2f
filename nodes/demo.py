"""DEMO / TEST ONLY nodes: deterministic stand-in text features for tiny models (category ZImageTurbo/demo).

ComfyUI's CLIPLoader only builds the real Qwen3-4B text encoder (2560-wide features). The pack's tests and its
offline demo run tiny Z-Image models (e.g. 48-wide caption features) that no real encoder fits, so this node makes
text features from hashed word vectors: each lower-cased word maps to a fixed pseudo-random vector (seeded by the
SHA-256 of the word), so the same prompt always gives the same features and different prompts differ. It carries no
language understanding at all; never use it with a real model for real images.

* ZImageTurboDemoConditioning: text -> CONDITIONING directly.
* ZImageTurboDemoTextEncoder: a CLIP-socket stand-in (`DemoTextEncoder`) with the two methods ComfyUI's
  CLIPTextEncode and this pack's trainer call (`tokenize`, `encode_from_tokens_scheduled`), so demo workflows keep
  the shape of real ones (CLIPTextEncode, trainer `clip` input) with a tiny model.
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


def _width_inputs() -> list:
    """The feature width, or a model to take it from: shared by both demo nodes."""
    return [
        io.Int.Input("width", default=2560, min=8, max=8192,
                     tooltip="Feature width (the released model reads 2560). Ignored when a model is "
                             "connected: its caption width is used."),
        ZIMAGE_MODEL.Input("model", optional=True,
                           tooltip="Optional: take the feature width from this model."),
    ]


class DemoTextEncoder:
    """Stand-in for a ComfyUI CLIP object (demo/test only): hashed word vectors of a fixed width."""

    def __init__(self, width: int):
        self.width = int(width)
        self.encoder_id = f"zimage-demo-hashed-words-v1:d{self.width}"

    def clone(self):
        return self

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return {"demo_text": text}

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        features = hashed_features(tokens["demo_text"], self.width)
        if return_dict:
            return {"cond": features, "pooled_output": None}
        return (features, None) if return_pooled else features

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict=None, show_pbar=True):
        return [[hashed_features(tokens["demo_text"], self.width), dict(add_dict or {})]]


class ZImageTurboDemoTextEncoder(io.ComfyNode):
    @classmethod
    @override
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZImageTurboDemoTextEncoder",
            display_name="Z-Image Demo Text Encoder (test only, hashed words)",
            category="ZImageTurbo/demo",
            description="DEMO / TEST ONLY: a stand-in text encoder for the CLIP socket (CLIPTextEncode, the "
                        "trainer) that turns each word into a fixed pseudo-random vector, for tiny demo/test "
                        "models. It does not understand language; for real images load qwen_3_4b with CLIPLoader.",
            inputs=_width_inputs(),
            outputs=[io.Clip.Output("CLIP", display_name="CLIP",
                                    tooltip="Stand-in text encoder for CLIPTextEncode and the Z-Image trainer.")],
        )

    @classmethod
    @override
    def execute(cls, width, model=None) -> io.NodeOutput:
        return io.NodeOutput(DemoTextEncoder(model.config.cap_feat_dim if model is not None else width))


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
                *_width_inputs(),
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
