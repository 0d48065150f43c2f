"""Quantized GEMMs: the `compute` choices of a QuantizedLinear besides "dequant" (zimage_core.quant.linear).

The default, "dequant", makes the weight in the compute dtype and runs a bf16/fp16 GEMM: the only error is the
file's own weight rounding. A quantized GEMM also quantizes the *activation*, per token (or per tensor for nvfp4),
and multiplies in low precision with the scales applied to the fp32 accumulator:

| compute | formats | GEMM | auto picks it on |
|---|---|---|---|
| `fp8_gemm` | `fp8_channel` (fp8 storage, scaled fp8 files), `comfy:float8_e4m3fn`, `comfy:float8_e4m3fn_rowwise` (e4m3 weights) | `torch._scaled_mm`, row-wise scales | NVIDIA sm >= 8.9 (Ada, Hopper, Blackwell) |
| `int8_gemm` | `comfy:int8_tensorwise` (no ConvRot) | `torch._int_mm` (exact int32 accumulation), row-wise scales | NVIDIA sm >= 8.0 |
| `nvfp4_gemm` | `comfy:nvfp4` | comfy-kitchen `scaled_mm_nvfp4` (installed with ComfyUI) | NVIDIA sm >= 10.0 with comfy-kitchen's CUDA backend |

Everything else (GGUF, SVDQuant, block-wise fp8, layers with pre_quant_scale, e5m2) keeps "dequant". A quantized GEMM
runs only while no autograd is recording (sampling): a training forward takes the dequant path, whose backward is
defined and saves the stored tensors. LoRA side branches are hooks on the same Linear and stay in the compute dtype.
The errors each adds to the dequant path are in docs/speed-options.md (tests/test_quant_gemm.py measures them on
CPU, where torch's `_scaled_mm` / `_int_mm` and comfy-kitchen's eager backend compute the same products).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .linear import COMPUTE_PATHS, QuantizedLinear

COMPUTE_MODES = ("auto", "dequant", "fp8_gemm", "int8_gemm", "nvfp4_gemm")  # what a user can choose (loader node)
E4M3_MAX, INT8_MAX, E2M1_MAX = 448.0, 127.0, 6.0
GEMM_FORMATS = {
    "fp8_gemm": ("fp8_channel", "comfy:float8_e4m3fn", "comfy:float8_e4m3fn_rowwise"),
    "int8_gemm": ("comfy:int8_tensorwise",),
    "nvfp4_gemm": ("comfy:nvfp4",),
}


# ---------------------------------------------------------------------------------------------- the products
def _rowwise_scale(x2: Tensor, qmax: float) -> Tensor:
    """Per-row scale [M, 1] (fp32) mapping each row's largest magnitude to qmax (all-zero rows: 1)."""
    amax = x2.abs().amax(dim=1, keepdim=True).float()
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def _channel_scale(scale: Tensor, out_features: int) -> Tensor:
    """A per-tensor or per-channel weight scale as the [1, N] fp32 row `_scaled_mm` wants."""
    return scale.float().reshape(1, -1).expand(1, out_features).contiguous()


