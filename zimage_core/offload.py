"""Block offload for small GPUs: the transformer blocks' weights live on the offload device (CPU RAM) and each block
is copied to the compute device just before it runs, so only the running block and the next one occupy GPU memory.
No quantisation: the numbers are those of the model as stored (bf16, or fp8 with its scales).

It covers everything the trainer does: forward, gradient-checkpoint recompute and backward.

* A block's weights and buffers (any: fp8 weights with their scale buffers travel too) are fetched into *new*
  tensors that stand in for the module's own during the call (`module._parameters[name]` is swapped and restored).
  So whatever autograd saves for backward refers to the fetched copy, never to the home tensor that the module
  holds again after the call: backward sees the right values on the right device.
* Under autograd an offloaded block always runs gradient-checkpointed (`ZImageTransformer` asks `wants_checkpoint`):
  a block that is not checkpointed saves its fetched weights for backward, which would keep every block resident.
  The recompute fetches the block again, and the copy is freed once that block's backward has used it.
* While block i runs, block i + 1 (in backward: i - 1) is already being copied on a side CUDA stream from pinned
  host memory, so the copy overlaps compute. A guess that turns out wrong only costs that copy; a block is always
  fetched (waiting for its prefetch, or synchronously) before it runs. On CPU the same code runs synchronously.
* The prefetch is made only when the running block and the next one together fit a byte budget, by default twice
  the median block. Uniform models (bf16, fp8, files that quantize every block) always prefetch. A block far larger
  than the typical one (a GGUF file keeps its 4 refiner blocks in bf16, 3x its Q4_K main blocks) is fetched when it
  runs, without overlap: two of them in flight would set the offloaded model's peak memory.
* The home tensors are the module's own (pinned in place of the pageable ones when the compute device is CUDA,
  never a second copy), so LoRA merges between calls patch them directly; prefetches still in flight are dropped
  at the start of every model call, so a merge can never be missed.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

_ATTR = "_block_offload"
OFFLOAD_MODES = ("none", "block")  # what a user can choose (loader node, headless trainer): nothing, or block offload


@dataclass
class _Fetched:
    """The compute-device copies of one block's tensors, and the event that says when the copy is complete."""

    index: int
    tensors: dict[tuple[nn.Module, str, str], Tensor]  # (module, "param" | "buffer", name) -> copy
    ready: torch.cuda.Event | None


def _block_tensors(block: nn.Module) -> list[tuple[nn.Module, str, str, Tensor]]:
    """Every parameter and buffer of `block`, read at call time (a trainer may have replaced a parameter object)."""
    out = []
    for module in block.modules():
        out += [(module, "param", n, p) for n, p in module._parameters.items() if p is not None]
        out += [(module, "buffer", n, b) for n, b in module._buffers.items() if b is not None]
    return out


class BlockOffload:
    """Streams `blocks` of a model between `offload` and `compute` (see the module docstring)."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], compute: torch.device, offload: torch.device,
                 prefetch_budget_bytes: int | None = None):
        self.blocks, self.compute, self.offload = list(blocks), compute, offload
        # Read once: a LoRA merge or a trainer may replace the home tensors later, never their shapes or dtypes.
        self.nbytes = [sum(t.nbytes for *_, t in _block_tensors(b)) for b in self.blocks]
        self.set_budget(prefetch_budget_bytes)
        self.stream = torch.cuda.Stream(compute) if compute.type == "cuda" else None
        self.index = {id(b): i for i, b in enumerate(self.blocks)}
        self.pending: _Fetched | None = None  # a prefetch not yet used
        self.active: dict[int, tuple[_Fetched, list]] = {}  # block index -> (fetch, home tensors to restore)
        self.handles = [model.register_forward_pre_hook(self._drop_pending)]
        for block in self.blocks:
            self.handles += [block.register_forward_pre_hook(self._enter),
                             block.register_forward_hook(self._exit, always_call=True)]

    def set_budget(self, prefetch_budget_bytes: int | None) -> None:
        self.budget = default_prefetch_budget(self.nbytes) if prefetch_budget_bytes is None else prefetch_budget_bytes

    # ------------------------------------------------------------------ copies
    def _copy(self, index: int) -> _Fetched:
        tensors = {}
        stream = torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()
        with stream, torch.no_grad():
            for module, kind, name, home in _block_tensors(self.blocks[index]):
                # empty + copy_, not .to(): a real copy even when both devices are the same (CPU tests, meta)
                tensors[(module, kind, name)] = torch.empty_like(home, device=self.compute).copy_(
                    home, non_blocking=self.stream is not None)
            ready = None
            if self.stream is not None:
                ready = torch.cuda.Event()
                ready.record(self.stream)
        return _Fetched(index, tensors, ready)

    def _take(self, index: int) -> _Fetched:
        """Block `index` on the compute device: the prefetch when it guessed right, else a fresh copy."""
        fetched, self.pending = self.pending, None
        if fetched is not None and fetched.index != index:
            fetched = None  # a wrong guess is freed before the right block is copied, not beside it
        if fetched is None:
            fetched = self._copy(index)
        if fetched.ready is not None:
            current = torch.cuda.current_stream(self.compute)
            current.wait_event(fetched.ready)
            for t in fetched.tensors.values():
                t.record_stream(current)  # allocated on the side stream, used (and freed) on this one
        return fetched

    def _prefetch(self, index: int, running: int) -> None:
        # Over the budget the next block is fetched when it runs: an outsized pair in flight would set the peak.
        if (0 <= index < len(self.blocks) and index not in self.active
                and self.nbytes[running] + self.nbytes[index] <= self.budget):
            self.pending = self._copy(index)

    def _drop_pending(self, module, args) -> None:
        self.pending = None  # homes may have been patched since (LoRA merges happen between model calls)

    # ------------------------------------------------------------------ hooks
    def _enter(self, block: nn.Module, args) -> None:
        index = self.index[id(block)]
        if torch.is_grad_enabled() and any(p.requires_grad for p in block.parameters()):
            raise RuntimeError(
                f"block offload: block {index} has parameters that require grad; offloaded block weights are "
                f"frozen (train LoRAs, or disable block offload to train the base weights)")
        fetched = self._take(index)
        homes = []
        for (module, kind, name), copy in fetched.tensors.items():
            table = module._parameters if kind == "param" else module._buffers
            homes.append((table, name, table[name]))
            table[name] = nn.Parameter(copy, requires_grad=False) if kind == "param" else copy
        self.active[index] = (fetched, homes)
        # The next block to run: in backward the checkpoint recompute walks the blocks in reverse.
        self._prefetch(index - 1 if _in_backward() else index + 1, index)

    def _exit(self, block: nn.Module, args, output) -> None:
        entry = self.active.pop(self.index[id(block)], None)
        if entry is not None:
            for table, name, home in entry[1]:
                table[name] = home  # the copy lives on only where autograd saved it for backward

    # ------------------------------------------------------------------ lifetime
    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.pending = None


def default_prefetch_budget(block_bytes: list[int]) -> int:
    """Twice the median block: any two blocks of a uniform model fit, a few outsized ones (see the module docstring)
    do not."""
    return 2 * sorted(block_bytes)[len(block_bytes) // 2] if block_bytes else 0


def bytes_in_flight(block_bytes: list[int], prefetch_budget_bytes: int | None = None) -> int:
    """The most block bytes on the compute device at once for blocks of these sizes (in execution order): a block,
    or a block with its neighbour where the two fit the budget (forward prefetches the next, backward the previous:
    the same pairs)."""
    budget = default_prefetch_budget(block_bytes) if prefetch_budget_bytes is None else prefetch_budget_bytes
    pairs = [a + b for a, b in zip(block_bytes, block_bytes[1:]) if a + b <= budget]
    return max([*block_bytes, *pairs], default=0)


def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass (where checkpointed blocks are recomputed);
    torch.utils.checkpoint asks the engine the same way."""
    return torch._C._current_graph_task_id() != -1


