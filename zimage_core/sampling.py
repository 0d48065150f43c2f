"""The Euler sampling loop of Z-Image-Turbo, with classifier-free guidance in the ComfyUI/DiffSynth convention."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .controlnet import ControlSchedule
from .scheduler import DEFAULT_SHIFT, denoise_sigmas


@dataclass(frozen=True)
class SamplerPreset:
    name: str
    steps: int
    cfg: float


TURBO = SamplerPreset("turbo", steps=8, cfg=1.0)  # what Z-Image-Turbo is distilled for
QUALITY = SamplerPreset("quality", steps=30, cfg=2.0)  # an SFT LoRA without a DistillPatch (scheme 1)

StepCallback = Callable[[int, int, Tensor], None]


def _as_caption_list(captions, batch: int, name: str) -> list[Tensor]:
    if isinstance(captions, Tensor):
        if captions.ndim == 2:
            return [captions] * batch
        if captions.ndim == 3 and captions.shape[0] in (1, batch):
            return list(captions.expand(batch, -1, -1).unbind(0))
        raise ValueError(f"{name} must be [L, D], [B, L, D] or a list of [L, D], got {list(captions.shape)}")
    captions = list(captions)
    if len(captions) == 1:
        captions = captions * batch
    if len(captions) != batch:
        raise ValueError(f"{len(captions)} {name} captions for a batch of {batch}")
    return captions


def sample(model, noise: Tensor, positive, negative=None, steps: int = TURBO.steps, cfg: float = TURBO.cfg,
           shift: float = DEFAULT_SHIFT, denoise: float = 1.0, callback: StepCallback | None = None,
           init_latent: Tensor | None = None, control: Sequence = ()) -> Tensor:
    """Sample with the flow-matching Euler sampler and return the final latent (model space, fp32).

    noise: [B, C, H, W] Gaussian noise. With `denoise` < 1, `init_latent` (the clean latent to start from) is
    noised to the first sigma as (1 - s) * init_latent + s * noise; without `init_latent`, `noise` is taken to be
    that partially noised latent already. cfg: `neg + cfg * (pos - neg)`; cfg == 1 makes exactly one model call per
    step and ignores `negative`; a missing negative with cfg != 1 uses zeroed positive features (ComfyUI's
    ConditioningZeroOut). callback(step, total, x0_estimate) runs after each step and may raise to interrupt.
    control: `zimage_core.controlnet.ControlInput`s (several add up), each acting on its start/end share of the steps.
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps}")
    if cfg < 0:
        raise ValueError(f"cfg must be >= 0, got {cfg}")
    if noise.ndim != 4:
        raise ValueError(f"noise must be a [B, C, H, W] latent, got shape {list(noise.shape)}")
    schedule = denoise_sigmas(int(steps), denoise, shift)
    batch = noise.shape[0]
    pos = _as_caption_list(positive, batch, "positive")
    guided = cfg != 1.0
    if guided:
        neg = [torch.zeros_like(c) for c in pos] if negative is None else _as_caption_list(negative, batch, "negative")

    controls = ControlSchedule(model, control, noise.shape) if control else None
    x = noise.float()
    if init_latent is not None and denoise < 1.0:
        first = float(schedule[0])
        x = (1.0 - first) * init_latent.float() + first * x
    for i in range(int(steps)):
        sigma, sigma_next = float(schedule[i]), float(schedule[i + 1])
        hook = controls.at(i, int(steps)) if controls is not None else None
        extra = {} if hook is None else {"residuals": hook}
        if guided:
            v_pos, v_neg = model(torch.cat([x, x]), torch.full((2 * batch,), sigma), pos + neg,
                                 **extra).float().chunk(2)
            v = v_neg + cfg * (v_pos - v_neg)
        else:
            v = model(x, torch.full((batch,), sigma), pos, **extra).float()
        if callback is not None:
            callback(i + 1, int(steps), x - sigma * v)
        x = x + (sigma_next - sigma) * v
    return x
