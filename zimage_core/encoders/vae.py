"""The Flux VAE encoder (diffusers' AutoencoderKL): training images to Z-Image's model-space latents.

A latent is the mean of the VAE's posterior (ComfyUI's VAEEncode takes the mode, not a sample) moved into the model
space as ComfyUI's Flux latent format does it, `(z - 0.1159) * 0.3611` (diffusers' pipelines apply the same
shift_factor / scaling_factor of Z-Image-Turbo's vae/config.json), from pixels in 0..1 mapped to -1..1. That is
what the ComfyUI training node stores, so both paths build the same cache from the same VAE weights.

Weights: a diffusers folder (`vae/` of the diffusers repository) or a single file: ComfyUI's / BFL's `ae.safetensors`
in the original key layout (`encoder.down.0.block.0...`, converted with diffusers' own single-file helper; the config
is read from the tensor shapes), or a single file in diffusers' key layout.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..safetensors_io import describe_lookalike
from .common import EncoderError, common_prefix, open_safetensors, read_component_config, read_state_dict, require, \
    safetensors_files, weights_id

FLUX_SHIFT_FACTOR = 0.1159  # ComfyUI comfy/latent_formats.py Flux; Z-Image-Turbo vae/config.json shift_factor
FLUX_SCALE_FACTOR = 0.3611  # ... scaling_factor
LATENT_CHANNELS = 16
NORM_GROUPS = 32  # every Flux / SD VAE; not recorded in the weights
_PREFIXES = ("first_stage_model.", "vae.")
_LOOKALIKES = [
    ("model.layers.0.self_attn", "a text encoder"),
    ("cap_embedder", "a Z-Image transformer"),
    ("double_blocks.", "a Flux transformer"),
    ("input_blocks.", "a Stable Diffusion checkpoint without its VAE"),
    ("lora_", "a LoRA"),
]


class FluxVaeEncoder:
    """Callable PIL image (RGB, sides multiples of 8) -> latent [16, H/8, W/8] (fp32, CPU) in model space."""

    def __init__(self, vae: torch.nn.Module, encoder_id: str, source: Path):
        self.vae = vae
        self.encoder_id = encoder_id
        self.source = source

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent cell along each side (8 for the Flux VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> Tensor:
        # the float pixels of a ComfyUI IMAGE, then ComfyUI's (and diffusers') 2x - 1
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
        x = (pixels.permute(2, 0, 1)[None] * 2.0 - 1.0).to(next(self.vae.parameters()).device)
        mean = self.vae.encode(x).latent_dist.mode()
        return ((mean.float() - FLUX_SHIFT_FACTOR) * FLUX_SCALE_FACTOR)[0].cpu()


def load_vae_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> FluxVaeEncoder:
    """The Flux VAE (fp32) from a diffusers folder or a single .safetensors file."""
    diffusers = require("diffusers", "the headless image encoder (the Flux VAE)")
    path = Path(path)
    if path.is_dir():
        vae, files = _load_folder(diffusers, path)
    elif path.is_file():
        vae, files = _load_single_file(diffusers, path)
    else:
        raise EncoderError(f"VAE {path} does not exist (Z-Image-Turbo's vae/ folder, or ComfyUI's ae.safetensors)")
    vae = vae.to(device).eval().requires_grad_(False)
    return FluxVaeEncoder(vae, f"flux-vae:{weights_id(files)}", path)


def _wrong_channels(source: Path, channels: int) -> EncoderError:
    kind = " (an SD 1.x / SDXL VAE has 4, the Flux 2 VAE 32)" if channels in (4, 32) else ""
    return EncoderError(f"{source}: the VAE has {channels} latent channels{kind}; Z-Image needs the 16-channel Flux "
                        "VAE (ae.safetensors)")


def _load_folder(diffusers, folder: Path):
    config_file, config = read_component_config(folder, "VAE", "Z-Image-Turbo's vae/")
    if config.get("_class_name") != "AutoencoderKL":
        raise EncoderError(f"{config_file} describes a {config.get('_class_name')!r}, not the Flux VAE "
                           "(AutoencoderKL)")
    if config.get("latent_channels") != LATENT_CHANNELS:
        raise _wrong_channels(config_file, config.get("latent_channels"))
    factors = (config.get("shift_factor"), config.get("scaling_factor"))
    if factors != (FLUX_SHIFT_FACTOR, FLUX_SCALE_FACTOR):
        raise EncoderError(f"{config_file} has shift_factor / scaling_factor {factors}, not the Flux VAE's "
                           f"({FLUX_SHIFT_FACTOR}, {FLUX_SCALE_FACTOR}): it is another model's VAE (SD3's has 16 "
                           "channels too)")
    files = safetensors_files(folder, "VAE")
    vae = diffusers.AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True,
                                                  use_safetensors=True)
    return vae, files


def _load_single_file(diffusers, path: Path):
    file = open_safetensors(path)
    prefix = common_prefix(file.keys(), _PREFIXES)
    shapes = {k[len(prefix):]: info.shape for k, info in file.tensors.items()}
    if "encoder.conv_in.weight" not in shapes or "encoder.conv_out.weight" not in shapes:
        what = describe_lookalike(shapes, _LOOKALIKES)
        raise EncoderError(f"{path} is not a VAE (no encoder.conv_in.weight / encoder.conv_out.weight){what}")
    channels = shapes["encoder.conv_out.weight"][0] // 2  # the encoder outputs mean and log-variance
    if channels != LATENT_CHANNELS:
        raise _wrong_channels(path, channels)
    original_layout = any(k.startswith("encoder.down.") for k in shapes)
    config = _config_from_shapes(shapes, original_layout)
    state = read_state_dict(file, prefix)
    if original_layout:
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
        state = convert_ldm_vae_checkpoint(state, config)
    vae = diffusers.AutoencoderKL(**config)
    result = vae.load_state_dict(state, strict=False)
    # Only the encoder half is used; a file without the decoder still encodes.
    missing = [k for k in result.missing_keys if not k.startswith(("decoder.", "post_quant_conv."))]
    if missing or result.unexpected_keys:
        raise EncoderError(f"{path} does not fit the VAE its shapes describe: missing {missing[:5]}, unexpected "
                           f"{result.unexpected_keys[:5]}")
    return vae, [path]


def _config_from_shapes(shapes: dict[str, tuple], original_layout: bool) -> dict:
    if original_layout:
        down, block, conv2, attn = r"encoder\.down\.(\d+)\.", r"encoder\.down\.0\.block\.(\d+)\.", \
            "encoder.down.{}.block.0.conv2.weight", "encoder.mid.attn_1.q.weight"
    else:
        down, block, conv2, attn = r"encoder\.down_blocks\.(\d+)\.", r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", \
            "encoder.down_blocks.{}.resnets.0.conv2.weight", "encoder.mid_block.attentions.0.to_q.weight"

    def count(pattern: str) -> int:
        return 1 + max(int(m.group(1)) for k in shapes if (m := re.match(pattern, k)))

    levels = count(down)
    return dict(in_channels=shapes["encoder.conv_in.weight"][1], out_channels=3, latent_channels=LATENT_CHANNELS,
                down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
                block_out_channels=[shapes[conv2.format(i)][0] for i in range(levels)],
                layers_per_block=count(block), norm_num_groups=NORM_GROUPS, act_fn="silu",
                scaling_factor=FLUX_SCALE_FACTOR, shift_factor=FLUX_SHIFT_FACTOR,
                use_quant_conv="quant_conv.weight" in shapes, use_post_quant_conv="post_quant_conv.weight" in shapes,
                mid_block_add_attention=attn in shapes)
