"""Deterministic random weights for tiny models (tests, benchmarks and the demo's embedded model)."""

from __future__ import annotations

import torch

from .config import ZImageConfig
from .controlnet import ControlNetConfig, ZImageControlNet
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


def tiny_controlnet(release: str = "2.1", seed: int = 1, dtype: torch.dtype = torch.float32, n_control_layers=None,
                    base: ZImageConfig | None = None) -> ZImageControlNet:
    """A random Fun ControlNet of a released layout ("1.0", "2.0", "2.1", "2.1-lite") at the width of `base`
    (default `ZImageConfig.tiny()`), with `n_control_layers` (default: half the base's layers, at least 1) and as
    many refiner hints as the base has refiner blocks."""
    base = base or ZImageConfig.tiny()
    cfg = ControlNetConfig.release(release, dim=base.dim, n_heads=base.n_heads,
                                   n_refiner_layers=base.n_refiner_layers)
    cfg = cfg.replace(n_control_layers=n_control_layers or max(1, base.n_layers // 2))
    return init_random_(ZImageControlNet(cfg), seed).to(dtype).eval()
