"""Learning-rate schedules: the factor on `lr` of optimizer step `step` (0-based) of a run of `steps` steps.

A pure function of the step, so a resumed run continues the schedule exactly where it stopped. The warm-up rises
linearly to the full lr and reaches it at step `warmup - 1` ((step + 1) / warmup): unlike diffusers' get_scheduler,
whose first step has lr 0, no step is spent without an update. After the warm-up, cosine falls as half a cosine
and linear as a straight line towards 0 at the end of the run (the last step keeps a small positive lr).
"""

from __future__ import annotations

import math

DIFFSYNTH_WARMUP = (5, 1.0 / 3.0)  # DiffSynth's implicit torch ConstantLR: 5 steps at lr/3 (errata D4)


def lr_factor(schedule: str, step: int, steps: int, warmup: int = 0) -> float:
    if schedule == "constant":
        return 1.0
    if schedule == "diffsynth":
        return DIFFSYNTH_WARMUP[1] if step < DIFFSYNTH_WARMUP[0] else 1.0
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant_with_warmup":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown lr_schedule {schedule!r}")
