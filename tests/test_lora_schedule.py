"""LoRA step ranges (zimage_core.lora.schedule through apply_loras and sample): a ranged LoRA acts on the steps of its
range only, exactly as applying and removing it by hand around those steps would; it is back on after sampling,
removal restores the base bit for bit, and a LoRA that cannot be switched per step is refused by name before
anything is applied."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from zimage_core import sample
from zimage_core.lora import LoraError, LoraModule, LoraWeights, apply_loras, new_lora
from zimage_core.scheduler import StepRange, sigmas
from zimage_core.testing import tiny_model

NOISE = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
CAPS = [torch.randn(5, 48, generator=torch.Generator().manual_seed(1)) for _ in range(2)]


def random_lora(model, seed, source):
    lora = new_lora(model, rank=4, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    for module in lora.modules.values():
        module.up.copy_(0.2 * torch.randn(module.up.shape, generator=gen))
    lora.source = source
    return lora


@pytest.fixture(scope="module")
def loras():
    model = tiny_model(seed=0)
    return random_lora(model, 1, "shape.safetensors"), random_lora(model, 2, "colour.safetensors")


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def by_hand(model, plan, steps=8):
    """Euler at cfg 1, applying plan[i] (a list of (lora, strength)) as runtime branches around step i only."""
    grid = sigmas(steps)
    x = NOISE.clone()
    for i in range(steps):
        with apply_loras(model, plan[i], mode="runtime"):
            v = model(x, torch.full((2,), float(grid[i])), CAPS).float()
        x = x + (grid[i + 1] - grid[i]) * v
    return x


@pytest.mark.parametrize("mode", ["merge", "runtime"])
def test_each_lora_acts_on_the_steps_of_its_range_only(loras, mode):
    shape, colour = loras
    model = tiny_model(seed=0)
    handle = apply_loras(model, [(shape, 1.0), (colour, 0.8)], mode=mode,
                         step_ranges={0: StepRange(0.0, 0.75), 1: StepRange(0.75, 1.0)})
    with torch.no_grad():
        ranged = sample(model, NOISE, CAPS, steps=8, cfg=1.0, lora_steps=handle.schedule)
        plain = sample(model, NOISE, CAPS, steps=8, cfg=1.0)  # no lora_steps: both on at every step
    handle.remove()
    expected = by_hand(model, [[(shape, 1.0)]] * 6 + [[(colour, 0.8)]] * 2)
    both = by_hand(model, [[(shape, 1.0), (colour, 0.8)]] * 8)
    torch.testing.assert_close(ranged, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plain, both, rtol=1e-4, atol=1e-5)
    assert (ranged - plain).abs().max() > 1e-2  # the ranges changed the picture
    assert handle.schedule.describe(8) == ["shape.safetensors: steps 1-6 of 8 (steps 0-0.75)",
                                           "colour.safetensors: steps 7-8 of 8 (steps 0.75-1)"]


def test_a_ranged_lora_is_on_again_after_sampling_and_removal_restores_the_base(loras):
    shape, colour = loras
    model = tiny_model(seed=0)
    before = snapshot(model)
    with apply_loras(model, [(shape, 1.0), (colour, 1.0)]):
        full = model(NOISE, 0.5, CAPS)
    handle = apply_loras(model, [(shape, 1.0), (colour, 1.0)], step_ranges={1: StepRange(0.5, 1.0)})
    assert len(handle.schedule.entries) == 1
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the shape LoRA is merged
    with torch.no_grad():
        sample(model, NOISE, CAPS, steps=4, cfg=1.0, lora_steps=handle.schedule)
        torch.testing.assert_close(model(NOISE, 0.5, CAPS), full, rtol=1e-4, atol=1e-5)
    handle.remove()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not handle.schedule.entries or all(float(f) == v for _, _, fs in handle.schedule.entries for f, v in fs)


def test_a_full_range_is_the_plain_stack(loras):
    shape, colour = loras
    model = tiny_model(seed=0)
    with apply_loras(model, [(shape, 1.0), (colour, 1.0)]):
        plain = snapshot(model)
    with apply_loras(model, [(shape, 1.0), (colour, 1.0)], step_ranges={0: StepRange(), 1: StepRange(0, 1)}) as h:
        assert not h.schedule and snapshot(model).keys() == plain.keys()
        assert all(torch.equal(v, plain[k]) for k, v in snapshot(model).items())


def test_a_lora_with_a_bias_delta_cannot_have_a_range_and_nothing_is_applied(loras):
    shape, colour = loras
    model = tiny_model(seed=0)
    before = snapshot(model)
    path = "layers.0.adaLN_modulation.0"  # a Linear with a bias (ComfyUI's .diff_b form)
    bias = model.get_submodule(path).bias
    biased = dataclasses.replace(colour, modules={**colour.modules, path: LoraModule(
        kind="diff", diff_b=torch.full_like(bias, 0.1))}, source="biased.safetensors")
    with pytest.raises(LoraError, match=rf"biased\.safetensors .*{path} has a bias delta.*steps 0.5-1.*Nothing was"):
        apply_loras(model, [(shape, 1.0), (biased, 1.0)], step_ranges={1: StepRange(0.5, 1.0)})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(getattr(m, "lora_branches", ()) for m in model.modules())


def test_step_range_rule_and_errors():
    assert StepRange(0.0, 0.75).steps_of(8) == [0, 1, 2, 3, 4, 5]
    assert StepRange(0.75, 1.0).steps_of(8) == [6, 7]
    assert StepRange(0.5, 1.0).steps_of(30) == list(range(15, 30))
    with pytest.raises(ValueError, match="0 <= start < end <= 1, got start 0.8, end 0.2"):
        StepRange(0.8, 0.2)


def test_on_an_fp8_base_a_ranged_lora_switches_per_step_and_never_touches_the_fp8_bits(loras):
    from zimage_core.quant.fp8 import Fp8Linear, to_fp8_storage
    shape, colour = loras
    model = to_fp8_storage(tiny_model(seed=0))
    bits = {p: m.weight.view(torch.uint8).clone() for p, m in model.named_modules() if isinstance(m, Fp8Linear)}
    with apply_loras(model, [(shape, 1.0), (colour, 1.0)], step_ranges={0: StepRange(0.0, 0.5)}) as handle:
        with torch.no_grad():
            ranged = sample(model, NOISE, CAPS, steps=4, cfg=1.0, lora_steps=handle.schedule)
    expected = by_hand(model, [[(shape, 1.0), (colour, 1.0)]] * 2 + [[(colour, 1.0)]] * 2, steps=4)
    torch.testing.assert_close(ranged, expected, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(bits[p], m.weight.view(torch.uint8)) for p, m in model.named_modules() if p in bits)


def test_a_ranged_lokr_runs_as_a_full_delta_branch(loras):
    """LoKr has no low-rank factors: with a range its full delta is rebuilt per call as a side branch, switched
    like any other (no fallback needed, nothing merged)."""
    shape, _ = loras
    model = tiny_model(seed=0)
    before = snapshot(model)
    w1 = model.layers[0].feed_forward.w1
    gen = torch.Generator().manual_seed(9)
    lokr = LoraWeights({"layers.0.feed_forward.w1": LoraModule(kind="lokr", factors={
        "lokr_w1": torch.randn(8, 4, generator=gen) * 0.3,
        "lokr_w2": torch.randn(w1.out_features // 8, w1.in_features // 4, generator=gen) * 0.3})},
        format="lokr", source="style_lokr.safetensors")
    with apply_loras(model, [(lokr, 1.0)], step_ranges={0: StepRange(0.5, 1.0)}) as handle:
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing merged
        with torch.no_grad():
            ranged = sample(model, NOISE, CAPS, steps=4, cfg=1.0, lora_steps=handle.schedule)
    torch.testing.assert_close(ranged, by_hand(model, [[]] * 2 + [[(lokr, 1.0)]] * 2, steps=4), rtol=1e-4, atol=1e-5)
    assert (ranged - by_hand(model, [[]] * 4, steps=4)).abs().max() > 1e-4
