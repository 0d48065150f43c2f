"""The `ZIMAGE_MODEL` wire type: what travels between the pack's nodes, documented in this one place.

A `ZIMAGE_MODEL` socket carries a `ZImageModel` (below): an immutable *description* of "this Z-Image transformer
with these LoRAs". It holds

* `base`: a `LoadedBase`, the one shared, cached transformer loaded from a file (per path, mtime, dtype and offload
  mode), wrapped in a ComfyUI `ModelPatcher` (`ZImagePatcher`) so that ComfyUI's memory management can free VRAM for
  it before sampling and unload it when another model needs the memory;
* `loras`: the ordered LoRA stack (`LoraSpec`s, user LoRAs and the DistillPatch) this wire wants applied;
* `variant`: "turbo" or "base" (zimage_core.variants: same weights layout, told apart by the loader), which the
  trainer's turbo check and validation grid follow.

Nodes never modify a `ZImageModel`; the LoRA stack node returns a new one with more LoRAs. Because the weights are
shared, a stack is *merged* into the base weights only when a node calls `activate()`: it removes whatever other
stack is merged (zimage_core restores the base weights bit-exactly) and merges this wire's stack, so any number of
branches and runs with different LoRAs can share one loaded model without drift.

The sockets around it are ComfyUI's own types (CONDITIONING, LATENT, CLIP, VAE, IMAGE), so core text encoding, VAE
and image nodes work unchanged.

Two more sockets carry the Fun ControlNet (nodes/controlnet.py):

* `ZIMAGE_CONTROLNET`: a `LoadedControlNet`, one cached `zimage_core.ZImageControlNet` loaded from a file, wrapped in
  its own `ZImagePatcher` so that ComfyUI moves it to the GPU with the transformer and frees it like any model;
* `ZIMAGE_CONTROL`: a tuple of `ControlSpec`s, what the Apply ControlNet nodes of a chain asked for (ControlNet, VAE,
  control image, strength, start/end, optional inpaint image and mask), in chain order. The images are encoded by
  the sampler, at the size of its latent, so one chain serves any resolution. The sampler's optional `control`
  input takes it; nothing of the ZIMAGE_MODEL changes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
from comfy_api.latest import io

from ..zimage_core import ZImageTransformer
from ..zimage_core.offload import OFFLOAD_MODES, bytes_in_flight, disable_block_offload, enable_block_offload
from .lora_cache import apply_stack
from .lora_spec import ROLE_DISTILLPATCH, ROLE_LORA, ROLE_TRAINED, LoraSpec  # noqa: F401  (part of the wire type)

log = logging.getLogger("ZImageTurbo")

ZIMAGE_MODEL = io.Custom("ZIMAGE_MODEL")
"""The socket type; use `ZIMAGE_MODEL.Input(...)` / `ZIMAGE_MODEL.Output(...)` in schemas."""
ZIMAGE_CONTROLNET = io.Custom("ZIMAGE_CONTROLNET")
ZIMAGE_CONTROL = io.Custom("ZIMAGE_CONTROL")

class ZImageShell(torch.nn.Module):
    """The object ComfyUI's `ModelPatcher` manages: the zimage_core transformer as `.diffusion_model`, plus the
    attributes ComfyUI reads from its own models (`latent_format` for previews and empty-latent fixing, `get_dtype`,
    `memory_required`)."""

    memory_usage_factor_conds = ()  # what BaseModel.memory_required reads besides the factor
    manual_cast_dtype = None

    def __init__(self, transformer: ZImageTransformer, offload: str):
        super().__init__()
        self.diffusion_model = transformer
        self.latent_format = comfy.latent_formats.Flux()  # what ComfyUI's ZImage (Lumina2) model uses
        self.offload = offload

    def get_dtype(self) -> torch.dtype:
        return self.diffusion_model.dtype

    @property
    def memory_usage_factor(self) -> float:
        """The host's own activation-memory factor for Z-Image (`supported_models.ZImage.memory_usage_factor`), read
        from the running ComfyUI when asked, never copied: it changes between releases (1.7 in 0.3.75, 2.0 in 0.8.0,
        other values in others), and ComfyUI's estimate is what its other models are freed against."""
        return comfy.supported_models.ZImage.memory_usage_factor

    def memory_required(self, input_shape, cond_shapes={}) -> float:
        """Activation memory for a latent batch of `input_shape`: ComfyUI's BaseModel formula, run on this model."""
        return comfy.model_base.BaseModel.memory_required(self, input_shape, cond_shapes)