def fp8_rowwise_linear(x: Tensor, weight: Tensor, weight_scale: Tensor) -> Tensor:
    """x @ (weight * weight_scale).T with x quantized to e4m3 per token, in one `torch._scaled_mm` (fp32 accumulate,
    output in x's dtype). weight: e4m3 [N, K]; weight_scale: scalar, [N] or [N, 1]."""
    x2 = x.reshape(-1, x.shape[-1])
    x_scale = _rowwise_scale(x2, E4M3_MAX)
    xq = (x2.float() / x_scale).to(torch.float8_e4m3fn)
    out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=_channel_scale(weight_scale, weight.shape[0]),
                           out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def int8_rowwise_linear(x: Tensor, weight: Tensor, weight_scale: Tensor) -> Tensor:
    """x @ (weight * weight_scale).T for an int8 weight [N, K]: x quantized to int8 per token, `torch._int_mm`
    (exact int32 accumulation), both scales applied in fp32."""
    x2 = x.reshape(-1, x.shape[-1])
    x_scale = _rowwise_scale(x2, INT8_MAX)
    xq = torch.round(x2.float() / x_scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    acc = torch._int_mm(xq, weight.t())
    out = acc.float() * x_scale * _channel_scale(weight_scale, weight.shape[0])
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def nvfp4_linear(x: Tensor, weight: Tensor, block_scale: Tensor, tensor_scale: Tensor,
                 shape: tuple[int, int]) -> Tensor:
    """x @ W.T for an nvfp4 weight (packed e2m1 [N', K/2], swizzled e4m3 block scales, fp32 tensor scale) through
    comfy-kitchen: x quantized to nvfp4 with one per-tensor scale (its amax over 6 * 448), as ComfyUI does."""
    import comfy_kitchen

    n, k = shape
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    scale = (x2.abs().amax().float() / (E4M3_MAX * E2M1_MAX)).clamp_min(torch.finfo(torch.float32).tiny)
    xq, x_blocks = comfy_kitchen.quantize_nvfp4(x2, scale, pad_16x=m % 16 != 0)
    out = comfy_kitchen.scaled_mm_nvfp4(xq, weight, tensor_scale_a=scale, tensor_scale_b=tensor_scale.float(),
                                        block_scale_a=x_blocks, block_scale_b=block_scale.view(torch.float8_e4m3fn),
                                        out_dtype=x.dtype)
    return out[:m, :n].reshape(*x.shape[:-1], n)


# ---------------------------------------------------------------------------------------------- compute paths
def _when_sampling(gemm):
    """A compute path that runs `gemm` without autograd and the dequant path under it (training)."""
    def compute(module: QuantizedLinear, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return COMPUTE_PATHS["dequant"](module, x)
        return gemm(module, x)
    return compute


COMPUTE_PATHS.update({
    "fp8_gemm": _when_sampling(lambda m, x: fp8_rowwise_linear(x, m.weight, m.weight_scale)),
    "int8_gemm": _when_sampling(lambda m, x: int8_rowwise_linear(x, m.weight, m.weight_scale)),
    "nvfp4_gemm": _when_sampling(lambda m, x: nvfp4_linear(x, m.weight, m.weight_scale, m.weight_scale_2, m.shape)),
})


# ---------------------------------------------------------------------------------------------- the choice
def gemm_for(module: nn.Module) -> str | None:
    """The quantized GEMM this layer's format can use (None: dequant only)."""
    if not isinstance(module, QuantizedLinear):
        return None
    gemm = next((g for g, formats in GEMM_FORMATS.items() if module.fmt in formats), None)
    if gemm == "fp8_gemm" and module.weight.dtype != torch.float8_e4m3fn:
        return None  # e5m2 storage: _scaled_mm's row-wise path takes e4m3
    return gemm


def device_has(gemm: str, device: torch.device | str) -> bool:
    """Whether `device` has the tensor cores (and kernels) for `gemm`."""
    device = torch.device(device)
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    capability = torch.cuda.get_device_capability(device)
    if gemm == "fp8_gemm":
        return hasattr(torch, "_scaled_mm") and capability >= (8, 9)
    if gemm == "int8_gemm":
        return hasattr(torch, "_int_mm") and capability >= (8, 0)
    if gemm == "nvfp4_gemm" and capability >= (10, 0):
        try:
            import comfy_kitchen
        except ImportError:
            return False
        return bool(comfy_kitchen.list_backends().get("cuda", {}).get("available"))
    return False


def _device_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def set_quantized_compute(model: nn.Module, compute: str = "auto", device: torch.device | str | None = None,
                          force: bool = False) -> dict[str, int]:
    """Set each QuantizedLinear's `compute` for `device` (default: where its weights are) and return how many layers
    got which. auto: each layer's GEMM where the device has it, else dequant. A named GEMM: the layers whose format
    takes it (the others dequantize); an error naming the option when the device lacks it or no layer takes it.
    force=True skips the device check (CPU tests: torch and comfy-kitchen compute the same products there)."""
    if compute not in COMPUTE_MODES:
        raise ValueError(f"quantized_compute: unknown choice {compute!r}; choose one of {COMPUTE_MODES}")
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if device is None:
        device = layers[0].stored_tensors()[0].device if layers else "cpu"
    if compute not in ("auto", "dequant"):
        if not any(gemm_for(m) == compute for m in layers):
            raise ValueError(f"quantized_compute: {compute} takes layers stored as {GEMM_FORMATS[compute]}; this "
                             f"model has none (choose auto or dequant)")
        if not force and not device_has(compute, device):
            raise ValueError(f"quantized_compute: {compute} is not available on {_device_name(device)} (fp8: NVIDIA "
                             f"sm >= 8.9, int8: sm >= 8.0, nvfp4: sm >= 10.0 with comfy-kitchen); choose auto or "
                             f"dequant")
    counts: dict[str, int] = {}
    for module in layers:
        gemm = gemm_for(module)
        if compute == "dequant" or gemm is None:
            chosen = "dequant"
        elif compute == "auto":
            chosen = gemm if device_has(gemm, device) else "dequant"
        else:
            chosen = gemm if gemm == compute else "dequant"
        module.compute = chosen
        counts[chosen] = counts.get(chosen, 0) + 1
    return counts
