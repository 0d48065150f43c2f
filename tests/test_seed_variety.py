"""zimage_core.sample's seed-variety option: noise on the positive caption for the first steps only, seeded, off by
default (bit-identical to the classic sampler)."""

from __future__ import annotations

import pytest
import torch

from zimage_core import sample
from zimage_core.sampling import SeedVariety
from zimage_core.testing import tiny_model

NOISE = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
CAPS = [torch.randn(5, 48, generator=torch.Generator().manual_seed(1))]


class Spy(torch.nn.Module):
    """The tiny model, recording the captions of every call."""

    def __init__(self):
        super().__init__()
        self.model, self.captions = tiny_model(seed=0), []

    def forward(self, x, t, caps, **kw):
        self.captions.append([c.clone() for c in caps])
        return self.model(x, t, caps, **kw)


@pytest.fixture(scope="module")
def classic():
    with torch.no_grad():
        return sample(tiny_model(seed=0), NOISE, CAPS, steps=4)


@torch.no_grad()
def test_off_is_the_classic_sampler_bit_for_bit(classic):
    for off in (None, SeedVariety(0.0, 2, 5), SeedVariety(1.0, 0, 5)):
        assert torch.equal(sample(tiny_model(seed=0), NOISE, CAPS, steps=4, variety=off), classic)


@torch.no_grad()
def test_noise_only_in_the_first_steps_seeded_and_per_row(classic):
    spy = Spy()
    out = sample(spy, NOISE, CAPS, steps=4, variety=SeedVariety(0.5, 2, seed=3))
    first, second, third = spy.captions[0], spy.captions[1], spy.captions[2]
    assert not torch.equal(first[0], CAPS[0]) and torch.equal(first[0], second[0])
    assert not torch.equal(first[0], first[1])  # each batch row its own draw
    assert all(torch.equal(c, CAPS[0]) for call in spy.captions[2:] for c in call) and third
    rel = float((first[0] - CAPS[0]).norm() / CAPS[0].norm())
    assert 0.3 < rel < 0.7  # strength 0.5 of each token's RMS
    assert not torch.equal(out, classic)
    again = sample(tiny_model(seed=0), NOISE, CAPS, steps=4, variety=SeedVariety(0.5, 2, seed=3))
    other = sample(tiny_model(seed=0), NOISE, CAPS, steps=4, variety=SeedVariety(0.5, 2, seed=4))
    assert torch.equal(out, again) and not torch.equal(out, other)


@pytest.mark.parametrize("bad", [dict(strength=-1.0), dict(steps=-1), dict(steps=1.5)])
def test_bad_values_are_refused(bad):
    with pytest.raises(ValueError, match="seed variety"):
        SeedVariety(**{"strength": 1.0, "steps": 1, **bad})
