"""Test-only bridges to the reference implementations (diffusers), fed the very same weights."""

from __future__ import annotations

import numpy as np
import torch


def diffusers_twin(model):
    """diffusers' ZImageTransformer2DModel holding exactly the weights of our model."""
    from diffusers import ZImageTransformer2DModel

    cfg = {k: v for k, v in model.config.to_diffusers().items() if not k.startswith("_")}
    ref = ZImageTransformer2DModel(**cfg).to(model.dtype)
    missing, unexpected = ref.load_state_dict(model.state_dict(), strict=True)
    assert not missing and not unexpected
    return ref.eval()


def diffusers_velocity(ref, latents, t, captions):
    """diffusers' raw output at model time t, negated into our velocity convention, as [B, C, H, W]."""
    out = ref([x[:, None] for x in latents], t, list(captions), return_dict=False)[0]
    return -torch.stack([o[:, 0] for o in out])


def diffusers_sample(ref, noise, positive, negative, steps, cfg):
    """ZImagePipeline's denoising loop (latents and prompt embeddings given; guidance_scale = cfg - 1)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=ref)
    pipe.set_progress_bar_config(disable=True)
    h, w = noise.shape[-2:]
    out = pipe(prompt_embeds=list(positive), negative_prompt_embeds=list(negative) if negative is not None else None,
               height=h * 8, width=w * 8, num_inference_steps=steps, guidance_scale=cfg - 1.0,
               latents=noise.clone(), output_type="latent", return_dict=False)[0]
    return out


def diffusers_sigmas(steps: int) -> torch.Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps).tolist())
    return scheduler.sigmas


def diffusers_inpaint(ref, image_latents, mask, positive, negative, steps, cfg, seed, strength=1.0):
    """ZImageInpaintPipeline's denoising loop on a latent image (its image processor is told the image is a
    16-channel latent, and a one-level 16-channel VAE keeps the mask at latent size, so no real VAE is involved).
    mask: [1, 1, H, W] at latent size, 1 = repaint. The noise is randn from a CPU generator seeded with `seed`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageInpaintPipeline
    from diffusers.image_processor import VaeImageProcessor

    channels = image_latents.shape[1]
    # only encodes the (unused) masked-image latents; one level keeps the pipeline's pixel size = latent size
    vae = AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=channels,
                        block_out_channels=(8,), norm_num_groups=4, layers_per_block=1,
                        scaling_factor=0.3611, shift_factor=0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImageInpaintPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=ref)
    pipe.image_processor = VaeImageProcessor(vae_scale_factor=2, vae_latent_channels=channels)
    pipe.set_progress_bar_config(disable=True)
    h, w = image_latents.shape[-2:]
    return pipe(image=image_latents.clone(), mask_image=mask.clone(), prompt_embeds=list(positive),
                negative_prompt_embeds=list(negative) if negative is not None else None, height=h, width=w,
                num_inference_steps=steps, strength=strength, guidance_scale=cfg - 1.0,
                generator=torch.Generator().manual_seed(seed), output_type="latent", return_dict=False)[0]