class ZImagePatcher(comfy.model_patcher.ModelPatcher):
    """A `ModelPatcher` for a zimage_core transformer. ComfyUI's own partial loading streams `comfy.ops` layers;
    this model has plain torch layers, so loading is all-or-nothing: `load_models_gpu` moves the whole transformer to
    the GPU (offload "none") or enables zimage_core's block offload (offload "block": embedders on the GPU, blocks
    streamed from RAM), and any unload ComfyUI asks for (freeing VRAM for the VAE / text encoder, `/free`, OOM)
    moves it back to the offload device. LoRAs are merged by zimage_core, not by ComfyUI's weight patches."""

    def model_size(self) -> int:
        """Bytes the model occupies on the GPU once loaded, which is what ComfyUI frees VRAM for: every tensor as
        stored (fp8 storage: one byte per block weight) or, with block offload, everything but the blocks plus the
        blocks in flight. Reporting the whole model for an offloaded one would make ComfyUI evict the text encoder
        and VAE for memory the model never takes."""
        transformer = self.model.diffusion_model
        total = sum(t.nbytes for t in (*transformer.parameters(), *transformer.buffers()))
        if self.model.offload != "block":
            return total
        blocks = [sum(t.nbytes for t in (*b.parameters(), *b.buffers())) for b in transformer.blocks()]
        return total - sum(blocks) + bytes_in_flight(blocks)  # the running block and its prefetch

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        device_to = torch.device(device_to)
        if self.model.model_loaded_weight_memory > 0 and self.model.device == device_to:
            return 0
        transformer = self.model.diffusion_model
        if self.model.offload == "block":
            enable_block_offload(transformer, device_to, offload_device=self.offload_device)
        else:
            transformer.to(device_to)
        self.model.device = device_to
        self.model.model_loaded_weight_memory = self.model_size()
        self.model.model_lowvram = self.model.offload == "block"
        return self.model.model_loaded_weight_memory

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        freed = self.model.model_loaded_weight_memory
        self._unload(device_to)
        return freed

    def detach(self, unpatch_all=True):
        # load_models_gpu detaches a model it is about to (re)load with unpatch_all=False: then nothing moves, so a
        # model that is already on the GPU stays there between runs. unpatch_all=True is a real unload.
        if unpatch_all:
            self._unload(self.offload_device)
        return self.model

    def _unload(self, device_to):
        transformer = self.model.diffusion_model
        if self.model.offload == "block":
            disable_block_offload(transformer, device_to)
        transformer.to(device_to)
        self.model.device = torch.device(device_to)
        self.model.model_loaded_weight_memory = 0
        self.model.model_lowvram = False


@dataclass(eq=False)
class LoadedBase:
    """One loaded transformer, shared by every `ZImageModel` made from it, and the LoRA stack merged into it now."""

    transformer: ZImageTransformer
    patcher: ZImagePatcher
    path: str
    name: str
    dtype: torch.dtype
    offload: str
    active: tuple[LoraSpec, ...] = ()
    reports: list = field(default_factory=list)
    handle: object = None  # zimage_core.lora handle of the merged stack (`.remove()`, `.reports`)

    @classmethod
    def create(cls, transformer: ZImageTransformer, path: str, name: str, dtype: torch.dtype,
               offload: str) -> "LoadedBase":
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")
        patcher = ZImagePatcher(ZImageShell(transformer, offload),
                                load_device=comfy.model_management.get_torch_device(),
                                offload_device=comfy.model_management.unet_offload_device())
        return cls(transformer, patcher, path, name, dtype, offload)

    def clear(self) -> None:
        """Remove the merged stack, if any, restoring the base weights."""
        if self.handle is not None:
            self.handle.remove()
        self.handle, self.active, self.reports = None, (), []


