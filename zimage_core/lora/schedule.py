"""LoRAs that act on part of the sampling steps only (a step range per stack entry).

Stacking a shape LoRA and a colour LoRA as a plain sum lets them overwrite each other, and turning both down (the
usual workaround) loses both. Giving each its own steps keeps them apart in time instead: on the toy world
(docs/lora-stacking.md) ending the shape LoRA at three quarters of the steps, so the colour LoRA paints the last ones
alone, draws the combined prompt as prompted in 0.81 of samples against the sum's 0.12. ComfyUI's hook keyframes and
A1111's [lora:x:0.5] scheduling do the same.

An entry with a range narrower than [0, 1] is applied as runtime side branches (never merged), whatever the stack's
mode: its factors (0-d tensors, apply.Branch) are set to their full value on the steps of its range and to 0 on the
others, in place, so a compiled model sees a changed input, not a changed graph. `sample(..., lora_steps=...)` calls
`at(step, steps)` before each step and `reset()` afterwards (every entry on again, as outside sampling).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..scheduler import StepRange


class LoraSchedule:
    """The ranged entries of one applied stack: for each, its range and its branches' factors at full value."""

    def __init__(self):
        self.entries: list[tuple[str, StepRange, list[tuple[Tensor, float]]]] = []

    def add(self, name: str, step_range: StepRange, factors: list[Tensor]) -> None:
        self.entries.append((name, step_range, [(f, float(f)) for f in factors]))

    def __bool__(self) -> bool:
        return bool(self.entries)

    @torch.no_grad()
    def at(self, step: int, steps: int) -> None:
        """Turn each entry on or off for step `step` of `steps`."""
        for _, step_range, factors in self.entries:
            on = step_range.active(step, steps)
            for factor, value in factors:
                factor.fill_(value if on else 0.0)

    @torch.no_grad()
    def reset(self) -> None:
        for _, _, factors in self.entries:
            for factor, value in factors:
                factor.fill_(value)

    def describe(self, steps: int) -> list[str]:
        """One line per entry: which of `steps` steps it acts on (1-based), e.g. 'bar.safetensors: steps 1-6 of 8'."""
        lines = []
        for name, step_range, _ in self.entries:
            active = step_range.steps_of(steps)
            span = f"steps {active[0] + 1}-{active[-1] + 1}" if active else "no step"
            lines.append(f"{name}: {span} of {steps} ({step_range})")
        return lines
