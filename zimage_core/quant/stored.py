"""What a family reader makes of a quantized file: per Linear its stored tensors and format, the rest as plain
tensors (zimage_core.quant.install_quantized and zimage_core.checkpoint build the model from it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from .linear import Format

# Where a reader keeps Linears quantized: the transformer blocks (98 % of the weights). Embedders and the final layer
# are dequantized at load even when a file quantizes them (stable-diffusion.cpp files do): the model reads its
# compute dtype from their weights, and they are 0.4 % of the weights.
BLOCK_PREFIXES = ("layers.", "noise_refiner.", "context_refiner.")

@dataclass(frozen=True)
class StoredWeight:
    """One Linear weight as a file stores it: its format, its stored tensors (as named by the format) and its
    logical shape (out, in)."""

    format: Format
    tensors: dict[str, Tensor]
    shape: tuple[int, int]


@dataclass
class QuantizedFile:
    """What a family reader makes of a file: per model parameter name (diffusers naming), either a quantized Linear
    weight (`quantized`, keyed by the Linear's module path) or a plain tensor to be read in the compute dtype
    (`plain`: name -> (shape, read() -> Tensor))."""

    path: Path
    quantized: dict[str, StoredWeight] = field(default_factory=dict)
    plain: dict[str, tuple[tuple[int, ...], Callable[[], Tensor]]] = field(default_factory=dict)
    layout: str = ""
