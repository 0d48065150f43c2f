"""The sampling loop of Z-Image-Turbo: classifier-free guidance in the ComfyUI/DiffSynth convention, a step rule
from `samplers` (euler, res_multistep) and inpainting with a noise mask, as ComfyUI's KSampler runs them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .controlnet import ControlSchedule
from .samplers import step_rule
from .scheduler import DEFAULT_SHIFT, denoise_sigmas

if TYPE_CHECKING:
    from .lora.schedule import LoraSchedule


@dataclass(frozen=True)
class SamplerPreset:
    name: str
    steps: int
    cfg: float


TURBO = SamplerPreset("turbo", steps=8, cfg=1.0)  # what Z-Image-Turbo is distilled for
QUALITY = SamplerPreset("quality", steps=30, cfg=2.0)  # an SFT LoRA without a DistillPatch (scheme 1)
# Z-Image base (not distilled): DiffSynth-Studio's Z-Image example and ComfyUI's image_z_image template both sample
# 50 steps at cfg 4, shift 3, with an empty negative prompt.
BASE = SamplerPreset("base", steps=50, cfg=4.0)

StepCallback = Callable[[int, int, Tensor], None]


VARIETY_MODES = ("shift", "caption")


@dataclass(frozen=True)
class SeedVariety:
    """More variety across seeds at 8 steps, for the first `steps` steps only (drawn from `seed`, one draw per batch
    row); the later steps are the classic sampler's. A distilled model (and more so a LoRA trained on a few images)
    maps most seeds to nearly one layout, which its first steps settle. strength 0 or steps 0 = off.

    mode "shift" (the default): after each of the first `steps` steps, the latent (and the step's clean estimate)
    is rolled by a random offset of up to `strength` times the picture's side on each axis (torch.roll, so content
    leaving one border comes back at the other; strength <= 0.5). The noise keeps its statistics, so the model
    goes on denoising, and the half-formed layout lands somewhere else; the prompt is never touched. The Euler step
    commutes with the roll; res_multistep's second-order term on a rolled step uses the previous step's estimate
    as it was (rolled by the previous offset only), which the first unshifted step no longer does.

    mode "caption": the positive caption features get Gaussian noise of `strength` times each token's RMS (the idea
    of the seed-variance node packs, which noise the text embedding for the first steps)."""

    strength: float = 0.0
    steps: int = 2
    seed: int = 0
    mode: str = "shift"

    def __post_init__(self):
        if self.mode not in VARIETY_MODES:
            raise ValueError(f"seed variety: unknown mode {self.mode!r}; choose one of {list(VARIETY_MODES)}")
        if self.strength < 0 or self.steps < 0 or int(self.steps) != self.steps:
            raise ValueError(f"seed variety: strength must be >= 0 and steps an integer >= 0, got strength "
                             f"{self.strength}, steps {self.steps}")
        if self.mode == "shift" and self.strength > 0.5:
            raise ValueError(f"seed variety: a shift strength is the largest offset as a share of the picture's "
                             f"side, 0 to 0.5, got {self.strength} (caption noise takes larger values: "
                             f"mode 'caption')")

    @property
    def on(self) -> bool:
        return self.strength > 0 and self.steps > 0

    def perturbed(self, captions: list[Tensor]) -> list[Tensor]:
        """The captions with this option's noise added (fp32 noise from a CPU generator, so the same seed gives the
        same noise on every device)."""
        gen = torch.Generator().manual_seed(int(self.seed))
        out = []
        for c in captions:
            noise = torch.randn(c.shape, generator=gen).to(c.device)
            rms = c.float().pow(2).mean(-1, keepdim=True).sqrt()
            out.append((c.float() + self.strength * rms * noise).to(c.dtype))
        return out

    def offsets(self, batch: int, height: int, width: int) -> Tensor:
        """The shift mode's offsets, [batch, steps, 2] integers (dy, dx): uniform in [-m, m] with m = strength
        times the side, rounded (a CPU generator, so the same seed gives the same offsets on every device)."""
        gen = torch.Generator().manual_seed(int(self.seed))
        reach = torch.tensor([round(self.strength * height), round(self.strength * width)])
        draw = torch.rand((batch, int(self.steps), 2), generator=gen, dtype=torch.float64)
        return (draw * (2 * reach + 1)).floor().long().clamp_max(2 * reach) - reach


def _rolled(x: Tensor, offsets: Tensor) -> Tensor:
    """Each batch row of [B, C, H, W] rolled by its own (dy, dx)."""
    return torch.stack([torch.roll(row, (int(dy), int(dx)), (-2, -1)) for row, (dy, dx) in zip(x, offsets.tolist())])


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


def _as_mask(mask: Tensor, noise: Tensor, init_latent: Tensor | None) -> Tensor:
    if init_latent is None:
        raise ValueError("an inpainting mask needs init_latent (the latent whose unmasked region is kept)")
    if mask.ndim != 4 or mask.shape[-2:] != noise.shape[-2:] or mask.shape[0] not in (1, noise.shape[0]) \
            or mask.shape[1] not in (1, noise.shape[1]):
        raise ValueError(f"mask has shape {list(mask.shape)}; it must be [1 or B, 1 or C, H, W] at the latent's "
                         f"size {list(noise.shape[-2:])} (latent shape {list(noise.shape)})")
    return mask.float().clamp(0.0, 1.0)


def sample(model, noise: Tensor, positive, negative=None, steps: int = TURBO.steps, cfg: float = TURBO.cfg,
           shift: float = DEFAULT_SHIFT, denoise: float = 1.0, callback: StepCallback | None = None,
           init_latent: Tensor | None = None, sampler: str = "euler", mask: Tensor | None = None,
           control: Sequence = (), variety: SeedVariety | None = None, lora_steps: LoraSchedule | None = None
           ) -> Tensor:
    """Sample and return the final latent (model space, fp32).

    noise: [B, C, H, W] Gaussian noise. The start is `init_latent` (the clean latent, if given) noised to the first
    sigma as (1 - s) * init_latent + s * noise (KSampler's noise scaling; pure noise at denoise 1); without
    `init_latent`, `noise` is taken to be that start already. cfg: `neg + cfg * (pos - neg)`; cfg == 1 makes exactly
    one model call per step and ignores `negative`; a missing negative with cfg != 1 uses zeroed positive features
    (ComfyUI's ConditioningZeroOut). sampler: a step rule of `zimage_core.samplers` ("euler", "res_multistep").

    mask: inpainting, ComfyUI's LATENT noise_mask ([1 or B, 1 or C, H, W] at latent size, 1 = regenerate, 0 = keep
    `init_latent`). As KSampler does (comfy.samplers.KSamplerX0Inpaint), before every model call the kept region
    of the model input is replaced by `init_latent` noised to the current sigma with the same `noise`, and the kept
    region of the x0 estimate by `init_latent`, so the result keeps `init_latent` there (up to rounding).

    control: `zimage_core.controlnet.ControlInput`s (several add up), each acting on its start/end share of the steps.
    variety: `SeedVariety`, more variety across seeds by a random shift of the latent after each of the first steps
    (or noise in the positive caption features for them); None or strength 0 = off, which leaves every step exactly
    as without it.
    lora_steps: the step ranges of the applied LoRA stack (`apply_loras(...).schedule`): each ranged LoRA is switched
    on for the steps of its range only, and every one is on again afterwards.
    callback(step, total, x0_estimate) runs after each step and may raise to interrupt.
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps}")
    if cfg < 0:
        raise ValueError(f"cfg must be >= 0, got {cfg}")
    if noise.ndim != 4:
        raise ValueError(f"noise must be a [B, C, H, W] latent, got shape {list(noise.shape)}")
    schedule = denoise_sigmas(int(steps), denoise, shift)
    step = step_rule(sampler, schedule)
    if mask is not None:
        mask = _as_mask(mask, noise, init_latent)
        keep = 1.0 - mask
    batch = noise.shape[0]
    pos = _as_caption_list(positive, batch, "positive")
    variety = variety if variety is not None and variety.on else None
    varied = variety.perturbed(pos) if variety is not None and variety.mode == "caption" else None
    shifts = variety.offsets(batch, *noise.shape[-2:]) if variety is not None and variety.mode == "shift" else None
    if shifts is not None and ((init_latent is not None and denoise < 1.0) or mask is not None or control):
        # the roll would move the picture away from the image, mask or control hint it must stay aligned with
        raise ValueError("seed variety mode 'shift' moves the layout, which an input image, inpainting mask or "
                         "ControlNet hint fixes: use mode 'caption' (or variety 0) with them")
    guided = cfg != 1.0
    if guided:
        neg = [torch.zeros_like(c) for c in pos] if negative is None else _as_caption_list(negative, batch, "negative")

    controls = ControlSchedule(model, control, noise.shape) if control else None
    noise = noise.float()
    init = None if init_latent is None else init_latent.float()
    x = noise if init is None else (1.0 - float(schedule[0])) * init + float(schedule[0]) * noise
    try:
        for i in range(int(steps)):
            sigma = float(schedule[i])
            if lora_steps:
                lora_steps.at(i, int(steps))
            x_in = x if mask is None else x * mask + ((1.0 - sigma) * init + sigma * noise) * keep
            hook = controls.at(i, int(steps)) if controls is not None else None
            extra = {} if hook is None else {"residuals": hook}
            caps = varied if varied is not None and i < variety.steps else pos
            if guided:
                v_pos, v_neg = model(torch.cat([x_in, x_in]), torch.full((2 * batch,), sigma), caps + neg,
                                     **extra).float().chunk(2)
                v = v_neg + cfg * (v_pos - v_neg)
            else:
                v = model(x_in, torch.full((batch,), sigma), caps, **extra).float()
            denoised = x_in - sigma * v
            if mask is not None:
                denoised = denoised * mask + init * keep
            if callback is not None:
                callback(i + 1, int(steps), denoised)
            if shifts is not None and i < variety.steps:  # both rolled: the Euler step commutes with the roll
                x, denoised = _rolled(x, shifts[:, i]), _rolled(denoised, shifts[:, i])
            x = step(x, denoised, i)
    finally:
        if lora_steps:
            lora_steps.reset()
    return x
