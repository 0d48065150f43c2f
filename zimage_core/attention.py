"""Attention backends for the transformer: PyTorch SDPA (default) or an opt-in fast kernel.

| backend | kernel | when it runs (else SDPA) |
|---|---|---|
| `sdpa` | `F.scaled_dot_product_attention` (flash / memory-efficient kernels on CUDA, flash-for-CPU on CPU) | always |
| `sage` | SageAttention (`sageattention.sageattn`, int8 Q·K, fp8/fp16 P·V) | CUDA, fp16/bf16, head_dim 64/128, no mask |
| `flash` | FlashAttention (`flash_attn.flash_attn_func`) | CUDA, fp16/bf16, head_dim <= 256, no mask |
| `kitchen_int8` | comfy-kitchen's INT8 attention (`comfy_kitchen.int8_attention`) | a GPU it supports, fp16/bf16, no mask |

None is a default: sage broke Z-Image images in a ComfyUI report (Comfy-Org/ComfyUI#12138) and quantises Q/K to
int8; see docs/speed-options.md for their errors. A missing package is found when the backend is chosen
(`set_attention_backend`: one log line, the model keeps SDPA); a call the kernel cannot take (CPU, fp32, a key mask
for captions of unequal length, another head size) runs SDPA, logged once per reason. Never an error mid-sampling.
An unknown backend name is a ValueError naming the option.
"""

from __future__ import annotations

import importlib
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger("zimage_core")

ATTENTION_BACKENDS = ("sdpa", "sage", "flash", "kitchen_int8")
_PACKAGES = {"sage": "sageattention", "flash": "flash_attn", "kitchen_int8": "comfy_kitchen"}
_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.warning(message)


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """q, k, v [B, S, H, D] -> [B, S, H, D] through PyTorch's SDPA (which wants [B, H, S, D])."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def _sage(q, k, v):
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


def _flash(q, k, v):
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v)


def _kitchen_int8(q, k, v):
    import comfy_kitchen

    return comfy_kitchen.int8_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


KERNELS = {"sage": _sage, "flash": _flash, "kitchen_int8": _kitchen_int8}  # q, k, v [B, S, H, D] -> same


def unsupported(backend: str, q: Tensor, mask: Tensor | None) -> str | None:
    """Why `backend` cannot take this call (None: it can)."""
    if q.device.type != "cuda":
        return f"runs on CUDA only (the model is on {q.device.type})"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"takes fp16/bf16 only (the model computes in {str(q.dtype).removeprefix('torch.')})"
    if mask is not None:
        return "takes no key mask (a batch of captions of unequal length)"
    head_dim = q.shape[-1]
    if backend == "sage" and head_dim not in (64, 128):
        return f"takes head_dim 64 or 128, not {head_dim}"
    if backend == "flash" and head_dim > 256:
        return f"takes head_dim <= 256, not {head_dim}"
    if backend == "kitchen_int8":
        import comfy_kitchen

        if not comfy_kitchen.int8_attention_is_available(q.device):
            return f"has no kernel for this GPU ({torch.cuda.get_device_name(q.device)})"
    return None


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, backend: str = "sdpa") -> Tensor:
    """Full attention of q, k, v [B, S, H, D] with a boolean key mask [B, 1, 1, S] (True = attend) or None."""
    if backend != "sdpa":
        reason = unsupported(backend, q, mask)
        if reason is None:
            return KERNELS[backend](q, k, v)
        _log_once(f"attention {backend!r} {reason}: those calls use SDPA")
    return sdpa(q, k, v, mask)


def check_backend(backend: str) -> str:
    """The backend a model can use: `backend` itself, or "sdpa" (logged) when its package is not installed."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention: unknown backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
    package = _PACKAGES.get(backend)
    if package is None:
        return backend
    try:
        importlib.import_module(package)
    except Exception as err:  # not installed, or built for another torch / CUDA
        _log_once(f"attention {backend!r}: package {package!r} cannot be imported ({type(err).__name__}: {err}); "
                  f"the model uses SDPA")
        return "sdpa"
    return backend


def set_attention_backend(model: nn.Module, backend: str = "sdpa") -> str:
    """Make every attention module of `model` use `backend` (see the module docstring); returns the backend in use
    ("sdpa" when the chosen package is missing)."""
    chosen = check_backend(backend)
    for module in model.modules():
        if hasattr(module, "attention_backend"):
            module.attention_backend = chosen
    return chosen
