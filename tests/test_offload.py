"""Block-wise offload: same numbers, and each block's weights only visit the compute device during its forward."""

import torch

from zimage_core.offload import disable_block_offload, enable_block_offload, is_offloaded
from zimage_core.testing import tiny_model


def _run(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        return model(torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.9, 0.3]), torch.randn(2, 9, 48, generator=g))


def test_offloaded_model_gives_identical_outputs():
    model = tiny_model(seed=2)
    expected = _run(model)
    enable_block_offload(model, "cpu")
    assert is_offloaded(model)
    assert torch.equal(_run(model), expected)
    disable_block_offload(model)
    assert not is_offloaded(model)
    assert torch.equal(_run(model), expected)


def test_each_block_is_fetched_just_in_time():
    model = tiny_model(seed=2)
    enable_block_offload(model, "cpu")
    fetched, released = [], []
    for index, offloader in enumerate(model._offloaders):
        for handle in offloader.handles:
            handle.remove()
        block = offloader.block
        offloader.handles = [
            block.register_forward_pre_hook(lambda m, a, o=offloader, i=index: fetched.append(i) or o.fetch(m, a)),
            block.register_forward_hook(lambda m, a, out, o=offloader, i=index: released.append(i) or o.release(m, a, out)),
        ]
    _run(model)
    order = list(range(len(model.blocks())))
    assert fetched == order and released == order  # every block fetched and dropped once, in execution order
    first = model._offloaders[0]
    assert next(first.block.parameters()).data_ptr() == first.home[0].data_ptr()  # back on its offload copy