@dataclass(frozen=True, eq=False)
class ZImageModel:
    """The value of a `ZIMAGE_MODEL` socket (see the module docstring)."""

    base: LoadedBase
    loras: tuple[LoraSpec, ...] = ()
    variant: str = "turbo"
    combine: str = "sum"  # how the stack's LoRAs combine (zimage_core.lora.combine), from the last LoRA stack node

    @property
    def transformer(self) -> ZImageTransformer:
        return self.base.transformer

    @property
    def patcher(self) -> ZImagePatcher:
        return self.base.patcher

    @property
    def config(self):
        return self.base.transformer.config

    def with_loras(self, *specs: LoraSpec, combine: str | None = None) -> "ZImageModel":
        return replace(self, loras=self.loras + tuple(specs), combine=combine or self.combine)

    def activate(self) -> list:
        """Make the shared transformer carry exactly this wire's LoRA stack; returns the engine's per-LoRA reports.
        A different stack merged before is removed first (bit-exact restore)."""
        base = self.base
        wanted = (self.loras, self.combine) if self.loras else ()
        if base.active == wanted and (base.handle is not None or not self.loras):
            return base.reports
        base.clear()
        if self.loras:
            base.handle, base.reports = apply_stack(base.transformer, self.loras, self.combine)
            base.active = wanted
        return base.reports

    @property
    def lora_steps(self):
        """The step ranges of the active stack (zimage_core's LoraSchedule, for `sample(lora_steps=)`); None when no
        stack is merged. Call `activate()` first."""
        return self.base.handle.schedule if self.base.handle is not None else None

    def refuse_step_ranges(self, where: str) -> None:
        """Raise, naming the LoRAs, when the stack has step ranges that `where` cannot honour."""
        ranged = [f"'{s.name}' (steps {s.start:g}-{s.end:g})" for s in self.loras if s.ranged]
        if ranged:
            raise ValueError(f"{where} cannot switch LoRAs per step, and this stack has step ranges: "
                             f"{', '.join(ranged)}. Set their start 0 and end 1 on the LoRA stack, or sample with "
                             f"the Z-Image Turbo Sampler")

    def describe(self) -> str:
        stack = ", ".join(f"{s.name} @ {s.strength:g}" + (f" steps {s.start:g}-{s.end:g}" if s.ranged else "")
                          + (" (DistillPatch)" if s.role == ROLE_DISTILLPATCH else "") for s in self.loras)
        return (f"{self.base.name} [{self.variant}, {self.base.dtype}, offload {self.base.offload}]"
                + (f" + {stack}" if stack else ""))


@dataclass(frozen=True, eq=False)
class LoadedControlNet:
    """The value of a `ZIMAGE_CONTROLNET` socket: a loaded Fun ControlNet, its patcher and the file it came from."""

    net: object  # zimage_core.ZImageControlNet
    patcher: ZImagePatcher
    name: str
    dtype: torch.dtype

    @classmethod
    def create(cls, net, name: str, dtype: torch.dtype) -> "LoadedControlNet":
        patcher = ZImagePatcher(ZImageShell(net, "none"), load_device=comfy.model_management.get_torch_device(),
                                offload_device=comfy.model_management.unet_offload_device())
        return cls(net, patcher, name, dtype)


@dataclass(frozen=True, eq=False)
class ControlSpec:
    """One Apply ControlNet node's request (an element of a `ZIMAGE_CONTROL` tuple). Images are ComfyUI IMAGE
    tensors [B, H, W, C] in 0..1, the mask a MASK [B, H, W] (1 = repaint)."""

    controlnet: LoadedControlNet
    vae: object
    image: torch.Tensor | None
    strength: float
    start: float
    end: float
    inpaint_image: torch.Tensor | None = None
    mask: torch.Tensor | None = None
