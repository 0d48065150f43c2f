"""zimage_core.sample's seed-variety option, off by default (bit-identical to the classic sampler), for the first
steps only, seeded and per batch row: mode "shift" rolls the latent after each of the first steps, mode "caption"
noises the positive caption for them."""

from __future__ import annotations

import pytest
import torch

from zimage_core import sample
from zimage_core.samplers import step_rule
from zimage_core.sampling import SeedVariety
from zimage_core.scheduler import DEFAULT_SHIFT, denoise_sigmas
from zimage_core.testing import tiny_model

NOISE = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
CAPS = [torch.randn(5, 48, generator=torch.Generator().manual_seed(1))]


class Spy(torch.nn.Module):
    """The tiny model, recording the inputs, captions and outputs of every call."""

    def __init__(self):
        super().__init__()
        self.model, self.captions, self.inputs, self.outputs = tiny_model(seed=0), [], [], []

    def forward(self, x, t, caps, **kw):
        self.captions.append([c.clone() for c in caps])
        self.inputs.append(x.clone())
        out = self.model(x, t, caps, **kw)
        self.outputs.append(out.clone())
        return out


@pytest.fixture(scope="module")
def classic():
    with torch.no_grad():
        return sample(tiny_model(seed=0), NOISE, CAPS, steps=4)


@torch.no_grad()
def test_off_is_the_classic_sampler_bit_for_bit(classic):
    for off in (None, SeedVariety(0.0, 2, 5), SeedVariety(0.25, 0, 5), SeedVariety(0.0, 2, 5, mode="caption"),
                SeedVariety(1.0, 0, 5, mode="caption")):
        assert torch.equal(sample(tiny_model(seed=0), NOISE, CAPS, steps=4, variety=off), classic)


@torch.no_grad()
def test_shift_rolls_the_latent_after_the_first_steps_only(classic):
    """Replaying the spy's calls: the input of step i + 1 is the Euler step of step i, rolled by that row's offset
    for i < steps, untouched after; the captions are never changed."""
    spy, steps, option = Spy(), 4, SeedVariety(0.25, 2, seed=3)
    out = sample(spy, NOISE, CAPS, steps=steps, variety=option)
    sigmas = [float(s) for s in denoise_sigmas(steps, 1.0, DEFAULT_SHIFT)]
    euler = step_rule("euler", sigmas)
    shifts = option.offsets(2, 8, 8)
    assert shifts.shape == (2, 2, 2) and int(shifts.abs().max()) <= 2  # 0.25 of 8 latent pixels
    assert len({tuple(r) for r in shifts.flatten(1).tolist()}) == 2  # each batch row its own offsets
    assert torch.equal(spy.inputs[0], NOISE)
    for i in range(steps):
        x = spy.inputs[i]
        nxt = euler(x, x - sigmas[i] * spy.outputs[i].float(), i)
        if i < option.steps:
            nxt = torch.stack([torch.roll(r, tuple(d), (-2, -1)) for r, d in zip(nxt, shifts[:, i].tolist())])
        following = spy.inputs[i + 1] if i + 1 < steps else out
        assert torch.allclose(following, nxt, atol=1e-5), f"step {i}"
    assert all(torch.equal(c, CAPS[0]) for call in spy.captions for c in call)
    assert not torch.equal(out, classic)
    again = sample(tiny_model(seed=0), NOISE, CAPS, steps=4, variety=SeedVariety(0.25, 2, seed=3))
    other = sample(tiny_model(seed=0), NOISE, CAPS, steps=4, variety=SeedVariety(0.25, 2, seed=4))
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_shift_offsets_reach_the_strength_and_no_further():
    d = SeedVariety(0.25, 3, seed=0).offsets(400, 16, 32)  # reach 4 rows, 8 columns
    assert int(d[..., 0].min()) == -4 and int(d[..., 0].max()) == 4
    assert int(d[..., 1].min()) == -8 and int(d[..., 1].max()) == 8
    assert torch.equal(SeedVariety(0.25, 3, seed=0).offsets(2, 16, 32), d[:2])  # a row's draw is the batch's prefix


@torch.no_grad()
def test_caption_noise_only_in_the_first_steps_seeded_and_per_row(classic):
    spy = Spy()
    out = sample(spy, NOISE, CAPS, steps=4, variety=SeedVariety(0.5, 2, seed=3, mode="caption"))
    first, second, third = spy.captions[0], spy.captions[1], spy.captions[2]
    assert not torch.equal(first[0], CAPS[0]) and torch.equal(first[0], second[0])
    assert not torch.equal(first[0], first[1])  # each batch row its own draw
    assert all(torch.equal(c, CAPS[0]) for call in spy.captions[2:] for c in call) and third
    rel = float((first[0] - CAPS[0]).norm() / CAPS[0].norm())
    assert 0.3 < rel < 0.7  # strength 0.5 of each token's RMS
    assert not torch.equal(out, classic)
    again = sample(tiny_model(seed=0), NOISE, CAPS, steps=4, variety=SeedVariety(0.5, 2, seed=3, mode="caption"))
    other = sample(tiny_model(seed=0), NOISE, CAPS, steps=4, variety=SeedVariety(0.5, 2, seed=4, mode="caption"))
    assert torch.equal(out, again) and not torch.equal(out, other)


@pytest.mark.parametrize("bad, named", [(dict(strength=-1.0), "-1.0"), (dict(steps=-1), "-1"),
                                        (dict(steps=1.5), "1.5"), (dict(strength=0.75), "0.75"),
                                        (dict(mode="latent"), "'latent'")])
def test_bad_values_are_refused_naming_the_value(bad, named):
    with pytest.raises(ValueError, match="seed variety") as err:
        SeedVariety(**{"strength": 0.25, "steps": 1, **bad})
    assert named in str(err.value)
    SeedVariety(strength=2.0, steps=1, mode="caption")  # caption noise takes strengths above 0.5


def test_shift_is_refused_where_the_layout_is_fixed():
    """An input image (img2img / inpainting mask) fixes where things are: rolling would move the picture off it."""
    model = tiny_model(seed=0)
    shift, caption = SeedVariety(0.25, 2, seed=3), SeedVariety(1.0, 2, seed=3, mode="caption")
    init = torch.zeros_like(NOISE)
    with pytest.raises(ValueError, match="mode 'caption'"):
        sample(model, NOISE, CAPS, steps=4, init_latent=init, denoise=0.6, variety=shift)
    with pytest.raises(ValueError, match="mode 'caption'"):
        sample(model, NOISE, CAPS, steps=4, init_latent=init, mask=torch.ones(1, 1, 8, 8), variety=shift)
    out = sample(model, NOISE, CAPS, steps=4, init_latent=init, denoise=0.6, variety=caption)
    assert out.shape == NOISE.shape and torch.isfinite(out).all()
    # text to image (the sampler node always passes its latent; at denoise 1 it is pure noise) keeps the shift
    assert not torch.equal(sample(model, NOISE, CAPS, steps=4, init_latent=init, variety=shift),
                           sample(model, NOISE, CAPS, steps=4, init_latent=init))
