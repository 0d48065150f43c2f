"""GGUF (llama.cpp's container, as written by city96's convert.py + llama-quantize and by stable-diffusion.cpp):
one small torch dequantizer per ggml type, chosen from one table, each equal bit for bit in fp32 to gguf-py's
reference `gguf.quants.dequantize`.

A quantized GGUF weight is stored as the file's bytes: uint8 [out, bytes_per_row], each row a run of blocks along
the input dimension (`BLOCKS[type] = (elements, bytes)` per block). So a fused qkv weight splits by rows without
dequantizing. Dequantizing runs on the weight's device in fp32 (the reference's arithmetic, in its order) and is
rounded once to the compute dtype.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .linear import Format
from .stored import BLOCK_PREFIXES, QuantizedFile, StoredWeight

QK_K = 256
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # IQ4_NL / IQ4_XS codebook


def _f16(raw: Tensor) -> Tensor:
    """Little-endian IEEE half from a [n, 2] byte slice, as fp32 [n, 1]."""
    return raw.contiguous().view(torch.float16).to(torch.float32)


def _fields(raw: Tensor, width: int, count: int, dim: int) -> Tensor:
    """The `count` bit fields of `width` bits of each integer, low bits first, concatenated along `dim` (a size-1
    dimension of `raw`). One shift per field: cheaper than one broadcast shift on CPU."""
    mask = (1 << width) - 1
    return torch.cat([(raw >> (i * width)) & mask for i in range(count)], dim=dim)


def _nibbles(qs: Tensor, group: int) -> Tensor:
    """[n, k] bytes -> [n, k / group, 2, group]: per run of `group` bytes, their low nibbles then their high ones."""
    return _fields(qs.reshape(qs.shape[0], -1, 1, group), 4, 2, dim=2)


def _bits(raw: Tensor) -> Tensor:
    """[n, k] bytes -> [n, k * 8] bits, bit j = bit j % 8 of byte j // 8 (a little-endian bit field)."""
    return _fields(raw.unsqueeze(-1), 1, 8, dim=-1).reshape(raw.shape[0], -1)


def _float(q: Tensor) -> Tensor:
    """A new fp32 tensor of integer codes, for the in-place arithmetic below: each in-place op rounds exactly as the
    reference's out-of-place one (same operation, same order), without a full-size temporary per op."""
    return q.to(torch.float32)


_CODEBOOKS: dict[torch.device, Tensor] = {}  # one copy per device: no host-to-device copy per layer call


def _codebook(index: Tensor) -> Tensor:
    table = _CODEBOOKS.get(index.device)
    if table is None:
        table = _CODEBOOKS[index.device] = torch.tensor(IQ4_VALUES, dtype=torch.float32, device=index.device)
    return table[index.long()]


# ------------------------------------------------------------------ one function per type: [n, bytes] -> [n, elems]
def _q8_0(b: Tensor) -> Tensor:
    return _float(b[:, 2:].contiguous().view(torch.int8)).mul_(_f16(b[:, :2]))


def _q4_0(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 2:], 16).reshape(b.shape[0], -1)
    return _float(q.to(torch.int8) - 8).mul_(_f16(b[:, :2]))


def _q4_1(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 4:], 16).reshape(b.shape[0], -1)
    return _float(q).mul_(_f16(b[:, :2])).add_(_f16(b[:, 2:4]))


def _q5_0(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 6:], 16).reshape(b.shape[0], -1) | (_bits(b[:, 2:6]) << 4)
    return _float(q.to(torch.int8) - 16).mul_(_f16(b[:, :2]))


def _q5_1(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 8:], 16).reshape(b.shape[0], -1) | (_bits(b[:, 4:8]) << 4)
    return _float(q).mul_(_f16(b[:, :2])).add_(_f16(b[:, 2:4]))


