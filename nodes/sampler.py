"""ZImageTurboSampler: zimage_core's sampling loop on ComfyUI CONDITIONING and LATENT.

ComfyUI conventions it reproduces (so the output decodes with VAEDecode and compares with KSampler):
* LATENT holds raw Flux-VAE latents; the model works in `latent_formats.Flux` space: `process_in` is applied to a
  non-zero input latent, `process_out` to the result (as `comfy.samplers.CFGGuider` does for ComfyUI's ZImage).
* the noise for a seed is `comfy.sample.prepare_noise(latent, seed, batch_index)`, exactly KSampler's, after the same
  empty-latent channel fix (a 4-channel EmptyLatentImage becomes 16 channels).
* image-to-image: the start is `sigma0 * noise + (1 - sigma0) * latent`, KSampler's noise scaling.
* inpainting: a LATENT `noise_mask` (SetLatentNoiseMask, VAEEncodeForInpaint, InpaintModelConditioning) is resized
  to the latent as KSampler does (`comfy.sampler_helpers.prepare_mask`) and blended every step by zimage_core.
* samplers: euler and res_multistep, the step rules of KSampler's samplers of the same names.
"""

from __future__ import annotations

import torch
from typing_extensions import override

import comfy.model_management
import comfy.sample
import comfy.sampler_helpers
import latent_preview
from comfy_api.latest import io

from ..zimage_core import QUALITY, TURBO, sample
from ..zimage_core.sampling import BASE, VARIETY_MODES, SeedVariety
from ..zimage_core.samplers import SAMPLERS
from ..zimage_core.scheduler import DEFAULT_SHIFT
from .controlnet import control_inputs
from .metadata import search_aliases
from .types import ZIMAGE_CONTROL, ZIMAGE_MODEL, ZImageModel

PRESETS = {"turbo": TURBO, "quality": QUALITY, "base": BASE, "custom": None}


def conditioning_features(conditioning, model: ZImageModel, name: str) -> list[torch.Tensor]:
    """ComfyUI CONDITIONING ([[tensor [B, L, D], {...}]]) -> one [L_i, D] caption per batch row, with padding
    removed where the text encoder returned an attention mask."""
    if not conditioning:
        raise ValueError(f"{name} conditioning is empty")
    if len(conditioning) > 1:
        raise ValueError(f"{name} conditioning has {len(conditioning)} entries (combined, area or timestep "
                         f"conditioning); the Z-Image Turbo sampler takes a single CLIPTextEncode output")
    tensor, extra = conditioning[0]
    width = model.config.cap_feat_dim
    if tensor.ndim != 3 or tensor.shape[-1] != width:
        raise ValueError(f"{name} conditioning has shape {list(tensor.shape)}, but this Z-Image model reads "
                         f"[batch, tokens, {width}] text features: load the Qwen3-4B text encoder with CLIPLoader "
                         f"(type lumina2) for the released model")
    mask = extra.get("attention_mask") if isinstance(extra, dict) else None
    rows = []
    for i in range(tensor.shape[0]):
        row = tensor[i]
        if mask is not None and mask.shape[-1] == row.shape[0]:
            keep = mask[min(i, mask.shape[0] - 1)].bool().to(row.device)
            row = row[keep] if keep.any() else row[:1]
        rows.append(row)
    return rows


def prepare_latents(model: ZImageModel, latent: dict, seed: int):
    """(raw latent, noise, model-space start latent, noise mask or None): KSampler's channel fix, noise and mask
    resize, Flux process_in."""
    samples = comfy.sample.fix_empty_latent_channels(model.patcher, latent["samples"])
    channels = model.config.in_channels
    if samples.ndim != 4 or samples.shape[1] != channels:
        raise ValueError(f"LATENT has shape {list(samples.shape)}; Z-Image needs [batch, {channels}, H, W] latents "
                         f"of the Flux VAE (EmptySD3LatentImage, or VAEEncode with the Flux ae.safetensors)")
    p = model.config.patch_size
    if samples.shape[-2] % p or samples.shape[-1] % p:
        raise ValueError(f"image size {samples.shape[-1] * 8}x{samples.shape[-2] * 8} is not a multiple of "
                         f"{8 * p} pixels, which Z-Image needs")
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    fmt = model.patcher.model.latent_format
    start = fmt.process_in(samples) if torch.count_nonzero(samples) > 0 else torch.zeros_like(samples)
    mask = latent.get("noise_mask")
    if mask is not None:
        mask = comfy.sampler_helpers.prepare_mask(mask, samples.shape, "cpu")
    return samples, noise, start, mask


