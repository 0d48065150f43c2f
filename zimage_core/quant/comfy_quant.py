"""ComfyUI's mixed-precision files ("comfy_quant"): per-layer quantized Linears, the rest in bf16.

A quantized Linear `P` of such a file stores `P.weight` (the quantized bits), its scales and a `P.comfy_quant` uint8
tensor holding a JSON object such as `{"format": "nvfp4"}` (ComfyUI >= 0.4); older files (ComfyUI 0.3.68-0.3.7x)
put the same objects in the safetensors header instead, as `_quantization_metadata` =
`{"format_version": "1.0", "layers": {"<layer>": {"format": ...}}}`. The suffix `weight_scale` means something
different per format, so the format is read first and the scales are interpreted from it:

- float8_e4m3fn / float8_e5m2: fp8 [N, K]; `weight_scale` f32 scalar (or [N, 1])
- float8_e4m3fn_rowwise (silveroxides' convert_to_quant): fp8 [N, K]; `weight_scale` f32 [N]
- float8_e4m3fn_blockwise (convert_to_quant): fp8 [N, K]; `weight_scale` f32 [N/b, K/b], one per b x b tile
- nvfp4: uint8 [N, K/2] of E2M1 codes, the even element in the HIGH nibble; `weight_scale` fp8 e4m3 per 16 columns in
  the cuBLAS-swizzled layout; `weight_scale_2` f32 scalar
- mxfp8: fp8 e4m3 [N, K]; `weight_scale` e8m0 per 32 columns, swizzled
- int8_tensorwise: int8 [N, K]; `weight_scale` f32 scalar or [N, 1]
- int8_tensorwise + convrot: int8 [N, K], rotated; `weight_scale` f32 [N, 1]; un-rotated by a regular Hadamard matrix
  per group of g input columns
- convrot_w4a4: int8 [N, K/2] of signed int4, the even element in the LOW nibble, rotated as above; `weight_scale` f32
  [N]

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

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .linear import Format
from .stored import BLOCK_PREFIXES, QuantizedFile, StoredWeight
from .svdquant import unpack_natural_int4

log = logging.getLogger("zimage_core")

PREFIX = "comfy:"
HEADER_KEY = "_quantization_metadata"
CONF_SUFFIX = ".comfy_quant"
PQS = "pre_quant_scale"
# Formats ComfyUI (<= 0.38) knows that this pack refuses by name rather than as "unknown".
KNOWN_UNSUPPORTED = ("awq_w4a16", "asym_w4a8_int8", "int8_blockwise", "hybrid_mxfp8")
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


@functools.lru_cache(maxsize=None)
def _e2m1_pairs(dtype: torch.dtype, device: torch.device) -> Tensor:
    """[256, 2]: the two E2M1 values of each byte, high nibble first (one gather per byte instead of per nibble),
    made once per dtype and device."""
    codes = torch.arange(256)
    return torch.tensor(_E2M1, dtype=dtype)[torch.stack([codes >> 4, codes & 0x0F], dim=-1)].to(device)


def _e8m0_to_f32(scales: Tensor) -> Tensor:
    """e8m0 bytes -> 2^(e - 127) in fp32, with e = 0 read as 0 (comfy-kitchen's convention)."""
    e = scales.view(torch.uint8).to(torch.int32)
    return torch.where(e == 0, 0, e << 23).view(torch.float32)


@functools.lru_cache(maxsize=None)
def hadamard(size: int, device: torch.device | None = None) -> Tensor:
    """ConvRot's regular Hadamard matrix of `size` (a power of 4): Kronecker powers of a symmetric 4 x 4 +-1 matrix,
    over sqrt(size). Symmetric and orthogonal, so the rotation that made the stored weight also undoes it. Cached per
    size and device (callers must not write to it)."""
    h4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=torch.float32,
                      device=device)
    h = h4
    while h.shape[0] < size:
        h = torch.kron(h, h4)
    return h / size ** 0.5


# ---------------------------------------------------------------------------------------------- dequantizers
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
    # even element in the high nibble; embedding is a faster gather than indexing on CPU
    values = torch.nn.functional.embedding(packed.int(), _e2m1_pairs(dtype, packed.device)).reshape(rows, cols)
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