def _q2_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    dl = (_f16(b[:, 80:82]) * (scales & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (_f16(b[:, 82:84]) * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    q = _fields(qs.reshape(n, -1, 1, 32), 2, 4, dim=2).reshape(n, 16, 16)
    return _float(q).mul_(dl).sub_(ml).reshape(n, QK_K)


def _q3_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    low = _fields(scales[:, :8].reshape(n, 1, 8), 4, 2, dim=1).reshape(n, 16)
    high = _fields(scales[:, 8:].reshape(n, 1, 4), 2, 4, dim=1).reshape(n, 16)
    sc = ((low | (high << 4)).to(torch.int8) - 32).to(torch.float32)
    dl = (_f16(b[:, 108:110]) * sc).reshape(n, 16, 1)
    ql = _fields(qs.reshape(n, -1, 1, 32), 2, 4, dim=2).reshape(n, 16, 16)
    qh = _fields(hmask.reshape(n, -1, 1, 32), 1, 8, dim=2).reshape(n, 16, 16) ^ 1
    q = ql.to(torch.int8) - (qh << 2).to(torch.int8)  # a clear high bit subtracts 4
    return _float(q).mul_(dl).reshape(n, QK_K)


def _k_scales(raw: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins (the doc's §1.2 packing)."""
    n = raw.shape[0]
    s = raw.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.to(torch.float32), mn.to(torch.float32)


def _k_dequant(b: Tensor, q: Tensor) -> Tensor:
    """Q4_K / Q5_K: d·scale·q − dmin·min per 32-element sub-block, from codes q [n, 8, 32]."""
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc).reshape(n, -1, 1)
    dm = (_f16(b[:, 2:4]) * mn).reshape(n, -1, 1)
    return _float(q).mul_(d).sub_(dm).reshape(n, QK_K)


def _q4_k(b: Tensor) -> Tensor:
    return _k_dequant(b, _nibbles(b[:, 16:], 32).reshape(b.shape[0], -1, 32))


def _q5_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    ql = _nibbles(b[:, 48:], 32).reshape(n, -1, 32)
    qh = _fields(b[:, 16:48].reshape(n, -1, 1, 32), 1, 8, dim=2).reshape(n, -1, 32)
    return _k_dequant(b, ql | (qh << 4))


def _q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    scales = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = (_f16(b[:, 208:210]) * scales).reshape(n, 16, 1)
    ql = _nibbles(b[:, :128], 64).reshape(n, -1, 32)
    qh = _fields(b[:, 128:192].reshape(n, -1, 1, 32), 2, 4, dim=2).reshape(n, -1, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, 16)
    return _float(q).mul_(d).reshape(n, QK_K)


def _iq4_nl(b: Tensor) -> Tensor:
    return _codebook(_nibbles(b[:, 2:], 16).reshape(b.shape[0], -1)).mul_(_f16(b[:, :2]))


def _iq4_xs(b: Tensor) -> Tensor:
    n = b.shape[0]
    high_bits = b[:, 2].to(torch.int32) | (b[:, 3].to(torch.int32) << 8)  # a little-endian u16
    low = _fields(b[:, 4:8].reshape(n, -1, 1), 4, 2, dim=2).reshape(n, -1)
    high = _fields(high_bits.reshape(n, 1), 2, 8, dim=1)
    scales = ((low.to(torch.int32) | (high << 4)) - 32).to(torch.float32)
    dl = (_f16(b[:, :2]) * scales).reshape(n, -1, 1)
    return _codebook(_nibbles(b[:, 8:], 16).reshape(n, -1, 32)).mul_(dl).reshape(n, -1)


def _bf16(b: Tensor) -> Tensor:  # the top half of an fp32, as the reference builds it (NaN payloads kept)
    return (b.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)


def _f16_values(b: Tensor) -> Tensor:
    return b.contiguous().view(torch.float16).to(torch.float32)


def _f32(b: Tensor) -> Tensor:
    return b.contiguous().view(torch.float32).clone()


# ggml type name -> (elements per block, bytes per block, dequantizer)
TYPES: dict[str, tuple[int, int, Callable[[Tensor], Tensor]]] = {
    "F32": (1, 4, _f32), "F16": (1, 2, _f16_values), "BF16": (1, 2, _bf16),
    "Q8_0": (32, 34, _q8_0), "Q4_0": (32, 18, _q4_0), "Q4_1": (32, 20, _q4_1),
    "Q5_0": (32, 22, _q5_0), "Q5_1": (32, 24, _q5_1),
    "Q2_K": (QK_K, 84, _q2_k), "Q3_K": (QK_K, 110, _q3_k), "Q4_K": (QK_K, 144, _q4_k),
    "Q5_K": (QK_K, 176, _q5_k), "Q6_K": (QK_K, 210, _q6_k),
    "IQ4_NL": (32, 18, _iq4_nl), "IQ4_XS": (QK_K, 136, _iq4_xs),
}
FLOAT_TYPES = ("F32", "F16", "BF16")  # loaded as plain tensors in the compute dtype


def dequantize(raw: Tensor, kind: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """The bytes of one tensor of ggml type `kind` (uint8, any shape holding whole blocks) as `shape` in `dtype`."""
    _, nbytes, fn = TYPES[kind]
    values = fn(raw.reshape(-1, nbytes))
    return values.reshape(shape).to(dtype)


def _format(kind: str) -> Format:
    def dequantize_weight(tensors: dict[str, Tensor], shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
        return dequantize(tensors["weight"], kind, shape, dtype)
    return Format(f"gguf:{kind}", ("weight",), dequantize_weight)


FORMATS: dict[str, Format] = {f"gguf:{kind}": _format(kind) for kind in TYPES}


# ---------------------------------------------------------------------------------------------- reading files
ARCH = "lumina2"  # what city96's convert.py (and so every ComfyUI-GGUF Z-Image file) writes
COMPAT_ARCHS = (None, "pig", "cow")  # no arch / ComfyUI-GGUF's own markers: stable-diffusion.cpp-style files


def _open(path: Path):
    try:
        import gguf
    except ImportError:
        raise ImportError(f"{path} is a GGUF file: reading it needs the optional package gguf "
                          f"(pip install gguf)") from None
    try:
        return gguf.GGUFReader(path, mode="c")  # copy-on-write map: torch views need a writable array
    except Exception as err:  # the reader raises ValueError / IndexError / struct errors on damaged files
        size = path.stat().st_size
        raise ValueError(f"{path} is not a readable GGUF file ({size} bytes; truncated or damaged? "
                         f"{type(err).__name__}: {err})") from None


def _architecture(reader) -> str | None:
    field = reader.get_field("general.architecture")
    return None if field is None else str(field.contents())


def _as_bytes(data: np.ndarray, rows: slice | None) -> Tensor:
    """A tensor's stored data (typed for F16/F32, uint8 for the rest) as a uint8 torch view [rows, bytes]."""
    data = data if rows is None else data[rows]
    return torch.from_numpy(data.view(np.uint8).reshape(data.shape[0] if data.ndim > 1 else 1, -1))


def read_gguf(path: str | os.PathLike) -> QuantizedFile:
    """Every tensor of a Z-Image GGUF as the model needs it: quantized 2-D `.weight` tensors of the blocks as
    StoredWeights of format `gguf:<type>` (their bytes, a fused qkv split by rows), everything else (F32 / F16 /
    BF16, a quantized embedder) as a plain tensor dequantized to fp32 when read. The whole file is checked
    (readable, architecture, Z-Image keys, every type supported) before anything is read."""
    from ..checkpoint import _IGNORED, _REQUIRED, LOOKALIKES, _strip_prefix, is_comfy_layout, model_targets
    from ..safetensors_io import describe_lookalike

    path = Path(path)
    reader = _open(path)
    arch = _architecture(reader)
    if arch != ARCH and arch not in COMPAT_ARCHS:
        raise ValueError(f"{path} is a GGUF of architecture {arch!r}, not a Z-Image transformer (ComfyUI-GGUF's "
                         f"Z-Image files are {ARCH!r})")
    keys = [t.name for t in reader.tensors]
    prefix = _strip_prefix(keys)
    names = [k[len(prefix):] for k in keys]
    missing = [k for k in _REQUIRED if k not in names]
    if missing:
        raise ValueError(f"{path} (GGUF, architecture {arch!r}) is not a Z-Image transformer: missing {missing}"
                         f"{describe_lookalike(keys, LOOKALIKES)} (first keys: {sorted(keys)[:4]})")
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in TYPES:
            raise ValueError(f"{path}: tensor {t.name!r} is stored as ggml type {kind}, which this loader does not "
                             f"support (supported: {', '.join(TYPES)})")
    comfy = is_comfy_layout(names)
    out = QuantizedFile(path, layout=f"GGUF {arch or 'compat (stable-diffusion.cpp)'}, "
                                     f"{'comfyui' if comfy else 'diffusers'} keys"
                                     + (f" (prefix {prefix!r})" if prefix else ""))
    for t, name in zip(reader.tensors, names):
        if _IGNORED.match(name):
            continue
        kind, shape = t.tensor_type.name, tuple(int(d) for d in reversed(t.shape.tolist()))
        for target, rows, part in model_targets(name, shape, comfy):
            if kind not in FLOAT_TYPES and len(part) == 2 and target.endswith(".weight") \
                    and target.startswith(BLOCK_PREFIXES):
                raw = _as_bytes(t.data, rows)
                out.quantized[target.removesuffix(".weight")] = StoredWeight(FORMATS[f"gguf:{kind}"],
                                                                             {"weight": raw}, part)
            else:
                out.plain[target] = (part, _plain_reader(t.data, rows, kind, part))
    return out


def _plain_reader(data: np.ndarray, rows: slice | None, kind: str, shape: tuple):
    def read() -> Tensor:
        return dequantize(_as_bytes(data, rows), kind, shape)
    return read
