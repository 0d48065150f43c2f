"""fp16 safety: activations beyond fp16's 65504 stay finite and equal to the fp32 model (transformer.py's fp16
branch scaling and fp32 residual stream), where the reference implementation without a guard gives inf/NaN."""

import pytest
import torch

from zimage_core.testing import tiny_model

from reference import diffusers_twin, diffusers_velocity

G = torch.Generator().manual_seed(4)
LATENTS, CAPTION = torch.randn(1, 16, 8, 8, generator=G), torch.randn(20, 48, generator=G)
SIGMA = torch.tensor([0.7])


@torch.no_grad()
def _overflowing(dtype):
    """The tiny model with weights scaled by powers of two (exact in every dtype) so that its branch outputs reach
    ~1e5-1e6 and its residual stream exceeds 65504: the sandwich norms make the fp32 output nearly scale-free."""
    model = tiny_model(seed=0)
    for block in model.blocks():
        block.attention.to_out[0].weight.mul_(2.0 ** 12)
        block.feed_forward.w2.weight.mul_(2.0 ** 12)
        block.attention_norm2.weight.mul_(2.0 ** 14)
        block.ffn_norm2.weight.mul_(2.0 ** 14)
    return model.to(dtype)


def _residual_peaks(model):
    peaks = []
    hooks = [b.register_forward_hook(lambda m, a, out: peaks.append(float(out.abs().max()))) for b in model.blocks()]
    with torch.no_grad():
        out = model(LATENTS, SIGMA, [CAPTION])
    for h in hooks:
        h.remove()
    return out, peaks


def test_fp16_overflowing_activations_stay_finite_and_equal_fp32(monkeypatch):
    ref, peaks = _residual_peaks(_overflowing(torch.float32))
    assert max(peaks) > 65504  # the residual stream really leaves fp16's range
    fp16 = _overflowing(torch.float16)
    out = _residual_peaks(fp16)[0]
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    err = float((out - ref).norm() / ref.norm())
    print(f"fp16 vs fp32 relative RMS error with overflowing activations: {err:.2e}")
    assert err < 5e-3  # fp16 precision (11-bit mantissa), not a clamp

    # the same weights in the reference implementation, which has no fp16 guard: inf/NaN
    twin = diffusers_twin(fp16)
    with torch.no_grad():
        plain = diffusers_velocity(twin, LATENTS.half(), 1.0 - SIGMA, [CAPTION.half()])
    assert not torch.isfinite(plain).all()
    # and this model with its guard switched off
    from zimage_core import transformer
    monkeypatch.setattr(transformer, "_branch_scale", lambda dtype: None)
    assert not torch.isfinite(_residual_peaks(fp16)[0]).all()


@pytest.mark.parametrize("dtype, scaled", [(torch.float32, False), (torch.bfloat16, False), (torch.float16, True)])
def test_bf16_and_fp32_take_the_plain_path(dtype, scaled, monkeypatch):
    """Only fp16 takes the scaled branch path: counted at the norm that undoes the scale (fp32 would give the same
    numbers either way, power-of-two scale, so its numbers alone could not tell)."""
    from zimage_core import transformer
    calls = []
    unscaled = transformer.RMSNorm.unscaled_fp32
    monkeypatch.setattr(transformer.RMSNorm, "unscaled_fp32",
                        lambda self, x, scale: calls.append(scale) or unscaled(self, x, scale))
    model = tiny_model(seed=0).to(dtype)
    with torch.no_grad():
        before = model(LATENTS, SIGMA, [CAPTION])
    assert bool(calls) == scaled and all(c == transformer.FP16_BRANCH_SCALE for c in calls)
    if not scaled:  # and the scale constant is not read on the plain path
        monkeypatch.setattr(transformer, "FP16_BRANCH_SCALE", 0.5)
        with torch.no_grad():
            assert torch.equal(model(LATENTS, SIGMA, [CAPTION]), before)


def test_fp16_on_ordinary_weights_is_as_accurate_as_before():
    ref = tiny_model(seed=0)
    with torch.no_grad():
        want = ref(LATENTS, SIGMA, [CAPTION])
        got = tiny_model(seed=0).half()(LATENTS, SIGMA, [CAPTION])
        plain = diffusers_velocity(diffusers_twin(tiny_model(seed=0).half()), LATENTS.half(), 1.0 - SIGMA,
                                   [CAPTION.half()]).float()
    err, plain_err = float((got - want).norm() / want.norm()), float((plain - want).norm() / want.norm())
    print(f"fp16 vs fp32 on ordinary weights: {err:.2e} (diffusers in fp16: {plain_err:.2e})")
    assert err <= 1.2 * plain_err
