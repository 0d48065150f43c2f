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
    if fmt == "convrot_w4a4":
        q, s = ck.quantize_convrot_w4a4_weight(w, convrot_groupsize=group)
        return {"weight": q, "weight_scale": s}, {"format": fmt, "convrot_groupsize": group}
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
    if fmt == "convrot_w4a4":
        return ck.dequantize_convrot_w4a4_weight(q, s, convrot_groupsize=conf["convrot_groupsize"], output_dtype=dtype)
    # convert_to_quant's RowWiseFP8Layout / BlockWiseFP8Layout.dequantize: fp8 -> dtype, times the scale in dtype
    if fmt == "float8_e4m3fn_rowwise":
        return q.to(dtype) * s.to(dtype)[:, None]
    if fmt == "float8_e4m3fn_blockwise":
        b = n // s.shape[0]
        return q.to(dtype) * s.to(dtype).repeat_interleave(b, 0).repeat_interleave(b, 1)
    raise ValueError(fmt)


QUANTIZABLE = (".attention.qkv.weight", ".attention.out.weight", ".feed_forward.w1.weight",
               ".feed_forward.w2.weight", ".feed_forward.w3.weight",
               "layers.0.adaLN_modulation.0.weight", "x_embedder.weight")  # files may quantize more (with bias)
RECIPES = ("float8_e4m3fn", "nvfp4", "mxfp8", "int8_tensorwise", "int8_convrot", "float8_e5m2", "int8_rowwise",
           "float8_e4m3fn_rowwise", "float8_e4m3fn_blockwise", "convrot_w4a4")


def write_file(model, path, recipes=RECIPES, header: bool = False, prefix: str = "", pre_quant_every: int = 0,
               input_scale: bool = True):
    """Save `model` (a tiny Z-Image) as a ComfyUI mixed-precision file: its block Linears (ComfyUI names, fused
    qkv; plus one adaLN and the x_embedder) quantized by comfy-kitchen, formats cycling through `recipes`, every
    `pre_quant_every`-th one with a `pre_quant_scale`, each with an `input_scale` unless `input_scale` is False; the
    rest in bf16. `header` puts the formats in `_quantization_metadata` (layer names without the key prefix, as
    kitchen's converters write) instead of per-layer `.comfy_quant` tensors. Returns {ComfyUI weight key: reference
    fp32 weight}: what the loaded model must compute with."""
    from safetensors.torch import save_file

    from zimage_core.checkpoint import comfyui_state_dict

    state = {k: v.detach().to(torch.bfloat16) for k, v in comfyui_state_dict(model).items()}
    out, refs, layers = {}, {}, {}
    keys = sorted(k for k in state if k.endswith(QUANTIZABLE))
    for i, key in enumerate(keys):
        w = state.pop(key).float()
        recipe = recipes[i % len(recipes)]
        if recipe == "convrot_w4a4" and w.shape[1] % 64:  # W4A4 needs K % 64: narrower layers take nvfp4
            recipe = "nvfp4"
        stored, conf = quantize(w, recipe, group=16 if w.shape[1] % 64 else 64)
        layer = key[: -len(".weight")]
        ref = reference(stored, conf, tuple(w.shape), torch.float32)
        if pre_quant_every and i % pre_quant_every == 0:
            stored["pre_quant_scale"] = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(i)) + 0.5
            ref = ref * stored["pre_quant_scale"]
        if input_scale:  # an activation scale: carried by fp8 files for ComfyUI's fp8 GEMM, unused here
            stored["input_scale"] = torch.tensor(1.0)
        out.update({f"{prefix}{layer}.{name}": t for name, t in stored.items()})
        if header:
            layers[layer] = conf
        else:
            out[f"{prefix}{layer}.comfy_quant"] = conf_tensor(conf)
        refs[key] = ref
    out.update({prefix + k: v for k, v in state.items()})
    metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})} if header else {}
    save_file({k: v.contiguous() for k, v in out.items()}, str(path), metadata=metadata)
    return refs


def reference_model(model, refs: dict):
    """A copy of `model` with its plain weights rounded to bf16 (as the file stores them) and its quantized weights
    replaced by the reference dequantization (fused qkv split into q/k/v): the model a loader must reproduce."""
    import copy

    from zimage_core.checkpoint import _to_diffusers_name

    ref_model = copy.deepcopy(model).to(torch.bfloat16).float()
    with torch.no_grad():
        for key, w in refs.items():
            stem = key[: -len(".weight")]
            if stem.endswith("attention.qkv"):
                for part, proj in zip(w.chunk(3), ("to_q", "to_k", "to_v")):
                    ref_model.get_submodule(stem[: -len("qkv")] + proj).weight.copy_(part)
            else:
                path = _to_diffusers_name(key)[: -len(".weight")]
                ref_model.get_submodule(path).weight.copy_(w)
    return ref_model
