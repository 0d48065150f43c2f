"""nunchaku's SVDQuant files (nunchaku-ai/nunchaku-z-image-turbo `svdq-int4_r{32,128,256}`): 4-bit weights with a
low-rank correction, computed here on any device.

An SVDQuant Linear computes y = Q4(x / smooth) · (Wres · wscales)ᵀ + (x · downᵀ) · upᵀ + bias: a 4-bit residual
weight (signed int4, one scale per 64 input columns), per-input-channel smoothing that divides the activation before
its own 4-bit quantization, and a bf16 low-rank branch (rank r) that sees the raw input. Without the activation
quantization (which only nunchaku's CUDA kernels need), the weight this computes with is

    W_eff = Wres·diag(1/smooth) + up·down        [N, K]

which is what `dequantize` makes, in fp32 and then the compute dtype, one layer at a time.

nunchaku stores every tensor of a quantized Linear in the tile order of its CUDA MMA kernels (nunchaku
`lora/flux/packer.py`, from deepcompressor; int4, warp_n = 128). All are pure permutations, inverted once at load
into comfy-kitchen's natural SVDQuant layout (the same bytes, which kitchen's own W4A4 kernels read):

    qweight        int8 [N, K/2]: int4 [N, K] viewed (N/128, 8, 2, 8, 1, K/64, 1, 2, 4, 8), permuted
                   (0,5,6,1,3,8,2,7,4,9), each run of 8 nibbles one little-endian int32
                   -> natural: two's-complement nibbles, low nibble = even column
    wscales        [K/64, N]: [N, K/64] viewed (N/128, 1, 8, 2, 4, 2, K/64), permuted (0,6,1,2,4,3,5)
                   -> natural [K/64, N]
    smooth_factor  [K] and bias [N]: the same permutation with one group ("pack_scale(group_size=-1)")
    proj_down      stored [K, R]: the [R, K] down matrix in 16 x 16 tiles -> natural [K, R] (= downᵀ)
    proj_up        stored [N, R]: the [N, R] up matrix in 16 x 16 tiles  -> natural [N, R]

Keys use diffusers naming with q/k/v fused (`attention.to_qkv`, N = 3·dim) and the SwiGLU input projections fused
as `feed_forward.net.0.proj` = [w3; w1] (diffusers' SwiGLU: hidden first, gate second), `feed_forward.net.2` = w2.
Fused weights are cut by rows in the natural layout; the shared smooth_factor/proj_down are copied per part.
`smooth_factor_orig` is unused by nunchaku and not kept. svdq-fp4 files (NVFP4 residual, fp8 scales per 16) have
no exact reference outside nunchaku's Blackwell kernels and are refused by name.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, MutableMapping
from pathlib import Path

import torch
from torch import Tensor

from .linear import Format
from .stored import BLOCK_PREFIXES, QuantizedFile, StoredWeight

log = logging.getLogger("zimage_core")

GROUP = 64  # int4 residual: one scale per 64 input columns
TILE_N = 128  # nunchaku's warp_n: N and K are padded to it
LOWRANK_TILE = 16
STORED = ("qweight", "wscales", "smooth_factor", "proj_down", "proj_up")
_SUBKEYS = (*STORED, "smooth_factor_orig", "bias")
_FP4_MARKERS = ("wcscales", "wtscale")
FP4_REFUSAL = ("is an svdq-fp4 (NVFP4) SVDQuant file, which this pack does not load: its fp4 layout has no exact "
               "reference outside nunchaku's Blackwell kernels. Load it with ComfyUI-nunchaku "
               "(NunchakuZImageDiTLoader), or use the svdq-int4 file of the same model")

# nunchaku's permutations (see the module docstring): (view shape as a function of N, K or R, permutation)
_QWEIGHT_PERM = (0, 5, 6, 1, 3, 8, 2, 7, 4, 9)
_SCALE_PERM = (0, 6, 1, 2, 4, 3, 5)
_LOWRANK_PERM = (0, 1, 3, 6, 2, 5, 4, 7)


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(range(len(perm)), key=perm.__getitem__))


def _unpermute(packed: Tensor, logical_view: tuple[int, ...], perm: tuple[int, ...]) -> Tensor:
    """Undo `logical.view(logical_view).permute(perm)` (then flattened) on the flat `packed`."""
    stored_view = tuple(logical_view[i] for i in perm)
    return packed.reshape(stored_view).permute(_inverse(perm)).reshape(logical_view)


# ---------------------------------------------------------------------------------------------- unpacking
def unpack_int4(qweight: Tensor) -> Tensor:
    """nunchaku qweight int8 [N, K/2] -> signed int4 values int8 [N, K] in natural order."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    # nibble i of each little-endian int32 word is the low (even i) or high (odd i) half of its byte i // 2; bytes
    # keep the temporaries at one byte per value
    b = qweight.contiguous().view(torch.uint8)
    values = _signed(torch.stack([b & 0xF, b >> 4], dim=-1))
    view = (n // TILE_N, 8, 2, 8, 1, k // 64, 1, 2, 4, 8)
    return _unpermute(values, view, _QWEIGHT_PERM).reshape(n, k)


def _signed(nibbles: Tensor) -> Tensor:
    """uint8 nibbles 0..15 -> their two's-complement int4 values as int8 (-8..7)."""
    return (nibbles ^ 8).view(torch.int8) - 8


def pack_natural_int4(values: Tensor) -> Tensor:
    """int4 values [N, K] -> comfy-kitchen's natural packing int8 [N, K/2] (low nibble = even column)."""
    v = values.view(torch.uint8) & 0xF
    return (v[:, 0::2] | (v[:, 1::2] << 4)).view(torch.int8)


def unpack_natural_int4(packed: Tensor) -> Tensor:
    """comfy-kitchen's natural int8 [N, K/2] -> signed int4 values int8 [N, K]."""
    b = packed.view(torch.uint8)
    return _signed(torch.stack([b & 0xF, b >> 4], dim=-1)).reshape(packed.shape[0], -1)


def unpack_scales(wscales: Tensor, n: int) -> Tensor:
    """nunchaku wscales [K/64, N] (or a 1-D vector when groups == 1) -> natural [groups, N]."""
    groups = wscales.numel() // n
    natural = _unpermute(wscales, (n // TILE_N, 1, 8, 2, 4, 2, groups), _SCALE_PERM)  # [N, groups] in tiles
    return natural.reshape(n, groups).t().contiguous()


def unpack_vector(vector: Tensor) -> Tensor:
    """nunchaku's smooth_factor [K] / bias [N] (pack_scale order) -> natural order."""
    return unpack_scales(vector, vector.numel()).reshape(-1)


def unpack_lowrank(weight: Tensor, down: bool) -> Tensor:
    """nunchaku proj_down [K, R] / proj_up [N, R] -> down [R, K] / up [N, R] in natural order."""
    c, r = weight.shape
    rows, cols = (r, c) if down else (c, r)  # the matrix that was packed: down is [R, K], up is [N, R]
    t = LOWRANK_TILE
    tiles = weight.reshape(cols // t if down else rows // t, (rows // t) if down else cols // t, 8, 4, 2, 2, 1, 2)
    tiles = tiles.permute(_inverse(_LOWRANK_PERM)).reshape(tiles.shape[0], tiles.shape[1], t, t)
    if down:  # tiles are (K tile, R tile, r, k)
        return tiles.permute(1, 2, 0, 3).reshape(rows, cols)
    return tiles.permute(0, 2, 1, 3).reshape(rows, cols)  # (N tile, R tile, n, r)


def check_shapes(shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """The stored shapes of one nunchaku int4 Linear (from a header): qweight [N, K/2] with N, K multiples of 128,
    wscales [K/64, N], smooth_factor [K], proj_down [K, R], proj_up [N, R], R a multiple of 16."""
    n, k = shapes["qweight"][0], shapes["qweight"][1] * 2
    if len(shapes["qweight"]) != 2 or n % TILE_N or k % (2 * GROUP):
        raise ValueError(f"{where}: qweight of shape {list(shapes['qweight'])} is not nunchaku's int4 layout "
                         f"(N and K must be multiples of 128)")
    for name, shape in {"wscales": (k // GROUP, n), "smooth_factor": (k,)}.items():
        if tuple(shapes[name]) != shape:
            raise ValueError(f"{where}: {name} has shape {list(shapes[name])}, a [{n}, {k}] int4 weight needs "
                             f"{list(shape)}")
    down, up = shapes["proj_down"], shapes["proj_up"]
    if len(down) != 2 or len(up) != 2 or down[0] != k or up[0] != n or down[1] != up[1] or down[1] % LOWRANK_TILE:
        raise ValueError(f"{where}: proj_down {list(down)} / proj_up {list(up)} do not fit a [{n}, {k}] weight "
                         f"(need [{k}, R] and [{n}, R], R a multiple of 16)")


def unpack_linear(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """One nunchaku Linear's stored tensors (shapes as `check_shapes` wants) -> the natural form of "svdq:int4"."""
    qweight, down, up = tensors["qweight"], tensors["proj_down"], tensors["proj_up"]
    n = qweight.shape[0]
    return {
        "qweight": pack_natural_int4(unpack_int4(qweight)),
        "wscales": unpack_scales(tensors["wscales"], n),
        "smooth_factor": unpack_vector(tensors["smooth_factor"]),
        "proj_down": unpack_lowrank(down, down=True).t().contiguous(),
        "proj_up": unpack_lowrank(up, down=False).contiguous(),
    }


# ---------------------------------------------------------------------------------------------- the format
def residual(t: dict[str, Tensor], shape: tuple[int, int]) -> Tensor:
    """Wres · wscales as fp32 [N, K] (before the smoothing is undone)."""
    n, k = shape
    q = unpack_natural_int4(t["qweight"]).to(torch.float32).reshape(n, k // GROUP, GROUP)
    return (q * t["wscales"].to(torch.float32).t().unsqueeze(-1)).reshape(n, k)


def dequantize(t: dict[str, Tensor], shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """W_eff = Wres·diag(1/smooth) + up·down, computed in fp32, returned in `dtype`."""
    w = residual(t, shape).div_(t["smooth_factor"].to(torch.float32))
    w.addmm_(t["proj_up"].to(torch.float32), t["proj_down"].to(torch.float32).t())
    return w.to(dtype)


INT4 = Format("svdq:int4", STORED, dequantize)
FORMATS = {INT4.name: INT4}


def take_rows(t: dict[str, Tensor], a: int, b: int) -> dict[str, Tensor]:
    """The natural-form tensors of output rows a:b of a fused weight. smooth_factor and proj_down belong to all the
    parts: the same tensors, not copies (at rank 256 a copy per part would add ~4 % to the resident weights)."""
    return {"qweight": t["qweight"][a:b].clone(), "wscales": t["wscales"][:, a:b].contiguous(),
            "smooth_factor": t["smooth_factor"], "proj_down": t["proj_down"], "proj_up": t["proj_up"][a:b].clone()}


def linear_w4a4(x: Tensor, t: dict[str, Tensor]) -> Tensor:
    """nunchaku's own arithmetic (4-bit activations too) through comfy-kitchen's SVDQuant kernels: what ComfyUI-
    nunchaku computes, for comparisons. Needs comfy-kitchen (`pip install comfy-kitchen packaging`)."""
    try:
        import comfy_kitchen as ck
    except ImportError as err:
        raise ImportError(f"SVDQuant W4A4 compute needs comfy-kitchen ({err}): pip install comfy-kitchen "
                          f"packaging, or use the dequantizing path (the default)") from None
    flat = x.reshape(-1, x.shape[-1])
    q, ascales, lora = ck.quantize_svdquant_w4a4(flat, smooth=t["smooth_factor"].to(x.dtype),
                                                 lora_down=t["proj_down"].to(x.dtype))
    out = ck.scaled_mm_svdquant_w4a4(act=q, wgt=t["qweight"], ascales=ascales, wscales=t["wscales"].to(x.dtype),
                                     lora_act_in=lora, lora_up=t["proj_up"].to(x.dtype))
    return out[: flat.shape[0]].reshape(*x.shape[:-1], -1)


def quantization_config(metadata: dict[str, str]) -> dict:
    try:
        return json.loads(metadata.get("quantization_config", "{}")) or {}
    except ValueError:
        return {}


def is_fp4(metadata: dict[str, str], keys) -> bool:
    """An svdq-fp4 file: its quantization_config says fp4 / group 16, or it carries fp4-only tensors."""
    weight = quantization_config(metadata).get("weight", {})
    if isinstance(weight, dict) and (str(weight.get("dtype", "")).startswith("fp4") or weight.get("group_size") == 16):
        return True
    return any(k.rpartition(".")[2] in _FP4_MARKERS for k in keys)


# ---------------------------------------------------------------------------------------------- reading a file
# nunchaku's fused Linears -> (the model's Linears, in row order)
_FUSED = {"attention.to_qkv": ("attention.to_q", "attention.to_k", "attention.to_v"),
          "feed_forward.net.0.proj": ("feed_forward.w3", "feed_forward.w1"),
          "feed_forward.net.2": ("feed_forward.w2",)}


def _targets(stem: str) -> tuple[str, ...]:
    for fused, parts in _FUSED.items():
        if stem.endswith("." + fused):
            base = stem[: -len(fused)]
            return tuple(base + p for p in parts)
    return (stem,)


def _check_linear(file, stem: str, label: str) -> None:
    """Every stored tensor of one quantized Linear, checked from the header alone."""
    keys = file.tensors
    missing = [f"{stem}.{name}" for name in STORED if f"{stem}.{name}" not in keys]
    if missing:
        raise ValueError(f"{label}: SVDQuant layer {stem} has no {missing[0]}: the file is incomplete")
    extra = sorted(k for k in keys if k.startswith(stem + ".") and k[len(stem) + 1:] not in _SUBKEYS)
    if extra:
        raise ValueError(f"{label}: SVDQuant layer {stem} holds {extra[0]}, which an int4 SVDQuant Linear does not "
                         f"have (an AWQ W4A16 layer, or another nunchaku format): not supported")
    q = keys[f"{stem}.qweight"]
    if q.dtype != torch.int8:
        raise ValueError(f"{label}: {stem}.qweight must be int8 [N, K/2], got {q.dtype} {list(q.shape)}")
    check_shapes({name: keys[f"{stem}.{name}"].shape for name in STORED}, f"{label}: {stem}")
    if len(_targets(stem)) > 1 and q.shape[0] % len(_targets(stem)):
        raise ValueError(f"{label}: fused {stem}.qweight has {q.shape[0]} rows, not {len(_targets(stem))} equal parts")


class _Unpacked(MutableMapping):
    """The natural-form tensors of one model Linear, unpacked from the file only when first used: reading a file's
    layout (inspect_checkpoint) unpacks nothing, and loading unpacks one Linear at a time, freed once installed."""

    def __init__(self, make: Callable[[], dict[str, Tensor]]):
        self._make, self._tensors = make, None

    def _get(self) -> dict[str, Tensor]:
        if self._tensors is None:
            self._tensors = self._make()
        return self._tensors

    def __getitem__(self, name: str) -> Tensor:
        return self._get()[name]

    def __setitem__(self, name: str, value: Tensor) -> None:
        self._get()[name] = value

    def __delitem__(self, name: str) -> None:
        del self._get()[name]

    def __iter__(self):
        return iter(STORED if self._tensors is None else self._tensors)

    def __len__(self) -> int:
        return len(STORED if self._tensors is None else self._tensors)

    def clear(self) -> None:  # once installed: drop this Linear's tensors (without unpacking them first)
        self._make, self._tensors = None, {}


class _LastLinear:
    """Unpacks one nunchaku Linear and keeps only the last one asked for: the parts of a fused Linear (installed one
    after another) share its smooth_factor and proj_down tensors, and nothing else stays in memory."""

    def __init__(self, file):
        self.file, self.stem, self.natural = file, None, None

    def __call__(self, stem: str) -> dict[str, Tensor]:
        if stem != self.stem:
            self.stem, self.natural = stem, None  # the previous Linear is freed before the next is unpacked
            self.natural = unpack_linear({name: self.file.mapped(f"{stem}.{name}") for name in STORED})
        return self.natural


def read_svdquant(path: str | Path):
    """A nunchaku SVDQuant int4 file as a QuantizedFile: each quantized Linear unpacked to the natural layout
    (fused q/k/v and w3/w1 cut by rows), every other tensor for the plain loader (refiner FFNs that nunchaku kept in
    bf16 as a fused `net.0.proj` are cut the same way). svdq-fp4 files are refused by name."""
    from ..checkpoint import _strip_prefix  # (imports this package)
    from ..safetensors_io import SafetensorsFile

    path = Path(path)
    file = SafetensorsFile(path)
    label = str(path)
    if is_fp4(file.metadata, file.keys()):
        raise ValueError(f"{label} {FP4_REFUSAL}")
    stems = sorted(k[: -len(".qweight")] for k in file.keys() if k.endswith(".qweight"))
    for stem in stems:
        _check_linear(file, stem, label)
    for stem in stems:
        if f"{stem}.bias" in file.tensors and file.mapped(f"{stem}.bias").count_nonzero():
            raise ValueError(f"{label}: {stem}.bias is not zero, but Z-Image's {stem.rpartition('.')[2]} Linear "
                             f"has no bias")
    prefix = _strip_prefix(file.keys())
    unpacked = _LastLinear(file)
    quantized, plain = {}, {}
    for stem in stems:
        targets = _targets(stem[len(prefix):])
        n, k = file.tensors[f"{stem}.qweight"].shape[0], file.tensors[f"{stem}.qweight"].shape[1] * 2
        rows = n // len(targets)
        for i, target in enumerate(targets):
            part = _Unpacked(lambda stem=stem, a=i * rows, b=(i + 1) * rows, whole=len(targets) == 1:
                             unpacked(stem) if whole else take_rows(unpacked(stem), a, b))
            if target.startswith(BLOCK_PREFIXES):
                quantized[target] = StoredWeight(INT4, part, (rows, k))
            else:  # outside the blocks: dequantized at load (zimage_core.quant.stored)
                plain[target + ".weight"] = ((rows, k), lambda part=part, shape=(rows, k): dequantize(dict(part), shape,
                                                                                                     torch.float32))

    consumed = {f"{stem}.{name}" for stem in stems for name in _SUBKEYS}
    for key, info in file.tensors.items():
        if key in consumed:
            continue
        stem, dot, leaf = key[len(prefix):].rpartition(".")
        targets = _targets(stem) if dot else ("",)
        rows = info.shape[0] // len(targets) if info.shape else 0
        for i, target in enumerate(targets):
            part = slice(i * rows, (i + 1) * rows) if len(targets) > 1 else None
            shape = (rows, *info.shape[1:]) if part else tuple(info.shape)
            plain[f"{target}{dot}{leaf}"] = (shape, lambda key=key, part=part: file.read(key, part))
    rank = max((file.tensors[f"{stem}.proj_up"].shape[1] for stem in stems), default=0)
    return QuantizedFile(path, quantized, plain, f"nunchaku SVDQuant int4 r{rank}"
                                                 f"{f' (prefix {prefix!r})' if prefix else ''}")
