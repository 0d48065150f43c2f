"""The trainer node follows the loader onto a quantized base, in a real ComfyUI 0.3.75 (tools/comfy_host.py): a
comfy_quant nvfp4 file chosen in the model loader (block offload on) trains through the trainer node with the
checkpointed block inputs in host RAM; the LoRA names the base's format, the checkpoint keeps the option."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from comfy_fixtures import train_prompt  # comfy_host / comfy_models fixtures come from conftest

import comfy_kitchen  # noqa: E402,F401  (pinned test requirement: missing fails)

NAME = "zimage_tiny_nvfp4.safetensors"


def test_trainer_node_trains_on_the_quantized_base_the_loader_loaded(comfy_host, comfy_models):
    from comfy_quant_fixtures import write_file

    from zimage_core.checkpoint import load_transformer
    from zimage_core.lora import load_lora
    from zimage_core.training.checkpoint import load_checkpoint

    m = comfy_models
    models = comfy_host.models_dir / "diffusion_models"
    if not (models / NAME).is_file():  # the host's tiny transformer, its block Linears in nvfp4 (comfy-kitchen)
        write_file(load_transformer(models / m.transformer, dtype=torch.float32),
                   models / NAME, recipes=("nvfp4",))
    name = "trained_on_nvfp4"
    prompt = train_prompt(m, steps=2, output_name=name, checkpoint_inputs_on_host=True)
    prompt["1"]["inputs"].update(model_name=NAME, offload="block")
    result = comfy_host.run(prompt)
    assert result.success, result.error
    path = comfy_host.models_dir / "loras" / f"{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["base_format"] == "comfy:nvfp4" and meta["base_model"] == NAME
    lora = load_lora(path)
    assert lora.modules and max(float(mod.up.abs().max()) for mod in lora.modules.values()) > 0
    work = comfy_host.base_dir / "output" / "zimage_training" / name
    state = load_checkpoint(work / f"{name}.ckpt.safetensors")
    assert state["config"]["checkpoint_inputs_on_host"] is True and state["base_format"] == "comfy:nvfp4"
