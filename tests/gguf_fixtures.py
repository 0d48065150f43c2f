"""Tiny GGUF files for the tests, written with gguf-py's own GGUFWriter (llama.cpp's reference), and their oracle:
the same model rebuilt from `gguf.quants.dequantize` of every stored tensor. A test helper, not product code.

Types follow the real files (docs: quantized-formats.md §1.1): city96 keeps 1-D / <= 1024-element tensors in F32,
embedders, refiners and the final layer in BF16, and quantizes the 2-D tensors of the main `layers.N` blocks; a
stable-diffusion.cpp file has no architecture, prefixed keys and every 2-D tensor quantized. Legacy types are made
with gguf's quantizer; K- and IQ-types (no quantizer in gguf-py 0.19) are random bytes whose f16 scale fields are
small finite values, which is what the reference dequantizes like any real block."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from safetensors.torch import save_file

import gguf
from gguf import GGMLQuantizationType as T

from zimage_core.checkpoint import comfyui_state_dict
from zimage_core.config import ZImageConfig
from zimage_core.testing import tiny_model

HAS_QUANTIZER = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16", "F16", "F32")
F16_FIELDS = {"Q2_K": (80, 84), "Q3_K": (108, 110), "Q4_K": (0, 4), "Q5_K": (0, 4), "Q6_K": (208, 210),
              "IQ4_XS": (0, 2), "IQ4_NL": (0, 2)}  # byte ranges of each block's f16 scales
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS")


def tiny_256(seed: int = 0) -> torch.nn.Module:
    """A tiny Z-Image whose Linear in-features (256, 512) suit every ggml block size, K-quants included."""
    return tiny_model(seed, dim=256, n_heads=2, axes_dims=ZImageConfig.rope_axes_for(128), ffn_hidden_dim=512)


def random_blocks(kind: str, rows: int, cols: int, rng: np.random.Generator, scale: float = 1e-4) -> np.ndarray:
    """Valid random blocks of a type without a quantizer: random bytes, small finite f16 scales."""
    elems, nbytes = gguf.GGML_QUANT_SIZES[T[kind]]
    raw = rng.integers(0, 256, size=(rows * cols // elems, nbytes), dtype=np.uint8)
    a, b = F16_FIELDS[kind]
    raw[:, a:b] = rng.uniform(0, scale, size=(raw.shape[0], (b - a) // 2)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def encode(value: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "F32":
        return value.astype(np.float32)
    if kind == "F16":
        return value.astype(np.float16)
    if kind in HAS_QUANTIZER:
        return gguf.quants.quantize(value.astype(np.float32), T[kind])
    return random_blocks(kind, *value.shape, rng)


def city96_type(name: str, value: torch.Tensor, quant: str | Callable[[str], str]) -> str:
    if value.ndim == 1 or value.numel() <= 1024:
        return "F32"
    if not name.startswith("layers."):
        return "BF16"
    return quant(name) if callable(quant) else quant


def sdcpp_type(name: str, value: torch.Tensor, quant: str) -> str:
    return "F32" if value.ndim == 1 or value.numel() <= 1024 or value.shape[-1] % 32 else quant


def write_gguf(path, model, quant: str | Callable[[str], str] = "Q8_0", arch: str | None = "lumina2",
               prefix: str = "", rules=city96_type, extra: dict | None = None, seed: int = 0):
    """Write `model` (ComfyUI key layout) as a GGUF with the per-tensor types of `rules`; `extra` adds raw
    tensors {name: (bytes [rows, row_bytes] uint8, ggml type name)}. Returns the path."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch=arch or "unused")
    if arch is None:  # stable-diffusion.cpp-style: no general.architecture at all
        for kv in writer.kv_data:
            kv.pop(gguf.Keys.General.ARCHITECTURE, None)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, value in comfyui_state_dict(model, dtype=torch.float32).items():
        kind = rules(name, value, quant)
        if rules is sdcpp_type and value.ndim == 2 and value.shape[0] == 1:
            value = value.reshape(-1)  # ggml drops trailing unit dims: sd.cpp writes the [1, dim] pad tokens as [dim]
        data = encode(value.float().numpy(), kind, rng)
        writer.add_tensor(prefix + name, data, raw_dtype=T[kind] if kind not in ("F32", "F16") else None)
    for name, (data, kind) in (extra or {}).items():
        writer.add_tensor(name, data, raw_dtype=T[kind])  # the writer derives the shape from the bytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def dequantized_reference(path, out_path):
    """The oracle: every tensor of the GGUF through gguf.quants.dequantize, saved as an fp32 ComfyUI-layout
    safetensors file (which the plain loader reads)."""
    reader = gguf.GGUFReader(str(path))
    state = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if t.name.endswith("pad_token"):
            shape = (1, -1)  # the model's [1, dim], whatever unit dims the writer dropped
        state[t.name] = torch.from_numpy(np.ascontiguousarray(
            gguf.quants.dequantize(t.data, t.tensor_type)).reshape(shape).astype(np.float32))
    save_file(state, str(out_path))
    return out_path


def stored_bytes(path) -> dict[str, tuple[str, int]]:
    """name -> (ggml type, bytes) of every tensor in the file."""
    return {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in gguf.GGUFReader(str(path)).tensors}
