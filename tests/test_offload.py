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


def test_each_block_is_fetched_just_in_time(monkeypatch):
    model = tiny_model(seed=2)
    enable_block_offload(model, "cpu")
    fetched = []
    for index, offloader in enumerate(model._offloaders):
        original = offloader.fetch
        monkeypatch.setattr(offloader, "fetch", lambda m, a, i=index, f=original: fetched.append(i) or f(m, a))
        offloader.handles[0].remove()
        offloader.handles[0] = offloader.block.register_forward_pre_hook(offloader.fetch)
    _run(model)
    assert fetched == list(range(len(model.blocks())))  # every block once, in execution order
    home = model._offloaders[0].home[0]
    assert next(model.blocks()[0].parameters()).data is home  # released back to its offload copy
