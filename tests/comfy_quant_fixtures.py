"""Build ComfyUI mixed-precision ("comfy_quant") test files with comfy-kitchen's own quantizers (the reference),
the way ComfyUI writes them: per layer `P.weight` + scales (named by kitchen's `state_dict` suffixes) + `P.comfy_quant`
JSON bytes, or the older per-file `_quantization_metadata` header. Also the reference dequantization of each stored
layer: comfy-kitchen's eager backend for every format it has, a restatement of silveroxides' convert_to_quant layouts
for the fp8 row-/block-wise ones it has not."""

from __future__ import annotations

import json

import torch

ck = __import__("pytest").importorskip("comfy_kitchen")
from comfy_kitchen.backends.eager import quantization as eager  # noqa: E402
from comfy_kitchen.tensor import QuantizedTensor  # noqa: E402

FP8_MAX = 448.0


def conf_tensor(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)


def quantize(w: torch.Tensor, fmt: str, group: int = 16, block: int = 32) -> tuple[dict, dict]:
    """(stored tensors by suffix: "weight", "weight_scale", ..., comfy_quant conf) of weight `w` [N, K] in `fmt`."""
    w = w.float()
    if fmt in ("float8_e4m3fn", "float8_e5m2"):
        dtype = getattr(torch, fmt)
        scale = w.abs().amax() / torch.finfo(dtype).max
        return {"weight": ck.quantize_per_tensor_fp8(w, scale, dtype), "weight_scale": scale}, {"format": fmt}
    if fmt == "nvfp4":
        sd = QuantizedTensor.from_float(w, "TensorCoreNVFP4Layout").state_dict("weight")
        return sd, {"format": fmt}
    if fmt == "mxfp8":
        sd = QuantizedTensor.from_float(w, "TensorCoreMXFP8Layout").state_dict("weight")
        return sd, {"format": fmt}
    if fmt == "int8_tensorwise":
        q, s = ck.quantize_int8_tensorwise(w)
        return {"weight": q, "weight_scale": s}, {"format": fmt}
    if fmt == "int8_rowwise":
        q, s = ck.quantize_int8_rowwise(w)
        return {"weight": q, "weight_scale": s}, {"format": "int8_tensorwise"}
    if fmt == "int8_convrot":
        q, s = eager.quantize_int8_convrot_weight(w, group)
        return {"weight": q, "weight_scale": s}, {"format": "int8_tensorwise", "convrot": True,
                                                  "convrot_groupsize": group}
    if fmt == "float8_e4m3fn_rowwise":
        scale = w.abs().amax(dim=1) / FP8_MAX
        return {"weight": (w / scale[:, None]).to(torch.float8_e4m3fn), "weight_scale": scale}, {"format": fmt}
    if fmt == "float8_e4m3fn_blockwise":
        n, k = w.shape
        tiles = w.reshape(n // block, block, k // block, block)
        scale = tiles.abs().amax(dim=(1, 3)) / FP8_MAX
        q = (tiles / scale[:, None, :, None]).reshape(n, k).to(torch.float8_e4m3fn)
        return {"weight": q, "weight_scale": scale}, {"format": fmt}
    raise ValueError(fmt)


def reference(stored: dict, conf: dict, shape, dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] in `dtype` as the reference dequantizes it."""
    fmt, q, s = conf["format"], stored["weight"], stored.get("weight_scale")
    n, k = shape
    if fmt in ("float8_e4m3fn", "float8_e5m2"):
        return ck.dequantize_per_tensor_fp8(q, s, dtype)
    if fmt == "nvfp4":
        return ck.dequantize_nvfp4(q, stored["weight_scale_2"], s, dtype)[:n, :k]
    if fmt == "mxfp8":
        return ck.dequantize_mxfp8(q, s, dtype)[:n, :k]
    if fmt == "int8_tensorwise" and conf.get("convrot"):
        return eager.dequantize_int8_convrot_weight(q, s, conf["convrot_groupsize"]).to(dtype)
    if fmt == "int8_tensorwise":
        return eager.dequantize_int8_simple(q, s).to(dtype)
    # convert_to_quant's RowWiseFP8Layout / BlockWiseFP8Layout.dequantize: fp8 -> dtype, times the scale in dtype
    if fmt == "float8_e4m3fn_rowwise":
        return q.to(dtype) * s.to(dtype)[:, None]
    if fmt == "float8_e4m3fn_blockwise":
        b = n // s.shape[0]
        return q.to(dtype) * s.to(dtype).repeat_interleave(b, 0).repeat_interleave(b, 1)
    raise ValueError(fmt)
