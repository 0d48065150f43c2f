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


def tiny_config():
    """A tiny Z-Image whose block Linears fit nunchaku's 128 x 128 tiles (dim 128, SwiGLU hidden 384)."""
    return dict(dim=128, n_heads=2, axes_dims=(16, 24, 24), ffn_hidden_dim=384)


def write_file(model, path, rank: int = 32, skip_refiners: bool = False, fp4: bool = False):
    """Save `model` as nunchaku's Z-Image file (diffusers names, fused `attention.to_qkv` and SwiGLU
    `feed_forward.net.0.proj` = [w3; w1], `net.2` = w2): the block Linears replaced by random int4 SVDQuant Linears of
    `rank` in nunchaku's packed layout (with skip_refiners the refiner blocks stay bf16, their FFN fused the same way),
    the rest in bf16. Returns {model Linear path: reference fp64 weight W_eff}."""
    import json

    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(rank)
    state = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
    out, refs = {}, {}
    blocks = sorted({k.rsplit(".attention.", 1)[0] for k in state if ".attention.to_q.weight" in k})
    for block in blocks:
        fused = {
            "attention.to_qkv": ("attention.to_q", "attention.to_k", "attention.to_v"),
            "attention.to_out.0": ("attention.to_out.0",),
            "feed_forward.net.0.proj": ("feed_forward.w3", "feed_forward.w1"),
            "feed_forward.net.2": ("feed_forward.w2",),
        }
        refiner = not block.startswith("layers.")
        for name, parts in fused.items():
            weights = [state.pop(f"{block}.{p}.weight") for p in parts]
            if refiner and skip_refiners:
                out[f"{block}.{name}.weight"] = torch.cat(weights)  # bf16, fused as nunchaku's FeedForward holds it
                continue
            n, k = sum(w.shape[0] for w in weights), weights[0].shape[1]
            lin = random_linear(n, k, rank, gen)
            out.update({f"{block}.{name}.{key}": t for key, t in nunchaku_tensors(lin).items()})
            w_eff = float_weight(lin)
            for part, rows in zip(parts, w_eff.split([w.shape[0] for w in weights])):
                refs[f"{block}.{part}"] = rows
            if fp4:
                out[f"{block}.{name}.wtscale"] = torch.ones(1, dtype=torch.bfloat16)
    for key, value in state.items():
        out[key] = value
    config = {"weight": {"dtype": "fp4_e2m1_all" if fp4 else "int4", "group_size": 16 if fp4 else 64},
              "rank": rank, "skip_refiners": skip_refiners}
    save_file({k: v.contiguous() for k, v in out.items()}, str(path),
              metadata={"quantization_config": json.dumps(config)})
    return refs


def reference_model(model, refs: dict):
    """`model` with its plain weights rounded to bf16 (as the file stores them) and each quantized Linear's weight
    set to the float W_eff (computed in fp64, rounded to fp32)."""
    import copy

    ref_model = copy.deepcopy(model).to(torch.bfloat16).float()
    with torch.no_grad():
        for path, w in refs.items():
            ref_model.get_submodule(path).weight.copy_(w)
    return ref_model
