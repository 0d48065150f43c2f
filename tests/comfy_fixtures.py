"""Test fixtures for the ComfyUI host (tools/comfy_host.py): the tiny model files, the test prompts and the pytest
fixtures `comfy_host` / `comfy_models` (registered for every test module by conftest.py).

Model files (deterministic; written into a models folder): `write_tiny_transformer`, `write_random_flux_vae`
(ComfyUI hard-codes the Flux VAE's channel widths, so it is full size: ~84 M random params, generated once per
machine into a cache folder), `write_lora`, `write_foreign_lora`; `write_test_models` puts them all in a host.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from comfy_host import InProcessHost, in_process_host, write_dataset

NODE_IDS = ("ZImageTurboModelLoader", "ZImageTurboLoraStack", "ZImageTurboSampler", "ZImageTurboTrainLora",
            "ZImageTurboControlNetLoader", "ZImageTurboApplyControlNet", "ZImageTurboToModel")
DEMO_NODE_IDS = ("ZImageTurboDemoConditioning",)


# =============================================================================================== model files
def cache_dir() -> Path:
    path = Path(os.environ.get("ZIMAGE_TEST_CACHE", Path(tempfile.gettempdir()) / "zimage-test-cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_tiny_transformer(path: str | os.PathLike, seed: int = 0, layout: str = "diffusers", prefix: str = "",
                           dtype=None, **config_overrides) -> Path:
    """A random tiny Z-Image transformer (zimage_core.testing.tiny_model) as a .safetensors file."""
    import torch
    from zimage_core import save_transformer
    from zimage_core.testing import tiny_model

    return save_transformer(tiny_model(seed, **config_overrides), path, layout=layout, prefix=prefix,
                            dtype=dtype or torch.float32)


FLUX_VAE_DDCONFIG = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                     "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def flux_vae_state_dict(seed: int = 0) -> dict:
    """Random weights with the exact key names and shapes of the Flux VAE (ae.safetensors), which ComfyUI's
    comfy.sd.VAE recognises by `decoder.conv_in.weight` with 16 latent channels and no post_quant_conv. ComfyUI
    builds that VAE with fixed widths (ch 128, ch_mult 1-2-4-4), so a narrower random VAE cannot load: it is full
    size. Deterministic: weights N(0, 1/fan_in), norms 1/0, biases 0."""
    import torch
    from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder

    with torch.device("meta"):
        parts = {"encoder": Encoder(**FLUX_VAE_DDCONFIG), "decoder": Decoder(**FLUX_VAE_DDCONFIG)}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, module in parts.items():
        for name, tensor in sorted(module.state_dict().items()):
            if tensor.ndim >= 2:
                fan_in = tensor[0].numel()
                value = torch.randn(tensor.shape, generator=gen) / fan_in ** 0.5
            elif "norm" in name and name.endswith("weight"):
                value = torch.ones(tensor.shape)
            else:
                value = torch.zeros(tensor.shape)
            out[f"{prefix}.{name}"] = value.to(torch.bfloat16)
    return out


def write_random_flux_vae(path: str | os.PathLike, seed: int = 0) -> Path:
    """Copy (hard-link when possible) a cached random Flux-architecture VAE to `path`. Needs ComfyUI importable."""
    from safetensors.torch import save_file

    cached = cache_dir() / f"flux_vae_random_seed{seed}_v1.safetensors"
    if not cached.is_file():
        tmp = cached.with_name(cached.name + f".{os.getpid()}.tmp")
        save_file(flux_vae_state_dict(seed), str(tmp))
        os.replace(tmp, cached)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        try:
            os.link(cached, path)
        except OSError:
            shutil.copyfile(cached, path)
    return path


def lora_tensors(config, fmt: str = "peft", rank: int = 4, seed: int = 1, scale: float = 0.05,
                 targets=("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                          "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")) -> dict:
    """A random LoRA for a model of `config` in a producer's key layout:
    fmt "peft": `diffusion_model.layers.0.attention.to_q.lora_A.weight` (ai-toolkit / this pack's export);
    fmt "diffsynth": `layers.0.attention.to_q.lora_A.default.weight` (DiffSynth, the DistillPatch's layout)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    dim, ffn = config.dim, config.ffn_dim
    shapes = {"attention.to_q": (dim, dim), "attention.to_k": (dim, dim), "attention.to_v": (dim, dim),
              "attention.to_out.0": (dim, dim), "feed_forward.w1": (ffn, dim), "feed_forward.w2": (dim, ffn),
              "feed_forward.w3": (ffn, dim)}
    blocks = ([f"layers.{i}" for i in range(config.n_layers)]
              + [f"noise_refiner.{i}" for i in range(config.n_refiner_layers)]
              + [f"context_refiner.{i}" for i in range(config.n_refiner_layers)])
    out = {}
    for block in blocks:
        for target in targets:
            out_f, in_f = shapes[target]
            down = torch.randn(rank, in_f, generator=gen) * scale
            up = torch.randn(out_f, rank, generator=gen) * scale
            stem = f"{block}.{target}"
            if fmt == "peft":
                out[f"diffusion_model.{stem}.lora_A.weight"], out[f"diffusion_model.{stem}.lora_B.weight"] = down, up
            elif fmt == "diffsynth":
                out[f"{stem}.lora_A.default.weight"], out[f"{stem}.lora_B.default.weight"] = down, up
            else:
                raise ValueError(f"unknown LoRA layout {fmt!r}")
    return out


def write_lora(path: str | os.PathLike, config, fmt: str = "peft", **kwargs) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in lora_tensors(config, fmt, **kwargs).items()}, str(path))
    return path


