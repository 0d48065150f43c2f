"""Which transformer blocks have weights on the compute device at once, seen from outside block offload: every tensor
an op copies out of a block's home tensors (`copy_`, `.to`) is that block's copy until its storage dies. Any fetch
must copy the homes, so this holds whatever BlockOffload does inside (prefetch, recompute, backward)."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_COPIES = {torch.ops.aten.copy_.default: 1, torch.ops.aten._to_copy.default: 0}  # op -> argument that is the source


class BlockCopies(TorchDispatchMode):
    """`together`: the set of blocks with a live copy each time a copy is made (in order); `peak_bytes`: the most
    block bytes alive at once."""

    def __init__(self, model):
        super().__init__()
        self.homes = {t.untyped_storage().data_ptr(): i for i, block in enumerate(model.blocks())
                      for t in [*block.parameters(), *block.buffers()] if t.numel()}
        self.live: dict[int, tuple[int, int]] = {}  # id(storage of a copy) -> (block, bytes)
        self.together: list[frozenset[int]] = []
        self.peak_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        source = _COPIES.get(func)
        if source is not None and args[source].numel():
            block = self.homes.get(args[source].untyped_storage().data_ptr())
            copy = args[0] if func is torch.ops.aten.copy_.default else out
            if block is not None and id(copy.untyped_storage()) not in self.live:
                storage = copy.untyped_storage()  # the same Python object for as long as the storage lives
                self.live[id(storage)] = (block, storage.nbytes())
                weakref.finalize(storage, self.live.pop, id(storage))
                self.together.append(frozenset(b for b, _ in self.live.values()))
                self.peak_bytes = max(self.peak_bytes, sum(n for _, n in self.live.values()))
        return out
