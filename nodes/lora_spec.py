"""One LoRA of a stack as the `ZIMAGE_MODEL` wire carries it (nodes/types.py): its own module, so that the wire type
and the LoRA file cache (nodes/lora_cache.py) both use it without importing each other."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..zimage_core.scheduler import StepRange

ROLE_LORA, ROLE_DISTILLPATCH, ROLE_TRAINED = "lora", "distillpatch", "trained"


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA in a stack: the file (absolute path and its mtime, so an edited file is reloaded), the name the
    user picked in the loras folder (for messages), the strength, its role in the stack and the share of the sampling
    steps it acts on (start / end, zimage_core.scheduler.StepRange; 0 / 1 = every step)."""

    path: str
    name: str
    strength: float
    role: str = ROLE_LORA
    mtime: float = 0.0
    start: float = 0.0
    end: float = 1.0

    @classmethod
    def from_file(cls, path: str, name: str, strength: float, role: str = ROLE_LORA, start: float = 0.0,
                  end: float = 1.0) -> "LoraSpec":
        return cls(os.path.abspath(path), name, float(strength), role, os.path.getmtime(path), float(start),
                   float(end))

    @property
    def step_range(self) -> StepRange:
        return StepRange(self.start, self.end)

    @property
    def ranged(self) -> bool:
        return not self.step_range.full
