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