def _move(tensors: list[tuple[nn.Module, str, str, Tensor]], device: torch.device, pin: bool) -> None:
    with torch.no_grad():
        for module, kind, name, t in tensors:
            moved = t.to(device)
            if pin and moved.device.type == "cpu" and not moved.is_pinned():
                moved = moved.pin_memory()  # replaces the pageable tensor: no second copy stays alive
            if kind == "param" and torch._has_compatible_shallow_copy_type(t, moved):
                t.data = moved  # the same Parameter object (an optimizer or LoRA handle may hold it)
            elif kind == "param":  # e.g. to or from "meta": as nn.Module.to does, a new Parameter
                module._parameters[name] = nn.Parameter(moved, requires_grad=t.requires_grad)
            else:
                module._buffers[name] = moved


def enable_block_offload(model: nn.Module, compute_device: str | torch.device,
                         offload_device: str | torch.device = "cpu", blocks: list[nn.Module] | None = None,
                         prefetch_budget_bytes: int | None = None):
    """Keep every block (default `model.blocks()`) on `offload_device` and stream it to `compute_device` per call;
    everything else (embedders, final layer, pad tokens) moves to `compute_device`. Host memory is pinned when the
    compute device is CUDA (for asynchronous copies). Calling it again with other devices re-homes the model (an
    offloaded model is never moved to the compute device whole on the way); with the same ones it only sets the
    budget. `prefetch_budget_bytes`: see the module docstring (None: twice the median block; 0: never prefetch)."""
    compute, offload = torch.device(compute_device), torch.device(offload_device)
    current = getattr(model, _ATTR, None)
    if current is not None:
        if (current.compute, current.offload) == (compute, offload):
            current.set_budget(prefetch_budget_bytes)
            return model
        disable_block_offload(model, offload)
    blocks = list(model.blocks()) if blocks is None else list(blocks)
    in_blocks = {id(t) for b in blocks for *_, t in _block_tensors(b)}
    everything = _block_tensors(model)
    _move([e for e in everything if id(e[3]) not in in_blocks], compute, pin=False)
    _move([e for e in everything if id(e[3]) in in_blocks], offload, pin=compute.type == "cuda")
    setattr(model, _ATTR, BlockOffload(model, blocks, compute, offload, prefetch_budget_bytes))
    return model


def disable_block_offload(model: nn.Module, device: str | torch.device | None = None):
    """Stop streaming and put the whole model on `device` (default: the compute device it streamed to)."""
    current = getattr(model, _ATTR, None)
    if current is not None:
        current.remove()
        delattr(model, _ATTR)
        _move(_block_tensors(model), torch.device(device) if device is not None else current.compute, pin=False)
    return model


def is_offloaded(model: nn.Module) -> bool:
    return getattr(model, _ATTR, None) is not None


def wants_checkpoint(model: nn.Module) -> bool:
    """Blocks of an offloaded model are checkpointed under autograd (see the module docstring)."""
    return is_offloaded(model)
