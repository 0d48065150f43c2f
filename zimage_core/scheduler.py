"""Flow-matching sigma schedules of Z-Image (FlowMatchEulerDiscreteScheduler, shift 3, no dynamic shifting).

Convention everywhere: x_sigma = (1 - sigma) * x0 + sigma * noise, velocity v = noise - x0, Euler step
x_next = x + (sigma_next - sigma) * v. sigma = 1 is pure noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_SHIFT = 3.0


def shift_sigmas(sigmas: Tensor, shift: float = DEFAULT_SHIFT) -> Tensor:
    """The static time shift s' = shift * s / (1 + (shift - 1) * s)."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def sigmas(steps: int, shift: float = DEFAULT_SHIFT) -> Tensor:
    """`steps + 1` sigmas from 1 to 0: shift(linspace(1, 1/steps, steps)) then a terminal 0, exactly as diffusers'
    ZImagePipeline sets up Z-Image-Turbo's scheduler (8 steps: 1, .954545, .9, .833333, .75, .642857, .5, .3, 0)."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    base = torch.linspace(1.0, 1.0 / steps, int(steps), dtype=torch.float64)
    return torch.cat([shift_sigmas(base, shift), torch.zeros(1, dtype=torch.float64)]).float()


def denoise_sigmas(steps: int, denoise: float = 1.0, shift: float = DEFAULT_SHIFT) -> Tensor:
    """Sigmas for image-to-image: the last `steps` steps of a `round(steps / denoise)`-step schedule (ComfyUI's rule),
    so `denoise` < 1 starts from a partially noised latent at the returned first sigma."""
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    if denoise == 1.0:
        return sigmas(steps, shift)
    total = max(int(steps / denoise), steps)
    return sigmas(total, shift)[-(steps + 1):]


def training_sigmas(num_train_timesteps: int = 1000, shift: float = DEFAULT_SHIFT) -> Tensor:
    """The 1000-entry training grid of DiffSynth's Z-Image template: shift(linspace(1, 0, N + 1)[:-1])."""
    base = torch.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=torch.float64)[:-1]
    return shift_sigmas(base, shift).float()


def insert_sigmas(grid: Tensor, targets: Tensor) -> tuple[Tensor, list[int]]:
    """Replace, for each target sigma, the nearest entry of a decreasing schedule by the target itself
    (DiffSynth's `target_timesteps`). Returns the new schedule and the indices of the targets in it."""
    grid = grid.clone()
    indices = []
    for target in targets.tolist():
        index = int((grid[:-1] - target).abs().argmin())  # never replace the terminal 0
        grid[index] = target
        indices.append(index)
    if len(set(indices)) != len(indices) or not bool((grid[:-1] > grid[1:]).all()):
        raise ValueError("target sigmas collide on this grid; use more teacher steps")
    return grid, indices


@dataclass(frozen=True)
class StepRange:
    """The share of the sampling steps something acts on (a ControlNet, a LoRA of a stack): step i of n when
    start <= i / n and (i + 1) / n <= end (diffusers' control_guidance_start / end)."""

    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"a step range must satisfy 0 <= start < end <= 1, got start {self.start}, end {self.end}")

    @property
    def full(self) -> bool:
        return self.start == 0.0 and self.end == 1.0

    def active(self, step: int, steps: int) -> bool:
        return self.start <= step / steps and (step + 1) / steps <= self.end

    def steps_of(self, steps: int) -> list[int]:
        """The steps (0-based) of `steps` this range acts on, e.g. for a report."""
        return [i for i in range(steps) if self.active(i, steps)]

    def __str__(self) -> str:
        return f"steps {self.start:g}-{self.end:g}"
