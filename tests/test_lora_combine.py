"""LoRA stack combine modes (zimage_core.lora.combine through apply_loras): the sum is today's stack bit for bit, every
mode removes exactly and never touches the DistillPatch slot, the orthogonal modes stay low rank (side branches on
fp8), and a format a mode cannot combine falls back to the sum with a note naming the LoRA."""

from __future__ import annotations

import pytest
import torch

from zimage_core.lora import LoraModule, LoraWeights, apply_loras, new_lora
from zimage_core.lora.combine import COMBINE_MODES, combine_stack
from zimage_core.quant.fp8 import Fp8Linear, to_fp8_storage
from zimage_core.testing import tiny_model

INPUTS = (torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0)), 0.4, [torch.ones(5, 48)])


def random_lora(model, seed, rank=4, source=None):
    lora = new_lora(model, rank=rank, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    for module in lora.modules.values():
        module.up.copy_(0.1 * torch.randn(module.up.shape, generator=gen))
    lora.source = source
    return lora


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(model, before):
    return [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]


@pytest.fixture(scope="module")
def stack():
    model = tiny_model(seed=0)
    return [(random_lora(model, 1, source="colour.safetensors"), 1.0),
            (random_lora(model, 2, source="shape.safetensors"), 0.7),
            (random_lora(model, 3, rank=8, source="distillpatch.safetensors"), 1.0)]


def test_sum_is_the_plain_stack_bit_for_bit(stack):
    model = tiny_model(seed=0)
    with apply_loras(model, stack):
        plain = snapshot(model)
    with apply_loras(model, stack, combine="sum", keep_apart={2}) as handle:
        assert not changed(model, plain)
        assert all(not r.notes for r in handle.reports)
    assert combine_stack(stack, "sum").stack == stack


@pytest.mark.parametrize("combine", [m for m in COMBINE_MODES if m != "sum"])
def test_each_mode_changes_the_stack_removes_exactly_and_keeps_the_distillpatch(stack, combine):
    model = tiny_model(seed=0)
    before = snapshot(model)
    with apply_loras(model, stack):
        plain = snapshot(model)
    with apply_loras(model, stack, combine=combine, keep_apart={2}) as handle:
        assert changed(model, plain)  # the mode did something
        out = model(*INPUTS)
        assert torch.isfinite(out).all()
        assert [bool(r.notes) for r in handle.reports] == [True, True, False]
        assert "shared modules" in handle.reports[0].notes[0]
    assert not changed(model, before)
    result = combine_stack(stack, combine, keep_apart={2})
    assert result.stack[2] is stack[2]  # the DistillPatch slot: the same object, never merged away


def test_orthogonal_modes_stay_low_rank_and_separate_the_loras(stack):
    out = combine_stack(stack, "orthogonal", keep_apart={2}).stack
    inp = combine_stack(stack, "orthogonal_in", keep_apart={2}).stack
    for path, a in out[0][0].modules.items():
        b, orig = out[1][0].modules[path], stack[0][0].modules[path]
        assert a.kind == "lora" and a.up.shape == orig.up.shape and a.down is orig.down
        # A writes nowhere B's original up writes, and the other way round
        assert (stack[1][0].modules[path].up.T @ a.up).abs().max() < 1e-5
        assert (orig.up.T @ b.up).abs().max() < 1e-5
        a_in, b_in = inp[0][0].modules[path], stack[1][0].modules[path]
        assert a_in.up is orig.up and (a_in.down @ b_in.down.T).abs().max() < 1e-5


def test_shared_once_counts_identical_loras_once_and_orthogonal_ones_fully():
    model = tiny_model(seed=0)
    lora = random_lora(model, 4)
    with apply_loras(model, [(lora, 1.0)]):
        once = snapshot(model)
    for n in (2, 3):
        with apply_loras(model, [(lora, 1.0)] * n, combine="shared_once"):
            for name, value in model.state_dict().items():
                torch.testing.assert_close(value, once[name], rtol=0, atol=1e-6)
    # LoRAs writing orthogonal output directions (disjoint rows of `up`) are untouched: the plain sum
    a, b = random_lora(model, 5), random_lora(model, 6)
    for ma, mb in zip(a.modules.values(), b.modules.values()):
        half = ma.up.shape[0] // 2
        ma.up[half:], mb.up[:half] = 0, 0
    combined = combine_stack([(a, 1.0), (b, 1.0)], "shared_once").stack
    for path, m in combined[0][0].modules.items():
        torch.testing.assert_close(m.up, a.modules[path].up, rtol=0, atol=1e-6)


def test_orthogonal_on_an_fp8_base_is_side_branches_equal_to_the_merge(stack):
    model = to_fp8_storage(tiny_model(seed=0))
    fp8 = {p: m for p, m in model.named_modules() if isinstance(m, Fp8Linear)}
    bits = {p: m.weight.view(torch.uint8).clone() for p, m in fp8.items()}
    base = model(*INPUTS)
    with apply_loras(model, stack, combine="orthogonal", keep_apart={2}) as handle:
        assert handle._patches == []
        applied = model(*INPUTS)
    assert torch.equal(model(*INPUTS), base)
    assert all(torch.equal(bits[p], m.weight.view(torch.uint8)) for p, m in fp8.items())
    plain = tiny_model(seed=0)
    for path, m in fp8.items():
        plain.get_submodule(path).weight.data.copy_(m.dequantized(torch.float32))
    with apply_loras(plain, stack, combine="orthogonal", keep_apart={2}):
        expected = plain(*INPUTS)
    assert (applied - expected).abs().max() < 1e-4 and (applied - base).abs().max() > 0.01


def _lokr_lora(model):
    gen = torch.Generator().manual_seed(9)
    w1 = model.layers[0].feed_forward.w1
    lokr = LoraModule(kind="lokr", factors={
        "lokr_w1": torch.randn(8, 4, generator=gen) * 0.1,
        "lokr_w2": torch.randn(w1.out_features // 8, w1.in_features // 4, generator=gen) * 0.1})
    return LoraWeights({"layers.0.feed_forward.w1": lokr}, format="lokr", source="style_lokr.safetensors")


def test_a_lokr_falls_back_to_the_sum_with_a_note_naming_it(stack):
    model = tiny_model(seed=0)
    lokr_stack = [stack[0], (_lokr_lora(model), 1.0)]
    before = snapshot(model)
    with apply_loras(model, lokr_stack):
        plain = snapshot(model)
    with apply_loras(model, lokr_stack, combine="orthogonal") as handle:
        assert not changed(model, plain)  # one low-rank LoRA left: nothing to combine, the plain sum
        assert "style_lokr.safetensors" in handle.reports[1].notes[0] and "plain sum" in handle.reports[1].notes[0]
        assert "style_lokr.safetensors" in str(handle.reports[1])
    with apply_loras(model, lokr_stack, combine="ties") as handle:  # ties works on the full delta: LoKr included
        assert changed(model, plain) and handle.reports[1].notes
    assert not changed(model, before)


def test_an_unknown_mode_is_refused_before_anything_is_applied(stack):
    model = tiny_model(seed=0)
    before = snapshot(model)
    with pytest.raises(ValueError, match="combine mode must be one of .*'dare'"):
        apply_loras(model, stack, combine="dare")
    assert not changed(model, before)
