"""ZImageTurboToModel: the pack's model (with its LoRA stack) on ComfyUI's MODEL wire. KSampler on the bridged model
equals KSampler on ComfyUI's own Z-Image model built from the same file (samplers, schedulers, cfg, inpainting,
sampler-level MODEL nodes, a LoRA through the pack's stack vs LoraLoaderModelOnly), shares the pack's weights, and
refuses what it cannot carry by name (in-process host)."""

from __future__ import annotations

import pytest
import torch

from comfy_fixtures import comfy_host, comfy_models  # noqa: F401  (fixtures)
from comfy_reference import apply_node, comfy_own, ksampler  # noqa: F401  (comfy_own: fixture)

pytestmark = pytest.mark.comfy
TOLERANCE = 3e-4  # measured 2.0e-5 to 3.3e-5 (this file's printed gaps): ~10x


def _graph(m, sampler="euler", scheduler="simple", steps=8, cfg=1.0, seed=5, loras=(), model_nodes=(),
           mask=False, offload="none") -> dict:
    """loader -> LoRA stack -> ZImageTurboToModel -> [core MODEL nodes] -> KSampler; demo conditioning, its
    ConditioningZeroOut as the negative; a 64x64 empty latent, or with `mask` a noise-masked random latent."""
    slots = list(loras) + [("None", 1.0)] * (3 - len(loras))
    prompt = {
        "1": {"class_type": "ZImageTurboModelLoader",
              "inputs": {"model_name": m.transformer, "weight_dtype": "fp32", "offload": offload}},
        "2": {"class_type": "ZImageTurboLoraStack",
              "inputs": {"model": ["1", 0], "distillpatch": "None", "distillpatch_strength": 1.0,
                         **{k: v for i, (name, strength) in enumerate(slots, 1)
                            for k, v in ((f"lora_{i}", name), (f"strength_{i}", strength))}}},
        "10": {"class_type": "ZImageTurboToModel", "inputs": {"model": ["2", 0]}},
        "3": {"class_type": "ZImageTurboDemoConditioning", "inputs": {"text": "a lighthouse", "width": 2560,
                                                                       "model": ["1", 0]}},
        "30": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["3", 0]}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }
    model = ["10", 0]
    for i, (class_type, inputs) in enumerate(model_nodes):
        prompt[f"4{i}"] = {"class_type": class_type, "inputs": {"model": model, **inputs}}
        model = [f"4{i}", 0]
    latent = ["4", 0]
    if mask:
        prompt.update({
            "50": {"class_type": "ZImageTurboSampler",  # a non-empty start latent: a 4-step Turbo sample
                   "inputs": {"model": ["2", 0], "positive": ["3", 0], "latent_image": ["4", 0], "preset": "custom",
                              "steps": 4, "cfg": 1.0, "shift": 3.0, "seed": 99, "denoise": 1.0}},
            "51": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 32}},
            "52": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}},
            "53": {"class_type": "MaskComposite", "inputs": {"destination": ["52", 0], "source": ["51", 0],
                                                              "x": 16, "y": 16, "operation": "add"}},
            "54": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["50", 0], "mask": ["53", 0]}},
        })
        latent = ["54", 0]
    prompt["5"] = {"class_type": "KSampler",
                   "inputs": {"model": model, "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler,
                              "scheduler": scheduler, "positive": ["3", 0], "negative": ["30", 0],
                              "latent_image": latent, "denoise": 1.0}}
    prompt["8"] = {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}}
    return prompt


def _compare(host, own, prompt, own_model=None):
    result = host.run(prompt)
    assert result.success, result.error
    k = prompt["5"]["inputs"]
    latent = result.output(*k["latent_image"])
    theirs = ksampler(own_model or own, latent, result.output("3", 0), result.output("30", 0), k["seed"], k["steps"],
                      k["cfg"], k["sampler_name"], k["scheduler"])
    ours = result.output("5", 0)["samples"]
    diff = (ours - theirs).abs().max().item()
    assert theirs.std() > 0.1
    return diff, ours, theirs, latent


