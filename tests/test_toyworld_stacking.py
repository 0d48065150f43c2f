"""toyworld/stacking.py's variety figures on real renderings, where the answer is known (no model needed)."""

from __future__ import annotations

import torch

from toyworld import world
from toyworld.stacking import layout, variety


def _render(cx, cy, size=11.0, shape="square"):
    n = len(cx)
    idx = torch.full((n,), world.SHAPES.index(shape))
    rgb = torch.tensor([world.COLOURS["red"]] * n)
    return world.render(idx, rgb, torch.full((n,), size), torch.tensor(cx), torch.tensor(cy))


def test_layout_reads_position_and_size():
    centre, size = layout(_render([8.0, 24.0, 8.0], [8.0, 8.0, 24.0]))
    torch.testing.assert_close(centre, torch.tensor([[8.0, 8.0], [24.0, 8.0], [8.0, 24.0]]), rtol=0, atol=0.05)
    torch.testing.assert_close(size, torch.full((3,), 11.0), rtol=0, atol=1.0)  # anti-aliased rim below threshold
    assert layout(_render([16.0], [16.0], size=7.0))[1] < size[0] - 3


def test_variety_is_zero_for_one_picture_and_grows_with_spread():
    same = _render([16.0] * 4, [16.0] * 4)
    spread = _render([8.0, 24.0, 8.0, 24.0], [8.0, 8.0, 24.0, 24.0])
    prompts = ["red square"] * 4
    assert variety(same, prompts) == {"pairwise": 0.0, "spread": 0.0, "positions": 1.0, "sizes": 1.0}
    v = variety(spread, prompts)
    assert v["positions"] == 4.0 and v["pairwise"] > 0.1 and abs(v["spread"] - 8 * 2 ** 0.5) < 0.1