def write_foreign_lora(path: str | os.PathLike, seed: int = 3) -> Path:
    """A LoRA for another model (SDXL UNet kohya keys), which must be refused by name."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    stem = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    tensors = {f"{stem}.lora_down.weight": torch.randn(4, 640, generator=gen),
               f"{stem}.lora_up.weight": torch.randn(640, 4, generator=gen), f"{stem}.alpha": torch.tensor(4.0)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


# =============================================================================================== test models + graphs
@dataclass
class ModelFiles:
    """Names (as the nodes list them) of the tiny model files written by `write_test_models`."""

    config: object  # the ZImageConfig of the tiny transformer
    transformer: str = "zimage_tiny.safetensors"  # diffusers layout, fp32: equals zimage_core.testing.tiny_model(0)
    transformer_comfy: str = "zimage_tiny_comfy.safetensors"  # the same weights, ComfyUI fused-qkv layout + prefix
    user_lora: str = "user_style.safetensors"  # ai-toolkit / peft layout
    user_lora2: str = "user_other.safetensors"
    distillpatch: str = "z_image_turbo_distill_patch_lora_bf16.safetensors"  # Comfy-Org's name; DiffSynth layout
    foreign_lora: str = "sdxl_style.safetensors"  # an SDXL LoRA
    foreign_model: str = "not_zimage.safetensors"  # an SDXL-UNet-like checkpoint in diffusion_models
    vae: str = "ae.safetensors"  # random Flux-architecture VAE
    dataset: str = "zimage_dataset"  # in ComfyUI's input folder: 2 images with .txt captions
    empty_dataset: str = "zimage_empty_dataset"
    image: str = "zimage_test_image.png"  # in ComfyUI's input folder, for LoadImage -> VAEEncode


_MODELS: ModelFiles | None = None


def write_test_models(host: InProcessHost) -> ModelFiles:
    """Write (once per process) the tiny model files into the host's models and input folders."""
    global _MODELS
    if _MODELS is None:
        import torch
        from safetensors.torch import save_file
        from zimage_core.testing import tiny_model

        m = ModelFiles(config=tiny_model(0).config)
        models = host.models_dir
        write_tiny_transformer(models / "diffusion_models" / m.transformer, seed=0)
        write_tiny_transformer(models / "diffusion_models" / m.transformer_comfy, seed=0, layout="comfyui",
                               prefix="model.diffusion_model.")
        write_lora(models / "loras" / m.user_lora, m.config, "peft", seed=1)
        write_lora(models / "loras" / m.user_lora2, m.config, "peft", seed=5, rank=2,
                   targets=("attention.to_q", "attention.to_v"))
        write_lora(models / "loras" / m.distillpatch, m.config, "diffsynth", seed=2)
        write_foreign_lora(models / "loras" / m.foreign_lora)
        save_file({"input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3), "time_embed.0.weight": torch.zeros(8, 8)},
                  str(models / "diffusion_models" / m.foreign_model))
        write_random_flux_vae(models / "vae" / m.vae)
        write_dataset(host.base_dir / "input" / m.dataset, n=2, size=32)
        shutil.copyfile(host.base_dir / "input" / m.dataset / "img0.png", host.base_dir / "input" / m.image)
        (host.base_dir / "input" / m.empty_dataset).mkdir(exist_ok=True)
        (host.base_dir / "input" / m.empty_dataset / "notes.md").write_text("no images here")
        _MODELS = m
    return _MODELS


def t2i_prompt(m: ModelFiles, loras=(), distillpatch: str | None = None, seed: int = 42, steps: int = 8,
               preset: str = "turbo", cfg: float = 1.0, size: int = 64, text: str = "a red fox in the snow",
               weight_dtype: str = "fp32", transformer: str | None = None, save: bool = True,
               prefix: str = "zimage_t2i") -> dict:
    """API prompt: loader -> LoRA stack -> Turbo sampler (demo conditioning) -> VAEDecode -> SaveImage.
    Without `save` the sampler's LATENT goes to PreviewAny (no VAE). loras: [(name, strength)] (up to 3)."""
    slots = list(loras) + [("None", 1.0)] * (3 - len(loras))
    prompt = {
        "1": {"class_type": "ZImageTurboModelLoader",
              "inputs": {"model_name": transformer or m.transformer, "weight_dtype": weight_dtype, "offload": "none"}},
        "2": {"class_type": "ZImageTurboLoraStack",
              "inputs": {"model": ["1", 0], "distillpatch": distillpatch or "None", "distillpatch_strength": 1.0,
                         **{k: v for i, (name, strength) in enumerate(slots[:3], 1)
                            for k, v in ((f"lora_{i}", name), (f"strength_{i}", strength))}}},
        "3": {"class_type": "ZImageTurboDemoConditioning", "inputs": {"text": text, "width": 2560, "model": ["1", 0]}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "ZImageTurboSampler",
              "inputs": {"model": ["2", 0], "positive": ["3", 0], "latent_image": ["4", 0], "preset": preset,
                         "steps": steps, "cfg": cfg, "shift": 3.0, "seed": seed, "denoise": 1.0}},
    }
    if save:
        prompt.update({
            "6": {"class_type": "VAELoader", "inputs": {"vae_name": m.vae}},
            "7": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["6", 0]}},
            "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
        })
    else:
        prompt["8"] = {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}}
    return prompt