@pytest.mark.parametrize("sampler, scheduler, steps, cfg", [
    ("euler", "simple", 8, 1.0), ("res_multistep", "simple", 8, 1.0), ("dpmpp_2m", "beta", 9, 2.0),
    ("euler_ancestral", "normal", 6, 1.0), ("uni_pc", "sgm_uniform", 7, 1.5),
])
def test_ksampler_on_bridge_equals_ksampler_on_comfyui_zimage(comfy_host, comfy_models, comfy_own,  # noqa: F811
                                                              sampler, scheduler, steps, cfg):
    diff, *_ = _compare(comfy_host, comfy_own, _graph(comfy_models, sampler, scheduler, steps, cfg))
    print(f"KSampler {sampler}/{scheduler} {steps} steps cfg {cfg}: max|bridge - ComfyUI Z-Image| = {diff:.2e}")
    assert diff <= TOLERANCE


def test_bridge_of_a_block_offloaded_model(comfy_host, comfy_models, comfy_own):  # noqa: F811
    diff, *_ = _compare(comfy_host, comfy_own, _graph(comfy_models, "res_multistep", offload="block"))
    print(f"KSampler on the bridge of a block-offloaded model: max|bridge - ComfyUI Z-Image| = {diff:.2e}")
    assert diff <= TOLERANCE


def test_native_inpainting_on_the_bridge(comfy_host, comfy_models, comfy_own):  # noqa: F811
    diff, ours, _, latent = _compare(comfy_host, comfy_own, _graph(comfy_models, "res_multistep", mask=True))
    print(f"KSampler + SetLatentNoiseMask: max|bridge - ComfyUI Z-Image| = {diff:.2e}")
    assert diff <= TOLERANCE
    keep = torch.nn.functional.interpolate(latent["noise_mask"], size=ours.shape[-2:]) == 0
    assert (ours - latent["samples"])[keep.expand_as(ours)].abs().max() < 1e-4


# sampler-level MODEL nodes: the same node applied to both models
MODEL_NODES = [
    ("ModelSamplingAuraFlow", {"shift": 5.0}),
    ("RescaleCFG", {"multiplier": 0.5}),
    ("CFGNorm", {"strength": 0.8}),
]


@pytest.mark.parametrize("class_type, inputs", MODEL_NODES)
def test_sampler_level_model_nodes_run_the_bridge(comfy_host, comfy_models, comfy_own,  # noqa: F811
                                                  class_type, inputs):
    prompt = _graph(comfy_models, "euler", steps=6, cfg=2.0, model_nodes=[(class_type, inputs)])
    own = apply_node(class_type, model=comfy_own, **inputs)
    diff, ours, *_ = _compare(comfy_host, comfy_own, prompt, own_model=own)
    print(f"{class_type}: max|bridge - ComfyUI Z-Image| = {diff:.2e}")
    assert diff <= TOLERANCE
    baseline = comfy_host.run(_graph(comfy_models, "euler", steps=6, cfg=2.0)).output("5", 0)["samples"]
    assert (ours - baseline).abs().max() > 1e-2  # the node changed the result (it is not ignored)


def test_lora_stack_on_the_bridge_equals_loraloader_on_comfyui_zimage(comfy_host, comfy_models,  # noqa: F811
                                                                      comfy_own):
    m = comfy_models
    own = apply_node("LoraLoaderModelOnly", model=comfy_own, lora_name=m.user_lora, strength_model=0.8)
    diff, ours, *_ = _compare(comfy_host, comfy_own, _graph(m, loras=[(m.user_lora, 0.8)]), own_model=own)
    print(f"LoRA stack @0.8 vs LoraLoaderModelOnly @0.8: max|bridge - ComfyUI Z-Image| = {diff:.2e}")
    assert diff <= TOLERANCE
    without = comfy_host.run(_graph(m)).output("5", 0)["samples"]
    assert (ours - without).abs().max() > 1e-2


