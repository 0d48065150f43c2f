"""fp8 weight storage for the transformer blocks: half the memory of bf16, computed in the compute dtype.

The attention (to_q/to_k/to_v/to_out) and SwiGLU (w1/w2/w3) Linears of every block hold 98 % of the weights. Stored
as float8 with one scale per output channel, each is cast to the compute dtype (bf16/fp16/fp32) one layer at a time
when it runs, and the cast weight is dropped right after, so at most one layer's up-cast copy ever exists. Everything
small and precision-sensitive (norms, adaLN modulation, embedders, final layer) stays in the compute dtype.

Scales are powers of two chosen so that each row's largest magnitude fits the fp8 range, which makes the cast back
exact in every compute dtype: the only error is the fp8 rounding of the weights themselves. Per-output-channel and
128x128 block-wise scales give the same error on real-width blocks (benchmarks/bench_fp8.py measures both), because
e4m3's 15-binade range holds a whole row; per channel is kept because it is simpler and broadcasts like the
per-tensor scales of ComfyUI's "scaled fp8" files, which load into the same layout unchanged.

The fp8 weight and its scale are frozen parameters of the module, so `.to(device)`, `module.parameters()` and block
offload move them with the block. Do not `.to(dtype)` a model with fp8 storage: that would cast the fp8 tensors.
An Fp8Linear is the QuantizedLinear (zimage_core.quant.linear) of format "fp8_channel".
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .linear import Format, QuantizedLinear, replace_module

WEIGHT_STORAGE = ("same", "fp8_e4m3fn")
FP8_DTYPES = {"fp8_e4m3fn": torch.float8_e4m3fn}
STORABLE_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)  # variants an Fp8Linear can hold as loaded from a file
QUANTIZED_MODULES = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                     "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
SCALE_NAME = "weight_scale"  # state-dict suffix of the per-channel scales (ComfyUI's per-tensor ones: scale_weight)


def dequantize(weight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """weight * scale in `dtype` (exact for power-of-two scales). Scaled in place in the one new tensor: a second
    full-size temporary would be the largest allocation of an fp8 forward (75 MB for an FFN weight)."""
    return weight.to(dtype, copy=True).mul_(scale.to(dtype))


def _dequantize_stored(tensors: dict[str, Tensor], shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    return dequantize(tensors["weight"], tensors[SCALE_NAME], dtype)


FP8_CHANNEL = Format("fp8_channel", ("weight", SCALE_NAME), _dequantize_stored)
FORMATS = {FP8_CHANNEL.name: FP8_CHANNEL}


class Fp8Linear(QuantizedLinear):
    """A QuantizedLinear of format "fp8_channel": the weight in float8 with a float32 scale per output channel
    ([out, 1]). Built empty (filled by the loader or `to_fp8_storage`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, fp8_dtype=torch.float8_e4m3fn,
                 compute_dtype: torch.dtype = torch.bfloat16, device=None):
        stored = {"weight": torch.empty(out_features, in_features, dtype=fp8_dtype, device=device),
                  SCALE_NAME: torch.ones(out_features, 1, dtype=torch.float32, device=device)}
        super().__init__(in_features, out_features, FP8_CHANNEL, stored,
                         torch.empty(out_features, dtype=compute_dtype, device=device) if bias else None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, storage={str(self.weight.dtype).removeprefix('torch.')}"


@torch.no_grad()
def quantize_fp8(weight: Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[Tensor, Tensor]:
    """(fp8 weight, fp32 scale [out, 1]): per output channel, the smallest power of two that maps the row's largest
    magnitude into the fp8 range (all-zero rows get scale 1); the fp8 values are round-to-nearest."""
    w = weight.float()
    amax = w.abs().amax(dim=1, keepdim=True)
    exponent = torch.ceil(torch.log2(amax / torch.finfo(fp8_dtype).max))
    scale = torch.where(amax > 0, torch.exp2(exponent), torch.ones_like(amax))
    return (w / scale).to(fp8_dtype), scale


def quantized_paths(model: nn.Module) -> list[str]:
    """Module paths of the Linears that fp8 storage covers: attention and SwiGLU Linears of every block (of the
    transformer, and of a Fun ControlNet)."""
    blocks = ("noise_refiner.", "context_refiner.", "layers.", "control_layers.", "control_noise_refiner.")
    return [path for path, module in model.named_modules()
            if isinstance(module, nn.Linear) and path.startswith(blocks)
            and any(path.endswith("." + suffix) for suffix in QUANTIZED_MODULES)]


def use_fp8_structure(model: nn.Module, fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> list[str]:
    """Swap the covered Linears for empty Fp8Linears on the same device (used on a meta model before loading);
    returns their paths."""
    paths = quantized_paths(model)
    for path in paths:
        old = model.get_submodule(path)
        replace_module(model, path, Fp8Linear(old.in_features, old.out_features, old.bias is not None,
                                              fp8_dtype=fp8_dtype, compute_dtype=old.weight.dtype,
                                              device=old.weight.device))
    return paths


@torch.no_grad()
def to_fp8_storage(model: nn.Module, fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> nn.Module:
    """Quantise an in-memory model's block Linears to fp8 storage in place, one layer at a time (each full-precision
    weight is freed as soon as its fp8 copy exists). Idempotent."""
    check_fp8_support(next(model.parameters()).device, fp8_dtype)
    for path in quantized_paths(model):
        old = model.get_submodule(path)
        if isinstance(old, Fp8Linear):
            continue
        new = Fp8Linear(old.in_features, old.out_features, old.bias is not None, fp8_dtype=fp8_dtype,
                        compute_dtype=old.weight.dtype, device=old.weight.device)
        new.weight.data, new.weight_scale.data = quantize_fp8(old.weight, fp8_dtype)
        if old.bias is not None:
            new.bias.copy_(old.bias)
        replace_module(model, path, new)
    return model


def has_fp8_storage(model: nn.Module) -> bool:
    return any(isinstance(m, Fp8Linear) for m in model.modules())


def check_fp8_support(device: str | torch.device, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
                      option: str = "weight_storage") -> None:
    """Raise ValueError naming `option` when this torch build cannot cast fp8 on `device` (old builds, some
    backends): the model would load but fail at its first forward. A meta model (shapes only) casts nothing."""
    if torch.device(device).type == "meta":
        return
    try:
        probe = torch.tensor([1.5, -0.25], device=device).to(fp8_dtype)
        ok = torch.equal(probe.to(torch.float32).cpu(), torch.tensor([1.5, -0.25]))
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{option}: this torch build ({torch.__version__}) cannot cast {fp8_dtype} on {device} "
                         f"({err}); use weight storage 'same' (bf16/fp16)") from None
    if not ok:
        raise ValueError(f"{option}: this torch build ({torch.__version__}) casts {fp8_dtype} wrongly on {device}; "
                         f"use weight storage 'same' (bf16/fp16)")
