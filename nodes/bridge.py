"""ZImageTurboToModel: the pack's loaded Z-Image (with its LoRA stack) on ComfyUI's MODEL wire.

What the MODEL carries is ComfyUI's own Z-Image model class, `comfy.model_base.Lumina2` configured as
`supported_models.ZImage` (flow model sampling with shift 3, Flux latents, Lumina2's conditioning), built around the
pack's transformer instead of ComfyUI's NextDiT: no second copy of the weights. So KSampler with any sampler and
scheduler, native inpainting (noise masks) and the MODEL nodes that work at sampler level (ModelSamplingAuraFlow,
CFG-level nodes, sampler wrappers) run it exactly as they run ComfyUI's own Z-Image.

What it does not carry, refused with an error naming the node's kind rather than silently ignored:
* ComfyUI weight patches (LoraLoader / LoraLoaderModelOnly, model merging, weight hooks): LoRAs go in the pack's
  LoRA stack before the bridge;
* ComfyUI ControlNets (`control`), attention overrides and RoPE options, and transformer block / attention patches
  (e.g. ComfyUI's own ZImageFunControlnet on newer ComfyUI): the pack's transformer does not run ComfyUI's patch
  points, so they are an error rather than a silent no-op; Fun ControlNets go through the pack's Apply ControlNet;
* saving the MODEL as a ComfyUI checkpoint (ModelSave / CheckpointSave);
* ComfyUI's torch.compile wrapper (TorchCompileModel and nodes built on `set_torch_compile_wrapper`): it compiles the
  whole `diffusion_model`, which bypasses block offload's hooks and ignores runtime LoRA branches changed after
  the first call; the loader's `compile` input compiles each block in a way that stays exact with both.

Loading goes through the base model's `ZImagePatcher` (one copy, one VRAM bookkeeping, block offload included); the
wire's LoRA stack is merged when ComfyUI loads the MODEL for sampling (`ZImageModel.activate`).
"""

from __future__ import annotations

import torch
from typing_extensions import override

import comfy.ldm.common_dit
import comfy.model_base
import comfy.model_patcher
import comfy.patcher_extension
import comfy.supported_models
from comfy_api.latest import io

from .metadata import search_aliases
from .types import ZIMAGE_MODEL, LoadedBase, ZImageModel

COMPILE_KEY = "torch.compile"  # the wrapper key of comfy_api.torch_helpers.set_torch_compile_wrapper
USE_THE_LOADER_COMPILE = ("torch.compile of the bridged Z-Image MODEL (TorchCompileModel) is refused: it compiles the "
                          "whole model, which skips block offload and keeps stale LoRA branches. Set compile = blocks "
                          "on the Z-Image Turbo Model Loader instead (per-block compile, exact with the LoRA stack)")
USE_THE_STACK = ("put LoRAs in a Z-Image Turbo LoRA Stack before Z-Image Turbo To MODEL, or load the model with "
                 "ComfyUI's UNETLoader for ComfyUI's own patches")


USE_PACK_CONTROLNET = ("use Z-Image Turbo ControlNet Loader -> Z-Image Turbo Apply ControlNet -> Z-Image Turbo "
                       "Sampler instead")


def unet_config(config) -> dict:
    """The unet_config ComfyUI's model detection gives a Z-Image state dict of this shape."""
    return {"image_model": "lumina2", "patch_size": config.patch_size, "in_channels": config.in_channels,
            "dim": config.dim, "cap_feat_dim": config.cap_feat_dim, "n_layers": config.n_layers,
            "n_refiner_layers": config.n_refiner_layers, "qk_norm": True, "n_heads": config.n_heads,
            "n_kv_heads": config.n_heads, "axes_dims": list(config.axes_dims), "axes_lens": [1536, 512, 512],
            "rope_theta": config.rope_theta, "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True,
            "time_scale": config.t_scale, "pad_tokens_multiple": 32}


class NextDiTInterface(torch.nn.Module):
    """`diffusion_model` of the bridged model: NextDiT's call signature around the zimage_core transformer.
    Timesteps are ComfyUI's sigmas (1 = noise), the output the velocity noise - x0, as NextDiT returns them."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def forward(self, x, timesteps, context, num_tokens=None, attention_mask=None, **kwargs):
        wrappers = comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                            kwargs.get("transformer_options", {}))
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(self._forward, self, wrappers).execute(
            x, timesteps, context, num_tokens, attention_mask, **kwargs)

    def _forward(self, x, timesteps, context, num_tokens, attention_mask=None, control=None, transformer_options={},
                 **kwargs):
        refuse_unsupported(control, transformer_options)
        h, w = x.shape[-2:]
        p = self.transformer.config.patch_size
        x = comfy.ldm.common_dit.pad_to_patch_size(x, (p, p))
        captions = []
        for i in range(context.shape[0]):
            row = context[i]
            if attention_mask is not None:  # padded batch rows: keep the real tokens (the pack's convention)
                keep = attention_mask[min(i, attention_mask.shape[0] - 1)].bool()
                row = row[keep] if keep.any() else row[:1]
            captions.append(row)
        return self.transformer(x, timesteps, captions)[..., :h, :w]


def refuse_unsupported(control, transformer_options: dict) -> None:
    if control is not None:
        raise ValueError(f"the bridged Z-Image MODEL cannot carry a ComfyUI ControlNet (applied to the conditioning): "
                         f"{USE_PACK_CONTROLNET}")
    unsupported = [k for k in ("rope_options", "optimized_attention_override") if transformer_options.get(k)]
    unsupported += [f"{kind} ({', '.join(map(str, patches))})" for kind in ("patches", "patches_replace")
                    if (patches := {k: v for k, v in transformer_options.get(kind, {}).items() if v})]
    if unsupported:
        raise ValueError(f"the bridged Z-Image MODEL cannot apply {'; '.join(unsupported)} from a model-patch node: "
                         f"the pack's transformer does not run ComfyUI's block / attention patches. For a Z-Image "
                         f"Fun ControlNet (ZImageFunControlnet) {USE_PACK_CONTROLNET}; for other patches remove that "
                         f"node, or load the model with ComfyUI's UNETLoader instead of the bridge")


class ZImageComfyModel(comfy.model_base.Lumina2):
    """ComfyUI's Z-Image model class around a loaded base transformer."""

    def __init__(self, base: LoadedBase):
        config = comfy.supported_models.ZImage({**unet_config(base.transformer.config),
                                                "disable_unet_model_creation": True})
        config.set_inference_dtype(base.transformer.dtype, None)
        super().__init__(config)
        self.diffusion_model = NextDiTInterface(base.transformer)
        self.base_patcher = base.patcher

    def state_dict_for_saving(self, *args, **kwargs):
        raise ValueError("the bridged Z-Image MODEL cannot be saved as a ComfyUI checkpoint; save the transformer "
                         "with zimage_core.save_transformer, or train and save LoRAs with the pack's nodes")


