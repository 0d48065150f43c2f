"""The optimizers of the trainable LoRA tensors.

adamw      torch.optim.AdamW (the default; DiffSynth's recipe): lr, adam_betas, adam_eps, weight_decay.
adafactor  torch.optim.Adafactor (torch's own, factored second moments: less state than AdamW): lr, weight_decay.
prodigy    prodigyopt.Prodigy (optional package `prodigyopt`): adapts the step size itself; lr is a multiplier
           of that estimate (1.0 is its authors' setting), with adam_betas, adam_eps, weight_decay.
adamw8bit  bitsandbytes.optim.AdamW8bit (optional package `bitsandbytes`): AdamW with 8-bit block-quantised
           state; lr, adam_betas, adam_eps, weight_decay.

Every optimizer's state_dict is plain tensors and numbers, so checkpoints hold it and resume is exact.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

import torch

OPTIMIZERS = ("adamw", "adafactor", "prodigy", "adamw8bit")
_OPTIONAL = {"prodigy": ("prodigyopt", "prodigyopt"), "adamw8bit": ("bitsandbytes.optim", "bitsandbytes")}


class MissingOptimizerPackage(ImportError):
    """An optional optimizer was chosen but its package is not installed."""


def require_optimizer(name: str):
    """The module an optional optimizer lives in (None for torch's own); a message naming the pip package when it is
    not installed."""
    if name not in _OPTIONAL:
        return None
    module, package = _OPTIONAL[name]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingOptimizerPackage(
            f"optimizer {name!r} needs the Python package '{package}', which is not installed: run "
            f"`pip install {package}` in the Python that runs ComfyUI / the trainer, or choose optimizer 'adamw' "
            f"({exc})") from exc


def build_optimizer(name: str, params: Iterable[torch.Tensor], *, lr: float, betas: tuple[float, float],
                    eps: float, weight_decay: float) -> torch.optim.Optimizer:
    params = list(params)
    module = require_optimizer(name)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay)
    if name == "prodigy":
        return module.Prodigy(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw8bit":
        return module.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
