"""Deterministic random weights for tiny models (tests, benchmarks and the demo's embedded model)."""

from __future__ import annotations

import torch

from .config import ZImageConfig
from .transformer import ZImageTransformer


@torch.no_grad()
def init_random_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter from a seeded CPU generator, in name order, so results do not depend on the device:
    Linear weights N(0, 1/fan_in), biases 0.1 N(0, 1), norm scales 1 + 0.1 N(0, 1), pad tokens N(0, 1).
    Unlike the zero init of the references, every path (adaLN, pad tokens, norms) then carries signal."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if param.ndim >= 2:
            value = torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5
        elif name.endswith("bias"):
            value = 0.1 * torch.randn(param.shape, generator=gen)
        elif "pad_token" in name:
            value = torch.randn(param.shape, generator=gen)
        else:
            value = 1.0 + 0.1 * torch.randn(param.shape, generator=gen)
        param.copy_(value.to(param.dtype))
    return model


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, **config_overrides) -> ZImageTransformer:
    """A randomly initialised ~1 M parameter Z-Image transformer (`ZImageConfig.tiny`)."""
    model = ZImageTransformer(ZImageConfig.tiny(**config_overrides))
    return init_random_(model, seed).to(dtype).eval()
