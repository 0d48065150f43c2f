"""ComfyUI's mixed-precision files ("comfy_quant"): per-layer quantized Linears, the rest in bf16.

A quantized Linear `P` of such a file stores `P.weight` (the quantized bits), its scales and a `P.comfy_quant` uint8
tensor holding a JSON object such as `{"format": "nvfp4"}` (ComfyUI >= 0.4); older files (ComfyUI 0.3.68-0.3.7x)
put the same objects in the safetensors header instead, as `_quantization_metadata` =
`{"format_version": "1.0", "layers": {"<layer>": {"format": ...}}}`. The suffix `weight_scale` means something
different per format, so the format is read first and the scales are interpreted from it:

| format (`comfy:` key)          | `weight`                 | scales                                                      |
|--------------------------------|--------------------------|-------------------------------------------------------------|
| float8_e4m3fn / float8_e5m2    | fp8 [N, K]               | `weight_scale` f32 scalar (or [N, 1])                       |
| float8_e4m3fn_rowwise          | fp8 [N, K]               | `weight_scale` f32 [N]  (silveroxides' convert_to_quant)    |
| float8_e4m3fn_blockwise        | fp8 [N, K]               | `weight_scale` f32 [N/b, K/b], b x b tiles (convert_to_quant)|
| nvfp4                          | uint8 [N, K/2], E2M1, even element in the HIGH nibble | `weight_scale` fp8 e4m3 per 16, cuBLAS-swizzled; `weight_scale_2` f32 scalar |
| mxfp8                          | fp8 e4m3 [N, K]          | `weight_scale` e8m0 per 32, cuBLAS-swizzled                 |
| int8_tensorwise                | int8 [N, K]              | `weight_scale` f32 scalar or [N, 1]                         |
| int8_tensorwise + convrot      | int8 [N, K], rotated     | `weight_scale` f32 [N, 1]; un-rotate by a regular Hadamard per group of g columns |

Any layer may also carry `pre_quant_scale` [K] (AWQ-style smoothing: ComfyUI multiplies the input by it before the
matmul, so the weight it computes with is W·diag(pre_quant_scale); it is folded into the dequantized weight here)
and `input_scale` (the activation scale of fp8/fp4 GEMM kernels; a dequantizing Linear does not quantize its input,
so it is not kept). nvfp4/mxfp8 pad N and K to their block sizes; the padding is dropped when dequantizing.

Each format is one small dequantizer in plain torch, chosen from one table (`FORMATS`); the arithmetic follows
comfy-kitchen's eager backend step by step (ComfyUI's own kernel library, the test reference), so the results are
bit-identical to it in every compute dtype. comfy-kitchen itself is not needed. The weights stay as stored (swizzled
scales included); only a fused `attention.qkv` is cut into q/k/v by rows, without dequantizing.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .linear import Format

log = logging.getLogger("zimage_core")

PREFIX = "comfy:"
HEADER_KEY = "_quantization_metadata"
CONF_SUFFIX = ".comfy_quant"
PQS = "pre_quant_scale"
# Formats ComfyUI (<= 0.38) knows that this pack refuses by name rather than as "unknown".
KNOWN_UNSUPPORTED = ("convrot_w4a4", "awq_w4a16", "asym_w4a8_int8", "int8_blockwise", "hybrid_mxfp8")
# Stored tensors of a layer this loader reads (anything else under the layer is an error: it would be lost).
_LAYER_SUFFIXES = ("weight", "weight_scale", "weight_scale_2", "input_scale", PQS, "comfy_quant", "bias")


# ---------------------------------------------------------------------------------------------- shared pieces
def unswizzle(blocked: Tensor, rows: int, cols: int) -> Tensor:
    """cuBLAS block-scale layout -> [rows, cols]. The scales of a [R, C] grid are padded to (128, 4) multiples;
    each 128 x 4 tile is stored as 32 x 16: row r of the tile sits at (r % 32, 4 * (r // 32) + column)."""
    n_row, n_col = -(-rows // 128), -(-cols // 4)
    tiles = blocked.reshape(n_row, n_col, 32, 4, 4).transpose(2, 3)  # (row tile, col tile, r // 32, r % 32, col)
    return tiles.reshape(n_row, n_col, 128, 4).permute(0, 2, 1, 3).reshape(n_row * 128, n_col * 4)[:rows, :cols]


def swizzle(grid: Tensor) -> Tensor:
    """[rows, cols] -> cuBLAS block-scale layout [ceil(rows/128)*128, ceil(cols/4)*4] (zero padded); the inverse of
    `unswizzle`, used only to re-store the scales of the q/k/v parts of a fused qkv weight."""
    rows, cols = grid.shape
    n_row, n_col = -(-rows // 128), -(-cols // 4)
    padded = grid.new_zeros(n_row * 128, n_col * 4)
    padded[:rows, :cols] = grid
    tiles = padded.reshape(n_row, 128, n_col, 4).permute(0, 2, 1, 3).reshape(n_row, n_col, 4, 32, 4)
    return tiles.transpose(2, 3).reshape(n_row * 128, n_col * 4)


_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _e8m0_to_f32(scales: Tensor) -> Tensor:
    """e8m0 bytes -> 2^(e - 127) in fp32, with e = 0 read as 0 (comfy-kitchen's convention)."""
    e = scales.view(torch.uint8).to(torch.int32)
    return torch.where(e == 0, 0, e << 23).view(torch.float32)


def hadamard(size: int, device=None) -> Tensor:
    """ConvRot's regular Hadamard matrix of `size` (a power of 4): Kronecker powers of a symmetric 4 x 4 +-1 matrix,
    over sqrt(size). Symmetric and orthogonal, so the rotation that made the stored weight also undoes it."""
    h4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=torch.float32,
                      device=device)
    h = h4
    while h.shape[0] < size:
        h = torch.kron(h, h4)
    return h / size ** 0.5


# ---------------------------------------------------------------------------------------------- one dequantizer per format
# Each takes (stored tensors, logical shape (N, K), dtype) and returns the [N, K] weight in dtype.
def _float8(t: dict[str, Tensor], shape, dtype) -> Tensor:
    return t["weight"].to(dtype) * t["weight_scale"].to(dtype)


def _float8_rowwise(t, shape, dtype) -> Tensor:
    return t["weight"].to(dtype) * t["weight_scale"].to(dtype).reshape(-1, 1)


def _float8_blockwise(t, shape, dtype) -> Tensor:
    (n, k), scale = shape, t["weight_scale"]
    b = n // scale.shape[0]
    tiles = t["weight"].to(dtype).reshape(n // b, b, k // b, b)
    return (tiles * scale.to(dtype)[:, None, :, None]).reshape(n, k)


def _nvfp4(t, shape, dtype) -> Tensor:
    packed = t["weight"]
    rows, cols = packed.shape[0], packed.shape[1] * 2
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(rows, cols)  # even element: high nibble
    values = torch.tensor(_E2M1, dtype=dtype, device=packed.device)[codes.int()]
    blocks = unswizzle(t["weight_scale"].view(torch.float8_e4m3fn), rows, cols // 16)
    scale = t["weight_scale_2"].to(dtype) * blocks.to(dtype)
    return (values.reshape(rows, -1, 16) * scale.unsqueeze(-1)).reshape(rows, cols)[: shape[0], : shape[1]]


def _mxfp8(t, shape, dtype) -> Tensor:
    q = t["weight"]
    rows, cols = q.shape
    scale = _e8m0_to_f32(unswizzle(t["weight_scale"].view(torch.uint8), rows, cols // 32))
    w = q.to(torch.float32).reshape(rows, -1, 32) * scale.unsqueeze(-1)
    return w.reshape(rows, cols)[: shape[0], : shape[1]].to(dtype)


def _int8(t, shape, dtype) -> Tensor:
    return (t["weight"].float() * t["weight_scale"]).to(dtype)


def _int8_convrot(group: int) -> Callable:
    def dequantize(t, shape, dtype) -> Tensor:
        n, k = shape
        h = hadamard(group, t["weight"].device)
        w = (t["weight"].float() * t["weight_scale"]).reshape(n, k // group, group)
        return torch.matmul(w, h.T).reshape(n, k).to(dtype)
    return dequantize


def _with_pre_quant_scale(dequantize: Callable) -> Callable:
    def folded(t, shape, dtype) -> Tensor:
        return dequantize(t, shape, dtype) * t[PQS].to(dtype)
    return folded


# ---------------------------------------------------------------------------------------------- row slicing (fused qkv)
# (stored tensors, logical shape, first row, end row) -> the stored tensors of those output rows.
def _rows_plain(t, shape, a, b):
    return {name: (v[a:b] if v.dim() >= 1 and v.shape[0] == shape[0] else v.clone()) for name, v in t.items()}


def _rows_blockwise(t, shape, a, b):
    block = shape[0] // t["weight_scale"].shape[0]
    if a % block or b % block:
        raise ValueError(f"cannot cut rows {a}:{b} out of a block-wise fp8 weight with {block}-row blocks")
    return {**_rows_plain({k: v for k, v in t.items() if k != "weight_scale"}, shape, a, b),
            "weight_scale": t["weight_scale"][a // block: b // block]}


def _rows_swizzled(group: int, align: int):
    def rows(t, shape, a, b):
        if a % align or b % align:
            raise ValueError(f"cannot cut rows {a}:{b} out of a weight whose rows are padded to {align}")
        cols = t["weight"].shape[1] * (2 if group == 16 else 1) // group
        grid = unswizzle(t["weight_scale"].view(torch.uint8), t["weight"].shape[0], cols)
        out = _rows_plain({k: v for k, v in t.items() if k != "weight_scale"}, shape, a, b)
        out["weight_scale"] = swizzle(grid[a:b]).view(t["weight_scale"].dtype)
        return out
    return rows


# ---------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class _Kind:
    """One ComfyUI format: its dequantizer, the tensors it stores besides `weight`, its storage dtypes, how its
    stored tensors are cut by output rows, and how the shape of each stored tensor is checked."""

    dequantize: Callable
    scales: tuple[str, ...]
    weight_dtypes: tuple[torch.dtype, ...]
    rows: Callable = _rows_plain


_FP8 = (torch.float8_e4m3fn,)
KINDS: dict[str, _Kind] = {
    "float8_e4m3fn": _Kind(_float8, ("weight_scale",), _FP8),
    "float8_e5m2": _Kind(_float8, ("weight_scale",), (torch.float8_e5m2,)),
    "float8_e4m3fn_rowwise": _Kind(_float8_rowwise, ("weight_scale",), _FP8),
    "float8_e4m3fn_blockwise": _Kind(_float8_blockwise, ("weight_scale",), _FP8, _rows_blockwise),
    "nvfp4": _Kind(_nvfp4, ("weight_scale", "weight_scale_2"), (torch.uint8,), _rows_swizzled(16, 16)),
    "mxfp8": _Kind(_mxfp8, ("weight_scale",), _FP8, _rows_swizzled(32, 32)),
    "int8_tensorwise": _Kind(_int8, ("weight_scale",), (torch.int8,)),
}
CONVROT_GROUPS = tuple(4 ** i for i in range(1, 7))  # 4 ... 4096


def _convrot_name(group: int) -> str:
    return f"int8_tensorwise_convrot{group}"


for _g in CONVROT_GROUPS:
    KINDS[_convrot_name(_g)] = _Kind(_int8_convrot(_g), ("weight_scale",), (torch.int8,))


def _formats() -> dict[str, Format]:
    out = {}
    for name, kind in KINDS.items():
        stored = ("weight", *kind.scales)
        out[PREFIX + name] = Format(PREFIX + name, stored, kind.dequantize)
        out[PREFIX + name + "+" + PQS] = Format(PREFIX + name + "+" + PQS, (*stored, PQS),
                                                _with_pre_quant_scale(kind.dequantize))
    return out


FORMATS: dict[str, Format] = _formats()


def format_key(conf: dict) -> str:
    """The KINDS key of one layer's comfy_quant object: its `format`, with int8 ConvRot as its own kind per group."""
    name = conf.get("format")
    params = conf.get("params") if isinstance(conf.get("params"), dict) else {}
    if name == "int8_tensorwise" and conf.get("convrot", params.get("convrot", False)):
        return _convrot_name(int(conf.get("convrot_groupsize", params.get("convrot_groupsize", 256))))
    return name


def supported_formats() -> list[str]:
    return sorted({k for k in KINDS if not k.startswith("int8_tensorwise_convrot")} | {"int8_tensorwise+convrot"})