def test_bridge_shares_the_weights_with_the_pack_sampler(comfy_host, comfy_models):  # noqa: F811
    """No second copy: the MODEL wraps the very transformer the loader cached, and the pack's sampler and KSampler
    on the bridge take turns on it (each with its own LoRA stack) without drift."""
    m = comfy_models
    pack = _graph(m)
    pack["5"] = {"class_type": "ZImageTurboSampler",
                 "inputs": {"model": ["2", 0], "positive": ["3", 0], "latent_image": ["4", 0], "preset": "turbo",
                            "steps": 8, "cfg": 1.0, "shift": 3.0, "seed": 5, "denoise": 1.0}}
    first = comfy_host.run(pack, fresh=True)
    assert first.success, first.error
    bridged = comfy_host.run(_graph(m, loras=[(m.user_lora, 0.8)]))
    assert bridged.success, bridged.error
    patcher = bridged.output("10", 0)
    base = first.output("2", 0)
    assert patcher.model.diffusion_model.transformer is base.transformer
    params = {id(p) for p in base.transformer.parameters()}
    assert {id(p) for p in patcher.model.parameters()} == params  # the same tensors, nothing else
    again = comfy_host.run(pack, fresh=True)
    torch.testing.assert_close(again.output("5", 0)["samples"], first.output("5", 0)["samples"], rtol=0, atol=0)


@pytest.mark.parametrize("class_type, inputs, failing, message", [
    ("LoraLoaderModelOnly", {"lora_name": "user_style.safetensors", "strength_model": 1.0}, "60",
     "ComfyUI weight patches (LoraLoader, model merging) cannot be applied to the bridged Z-Image MODEL"),
    ("ModelSave", {"filename_prefix": "bridged"}, "60", "cannot be saved as a ComfyUI checkpoint"),
    # whole-model compile would skip block offload and keep stale runtime LoRA branches: refused on the node itself
    ("TorchCompileModel", {"backend": "inductor"}, "60", "Set compile = blocks on the Z-Image Turbo Model Loader"),
    # an attention patch: the bridge names it and refuses it instead of running without it
    ("PerturbedAttentionGuidance", {"scale": 3.0}, "5", "cannot apply patches_replace (attn1)"),
])
def test_what_the_bridge_does_not_carry_is_an_error(comfy_host, comfy_models, class_type, inputs, failing,  # noqa: F811
                                                    message):
    prompt = _graph(comfy_models, cfg=2.0)
    prompt["60"] = {"class_type": class_type, "inputs": {"model": ["10", 0], **inputs}}
    if class_type != "ModelSave":
        prompt["5"]["inputs"]["model"] = ["60", 0]
    else:
        prompt = {k: v for k, v in prompt.items() if k not in ("5", "8")}
    result = comfy_host.run(prompt)
    assert not result.success
    assert result.error["node_id"] == failing and message in result.error["exception_message"], result.error


def test_a_stack_with_step_ranges_is_refused_by_the_bridge_naming_the_lora(comfy_host, comfy_models):  # noqa: F811
    """KSampler cannot switch LoRAs per step: the bridge refuses a ranged stack instead of running it on every step."""
    m = comfy_models
    prompt = _graph(m, loras=[(m.user_lora, 1.0)])
    prompt["2"]["inputs"].update(start_1=0.5)
    result = comfy_host.run(prompt)
    assert not result.success and result.error["node_id"] == "10", result.error
    message = result.error["exception_message"]
    assert f"'{m.user_lora}' (steps 0.5-1)" in message and "Z-Image Turbo Sampler" in message, message


@pytest.mark.parametrize("control, options, named", [
    (object(), {}, "cannot carry a ComfyUI ControlNet"),
    # what ComfyUI 0.8's own ZImageFunControlnet puts on the model: block patches
    (None, {"patches": {"double_block": [object()], "noise_refiner": [object()]}},
     "cannot apply patches (double_block, noise_refiner)"),
])
def test_refused_control_points_to_the_packs_controlnet_nodes(comfy_host, control, options, named):  # noqa: F811
    bridge = comfy_host.pack_module("nodes.bridge")
    with pytest.raises(ValueError) as refused:
        bridge.refuse_unsupported(control, options)
    assert named in str(refused.value)
    assert "Z-Image Turbo Apply ControlNet" in str(refused.value)
    assert "in ComfyUI's own model" not in str(refused.value)  # no claim about what ComfyUI's own model does
