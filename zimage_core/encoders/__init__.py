"""Dataset encoding without ComfyUI: Z-Image's real text encoder and VAE as the trainer's `Encoders`.

* Text: Qwen3-4B through `transformers`, prompts encoded exactly as diffusers' `ZImagePipeline.encode_prompt` does
  (`text.py`).
* Images: the Flux VAE through diffusers' `AutoencoderKL`, latents in the model space of ComfyUI's Flux latent
  format (`vae.py`).

Both load from the diffusers repository layout (`text_encoder/`, `tokenizer/`, `vae/` of Tongyi-MAI/Z-Image-Turbo)
or from ComfyUI's single files (`qwen_3_4b.safetensors` with a tokenizer folder, `ae.safetensors`). `transformers`
and `diffusers` are optional dependencies of this headless path only and are imported on first use; the node pack
never imports this package (inside ComfyUI the node uses ComfyUI's own CLIP and VAE).
`python -m zimage_core encode` (cli.py) builds the trainer's cache with them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..training.data import Encoders
from .common import EncoderError
from .text import MAX_SEQUENCE_LENGTH, PromptEncoder, load_prompt_encoder
from .vae import FLUX_SCALE_FACTOR, FLUX_SHIFT_FACTOR, FluxVaeEncoder, load_vae_encoder

__all__ = ["EncoderError", "FLUX_SCALE_FACTOR", "FLUX_SHIFT_FACTOR", "FluxVaeEncoder", "MAX_SEQUENCE_LENGTH",
           "PromptEncoder", "load_encoders", "load_prompt_encoder", "load_vae_encoder"]


def load_encoders(model_dir: str | os.PathLike | None = None, text_encoder: str | os.PathLike | None = None,
                  tokenizer: str | os.PathLike | None = None, vae: str | os.PathLike | None = None,
                  device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Encoders:
    """The trainer's Encoders from a diffusers repository folder (`model_dir` with text_encoder/, tokenizer/, vae/)
    and/or explicit parts, which take precedence: `text_encoder` (a transformers folder or ComfyUI's single file),
    `tokenizer` (a folder), `vae` (a diffusers folder or ae.safetensors). The text encoder runs in `dtype`, the VAE
    in fp32 (it is small, and its latents are the training targets)."""
    root = Path(model_dir) if model_dir is not None else None
    if root is not None and not root.is_dir():
        raise EncoderError(f"model folder {root} does not exist (expected a diffusers repository folder with "
                           "text_encoder/, tokenizer/ and vae/)")

    def part(explicit, name: str) -> Path | None:
        if explicit is not None:
            return Path(explicit)
        if root is None:
            return None
        path = root / name
        if not path.is_dir():
            raise EncoderError(f"model folder {root} has no {name}/ (a diffusers repository of Z-Image-Turbo has "
                               f"text_encoder/, tokenizer/ and vae/); pass --{name.replace('_', '-')} instead")
        return path

    te_path, tok_path, vae_path = part(text_encoder, "text_encoder"), part(tokenizer, "tokenizer"), part(vae, "vae")
    if te_path is None or vae_path is None:
        raise EncoderError("no text encoder or VAE given: pass --model (a diffusers repository folder) or both "
                           "--text-encoder and --vae")
    if tok_path is None and (te_path / "tokenizer_config.json").is_file():
        tok_path = te_path  # a transformers folder that carries its tokenizer
    text = load_prompt_encoder(te_path, tok_path, device="cpu", dtype=dtype)
    image = load_vae_encoder(vae_path, device="cpu")
    turns = _Turns(torch.device(device))

    def encode_text(prompt: str):
        turns.use(text.model)
        return text(prompt)

    def encode_image(im):
        turns.use(image.vae)
        return image(im)

    return Encoders(encode_image, encode_text, f"zimage-headless-v1:text={text.encoder_id}:vae={image.encoder_id}")


class _Turns:
    """The text encoder and the VAE take turns on the device: the one about to run is moved there and the other
    back to the CPU. Both at once need 10.3 GiB for 1024² images, in turn at most 7.7 (the text encoder; measured
    by benchmarks/bench_memory.py --encoders); build_cache encodes every caption before the first image, so they
    swap once."""

    def __init__(self, device: torch.device):
        self.device, self.current = device, None

    def use(self, model: torch.nn.Module) -> None:
        if self.current is model:
            return
        if self.current is not None and self.device.type != "cpu":
            self.current.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        model.to(self.device)
        self.current = model
