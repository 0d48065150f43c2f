"""Block-wise CPU offload for small GPUs: the transformer blocks' weights live on the offload device and each
block is copied to the compute device just before it runs and dropped right after, so only one block (plus the
small embedders) occupies GPU memory. No quantisation: the numbers are those of the full-precision model."""

from __future__ import annotations

import torch
from torch import nn

from .transformer import ZImageTransformer


class _BlockOffloader:
    def __init__(self, block: nn.Module, compute: torch.device):
        self.block = block
        self.compute = compute
        self.params = [p for p in block.parameters()]
        if compute.type == "cuda":  # pinned host memory makes the per-block copy asynchronous
            for p in self.params:
                p.data = p.data.pin_memory()
        self.home = [p.data for p in self.params]
        self.handles = [block.register_forward_pre_hook(self.fetch), block.register_forward_hook(self.release)]

    def fetch(self, module, args):
        for p, home in zip(self.params, self.home):
            p.data = home.to(self.compute, non_blocking=True)

    def release(self, module, args, output):
        for p, home in zip(self.params, self.home):
            p.data = home

    def remove(self):
        for h in self.handles:
            h.remove()


def enable_block_offload(model: ZImageTransformer, compute_device: str | torch.device,
                         offload_device: str | torch.device = "cpu") -> ZImageTransformer:
    """Keep every block on `offload_device` and stream it to `compute_device` per forward; everything else (embedders,
    final layer, pad tokens) moves to `compute_device`. In-place LoRA merges between forwards patch the offloaded
    weights. Idempotent; `disable_block_offload` undoes it."""
    disable_block_offload(model)
    compute, offload = torch.device(compute_device), torch.device(offload_device)
    blocks = model.blocks()
    block_params = {id(p) for b in blocks for p in b.parameters()}
    for p in model.parameters():
        p.data = p.data.to(offload if id(p) in block_params else compute)
    model._offloaders = [_BlockOffloader(b, compute) for b in blocks]
    model._compute_device = compute
    return model


def disable_block_offload(model: ZImageTransformer, device: str | torch.device | None = None) -> ZImageTransformer:
    offloaders = getattr(model, "_offloaders", None)
    if offloaders:
        for o in offloaders:
            o.remove()
        target = torch.device(device) if device is not None else model._compute_device
        for p in model.parameters():
            p.data = p.data.to(target)
        model._offloaders = None
    return model


def is_offloaded(model: ZImageTransformer) -> bool:
    return bool(getattr(model, "_offloaders", None))
