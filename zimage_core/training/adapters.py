"""LoRA set-up for training: shape checks of given LoRAs against the model, the trainable LoRA (fresh, or grown
from an SFT LoRA) and frozen copies. Everything here works on the LoRA engine's `LoraWeights`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from ..lora import LoraWeights, new_lora
from ..quant import weight_shape


class LoraMismatch(ValueError):
    """A LoRA does not fit the model being trained (another model, another size)."""


def check_lora_fits(model: nn.Module, lora: LoraWeights, label: str) -> LoraWeights:
    """Raise LoraMismatch unless every module of `lora` names a module of `model` with the same weight shape."""
    if not lora.modules:
        detail = f" ({len(lora.unmatched)} keys, e.g. {lora.unmatched[:2]})" if lora.unmatched else ""
        raise LoraMismatch(f"{label} {lora.name} changes no module of this Z-Image model{detail}: is it a LoRA for "
                           "another model?")
    named = dict(model.named_modules())
    for path, module in lora.modules.items():
        have = weight_shape(named[path]) if path in named else None  # quantized Linears: the logical [out, in]
        if have is None:
            raise LoraMismatch(f"{label} {lora.name} patches {path!r}, which this model does not have")
        shape = module.delta_shape()
        if shape is not None and tuple(shape) != tuple(have):
            raise LoraMismatch(f"{label} {lora.name} was made for another model: {path} expects a weight of shape "
                               f"{list(shape)}, this model's is {list(have)}")
    return lora


def frozen_copy(lora: LoraWeights, device=None, dtype: torch.dtype | None = None) -> LoraWeights:
    """An independent copy whose tensors never require grad (a teacher or preset snapshot)."""
    copy = lora.to(dtype=dtype, device=device)
    modules = {}
    for path, m in copy.modules.items():
        modules[path] = replace(m, down=_frozen(m.down), up=_frozen(m.up), diff=_frozen(m.diff),
                                diff_b=_frozen(m.diff_b), factors={k: _frozen(v) for k, v in m.factors.items()})
    return replace(copy, modules=modules)


def _frozen(t):
    return None if t is None else t.detach().clone().requires_grad_(False)


@torch.no_grad()
def grow_lora(model: nn.Module, init: LoraWeights, rank: int, alpha: float | None = None,
              targets: Sequence[str] = (), seed: int = 0) -> LoraWeights:
    """A trainable fp32 LoRA of `rank` that starts equal to `init` (an SFT LoRA of rank r <= rank).

    The first r components copy `init` (its `up` rescaled by init_scale / new_scale so the delta is unchanged; a
    no-op when both scales are 1). The other components keep the fresh peft initialisation (down random, up 0):
    zero-padding both factors would leave them at a saddle with no gradient (trainer-feasibility P3). Modules of
    `init` outside `targets` are added; all modules must be plain LoRA (not LoKr/LoHa/diff)."""
    bad = [p for p, m in init.modules.items() if m.kind != "lora"]
    if bad:
        raise LoraMismatch(f"{init.name}: only plain LoRA modules can be trained further; {bad[0]} is {init.modules[bad[0]].kind}")
    if init.rank > rank:
        raise LoraMismatch(f"rank {rank} is below the rank {init.rank} of the LoRA it starts from ({init.name})")
    paths = list(dict.fromkeys([*targets, *init.modules]))
    fresh = new_lora(model, rank=rank, alpha=alpha, targets=paths, seed=seed, dtype=torch.float32)
    modules = dict(fresh.modules)
    for path, src in init.modules.items():
        dst = modules[path]
        r = src.rank
        factor = src.scale / dst.scale
        dst.down[:r].copy_(src.down.float())
        up = src.up.float()
        dst.up[:, :r].copy_(up * factor if factor != 1.0 else up)
    metadata = {**fresh.metadata, "init_lora": init.name}
    return replace(fresh, modules=modules, metadata=metadata)


def count_parameters(lora: LoraWeights) -> int:
    return sum(t.numel() for t in lora.parameters())

