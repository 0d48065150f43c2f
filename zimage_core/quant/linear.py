"""One quantized Linear for every file family: the weight kept exactly as the file stores it, made into a
compute-dtype weight one layer at a time when the layer runs.

A `Format` says which tensors a family stores for one weight and how to dequantize them; a `QuantizedLinear` holds
those tensors as frozen parameters (so `.to(device)`, `parameters()`, `state_dict()` and block offload see and move
them) and computes through `_DequantMatmul`, which saves the *stored* tensors for backward: a frozen quantized base
under training keeps no up-cast copy of any layer alive between forward and backward. Gradients reach the input only.

How a layer computes is a per-module `compute` attribute, looked up in `COMPUTE_PATHS` ("dequant": dequantize, then
F.linear). Faster quantized GEMMs register there and are chosen per module by a small function outside the format
code, so a format never needs to know about kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Dequantize = Callable[[dict[str, Tensor], tuple[int, int], torch.dtype], Tensor]


@dataclass(frozen=True)
class Format:
    """One quantized-weight format: `name` (e.g. "fp8_channel", "gguf:Q4_K"), the names of its stored tensors (the
    first holds the weight's bits), and `dequantize(tensors, (out, in), dtype) -> [out, in]` in `dtype`."""

    name: str
    stored_names: tuple[str, ...]
    dequantize: Dequantize


class _DequantMatmul(torch.autograd.Function):
    """x @ W.T with W dequantized at call time; saves the stored tensors, not W, for the backward pass."""

    @staticmethod
    def forward(ctx, x: Tensor, fmt: Format, shape: tuple[int, int], *stored: Tensor) -> Tensor:
        ctx.fmt, ctx.shape = fmt, shape
        ctx.save_for_backward(*stored)
        return F.linear(x, fmt.dequantize(dict(zip(fmt.stored_names, stored)), shape, x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        stored = ctx.saved_tensors  # unpacked once: gradient checkpointing allows no second unpack
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ ctx.fmt.dequantize(dict(zip(ctx.fmt.stored_names, stored)), ctx.shape, grad.dtype)
        return (grad_x, None, None, *([None] * len(stored)))


def _dequant_forward(module: "QuantizedLinear", x: Tensor) -> Tensor:
    return _DequantMatmul.apply(x, module.format, module.shape, *module.stored_tensors())


COMPUTE_PATHS: dict[str, Callable[["QuantizedLinear", Tensor], Tensor]] = {"dequant": _dequant_forward}


class QuantizedLinear(nn.Linear):
    """A frozen nn.Linear whose weight is the file's stored tensors (`stored_names`, in `format`).

    A subclass of nn.Linear so that everything that addresses Linears (LoRA side branches, `new_lora`, offload)
    treats it as one; its stored tensors are never written to (LoRAs run beside it, see zimage_core.lora.apply).
    `shape` is the logical weight shape [out, in]; the stored tensors have their own shapes and dtypes."""

    def __init__(self, in_features: int, out_features: int, fmt: Format, stored: dict[str, Tensor],
                 bias: Tensor | None = None):
        nn.Module.__init__(self)
        missing = [n for n in fmt.stored_names if n not in stored]
        if missing:
            raise ValueError(f"{fmt.name}: a quantized Linear needs the stored tensors {list(fmt.stored_names)}, "
                             f"missing {missing}")
        self.in_features, self.out_features = in_features, out_features
        self.format = fmt
        self.compute = "dequant"
        for name in fmt.stored_names:
            self.register_parameter(name, nn.Parameter(stored[name], requires_grad=False))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def fmt(self) -> str:
        return self.format.name

    @property
    def stored_names(self) -> tuple[str, ...]:
        return self.format.stored_names

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def stored_tensors(self) -> list[Tensor]:
        # read at call time: block offload swaps the module's parameters for fetched copies during a call
        return [getattr(self, name) for name in self.format.stored_names]

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight [out, in] in `dtype`, made now (one layer's worth of memory)."""
        return self.format.dequantize(dict(zip(self.stored_names, self.stored_tensors())), self.shape, dtype)

    def forward(self, x: Tensor) -> Tensor:
        out = COMPUTE_PATHS[self.compute](self, x)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, format={self.fmt}"


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, QuantizedLinear)


def weight_shape(module: nn.Module) -> tuple[int, ...] | None:
    """The logical shape of a module's weight: [out, in] for a quantized Linear (whose stored tensors have other
    shapes), else its weight's shape; None without a weight. What LoRA shape checks compare against."""
    if isinstance(module, QuantizedLinear):
        return module.shape
    weight = getattr(module, "weight", None)
    return tuple(weight.shape) if isinstance(weight, Tensor) else None


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
