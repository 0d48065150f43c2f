"""Accelerator memory without an accelerator: a live-tensor byte tracker for work run on the `meta` device.

Meta tensors have shapes, dtypes and storages but no data, so a real-size model (dim 3840, 30 layers) runs its
forward, backward and optimizer step here in seconds and without memory. `LiveBytes` counts the bytes of every
storage on the tracked device from the moment an op creates it until the last reference dies (a weakref finalizer
on the storage), and keeps the peak, so it reads what `torch.cuda.max_memory_allocated` reads on a GPU for the same
work: every tensor autograd, checkpointing or the optimizer keeps alive counts, nothing freed does. Sizes are rounded
up to the CUDA caching allocator's 512-byte blocks. Not modelled: the CUDA context and cuBLAS/cuDNN workspaces
(a few hundred MB on a real GPU, the same for any model), allocator fragmentation (max_memory_reserved - allocated).

Two stand-ins keep the meta run faithful to a GPU:

* Attention. On the meta device (and on the CPU with masks) scaled_dot_product_attention decomposes into the math
  kernel, which materialises the S x S scores: several GB per layer at 1024². A GPU runs flash / memory-efficient
  kernels that keep O(S): `flash_attention` swaps in an autograd function around PyTorch's own flash kernel (its CPU
  variant, which has meta shapes), saving what the GPU kernel saves for backward (q, k, v, out and the fp32 row
  log-sum-exp). Applied to every caller of torch.nn.functional.scaled_dot_product_attention alike (ours, diffusers).
* Host memory. Offloaded weights live in host RAM, not on the accelerator: `host_homes` gives such tensors real but
  never-touched CPU storage (torch.empty: virtual memory only), so copies to `meta` are counted and homes are not.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

BLOCK = 512  # CUDA caching allocator granularity (bytes)


def _rounded(nbytes: int) -> int:
    return -(-nbytes // BLOCK) * BLOCK if nbytes else 0


class LiveBytes(TorchDispatchMode):
    """Live and peak bytes of storages on `device`, by label. Tensors that existed before are counted once
    `adopt`ed (model weights, LoRA); everything an op creates inside the mode is counted under "work"."""

    def __init__(self, device: str = "meta"):
        super().__init__()
        self.device = torch.device(device).type
        self.live: dict[int, tuple[int, str]] = {}  # id(storage) -> (bytes, label)
        self.by_label: dict[str, int] = {}
        self.current = self.peak = self.start = 0
        self.at_peak: dict[str, int] = {}

    # ------------------------------------------------------------------ bookkeeping
    def _track(self, t: Tensor, label: str) -> None:
        if t.device.type != self.device:
            return
        storage = t.untyped_storage()  # the same Python object for as long as the storage lives
        key = id(storage)
        if key in self.live:
            return
        size = _rounded(storage.nbytes())
        self.live[key] = (size, label)
        self.by_label[label] = self.by_label.get(label, 0) + size
        self.current += size
        weakref.finalize(storage, self._free, key)
        if self.current > self.peak:
            self.peak, self.at_peak = self.current, dict(self.by_label)

    def _free(self, key: int) -> None:
        size, label = self.live.pop(key)
        self.by_label[label] -= size
        self.current -= size

    def ignore(self, tensors) -> None:
        """Never count these storages (host-resident homes of offloaded weights in a CPU run)."""
        for t in tensors:
            if isinstance(t, Tensor) and t.device.type == self.device:
                self.live.setdefault(id(t.untyped_storage()), (0, "host"))

    def adopt(self, tensors, label: str) -> None:
        """Count existing tensors (e.g. `model.parameters()`, a state dict's values) under `label`."""
        for t in tensors:
            if isinstance(t, Tensor):
                self._track(t, label)

    def relabel(self, tensors, label: str) -> None:
        """Count the (already tracked) storages of `tensors` under `label` from now on."""
        for t in tensors:
            entry = self.live.get(id(t.untyped_storage())) if isinstance(t, Tensor) else None
            if entry is not None:
                size, old = entry
                self.live[id(t.untyped_storage())] = (size, label)
                self.by_label[old] -= size
                self.by_label[label] = self.by_label.get(label, 0) + size

    def reset_peak(self) -> None:
        self.start = self.peak = self.current
        self.at_peak = dict(self.by_label)

    def summary(self, gib: float = 2.0**30) -> dict:
        """The peak, and what of it was weights, trainable state (LoRA and its optimizer moments) and the rest."""
        w, t = self.at_peak.get("weights", 0), self.at_peak.get("trainable", 0)
        return {"peak_gib": self.peak / gib, "weights_gib": w / gib, "trainable_gib": t / gib,
                "activations_gib": (self.peak - w - t) / gib, "rise_gib": (self.peak - self.start) / gib}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self._track(t, "work")
        return out


# ---------------------------------------------------------------------------------------------- flash attention
class _FlashAttention(torch.autograd.Function):
    """PyTorch's flash-attention kernel (CPU variant) as an autograd function: saves q, k, v, out, logsumexp."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad.contiguous(), q, k, v, out, lse, 0.0, ctx.causal, scale=ctx.scale)
        return dq, dk, dv, None, None


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if attn_mask is not None or dropout_p:
        raise NotImplementedError("the flash-attention stand-in covers attention without a mask or dropout (batch 1, "
                                  "or captions of equal padded length)")
    if enable_gqa and key.shape[-3] != query.shape[-3]:  # grouped KV heads (Qwen3): the CPU kernel wants them
        repeat = query.shape[-3] // key.shape[-3]        # expanded (a GPU kernel reads them in place; small here)
        key, value = key.repeat_interleave(repeat, dim=-3), value.repeat_interleave(repeat, dim=-3)
    return _FlashAttention.apply(query, key, value, bool(is_causal), scale)


@contextmanager
def flash_attention():
    """Route torch.nn.functional.scaled_dot_product_attention through the flash kernel for the duration."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _flash_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


# ---------------------------------------------------------------------------------------------- host memory
def host_homes(modules) -> None:
    """Give every meta parameter and buffer of `modules` an untouched CPU storage of its shape and dtype (the
    weights that an offloaded model keeps in host RAM), keeping the Parameter objects' requires_grad."""
    for module in modules:
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and p.device.type == "meta":
                    m._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad)
            for name, b in list(m._buffers.items()):
                if b is not None and b.device.type == "meta":
                    m._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
