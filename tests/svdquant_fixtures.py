"""nunchaku SVDQuant test fixtures without a download: random int4 Linears in the logical form, and the forward
packing of nunchaku's files restated from its description (nunchaku `lora/flux/packer.py` NunchakuWeightPacker and
deepcompressor's `convert_to_nunchaku_w4x4y16_linear_weight`, as summarised in the knowledge base's
quantized-formats.md §3 plus the pack_scale order of smooth_factor and bias): the loader's unpacker must invert it
exactly. Written independently of zimage_core.quant.svdquant (forward direction only)."""

from __future__ import annotations

import torch

_QWEIGHT_PERM = (0, 5, 6, 1, 3, 8, 2, 7, 4, 9)


def pack_qweight(values: torch.Tensor) -> torch.Tensor:
    """signed int4 [N, K] -> nunchaku qweight int8 [N, K/2] (MMA tiles, 8 nibbles per little-endian int32)."""
    n, k = values.shape
    w = values.to(torch.int32).reshape(n // 128, 8, 2, 8, 1, k // 64, 1, 2, 4, 8).permute(*_QWEIGHT_PERM)
    w = (w.contiguous() & 0xF) << torch.arange(0, 32, 4, dtype=torch.int32)
    return w.sum(dim=-1, dtype=torch.int32).contiguous().view(torch.int8).reshape(n, k // 2)


def pack_scale(scale: torch.Tensor) -> torch.Tensor:
    """[N, groups] -> nunchaku's [groups, N] (pack_scale, warp_n 128); a [N] vector (groups 1) -> [N]."""
    n = scale.shape[0]
    s = scale.reshape(n // 128, 1, 8, 2, 4, 2, -1).permute(0, 6, 1, 2, 4, 3, 5).contiguous()
    return s.reshape(-1) if scale.dim() == 1 else s.reshape(-1, n)


def pack_lowrank(weight: torch.Tensor, down: bool) -> torch.Tensor:
    """down [R, K] -> stored [K, R]; up [N, R] -> stored [N, R] (16 x 16 MMA fragments)."""
    if down:
        r, c = weight.shape
        w = weight.reshape(r // 16, 16, c // 16, 16).permute(2, 0, 1, 3)
    else:
        c, r = weight.shape
        w = weight.reshape(c // 16, 16, r // 16, 16).permute(0, 2, 1, 3)
    w = w.reshape(w.shape[0], w.shape[1], 2, 8, 1, 2, 4, 2).permute(0, 1, 3, 6, 2, 5, 4, 7)
    return w.contiguous().reshape(c, r)


def random_linear(n: int, k: int, rank: int, gen: torch.Generator, dtype=torch.bfloat16) -> dict:
    """Logical SVDQuant Linear: int4 residual in [-8, 7], wscales [N, K/64] > 0, smooth [K] > 0, down [R, K],
    up [N, R], bias [N] (zeros, as nunchaku's converter writes for bias-free Linears)."""
    return {
        "values": torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int32).to(torch.int8),
        "scales": ((torch.rand(n, k // 64, generator=gen) + 0.5) * 2e-3).to(dtype),
        "smooth": (torch.rand(k, generator=gen) + 0.5).to(dtype),
        "down": (torch.randn(rank, k, generator=gen) / k ** 0.5).to(dtype),
        "up": (torch.randn(n, rank, generator=gen) * 0.02).to(dtype),
        "bias": torch.zeros(n, dtype=dtype),
    }


def nunchaku_tensors(lin: dict) -> dict:
    """The stored tensors of one quantized Linear in a nunchaku file."""
    return {
        "qweight": pack_qweight(lin["values"]),
        "wscales": pack_scale(lin["scales"]),
        "smooth_factor": pack_scale(lin["smooth"]),
        "smooth_factor_orig": lin["smooth"].clone(),
        "proj_down": pack_lowrank(lin["down"], down=True),
        "proj_up": pack_lowrank(lin["up"], down=False),
        "bias": pack_scale(lin["bias"]),
    }


def float_weight(lin: dict) -> torch.Tensor:
    """The float reference W_eff = (values * scales) / smooth + up @ down, in fp64 for a tight comparison."""
    n, k = lin["values"].shape
    w = lin["values"].double().reshape(n, k // 64, 64) * lin["scales"].double().unsqueeze(-1)
    return w.reshape(n, k) / lin["smooth"].double() + lin["up"].double() @ lin["down"].double()
