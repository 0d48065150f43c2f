"""Schedules and the Euler/CFG sampling loop, against diffusers' scheduler and ZImagePipeline."""

import pytest
import torch

from reference import diffusers_inpaint, diffusers_sample, diffusers_sigmas, diffusers_twin
from zimage_core import QUALITY, TURBO, sample, sigmas
from zimage_core.samplers import SAMPLERS
from zimage_core.scheduler import denoise_sigmas, insert_sigmas, training_sigmas


def test_sigmas_equal_diffusers_for_every_step_count():
    for steps in range(1, 51):
        assert (sigmas(steps) - diffusers_sigmas(steps)).abs().max() <= 1e-6, steps


def test_turbo_sigmas_are_the_released_values():
    expected = torch.tensor([1.0, 0.954545, 0.9, 0.833333, 0.75, 0.642857, 0.5, 0.3, 0.0])
    assert (sigmas(8) - expected).abs().max() < 1e-6
    assert abs(float(sigmas(30)[-2]) - 0.09375) < 1e-6


def test_teacher_grid_with_student_sigmas_inserted():
    grid, indices = insert_sigmas(sigmas(50), sigmas(8)[:-1])
    assert indices == [0, 6, 12, 19, 25, 31, 37, 44]
    assert torch.equal(grid[indices], sigmas(8)[:-1])
    assert bool((grid[:-1] > grid[1:]).all())
    assert len(training_sigmas()) == 1000 and float(training_sigmas()[0]) == 1.0


def _conditions(seed, batch=1, h=8, w=8):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 16, h, w, generator=g)
    pos = [torch.randn(13, 48, generator=g) for _ in range(batch)]
    neg = [torch.randn(7, 48, generator=g) for _ in range(batch)]
    return noise, pos, neg


@pytest.mark.parametrize("preset", [TURBO, QUALITY])
def test_sample_equals_diffusers_pipeline(tiny, preset):
    ref = diffusers_twin(tiny)
    noise, pos, neg = _conditions(1)
    with torch.no_grad():
        ours = sample(tiny, noise, pos, neg, steps=preset.steps, cfg=preset.cfg)
        theirs = diffusers_sample(ref, noise, pos, neg, preset.steps, preset.cfg)
    diff = (ours - theirs).abs().max().item()
    print(f"{preset.steps} steps cfg {preset.cfg}: max|sample - diffusers ZImagePipeline| = {diff:.2e}")
    assert ours.std() > 0.3
    assert diff <= 1e-4  # measured 6.1e-6 (turbo) and 9.5e-6 (30 steps, cfg 2): ~10x