def check_controls(chain, model: ZImageModel, latent_shape) -> list:
    """The chain's controls, encoded at the latent's size, after checking every ControlNet fits the model (before
    anything is loaded or merged, so a bad control leaves the model as it was)."""
    for spec in chain:
        net = spec.controlnet
        net.net.check_fits(model.transformer, f"control: ControlNet '{net.name}'")
        if net.dtype != model.base.dtype:
            raise ValueError(f"control: ControlNet '{net.name}' was loaded in {net.dtype} but the model runs in "
                             f"{model.base.dtype}: pick the same weight_dtype in both loaders")
    for spec in chain:  # the ControlNet streams its blocks when the transformer does (loader offload = block)
        shell = spec.controlnet.patcher.model
        if shell.offload != model.base.offload:
            spec.controlnet.patcher.detach(unpatch_all=True)
            shell.offload = model.base.offload
    return control_inputs(chain, latent_shape)


def resolve_preset(preset: str, steps: int, cfg: float) -> tuple[int, float]:
    chosen = PRESETS[preset]
    return (steps, cfg) if chosen is None else (chosen.steps, chosen.cfg)


class ZImageTurboSampler(io.ComfyNode):
    @classmethod
    @override
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZImageTurboSampler",
            display_name="Z-Image Turbo Sampler",
            category="ZImageTurbo",
            **search_aliases("sampler", "ksampler", "8 steps", "inpaint", "img2img"),
            description="Samples a Z-Image model (with its LoRA stack): turbo = 8 steps at cfg 1 (what "
                        "Z-Image-Turbo is distilled for), quality = 30 steps at cfg 2 (an SFT LoRA without "
                        "DistillPatch), or custom; euler or res_multistep. Seeds give the same noise as KSampler; a "
                        "LATENT with a noise mask (SetLatentNoiseMask, VAEEncodeForInpaint, "
                        "InpaintModelConditioning) is inpainted as KSampler does. The LATENT output decodes with "
                        "VAEDecode and the Flux VAE (ae.safetensors).",
            inputs=[
                ZIMAGE_MODEL.Input("model", tooltip="Z-Image model from the loader or the LoRA stack."),
                io.Conditioning.Input("positive", tooltip="Prompt: CLIPTextEncode with the Qwen3-4B text encoder "
                                                          "(CLIPLoader, type lumina2)."),
                io.Latent.Input("latent_image", tooltip="Start latent: EmptySD3LatentImage / EmptyLatentImage for "
                                                        "text-to-image, VAEEncode (Flux VAE) with denoise < 1 "
                                                        "for image-to-image, or a latent with a noise mask "
                                                        "(SetLatentNoiseMask, VAEEncodeForInpaint, "
                                                        "InpaintModelConditioning) for inpainting: only the "
                                                        "masked area is repainted."),
                io.Combo.Input("preset", options=list(PRESETS), default="turbo",
                               tooltip="turbo: 8 steps, cfg 1. quality: 30 steps, cfg 2. base: 50 steps, cfg 4, the "
                                       "Z-Image base recipe (connect an empty-prompt CLIPTextEncode as negative). "
                                       "custom: use the steps and cfg below (ignored by the other presets)."),
                io.Int.Input("steps", default=TURBO.steps, min=1, max=200,
                             tooltip="Sampling steps (preset custom only)."),
                io.Float.Input("cfg", default=TURBO.cfg, min=0.0, max=20.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance (preset custom only); 1 = no guidance and one "
                                       "model call per step, which is how Turbo is meant to run."),
                io.Float.Input("shift", default=DEFAULT_SHIFT, min=0.1, max=20.0, step=0.05,
                               tooltip="Sigma shift of the flow-matching schedule (Z-Image uses 3)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed; the same seed gives the same noise as ComfyUI's KSampler."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1 = start from pure noise; lower values keep more of the input latent "
                                       "(image-to-image)."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Optional negative prompt, used only when cfg != 1; without it an "
                                              "all-zero caption is the unconditional branch."),
                ZIMAGE_CONTROL.Input("control", optional=True,
                                     tooltip="Optional Fun ControlNet controls from Z-Image Turbo Apply ControlNet "
                                             "(control image, strength, start/end, inpaint mode)."),
                io.Combo.Input("sampler", options=list(SAMPLERS), default="euler", optional=True,
                               tooltip="Step rule: euler (what Z-Image-Turbo is distilled with) or res_multistep "
                                       "(the sampler of ComfyUI's official Z-Image-Turbo template); both equal "
                                       "KSampler's samplers of the same name on the simple scheduler."),
                io.Float.Input("variety", default=0.0, min=0.0, max=10.0, step=0.05, optional=True,
                               tooltip="Seed variety: more different pictures across seeds for the same prompt, "
                                       "for a LoRA or a distilled model that draws nearly one layout for every "
                                       "seed. With variety_mode shift (the default): after each of the first "
                                       "variety_steps steps the latent is moved by a random offset (from the "
                                       "seed) of up to this share of the picture's side, 0 to 0.5 (0.375 over 2 "
                                       "steps is the measured setting); the prompt is never changed. With caption: noise of this "
                                       "size (times each token's size, 0 to 10) in the prompt's text features for "
                                       "those steps. 0 = off (the classic sampler)."),
                io.Int.Input("variety_steps", default=2, min=0, max=200, optional=True,
                             tooltip="How many of the first steps the seed variety acts on (shift: 2-3 of 8 move "
                                     "the layout, 3 more than 2 at some cost in fidelity; caption: 1-2, more drift "
                                     "away from the prompt)."),
                io.Combo.Input("variety_mode", options=list(VARIETY_MODES), default="shift", optional=True,
                               tooltip="How seed variety acts: shift = move the half-formed latent (measured best "
                                       "on the toy world), caption = noise in the text features (the seed-variance "
                                       "node packs' method; takes variety up to 10)."),
            ],
            outputs=[io.Latent.Output("LATENT", display_name="LATENT",
                                      tooltip="Sampled latent (raw Flux-VAE space) for VAEDecode.")],
        )

    @classmethod
    @override
    def execute(cls, model: ZImageModel, positive, latent_image, preset, steps, cfg, shift, seed, denoise,
                negative=None, control=(), sampler="euler", variety=0.0, variety_steps=2,
                variety_mode="shift") -> io.NodeOutput:
        steps, cfg = resolve_preset(preset, steps, cfg)
        if denoise <= 0.0:
            return io.NodeOutput(dict(latent_image))
        samples, noise, start, mask = prepare_latents(model, latent_image, seed)
        pos = conditioning_features(positive, model, "positive")
        neg = conditioning_features(negative, model, "negative") if negative is not None and cfg != 1.0 else None

        patcher = model.patcher
        controls = check_controls(control or (), model, samples.shape)
        rows = samples.shape[0] * (2 if cfg != 1.0 else 1)
        comfy.model_management.load_models_gpu(
            [patcher, *{id(c.controlnet.patcher): c.controlnet.patcher for c in control or ()}.values()],
            memory_required=patcher.model.memory_required([rows, *samples.shape[1:]]), force_full_load=True)
        model.activate()
        device = patcher.load_device

        preview = latent_preview.prepare_callback(patcher, steps)

        def on_step(step, total, x0):
            comfy.model_management.throw_exception_if_processing_interrupted()  # Cancel stops within one step
            preview(step - 1, x0, None, total)

        out = sample(model.transformer, noise.to(device), [c.to(device) for c in pos],
                     None if neg is None else [c.to(device) for c in neg], steps=steps, cfg=cfg, shift=shift,
                     denoise=denoise, callback=on_step, init_latent=start.to(device), sampler=sampler,
                     mask=None if mask is None else mask.to(device), control=controls,
                     variety=SeedVariety(variety, variety_steps, seed=(seed + 1) & 0xFFFFFFFFFFFFFFFF,
                                         mode=variety_mode), lora_steps=model.lora_steps)
        result = dict(latent_image)
        result["samples"] = patcher.model.latent_format.process_out(out.float()).to(
            comfy.model_management.intermediate_device())
        return io.NodeOutput(result)
