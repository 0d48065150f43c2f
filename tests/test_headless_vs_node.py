"""The headless encoder and the ComfyUI training node build the same cache from the same encoder files, and the two
caches train the same LoRA.

The node path is the node's own `comfy_encoders` around ComfyUI's real objects: the text encoder loaded by
ComfyUI's `load_clip` from the tiny `qwen_3_4b.safetensors` (ComfyUI's Qwen3 code, tokenizer and chat template; only
the hard-coded Qwen3-4B sizes are shrunk to the file's, and the detection is told it is that encoder: see
comfy_reference.tiny_qwen3_as_zimage_encoder), the VAE loaded by `comfy.sd.VAE` from `ae.safetensors` (ComfyUI fixes
the Flux VAE's widths, so that one is full size and random) and the model's Flux latent format.
The headless path reads the same two files, with the tokenizer folder ComfyUI itself uses."""

from __future__ import annotations

import pytest
import torch

from comfy_fixtures import comfy_host, write_random_flux_vae  # noqa: F401  (fixture)
from comfy_host import find_comfyui
from comfy_reference import tiny_qwen3_as_zimage_encoder
from tiny_encoders import comfy_tokenizer_dir, qwen3_config, tiny_encoders, write_images  # noqa: F401  (fixture)
from zimage_core.encoders import load_encoders
from zimage_core.testing import tiny_model
from zimage_core.training import TrainConfig, build_cache, train

pytestmark = [pytest.mark.comfy, pytest.mark.slow]


def comfy_clip_from_file(path):
    """ComfyUI's CLIPLoader path (load_clip, type lumina2, read as Z-Image's Qwen3 encoder) for a tiny Qwen3 file."""
    import comfy.sd

    with tiny_qwen3_as_zimage_encoder(qwen3_config()):
        return comfy.sd.load_clip(ckpt_paths=[str(path)], clip_type=comfy.sd.CLIPType.LUMINA2)


def test_node_and_headless_caches_are_equal_and_train_the_same_lora(comfy_host, tiny_encoders, tmp_path):
    import comfy.sd
    import comfy.utils

    vae_file = write_random_flux_vae(tmp_path / "ae.safetensors")
    clip = comfy_clip_from_file(tiny_encoders.text_single)
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(vae_file)))
    node = comfy_host.pack_module("nodes.train")
    latent_format = comfy_host.pack_module("nodes.types").ZImageShell(tiny_model(0), "none").latent_format
    node_encoders = node.comfy_encoders(clip, vae, latent_format)
    headless_encoders = load_encoders(text_encoder=tiny_encoders.text_single,
                                      tokenizer=comfy_tokenizer_dir(find_comfyui()), vae=vae_file)

    dataset = write_images(tmp_path / "dataset")
    prompts = ["a red fox at night"]
    a = build_cache(dataset, tmp_path / "node", node_encoders, max_pixels=4096, prompts=prompts)
    b = build_cache(dataset, tmp_path / "headless", headless_encoders, max_pixels=4096, prompts=prompts)
    assert [(e.caption, e.bucket) for e in a.entries] == [(e.caption, e.bucket) for e in b.entries]
    latent_diff = max(float((a.latent(i) - b.latent(i)).abs().max()) for i in range(len(a)))
    caption_diff = max(float((a.caption(i) - b.caption(i)).abs().max()) for i in range(len(a)))
    for i in range(len(a)):
        assert a.latent(i).shape == b.latent(i).shape and a.caption(i).shape == b.caption(i).shape
    torch.testing.assert_close(a.prompt_features(prompts[0]), b.prompt_features(prompts[0]), atol=1e-4, rtol=1e-5)
    assert latent_diff < 1e-4 and caption_diff < 1e-4

    runs = {}
    for name, cache in (("node", a), ("headless", b)):
        config = TrainConfig(scheme="sft", rank=4, steps=4, lr=3e-3, batch_size=1, seed=0, validate=False,
                             checkpoint_every=0, save_dtype="fp32", output_dir=str(tmp_path / f"out_{name}"),
                             output_name="fox", log_every=0)
        runs[name] = train(tiny_model(0), config, cache)
    losses = {k: torch.tensor(r.losses) for k, r in runs.items()}
    torch.testing.assert_close(losses["node"], losses["headless"], atol=1e-5, rtol=1e-4)
    from safetensors.torch import load_file
    lora_a, lora_b = (load_file(str(r.lora_path)) for r in runs.values())
    assert lora_a.keys() == lora_b.keys()
    lora_diff = max(float((lora_a[k] - lora_b[k]).abs().max()) for k in lora_a)
    moved = max(float(v.abs().max()) for k, v in lora_a.items() if "lora_B" in k)
    print(f"\nnode vs headless cache: latents max |diff| {latent_diff:.2g}, captions {caption_diff:.2g}; "
          f"4 SFT steps: losses {losses['node'].tolist()} vs {losses['headless'].tolist()}, "
          f"LoRA max |diff| {lora_diff:.2g} (largest lora_B {moved:.3g})")
    assert moved > 1e-3 and lora_diff < 1e-4
