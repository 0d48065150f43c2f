"""The transformer equals diffusers' ZImageTransformer2DModel on the same weights (fp32, max abs diff <= 1e-4)."""

import pytest
import torch

from reference import diffusers_twin, diffusers_velocity
from zimage_core import ZImageConfig, ZImageTransformer
from zimage_core.testing import tiny_model

TOL = 1e-4


def _inputs(seed, h, w, lengths, cap_dim=48):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(len(lengths), 16, h, w, generator=g)
    captions = [torch.randn(n, cap_dim, generator=g) for n in lengths]
    sigmas = torch.rand(len(lengths), generator=g)
    return latents, sigmas, captions


@pytest.mark.parametrize("h,w,caption_len", [
    (12, 10, 37),   # 30 image tokens (padded to 32), caption 37 (padded to 64)
    (16, 16, 32),   # 64 image tokens, caption exactly 32: no padding anywhere
    (8, 12, 5),
])
def test_matches_diffusers(tiny, h, w, caption_len):
    ref = diffusers_twin(tiny)
    latents, sigmas, captions = _inputs(1, h, w, [caption_len])
    with torch.no_grad():
        ours = tiny(latents, sigmas, captions)
        theirs = diffusers_velocity(ref, latents, 1.0 - sigmas, captions)
    assert ours.shape == latents.shape
    assert ours.std() > 0.5  # a real signal, not a degenerate zero output
    assert (ours - theirs).abs().max() <= TOL


def test_batch_of_different_caption_lengths_equals_single_runs(tiny):
    ref = diffusers_twin(tiny)
    latents, sigmas, captions = _inputs(2, 12, 10, [37, 70, 32])
    with torch.no_grad():
        batch = tiny(latents, sigmas, captions)
        singles = torch.cat([tiny(latents[i:i + 1], sigmas[i:i + 1], captions[i:i + 1]) for i in range(3)])
        theirs = diffusers_velocity(ref, latents, 1.0 - sigmas, captions)
    assert (batch - singles).abs().max() <= TOL
    assert (batch - theirs).abs().max() <= TOL


def test_caption_tensor_and_list_forms_agree(tiny):
    latents, sigmas, _ = _inputs(3, 8, 8, [20, 20])
    caps = torch.randn(2, 20, 48)
    with torch.no_grad():
        assert torch.equal(tiny(latents, sigmas, caps), tiny(latents, sigmas, list(caps)))


def test_output_depends_on_every_input(tiny):
    latents, sigmas, captions = _inputs(4, 8, 8, [12])
    with torch.no_grad():
        base = tiny(latents, sigmas, captions)
        assert (tiny(latents + 0.1, sigmas, captions) - base).abs().max() > 1e-3
        assert (tiny(latents, sigmas * 0.5, captions) - base).abs().max() > 1e-3
        assert (tiny(latents, sigmas, [captions[0] + 0.5]) - base).abs().max() > 1e-3


def test_gradient_checkpointing_same_outputs_and_gradients():
    outs, grads = [], []
    for checkpointing in (False, True):
        model = tiny_model(seed=5).train()
        model.gradient_checkpointing = checkpointing
        latents, sigmas, captions = _inputs(6, 8, 8, [10, 33])
        out = model(latents, sigmas, captions)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert torch.equal(outs[0], outs[1])
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5) for n in grads[0])
    assert all(g.abs().sum() > 0 for n, g in grads[0].items() if "pad_token" not in n)


def test_attention_is_sdpa(tiny, monkeypatch):
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    latents, sigmas, captions = _inputs(7, 8, 8, [4])
    with torch.no_grad():
        tiny(latents, sigmas, captions)
    cfg = tiny.config
    assert len(calls) == cfg.n_layers + 2 * cfg.n_refiner_layers


@pytest.mark.parametrize("bad, message", [
    (lambda m: m(torch.zeros(1, 16, 7, 8), torch.ones(1), [torch.zeros(3, 48)]), "multiples of 2"),
    (lambda m: m(torch.zeros(1, 4, 8, 8), torch.ones(1), [torch.zeros(3, 48)]), r"\[B, 16, H, W\]"),
    (lambda m: m(torch.zeros(1, 16, 8, 8), torch.ones(1), [torch.zeros(3, 2560)]), "feature width"),
    (lambda m: m(torch.zeros(2, 16, 8, 8), torch.ones(2), [torch.zeros(3, 48)]), "1 captions for a batch of 2"),
])
def test_bad_inputs_name_the_problem(tiny, bad, message):
    with pytest.raises(ValueError, match=message):
        bad(tiny)


def test_config_checks_name_the_numbers():
    with pytest.raises(ValueError, match="axes_dims .* sum to 30.*head_dim .* 32"):
        ZImageConfig.tiny(axes_dims=(8, 10, 12))
    with pytest.raises(ValueError, match="not divisible by n_heads 5"):
        ZImageConfig.tiny(n_heads=5)


# transformer/config.json of Tongyi-MAI/Z-Image-Turbo (the released model's diffusers config)
RELEASED_CONFIG = {"all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16, "dim": 3840, "n_layers": 30,
                   "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5, "qk_norm": True,
                   "cap_feat_dim": 2560, "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [32, 48, 48],
                   "axes_lens": [1536, 512, 512]}


def test_turbo_preset_has_the_released_parameter_count():
    """The turbo preset holds exactly the tensors, shapes and parameter count of diffusers' model built from the
    released config (both on the meta device)."""
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        model = ZImageTransformer(ZImageConfig.turbo())
        released = ZImageTransformer2DModel(**RELEASED_CONFIG)
    theirs = {k: tuple(v.shape) for k, v in released.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == theirs
    assert model.num_parameters() == sum(p.numel() for p in released.parameters()) == 6_154_908_736
    assert len(theirs) == 521


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_in_real_arithmetic_equals_the_complex_product(dtype):
    """apply_rope is written without complex ops (inductor cannot compile them); the complex product diffusers uses
    (pairs as complex numbers times e^{i angle}) is the reference: equal in eager (so within 1e-6 in fp32)."""
    from zimage_core.config import ZImageConfig
    from zimage_core.transformer import apply_rope, rope_cos_sin

    cfg = ZImageConfig.tiny()
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 40, 3, sum(cfg.axes_dims), generator=g) * 4).to(dtype)
    positions = torch.randint(0, 300, (2, 40, 3), generator=g)
    cos, sin = rope_cos_sin(positions, cfg.axes_dims, cfg.rope_theta)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    expected = torch.view_as_real(pairs * torch.complex(cos, sin)[:, :, None]).flatten(-2)
    ours = apply_rope(x, cos, sin)
    assert ours.dtype == dtype and ours.shape == x.shape
    # eager: the very bits of the complex product (a rounding elsewhere, e.g. a fused multiply-add, flips bf16 ulps
    # that grow over an 8-step sample: tests/test_gpu_check.py compares with diffusers' sample)
    assert torch.equal(ours, expected.to(dtype))
    assert (ours.float() - x.float()).abs().max() > 0.1  # it rotated something
