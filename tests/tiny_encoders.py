"""Tiny random Z-Image encoders on disk, in both layouts the headless encoder reads (test helper).

* diffusers repository layout: `text_encoder/` (transformers Qwen3Model), `tokenizer/`, `vae/` (AutoencoderKL);
* ComfyUI's single files: `qwen_3_4b.safetensors` (transformers key names, no lm_head) and `ae.safetensors` (the
  original BFL / LDM key layout, written here from the diffusers weights by the inverse of diffusers' conversion).

The tokenizer is the real Qwen vocabulary (the qwen25_tokenizer folder ComfyUI ships) with Qwen3's chat template, so
diffusers' `apply_chat_template(enable_thinking=True)` renders prompts as Z-Image-Turbo's tokenizer does. The text
encoder is 48 wide, the caption width of `zimage_core.testing.tiny_model`, so its features train that model.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

# The branches of Qwen3's (hybrid thinking) chat template that a single user turn takes: an optional system turn,
# the messages, and the generation prompt, which gets an empty think block only for enable_thinking=False.
QWEN3_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
TEXT_WIDTH = 48  # = ZImageConfig.tiny().cap_feat_dim
QWEN_VOCAB = 151936  # Qwen3-4B's embedding rows (the tokenizer's ids reach 151668)


def qwen3_config(**overrides):
    from transformers import Qwen3Config

    base = dict(vocab_size=QWEN_VOCAB, hidden_size=TEXT_WIDTH, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                max_position_embeddings=40960, tie_word_embeddings=True, initializer_range=0.2)
    base.update(overrides)
    return Qwen3Config(**base)


def tiny_qwen3(seed: int = 0, **overrides):
    from transformers import Qwen3Model

    torch.manual_seed(seed)
    return Qwen3Model(qwen3_config(**overrides)).eval()


def tiny_vae(seed: int = 0, latent_channels: int = 16):
    """A tiny AutoencoderKL of the Flux VAE's kind (4 levels: factor 8; no quant convs; mid attention), 32 wide."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        block_out_channels=[32, 32, 32, 32], layers_per_block=1, norm_num_groups=32,
                        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    with torch.no_grad():  # diffusers zero-initialises nothing here, but make every path carry signal
        for p in vae.parameters():
            if p.ndim == 1 and p.abs().sum() == 0:
                p.normal_(0, 0.1)
    return vae.eval()


def qwen_tokenizer_dir(dest: Path, comfy_dir: Path, chat_template: str | None = QWEN3_CHAT_TEMPLATE) -> Path:
    """ComfyUI's Qwen vocabulary with Qwen3's chat template (chat_template=None keeps ComfyUI's Qwen2.5 one)."""
    source = comfy_tokenizer_dir(comfy_dir)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(source / name, dest / name)
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    if chat_template is not None:
        config["chat_template"] = chat_template
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return dest


# diffusers AutoencoderKL name -> original (BFL / LDM) name, the inverse of diffusers' convert_ldm_vae_checkpoint
_RESNET = {"conv_shortcut": "nin_shortcut"}
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def ldm_vae_state_dict(vae) -> dict[str, torch.Tensor]:
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        name = key
        name = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", name)
        name = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
        name = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                      lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.block.{m.group(2)}.", name)
        name = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                      lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.upsample.", name)
        name = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", name)
        attn = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)$",
                        name)
        if attn:
            name = f"{attn.group(1)}.mid.attn_1.{_ATTN[attn.group(2)]}.{attn.group(3)}"
            if value.ndim == 2:
                value = value[:, :, None, None]  # the original attention uses 1x1 convolutions
        name = name.replace(".conv_norm_out.", ".norm_out.")
        for new, old in _RESNET.items():
            name = name.replace(f".{new}.", f".{old}.")
        out[name] = value.contiguous()
    return out


@dataclass
class TinyEncoderFiles:
    repo: Path  # diffusers layout: text_encoder/, tokenizer/, vae/
    text_single: Path  # qwen_3_4b.safetensors (ComfyUI)
    vae_single: Path  # ae.safetensors (original layout)
    tokenizer: Path  # = repo / "tokenizer"
    qwen: torch.nn.Module
    vae: torch.nn.Module


def write_tiny_encoders(root: Path, comfy_dir: Path, seed: int = 0) -> TinyEncoderFiles:
    from safetensors.torch import save_file

    root = Path(root)
    qwen, vae = tiny_qwen3(seed), tiny_vae(seed)
    repo = root / "Z-Image-Tiny"
    qwen.save_pretrained(repo / "text_encoder", safe_serialization=True)
    vae.save_pretrained(repo / "vae", safe_serialization=True)
    tokenizer = qwen_tokenizer_dir(repo / "tokenizer", comfy_dir)
    comfy = root / "comfy_models"
    comfy.mkdir(parents=True, exist_ok=True)
    text_single = comfy / "qwen_3_4b.safetensors"
    save_file({f"model.{k}": v.contiguous() for k, v in qwen.state_dict().items()}, str(text_single))
    vae_single = comfy / "ae.safetensors"
    save_file(ldm_vae_state_dict(vae), str(vae_single))
    return TinyEncoderFiles(repo, text_single, vae_single, tokenizer, qwen, vae)


SIZES = [(64, 48), (48, 64), (64, 48)]  # two buckets


def write_images(folder: Path, sizes=SIZES, seed: int = 0) -> Path:
    """Random images with same-name .txt captions."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"picture {i}: a red fox, {w}x{h}", encoding="utf-8")
    return folder


def comfy_tokenizer_dir(comfy_dir: Path) -> Path:
    """The Qwen tokenizer folder ComfyUI ships and uses for Z-Image (Qwen2.5's chat template)."""
    return comfy_dir / "comfy" / "text_encoders" / "qwen25_tokenizer"


try:
    import pytest
except ImportError:
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def tiny_encoders(tmp_path_factory) -> TinyEncoderFiles:
        """The tiny encoders written once per test session, in both layouts."""
        from comfy_host import find_comfyui

        return write_tiny_encoders(tmp_path_factory.mktemp("tiny_encoders"), find_comfyui())
