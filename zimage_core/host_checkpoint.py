"""Checkpointed block inputs kept in host RAM (what musubi-tuner calls gradient_checkpointing_cpu_offload).

A gradient-checkpointed block keeps only its input between forward and backward, and recomputes the rest in
backward. Those inputs are what is left of the activations: one [B, S, dim] tensor per block (33 MB in bf16 at
1024², 1 GiB over the 34 blocks). With this option each checkpointed block's input is copied to host memory as soon
as the block has it, the accelerator copy is freed, and the recompute in backward copies it back. The block runs on
the very same values (a copy is exact), so losses and gradients are bit-identical to the plain checkpointed path;
the cost is copies of the input's size per block and step: device to host in forward, host to device for the
backward recompute, and the input's gradient once each way in backward (autograd hands a host input its gradient
on the host), each a few ms over PCIe at 1024² against the block's own 30-100 ms of compute.

Only the block input moves: rope, mask and the adaLN input are shared by every block of a call (one copy in all).
Host buffers are pinned when the accelerator is CUDA, so both copies are asynchronous on the compute stream (which
orders them before the recompute that reads them). On a CPU run the "host copy" is a second CPU tensor: no saving,
but the same code path, which is how the tests prove it exact.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

HOST = torch.device("cpu")


def _copy(t: Tensor, device: torch.device) -> Tensor:
    """A copy of `t` on `device`; pinned when it is host memory for a CUDA tensor. A `meta` tensor (shape-only memory
    runs, benchmarks/memtrack.py) has no data: its host copy is an untouched buffer of the same size."""
    pin = device.type == "cpu" and t.device.type == "cuda"
    out = torch.empty(t.shape, dtype=t.dtype, device=device, pin_memory=pin)
    if t.device.type != "meta":
        out.copy_(t, non_blocking=pin or t.device.type == "cpu" and t.is_pinned())
    return out


class _Move(torch.autograd.Function):
    """`t` copied to `device`, its gradient copied back to where `t` was."""

    @staticmethod
    def forward(ctx, t: Tensor, device: torch.device) -> Tensor:
        ctx.source = t.device
        return _copy(t, device)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _copy(grad, ctx.source), None


def _on_device(block, device: torch.device):
    def run(x_host: Tensor, *rest):
        return block(_Move.apply(x_host, device), *rest)
    return run


def checkpoint_block(block, x: Tensor, *rest, host_inputs: bool = False):
    """`block(x, *rest)` gradient-checkpointed; with host_inputs its saved input `x` waits in host RAM."""
    if not host_inputs:
        return checkpoint(block, x, *rest, use_reentrant=False)
    return checkpoint(_on_device(block, x.device), _Move.apply(x, HOST), *rest, use_reentrant=False)
