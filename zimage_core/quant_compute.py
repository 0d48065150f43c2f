"""Quantized GEMMs for quantized block Linears: the `compute` choice of a quantized Linear.

Today's quantized Linear is zimage_core.quantization's Fp8Linear (fp8 e4m3 weights, one power-of-two scale per
output channel). Its default compute, "dequant", casts the weight to the compute dtype and runs a bf16/fp16 GEMM:
the only error is the weights' fp8 rounding. The alternatives quantize the *activation* too, per token, and run a
low-precision GEMM with both scales applied to the fp32 accumulator:

| compute | GEMM | runs on | extra error (the activation's rounding) |
|---|---|---|---|
| `dequant` | weight -> compute dtype, bf16/fp16 GEMM | everywhere | none |
| `fp8_gemm` | `torch._scaled_mm`, e4m3 x e4m3, row-wise scales (per token x per channel) | NVIDIA sm >= 8.9 (Ada, Hopper, Blackwell) | tests/test_quant_compute.py, docs/speed-options.md |
| `int8_gemm` | `torch._int_mm`, int8 x int8 -> int32, row-wise scales | CUDA (and CPU) | for int8 weight files (`int8_rowwise_linear`, used once quant-core's int8 formats land) |

"auto" picks fp8_gemm where fp8 tensor cores exist and dequant elsewhere (on CPU `_scaled_mm` exists but runs at
0.43-0.46x the dequant path: speed-paths.md 5.6). The low-precision GEMMs run only without autograd (sampling); a
training forward always takes the dequant path, whose backward is defined. LoRA side branches are separate
Linears' hooks: they stay in the compute dtype whatever the base's compute.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

COMPUTE_MODES = ("auto", "dequant", "fp8_gemm")  # what a user can choose (loader node)
E4M3_MAX = 448.0
INT8_MAX = 127.0


def _rowwise_scale(x2: Tensor, qmax: float) -> Tensor:
    """Per-row scale [M, 1] (fp32) that maps each row's largest magnitude to qmax (all-zero rows: 1)."""
    amax = x2.abs().amax(dim=1, keepdim=True).float()
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def fp8_rowwise_linear(x: Tensor, weight: Tensor, weight_scale: Tensor) -> Tensor:
    """x @ (weight * weight_scale).T with x quantized to e4m3 per token: one `torch._scaled_mm` (fp32 accumulate,
    both scales applied to the accumulator, output in x's dtype). weight: e4m3 [out, in]; weight_scale [out, 1]."""
    x2 = x.reshape(-1, x.shape[-1])
    x_scale = _rowwise_scale(x2, E4M3_MAX)
    xq = (x2.float() / x_scale).to(torch.float8_e4m3fn)
    out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.float().reshape(1, -1),
                           out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def int8_rowwise_linear(x: Tensor, weight: Tensor, weight_scale: Tensor) -> Tensor:
    """x @ (weight * weight_scale).T for an int8 weight [out, in] with per-channel scales [out, 1]: x quantized to
    int8 per token, `torch._int_mm` (exact int32 accumulation), both scales applied in fp32."""
    x2 = x.reshape(-1, x.shape[-1])
    x_scale = _rowwise_scale(x2, INT8_MAX)
    xq = torch.round(x2.float() / x_scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    acc = torch._int_mm(xq, weight.t())
    out = acc.float() * x_scale * weight_scale.float().reshape(1, -1)
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


GEMMS = {"fp8_gemm": fp8_rowwise_linear}  # compute -> f(x, stored weight, scale), for Fp8Linear


def fp8_gemm_supported(device: torch.device | str) -> bool:
    """fp8 tensor cores: NVIDIA compute capability >= 8.9 and a torch with `_scaled_mm`."""
    device = torch.device(device)
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm") or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def resolve_compute(compute: str, device: torch.device | str) -> str:
    """The compute an fp8-stored Linear uses on `device` for the user's choice; "fp8_gemm" where the device has no
    fp8 tensor cores is an error naming the option (CPU tests pass device="cpu" through `force=True` instead)."""
    if compute not in COMPUTE_MODES:
        raise ValueError(f"quantized_compute: unknown choice {compute!r}; choose one of {COMPUTE_MODES}")
    if compute == "auto":
        return "fp8_gemm" if fp8_gemm_supported(device) else "dequant"
    if compute == "fp8_gemm" and not fp8_gemm_supported(device):
        name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else str(device)
        raise ValueError(f"quantized_compute: fp8_gemm needs fp8 tensor cores (NVIDIA sm >= 8.9), not {name}; "
                         f"choose auto or dequant")
    return compute


def set_quantized_compute(model: nn.Module, compute: str = "auto", device: torch.device | str | None = None,
                          force: bool = False) -> str:
    """Set the `compute` of every e4m3 Fp8Linear of `model` for `device` (default: where its weights are); returns
    what was set. force=True skips the device check (CPU tests of the fp8 GEMM: `_scaled_mm` runs on CPU too)."""
    from .quantization import Fp8Linear

    linears = [m for m in model.modules() if isinstance(m, Fp8Linear) and m.weight.dtype == torch.float8_e4m3fn]
    if device is None:
        device = linears[0].weight.device if linears else "cpu"
    chosen = compute if force and compute != "auto" else resolve_compute(compute, device)
    for linear in linears:
        linear.compute = chosen
    return chosen