class CountingModel(torch.nn.Module):
    """Wraps a model and records the batch size of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, s, c):
        self.calls.append(x.shape[0])
        return self.model(x, s, c)


@pytest.mark.parametrize("cfg, calls", [(1.0, [1] * 8), (2.0, [2] * 8)])
def test_cfg_one_makes_one_call_per_step(tiny, cfg, calls):
    counter = CountingModel(tiny)
    noise, pos, neg = _conditions(2)
    with torch.no_grad():
        sample(counter, noise, pos, neg, steps=8, cfg=cfg)
    assert counter.calls == calls


def test_cfg_one_ignores_negative_and_cfg_two_uses_it(tiny):
    noise, pos, neg = _conditions(3)
    with torch.no_grad():
        a = sample(tiny, noise, pos, neg, steps=4, cfg=1.0)
        b = sample(tiny, noise, pos, None, steps=4, cfg=1.0)
        c = sample(tiny, noise, pos, neg, steps=4, cfg=2.0)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_euler_with_exact_velocity_lands_on_x0():
    """Sign and timestep convention: a model that returns the true velocity noise - x0 reproduces x0 exactly."""
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    oracle = lambda x, s, c: noise - x0  # noqa: E731
    for steps in (1, 8, 30):
        assert (sample(oracle, noise, torch.zeros(3, 48), steps=steps) - x0).abs().max() < 1e-5


def test_callback_reports_x0_estimate_and_can_interrupt(tiny):
    noise, pos, _ = _conditions(5)
    seen = []

    def stop_at_three(step, total, x0):
        seen.append((step, total, x0.shape))
        if step == 3:
            raise KeyboardInterrupt

    with torch.no_grad(), pytest.raises(KeyboardInterrupt):
        sample(tiny, noise, pos, steps=8, callback=stop_at_three)
    assert seen == [(1, 8, noise.shape), (2, 8, noise.shape), (3, 8, noise.shape)]


def test_denoise_starts_from_a_partially_noised_latent(tiny):
    noise, pos, _ = _conditions(6)
    init = torch.randn_like(noise)
    schedule = denoise_sigmas(4, 0.5)
    assert len(schedule) == 5 and float(schedule[-1]) == 0.0 and float(schedule[0]) < 1.0
    assert torch.equal(schedule, sigmas(8)[-5:])
    counter = CountingModel(tiny)
    with torch.no_grad():
        out = sample(counter, noise, pos, steps=4, denoise=0.5, init_latent=init)
        manual = sample(tiny, (1 - schedule[0]) * init + schedule[0] * noise, pos, steps=4, denoise=0.5)
    assert len(counter.calls) == 4
    assert torch.allclose(out, manual, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(cfg=-1.0), "cfg must be >= 0"),
    (dict(denoise=0.0), r"denoise must be in \(0, 1\]"),
    (dict(denoise=1.5), r"denoise must be in \(0, 1\]"),
])
def test_bad_sampler_arguments(tiny, kwargs, message):
    noise, pos, _ = _conditions(7)
    with pytest.raises(ValueError, match=message):
        sample(tiny, noise, pos, **kwargs)


# ----------------------------------------------------------------------------------------------- samplers
def _gaussian_data_model(c: float):
    """The exact flow model of data x0 ~ N(0, c^2 I): E[x0 | x_s] = (1 - s) c^2 / ((1 - s)^2 c^2 + s^2) x_s, so the
    probability-flow ODE from noise n at sigma 1 ends exactly at c * n."""
    def model(x, s, captions):
        s = s.view(-1, 1, 1, 1).double()
        x0 = (1 - s) * c ** 2 / ((1 - s) ** 2 * c ** 2 + s ** 2) * x.double()
        return ((x.double() - x0) / s).float()
    return model


def test_res_multistep_is_more_accurate_than_euler_on_an_exact_ode():
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(1, 16, 8, 8, generator=g)
    model = _gaussian_data_model(0.5)
    errors = {name: [(sample(model, noise, torch.zeros(3, 48), steps=n, sampler=name) - 0.5 * noise).abs().max()
                     for n in (4, 8, 16)] for name in SAMPLERS}
    assert set(errors) == {"euler", "res_multistep"}
    for name, errs in errors.items():
        assert errs[0] > errs[1] > errs[2], (name, errs)  # both converge
    assert all(r < e for r, e in zip(errors["res_multistep"], errors["euler"])), errors
    assert errors["res_multistep"][2] < errors["euler"][2] / 3, errors
    # higher order: halving the step size cuts the error 7x here (Euler: 1.9x, first order)
    assert errors["res_multistep"][1] / errors["res_multistep"][2] > 3.0
    assert errors["euler"][1] / errors["euler"][2] < 2.6


def test_res_multistep_first_step_is_euler_and_then_differs(tiny):
    noise, pos, _ = _conditions(12)
    with torch.no_grad():
        assert torch.equal(sample(tiny, noise, pos, steps=1, sampler="res_multistep"),
                           sample(tiny, noise, pos, steps=1, sampler="euler"))
        a = sample(tiny, noise, pos, steps=8, sampler="res_multistep")
        b = sample(tiny, noise, pos, steps=8, sampler="euler")
    assert (a - b).abs().max() > 1e-3


def test_unknown_sampler_is_refused(tiny):
    noise, pos, _ = _conditions(7)
    with pytest.raises(ValueError, match="unknown sampler 'dpmpp_2m'"):
        sample(tiny, noise, pos, sampler="dpmpp_2m")


# ----------------------------------------------------------------------------------------------- inpainting
def _inpaint_case(seed, h=8, w=8):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 16, h, w, generator=g)
    mask = torch.zeros(1, 1, h, w)
    mask[..., 2:6, 1:5] = 1.0  # a binary mask: where diffusers' and ComfyUI's blends coincide
    pos = [torch.randn(13, 48, generator=g)]
    neg = [torch.randn(7, 48, generator=g)]
    return image, mask, pos, neg


@pytest.mark.parametrize("steps, cfg, strength", [(8, 1.0, 1.0), (6, 2.0, 0.6)])
def test_inpaint_equals_diffusers_inpaint_pipeline(tiny, steps, cfg, strength):
    ref = diffusers_twin(tiny)
    image, mask, pos, neg = _inpaint_case(21)
    seed = 5
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        theirs = diffusers_inpaint(ref, image, mask, pos, neg, steps, cfg, seed, strength=strength)
        ours = sample(tiny, noise, pos, neg, steps=round(steps * strength), cfg=cfg, denoise=strength,
                      init_latent=image, mask=mask)
    diff = (ours - theirs).abs().max().item()
    print(f"max|inpaint - diffusers ZImageInpaintPipeline| = {diff:.2e}")
    assert diff <= 3e-4  # measured 4.4e-6 (8 steps) and 3.2e-5 (6 steps, cfg 2, strength 0.6): ~10x
    kept = mask.expand_as(image) == 0
    assert (ours - image)[kept].abs().max() < 1e-5  # the unmasked region is the input latent
    assert (ours - image)[~kept].abs().mean() > 0.3  # the masked region is repainted


def test_inpaint_mask_shapes_and_requirements(tiny):
    image, mask, pos, _ = _inpaint_case(22)
    noise = torch.randn_like(image)
    with torch.no_grad():
        full = sample(tiny, noise, pos, steps=2, init_latent=image, mask=mask.expand(1, 16, -1, -1))
        single = sample(tiny, noise, pos, steps=2, init_latent=image, mask=mask)
        everything = sample(tiny, noise, pos, steps=2, init_latent=image, mask=torch.ones_like(mask))
        plain = sample(tiny, noise, pos, steps=2, init_latent=image)
    assert torch.equal(full, single)
    assert (everything - plain).abs().max() < 1e-5  # an all-ones mask repaints everything: plain sampling
    with pytest.raises(ValueError, match=r"mask has shape \[1, 1, 4, 4\].*latent's size \[8, 8\]"):
        sample(tiny, noise, pos, steps=2, init_latent=image, mask=torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="needs init_latent"):
        sample(tiny, noise, pos, steps=2, mask=mask)
