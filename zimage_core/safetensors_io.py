"""Streaming access to .safetensors files: header parsing with clear errors, and reads straight into a destination
tensor, so loading never holds a second copy of a model (nor maps the whole file into the process)."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,  # MX block scales (ComfyUI's mxfp8 files)
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsFile:
    """Header of one .safetensors file; tensors are read on demand with plain file reads (no pickle, no mmap)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path} is not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(_MAX_HEADER, size - 8):
                raise ValueError(self._not_safetensors(head, size))
            raw = f.read(header_len)
        try:
            header = json.loads(raw)
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (UnicodeDecodeError, ValueError) as err:
            raise ValueError(f"{self.path} is not a valid safetensors file (bad header: {err})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        base = 8 + header_len
        self.tensors: dict[str, TensorInfo] = {}
        for key, entry in header.items():
            kind = entry.get("dtype") if isinstance(entry, dict) else None
            if isinstance(kind, str) and kind.startswith("F8_") and kind not in _DTYPES:
                raise ValueError(f"{self.path}: tensor {key!r} is stored as the float8 variant {kind}, which this "
                                 f"loader does not support (supported: "
                                 f"{', '.join(k for k in _DTYPES if k.startswith('F8_'))})")
            try:
                dtype = _DTYPES[entry["dtype"]]
                start, end = entry["data_offsets"]
                shape = tuple(int(s) for s in entry["shape"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{self.path}: tensor {key!r} has an unsupported or malformed header entry "
                                 f"{entry!r}") from None
            info = TensorInfo(dtype, shape, base + start, base + end)
            if info.end > size:
                raise ValueError(f"{self.path} is truncated: tensor {key!r} ends at byte {info.end} but the file has "
                                 f"{size} bytes (an interrupted download or copy?)")
            expected = torch.Size(shape).numel() * dtype.itemsize
            if info.nbytes != expected:
                raise ValueError(f"{self.path}: tensor {key!r} has {info.nbytes} bytes, shape {list(shape)} "
                                 f"{entry['dtype']} needs {expected}")
            self.tensors[key] = info

    def _not_safetensors(self, head: bytes, size: int) -> str:
        kind = ""
        if head[:2] == b"PK" or head[:1] == b"\x80":
            kind = " (it looks like a pickled PyTorch checkpoint, which this pack never loads: convert it to " \
                   ".safetensors)"
        elif head[:4] == b"GGUF":
            kind = " (it is a GGUF file)"
        return f"{self.path} is not a safetensors file{kind}"

    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, key: str, rows: slice | None = None) -> torch.Tensor:
        """Read a tensor (or a contiguous block of its first-dimension rows) into fresh CPU memory."""
        info = self.tensors[key]
        shape = list(info.shape)
        start, end = info.start, info.end
        if rows is not None:
            row_bytes = info.nbytes // max(shape[0], 1)
            start, end = info.start + rows.start * row_bytes, info.start + rows.stop * row_bytes
            shape[0] = rows.stop - rows.start
        out = torch.empty(shape, dtype=info.dtype)
        self._read_bytes(start, end, out)
        return out

    def read_into(self, key: str, out: torch.Tensor, rows: slice | None = None) -> None:
        """Read a tensor into `out` (any dtype/device), avoiding a temporary when dtype and device already match."""
        info = self.tensors[key]
        if out.dtype == info.dtype and out.device.type == "cpu" and out.is_contiguous():
            row_bytes = info.nbytes // max(info.shape[0], 1) if info.shape else info.nbytes
            start = info.start + (rows.start * row_bytes if rows is not None else 0)
            self._read_bytes(start, start + out.numel() * out.element_size(), out)
        else:
            with torch.no_grad():
                out.copy_(self.read(key, rows))

    def mapped(self, key: str) -> torch.Tensor:
        """A tensor as a copy-on-write map of its bytes in the file (nothing is read until used): for readers whose
        loader copies each tensor to its final place once, so the whole file is never in memory twice."""
        import numpy as np

        info = self.tensors[key]
        if not info.nbytes:
            return torch.empty(info.shape, dtype=info.dtype)
        raw = np.memmap(self.path, dtype=np.uint8, mode="c", offset=info.start, shape=(info.nbytes,))
        return torch.from_numpy(raw).view(info.dtype).reshape(info.shape)

    def _read_bytes(self, start: int, end: int, out: torch.Tensor) -> None:
        buffer = out.reshape(-1).view(torch.uint8).numpy() if out.numel() else None
        if buffer is None:
            return
        with open(self.path, "rb") as f:
            f.seek(start)
            got = f.readinto(memoryview(buffer))
        if got != end - start:
            raise ValueError(f"{self.path}: short read at bytes {start}..{end} (file changed while loading?)")


def describe_lookalike(keys, lookalikes: list[tuple[str, str]]) -> str:
    """'; it looks like X' for the first (key fragment, X) of `lookalikes` that some key contains, else '': the hint
    an error about a file of the wrong kind gives."""
    for fragment, what in lookalikes:
        if any(fragment in k for k in keys):
            return f"; it looks like {what}"
    return ""