def train_prompt(m: ModelFiles, scheme: str = "sft", steps: int = 3, output_name: str = "trained_sft",
                 preset_lora: str = "None", sft_lora: str = "None", dataset: str | None = None,
                 distillpatch: str | None = None, lr: float = 1e-3, seed: int = 0, **options) -> dict:
    """API prompt: loader -> (stack) -> trainer (demo text encoder, real VAE) -> sampler -> VAEDecode -> SaveImage,
    plus PreviewImage of the loss curve and validation grid. `options` sets further trainer inputs."""
    prompt = t2i_prompt(m, distillpatch=distillpatch, prefix=f"after_{output_name}", steps=8, size=32)
    prompt["2"]["inputs"]["model"] = ["1", 0]
    prompt.update({
        "10": {"class_type": "ZImageTurboDemoTextEncoder", "inputs": {"width": 2560, "model": ["1", 0]}},
        "11": {"class_type": "ZImageTurboTrainLora",
               "inputs": {"model": ["2", 0], "clip": ["10", 0], "vae": ["6", 0], "dataset_folder": dataset or m.dataset,
                          "scheme": scheme, "preset_lora": preset_lora, "sft_lora": sft_lora, "steps": steps,
                          "learning_rate": lr, "rank": 4, "targets": "to_q,to_k,to_v,to_out.0,w1,w2,w3",
                          "max_pixels": 1024, "seed": seed, "validation_prompt": "a red fox",
                          "output_name": output_name, **options}},
        "12": {"class_type": "PreviewImage", "inputs": {"images": ["11", 2]}},
        "13": {"class_type": "PreviewImage", "inputs": {"images": ["11", 3]}},
    })
    prompt["5"]["inputs"]["model"] = ["11", 0]
    return prompt


# =============================================================================================== pytest fixtures
@pytest.fixture(scope="session")
def comfy_host() -> InProcessHost:
    """The in-process ComfyUI host (one per test process, whichever modules use this fixture)."""
    return in_process_host()


@pytest.fixture(scope="session")
def comfy_models(comfy_host) -> ModelFiles:
    """The tiny model files, written once into the host's folders."""
    return write_test_models(comfy_host)