class ZImageBridgePatcher(comfy.model_patcher.ModelPatcher):
    """The patcher on the MODEL wire. Object patches, model options and wrappers are ComfyUI's own machinery;
    weights are the base model's: loading, unloading and sizes are delegated to its `ZImagePatcher`, and ComfyUI
    weight patches are refused. `zimage` is the wire's `ZImageModel` (its LoRA stack)."""

    zimage: ZImageModel = None

    @property
    def base(self):
        return self.model.base_patcher

    def clone(self):
        n = super().clone()
        n.zimage = self.zimage
        return n

    def is_clone(self, other):  # loading the bridge replaces the base's entry in ComfyUI's loaded-model list
        return super().is_clone(other) or other is self.base

    def model_size(self):
        return self.base.model_size()

    def loaded_size(self):
        return self.base.loaded_size()

    def current_loaded_device(self):
        return self.base.current_loaded_device()

    def lowvram_patch_counter(self):
        return 0

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        self.unpatch_model(unpatch_weights=False)  # another clone's object patches out (ComfyUI's own code) ...
        self.patch_model(load_weights=False)  # ... this clone's in (ModelSamplingAuraFlow's model_sampling, ...)
        loaded = self.base.partially_load(device_to, extra_memory, force_patch_weights)
        self.zimage.activate()
        return loaded

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        return self.base.partially_unload(device_to, memory_to_free, force_patch_weights)

    def detach(self, unpatch_all=True):
        self.eject_model()
        self.model_patches_to(self.offload_device)
        if unpatch_all:
            self.unpatch_model(unpatch_weights=False)
            self.base.detach(unpatch_all=True)
        return self.model

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        raise ValueError(f"ComfyUI weight patches (LoraLoader, model merging) cannot be applied to the bridged "
                         f"Z-Image MODEL: {USE_THE_STACK}")

    def add_hook_patches(self, hook, patches, strength_patch=1.0, strength_model=1.0):
        raise ValueError(f"ComfyUI weight hooks (hooked LoRAs) cannot be applied to the bridged Z-Image MODEL: "
                         f"{USE_THE_STACK}")

    def add_wrapper_with_key(self, wrapper_type, key, wrapper):
        if key == COMPILE_KEY:
            raise ValueError(USE_THE_LOADER_COMPILE)
        return super().add_wrapper_with_key(wrapper_type, key, wrapper)

    def add_weight_wrapper(self, name, function):
        raise ValueError(f"weight wrappers cannot be applied to the bridged Z-Image MODEL: {USE_THE_STACK}")


def comfy_model(model: ZImageModel) -> ZImageBridgePatcher:
    """A MODEL for this wire, carrying its LoRA stack. The ComfyUI model object is small (it holds the base's
    transformer, not a copy) and lives as long as the MODEL, as ComfyUI's memory management expects."""
    model.refuse_step_ranges("The MODEL wire (KSampler and other ComfyUI samplers)")
    patcher = ZImageBridgePatcher(ZImageComfyModel(model.base), load_device=model.patcher.load_device,
                                  offload_device=model.patcher.offload_device)
    patcher.zimage = model
    return patcher


class ZImageTurboToModel(io.ComfyNode):
    @classmethod
    @override
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZImageTurboToModel",
            display_name="Z-Image Turbo To MODEL",
            category="ZImageTurbo",
            **search_aliases("to model", "bridge", "ksampler", "model wire"),
            description="Hands the loaded Z-Image model with its LoRA stack (and DistillPatch) to ComfyUI's MODEL "
                        "wire, without a second copy of the weights: KSampler / SamplerCustom with any sampler and "
                        "scheduler, native inpainting and sampler-level MODEL nodes (ModelSamplingAuraFlow, CFG "
                        "nodes) then run it as ComfyUI's own Z-Image. ComfyUI's LoRA loaders, weight patches, "
                        "ControlNets and checkpoint saving are refused: use the pack's LoRA stack and ControlNet.",
            inputs=[ZIMAGE_MODEL.Input("model", tooltip="Z-Image model from the pack's loader or LoRA stack.")],
            outputs=[io.Model.Output("MODEL", display_name="MODEL",
                                     tooltip="ComfyUI MODEL for KSampler and sampler-level MODEL nodes (Z-Image, "
                                             "shift 3 like ComfyUI's own; ModelSamplingAuraFlow changes it).")],
        )

    @classmethod
    @override
    def execute(cls, model: ZImageModel) -> io.NodeOutput:
        return io.NodeOutput(comfy_model(model))
