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
    images = _render([8.0, 24.0, 8.0], [8.0, 8.0, 24.0])
    cells = layout(images)
    assert cells[0][:2] == (1, 1) and cells[1][:2] == (5, 1) and cells[2][:2] == (1, 5)  # pixel index 7.5, 23.5
    small, big = layout(_render([16.0], [16.0], size=6.0))[0], layout(_render([16.0], [16.0], size=13.0))[0]
    assert small[:2] == big[:2] and small[2] < big[2]


def test_variety_is_zero_for_one_picture_and_grows_with_spread():
    same = _render([16.0] * 4, [16.0] * 4)
    spread = _render([8.0, 24.0, 8.0, 24.0], [8.0, 8.0, 24.0, 24.0])
    prompts = ["red square"] * 4
    assert variety(same, prompts) == {"pairwise": 0.0, "layouts": 1.0}
    v = variety(spread, prompts)
    assert v["layouts"] == 4.0 and v["pairwise"] > 0.1
