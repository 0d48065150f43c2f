"""An exponential moving average of the trainable LoRA tensors (ema = decay * ema + (1 - decay) * lora after every
optimizer step, from the starting LoRA, without bias correction, as ai-toolkit's ema_config does).

The average is of the factors (down, up), which is what peers average and what can be saved as an ordinary LoRA
file; it is kept in fp32 on the LoRA's device (one extra copy of the LoRA tensors).
"""

from __future__ import annotations

import torch

from ..lora import LoraWeights
from .adapters import frozen_copy


class LoraEma:
    def __init__(self, lora: LoraWeights, decay: float):
        self.decay = float(decay)
        self.lora = frozen_copy(lora)  # an ordinary LoRA: applied for validation, saved like the trained one
        self._shadow = list(self.lora.parameters())

    @torch.no_grad()
    def update(self, lora: LoraWeights):
        torch._foreach_lerp_(self._shadow, [p.detach() for p in lora.parameters()], 1.0 - self.decay)