def _unrotate(w: Tensor, shape, group: int, dtype) -> Tensor:
    """Undo ConvRot on the fp32 weight [N, K]: right-multiply each group of `group` columns by the Hadamard matrix."""
    n, k = shape
    return torch.matmul(w.reshape(n, k // group, group), hadamard(group, w.device).T).reshape(n, k).to(dtype)


def _int8_convrot(group: int) -> Callable:
    def dequantize(t, shape, dtype) -> Tensor:
        return _unrotate(t["weight"].float() * t["weight_scale"], shape, group, dtype)
    return dequantize


def _convrot_w4a4(group: int) -> Callable:
    def dequantize(t, shape, dtype) -> Tensor:
        w = unpack_natural_int4(t["weight"]).float() * t["weight_scale"].float().reshape(-1, 1)
        return _unrotate(w, shape, group, dtype)
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
    per_byte: int = 1  # weights per stored element (2 for 4-bit formats)


_FP8 = (torch.float8_e4m3fn,)
KINDS: dict[str, _Kind] = {
    "float8_e4m3fn": _Kind(_float8, ("weight_scale",), _FP8),
    "float8_e5m2": _Kind(_float8, ("weight_scale",), (torch.float8_e5m2,)),
    "float8_e4m3fn_rowwise": _Kind(_float8_rowwise, ("weight_scale",), _FP8),
    "float8_e4m3fn_blockwise": _Kind(_float8_blockwise, ("weight_scale",), _FP8, _rows_blockwise),
    "nvfp4": _Kind(_nvfp4, ("weight_scale", "weight_scale_2"), (torch.uint8,), _rows_swizzled(16, 16), 2),
    "mxfp8": _Kind(_mxfp8, ("weight_scale",), _FP8, _rows_swizzled(32, 32)),
    "int8_tensorwise": _Kind(_int8, ("weight_scale",), (torch.int8,)),
}
CONVROT_GROUPS = tuple(4 ** i for i in range(1, 7))  # 4 ... 4096


_CONVROT, _W4A4 = "int8_tensorwise_convrot", "convrot_w4a4_g"


def _convrot_name(group: int, base: str = _CONVROT) -> str:
    return f"{base}{group}"


for _g in CONVROT_GROUPS:
    KINDS[_convrot_name(_g)] = _Kind(_int8_convrot(_g), ("weight_scale",), (torch.int8,))
    KINDS[_convrot_name(_g, _W4A4)] = _Kind(_convrot_w4a4(_g), ("weight_scale",), (torch.int8,), per_byte=2)


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
    group = int(conf.get("convrot_groupsize", params.get("convrot_groupsize", 256)))
    if name == "int8_tensorwise" and conf.get("convrot", params.get("convrot", False)):
        return _convrot_name(group)
    return _convrot_name(group, _W4A4) if name == "convrot_w4a4" else name


def supported_formats() -> list[str]:
    return sorted({k for k in KINDS if not k.startswith((_CONVROT, _W4A4))} | {"int8_tensorwise+convrot",
                                                                                "convrot_w4a4"})


# ---------------------------------------------------------------------------------------------- reading a file
def layer_configs(file, label: str) -> dict[str, dict]:
    """{layer key as the file names it (without `.weight`): comfy_quant object}, from the per-layer `.comfy_quant`
    tensors and/or the header's `_quantization_metadata` (whose layer names may omit the file's key prefix)."""
    confs: dict[str, dict] = {}
    raw = file.metadata.get(HEADER_KEY)
    if raw is not None:
        try:
            layers = json.loads(raw)["layers"]
            if not isinstance(layers, dict):
                raise TypeError("'layers' is not an object")
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{label}: the header's {HEADER_KEY} is not ComfyUI's {{'layers': {{...}}}} JSON "
                             f"({err})") from None
        for layer, conf in layers.items():
            conf = {"format": conf} if isinstance(conf, str) else conf
            matches = [k for k in file.tensors if k.endswith(layer + ".weight")
                       and (k == layer + ".weight" or k.endswith("." + layer + ".weight"))]
            if not matches:
                log.warning("%s: %s names layer %s, which the file does not hold; ignored", label, HEADER_KEY, layer)
                continue
            confs[matches[0][: -len(".weight")]] = conf
    for key in file.tensors:
        if key.endswith(CONF_SUFFIX):
            try:
                conf = json.loads(bytes(file.read(key).tolist()).decode("utf-8"))
                if not isinstance(conf, dict):
                    raise TypeError("not a JSON object")
            except (ValueError, TypeError) as err:
                raise ValueError(f"{label}: {key} is not a comfy_quant JSON object ({err})") from None
            confs[key[: -len(CONF_SUFFIX)]] = conf
    return confs


def _check_layer(file, layer: str, conf: dict, label: str) -> tuple[Format, tuple[int, int]]:
    """The Format and logical shape of one quantized layer, every stored tensor checked from the header alone."""
    name = format_key(conf)
    if name not in KINDS:
        fmt = conf.get("format")
        if name and name.startswith((_CONVROT, _W4A4)):
            why = f"its ConvRot group {name.removeprefix(_CONVROT).removeprefix(_W4A4)} is not a power of 4 up to 4096"
        else:
            why = "a ComfyUI format this pack does not load" if fmt in KNOWN_UNSUPPORTED else "an unknown format"
        raise ValueError(f"{label}: layer {layer} has comfy_quant format {fmt!r}: {why} "
                         f"(supported: {', '.join(supported_formats())})")
    kind = KINDS[name]
    tensors = file.tensors
    weight = tensors.get(layer + ".weight")
    if weight is None or weight.dtype not in kind.weight_dtypes or len(weight.shape) != 2:
        got = "missing" if weight is None else f"{str(weight.dtype).removeprefix('torch.')} {list(weight.shape)}"
        raise ValueError(f"{label}: {layer}.weight ({conf['format']}) must be a 2-D "
                         f"{'/'.join(str(d).removeprefix('torch.') for d in kind.weight_dtypes)} tensor, got {got}")
    for scale in kind.scales:
        if layer + "." + scale not in tensors:
            raise ValueError(f"{label}: layer {layer} ({conf['format']}) has no {layer}.{scale}: the file is "
                             f"incomplete")
    rows, cols = weight.shape
    shape = (rows, cols * kind.per_byte)
    expected = _scale_shapes(name, shape, tensors[layer + ".weight_scale"].shape)
    for scale, allowed in expected.items():
        got = tuple(tensors[layer + "." + scale].shape)
        if got not in allowed:
            raise ValueError(f"{label}: {layer}.{scale} has shape {list(got)}, a {conf['format']} weight of "
                             f"shape {list(weight.shape)} needs {' or '.join(str(list(a)) for a in allowed)}")
    stored = "+" + PQS if layer + "." + PQS in tensors else ""
    if stored and tuple(tensors[layer + "." + PQS].shape) != (shape[1],):
        raise ValueError(f"{label}: {layer}.{PQS} has shape {list(tensors[layer + '.' + PQS].shape)}, the layer "
                         f"has {shape[1]} input columns")
    group = name.removeprefix(_CONVROT).removeprefix(_W4A4)
    if group.isdigit() and shape[1] % int(group):
        raise ValueError(f"{label}: layer {layer} has ConvRot group {group}, "
                         f"which does not divide its {shape[1]} input columns")
    return FORMATS[PREFIX + name + stored], shape


def _scale_shapes(name: str, shape: tuple[int, int], block_shape) -> dict[str, tuple]:
    """The allowed shapes of each scale of a weight of logical (possibly padded) `shape`."""
    n, k = shape
    scalar = ((), (1,))
    if name in ("float8_e4m3fn", "float8_e5m2"):
        return {"weight_scale": (*scalar, (n, 1))}
    if name == "float8_e4m3fn_rowwise":
        return {"weight_scale": ((n,), (n, 1))}
    if name == "float8_e4m3fn_blockwise":
        b = n // block_shape[0] if len(block_shape) == 2 and block_shape[0] else 0
        return {"weight_scale": ((n // b, k // b),) if b and n % b == 0 and k % b == 0 else ((-1, -1),)}
    if name == "nvfp4":
        return {"weight_scale": ((-(-n // 128) * 128, -(-(k // 16) // 4) * 4),), "weight_scale_2": scalar}
    if name == "mxfp8":
        return {"weight_scale": ((-(-n // 128) * 128, -(-(k // 32) // 4) * 4),)}
    if name == "int8_tensorwise":
        return {"weight_scale": (*scalar, (n, 1))}
    if name.startswith(_W4A4):
        return {"weight_scale": ((n,), (n, 1))}
    return {"weight_scale": ((n, 1),)}  # int8 ConvRot: one scale per row


def read_comfy_quant(path: str | Path):
    """A ComfyUI mixed-precision file as a QuantizedFile: every comfy_quant layer as stored (a fused
    `attention.qkv` cut into to_q/to_k/to_v by rows), every other tensor for the plain loader. The whole header is
    checked (formats, scales, shapes) before any tensor is read."""
    import copy

    # late: zimage_core.checkpoint imports this package
    from ..checkpoint import WeightSource, _strip_prefix, _to_diffusers_name, is_comfy_layout, map_sources
    from ..safetensors_io import SafetensorsFile

    path = Path(path)
    file = SafetensorsFile(path)
    label = str(path)
    confs = layer_configs(file, label)
    checked = {layer: _check_layer(file, layer, conf, label) for layer, conf in confs.items()}
    consumed = {f"{layer}.{suffix}" for layer in confs for suffix in _LAYER_SUFFIXES if suffix != "bias"}
    stray = [k for k, info in file.tensors.items() if k not in consumed and info.dtype in (torch.int8, torch.uint8)
             and not k.endswith(CONF_SUFFIX)]
    if stray:
        raise ValueError(f"{label}: {stray[0]} is stored as {str(file.tensors[stray[0]].dtype).removeprefix('torch.')}"
                         f" but has no comfy_quant format (neither a {stray[0].rpartition('.')[0]}{CONF_SUFFIX} "
                         f"tensor nor an entry in the header's {HEADER_KEY})")

    prefix = _strip_prefix(file.keys())
    comfy_layout = is_comfy_layout(k[len(prefix):] for k in file.keys())
    parts = {}  # model Linear path -> StoredWeight
    for layer, (fmt, shape) in checked.items():
        tensors = {name: file.mapped(f"{layer}.{name}") for name in fmt.stored_names}  # read when installed
        name = layer[len(prefix):]
        if name.endswith("attention.qkv"):
            dim, rows = shape[0] // 3, KINDS[fmt.name[len(PREFIX):].split("+")[0]].rows
            for i, proj in enumerate(("to_q", "to_k", "to_v")):
                part = rows(tensors, shape, i * dim, (i + 1) * dim)
                parts[name[: -len("qkv")] + proj] = StoredWeight(fmt, part, (dim, shape[1]))
        else:
            target = _to_diffusers_name(name + ".weight")[: -len(".weight")] if comfy_layout else name
            parts[target] = StoredWeight(fmt, tensors, shape)
    # Linears outside the blocks (embedders, final layer) are dequantized at load (zimage_core.quant.stored)
    quantized = {path: w for path, w in parts.items() if path.startswith(BLOCK_PREFIXES)}

    plain_file = copy.copy(file)
    plain_file.tensors = {k: v for k, v in file.tensors.items() if k not in consumed}
    sources, shapes, layout = map_sources([plain_file], label, required=())
    source = WeightSource(sources, torch.float32, layout, [path])
    plain = {name: (shapes[name], lambda name=name: source.read(name)) for name in sources}
    for target, w in parts.items():
        if target not in quantized:
            plain[target + ".weight"] = (w.shape, lambda w=w: w.format.dequantize(w.tensors, w.shape, torch.float32))
    formats = sorted({w.format.name.split("+")[0] for w in quantized.values()})
    where = "per-layer comfy_quant" if any(k.endswith(CONF_SUFFIX) for k in file.keys()) else HEADER_KEY
    return QuantizedFile(path, quantized, plain, f"{layout}, ComfyUI mixed precision ({where}: {', '.join(formats)})")
