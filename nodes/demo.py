"""DEMO / TEST ONLY nodes (category ZImageTurbo/demo): the toy world's text encoder and VAE, for tiny models.

ComfyUI's CLIPLoader builds only the real Qwen3-4B text encoder (2560-wide features) and VAELoader the real Flux VAE.
The pack's offline demo runs the toy world (toyworld/: a 1.9 M-parameter Z-Image model this project trained to draw
coloured shapes) and its tests run tiny random Z-Image models; no real encoder fits either, so these nodes stand in:

* ZImageTurboDemoTextEncoder: a CLIP-socket stand-in (`DemoTextEncoder`) with the methods ComfyUI's CLIPTextEncode
  and this pack's trainer call (`tokenize`, `encode_from_tokens_scheduled`). Each lower-cased word becomes the toy
  world's fixed word vector (pseudo-random, seeded by the SHA-256 of the word): at the toy model's width (32) these
  are exactly the captions it was trained on, so "red circle" draws a red circle; at other widths they are
  deterministic stand-in features for tiny test models. It carries no language understanding.
* ZImageTurboDemoConditioning: the same features, text -> CONDITIONING directly.
* ZImageTurboDemoVAE: the toy world's exact linear "VAE" (2x2 pixel blocks <-> 16 latent channels, factor 2) as a
  VAE-socket stand-in (`DemoVAE`) for VAEDecode, VAEEncode and the trainer. Only the toy world's models understand
  its latents.

Never use them with the real Z-Image-Turbo: load qwen_3_4b with CLIPLoader and ae.safetensors with VAELoader.
"""

from __future__ import annotations

import comfy.latent_formats
import torch
from typing_extensions import override

from comfy_api.latest import io

from ..toyworld.vae import FACTOR, LATENT_CHANNELS, ToyVAE
from ..toyworld.world import encode_text
from .metadata import search_aliases
from .types import ZIMAGE_MODEL


def hashed_features(text: str, width: int) -> torch.Tensor:
    """[1, L, width] features: the toy world's word vector of each lower-cased word (the empty prompt is one
    `<empty>` token), L >= 1."""
    return encode_text(text, width)[None]


def _width_inputs() -> list:
    """The feature width, or a model to take it from: shared by both text demo nodes."""
    return [
        io.Int.Input("width", default=2560, min=8, max=8192,
                     tooltip="Feature width (the released model reads 2560, the toy world's model 32). Ignored "
                             "when a model is connected: its caption width is used."),
        ZIMAGE_MODEL.Input("model", optional=True,
                           tooltip="Optional: take the feature width from this model."),
    ]


class DemoTextEncoder:
    """Stand-in for a ComfyUI CLIP object (demo/test only): the toy world's word vectors at a fixed width."""

    def __init__(self, width: int):
        self.width = int(width)
        self.encoder_id = f"zimage-demo-toyworld-words-v2:d{self.width}"  # keys the trainer's cache

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


class DemoVAE:
    """Stand-in for a ComfyUI VAE object (demo only): the toy world's linear VAE behind ComfyUI's LATENT convention.

    LATENT holds raw latents that the Z-Image nodes map into model space with the Flux latent format (process_in),
    as for the real Flux VAE; so encode returns Flux process_out of the toy latent and decode undoes it, and the toy
    model sees exactly the latents it was trained on."""

    latent_channels = LATENT_CHANNELS
    downscale_ratio = upscale_ratio = FACTOR

    def __init__(self, vae: ToyVAE):
        self.vae = vae
        self.latent_format = comfy.latent_formats.Flux()
        self.encoder_id = "zimage-demo-toyworld-vae-v1"  # keys the trainer's cache

    def spacial_compression_encode(self) -> int:  # ComfyUI's spelling
        return FACTOR

    def spacial_compression_decode(self) -> int:
        return FACTOR

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """IMAGE [B, H, W, C] in 0..1 -> raw LATENT [B, 16, H/2, W/2] (odd edges cropped)."""
        h, w = pixels.shape[1] // FACTOR * FACTOR, pixels.shape[2] // FACTOR * FACTOR
        images = pixels[:, :h, :w, :3].movedim(-1, 1).float().cpu()
        return self.latent_format.process_out(self.vae.encode(images))

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """raw LATENT [B, 16, h, w] -> IMAGE [B, 2h, 2w, 3] in 0..1."""
        images = self.vae.decode(self.latent_format.process_in(samples.float().cpu()))
        return images.clamp(0, 1).movedim(1, -1)


class ZImageTurboDemoTextEncoder(io.ComfyNode):
    @classmethod
    @override
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZImageTurboDemoTextEncoder",
            display_name="Z-Image Demo Text Encoder (toy world / tests only)",
            category="ZImageTurbo/demo",
            **search_aliases("toy world", "demo", "text encoder"),
            description="DEMO / TEST ONLY: a stand-in text encoder for the CLIP socket (CLIPTextEncode, the "
                        "trainer) that turns each word into the toy world's fixed word vector: the captions the "
                        "toy world's model was trained on (connect its model), or stand-in features for tiny test "
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
            display_name="Z-Image Demo Conditioning (toy world / tests only)",
            category="ZImageTurbo/demo",
            **search_aliases("toy world", "demo", "conditioning"),
            description="DEMO / TEST ONLY: the toy world's word vectors as CONDITIONING, for the toy world's model "
                        "and the pack's tiny test models, where no real Qwen3-4B text encoder fits. It does not "
                        "understand language; for real images use CLIPLoader (qwen_3_4b, type lumina2) + "
                        "CLIPTextEncode.",
            inputs=[
                io.String.Input("text", multiline=True, default="red circle",
                                tooltip="Prompt; each word becomes one fixed feature vector (the toy world knows "
                                        "'<colour> <shape>': red/green/blue/yellow, circle/square/triangle)."),
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


class ZImageTurboDemoVAE(io.ComfyNode):
    @classmethod
    @override
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZImageTurboDemoVAE",
            display_name="Z-Image Demo VAE (toy world only)",
            category="ZImageTurbo/demo",
            **search_aliases("toy world", "demo", "vae"),
            description="DEMO ONLY: the toy world's exact linear VAE (2x2 pixel blocks <-> 16 latent channels, so "
                        "a 16x16 latent is a 32x32 image) for VAEDecode, VAEEncode and the trainer, loaded from the "
                        "pack's toyworld/weights. Only the toy world's models draw in its latent space; for real "
                        "images load ae.safetensors with VAELoader. EmptySD3LatentImage counts 8 pixels per latent "
                        "cell (the Flux VAE's): 128x128 there gives the toy world's 32x32 images.",
            inputs=[],
            outputs=[io.Vae.Output("VAE", display_name="VAE",
                                   tooltip="The toy world's VAE, for VAEDecode / VAEEncode / the Z-Image trainer.")],
        )

    @classmethod
    @override
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(DemoVAE(ToyVAE.load()))
