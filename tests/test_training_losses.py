"""Loss maths (training-schemes §10 checks 2-4, 6, 20): bell weights, grids, SFT loss, trajectory imitation."""

import pytest
import torch

from zimage_core.scheduler import training_sigmas
from zimage_core.training import bell_weights, sft_loss, teacher_trajectory, trajectory_grids, trajectory_loss
from zimage_core.training.losses import SigmaSampler, chord_targets, per_sample_mse, student_step_weights


def test_bell_weights_on_the_training_grid():
    grid = training_sigmas(1000, 3.0)
    w = bell_weights(grid)
    assert abs(float(w.mean()) - 1.0) < 1e-3
    assert float(w[0]) == 0.0 and float(grid[0]) == 1.0
    peak = int(w.argmax())
    assert abs(float(w[peak]) - 1.798) < 2e-3 and abs(float(grid[peak]) - 0.5) < 2e-3
    assert abs(float(w[-1]) - 0.0166) < 1e-3


def diffsynth_scheduler(steps: int, **kwargs):
    """DiffSynth-Studio's own `FlowMatchScheduler("Z-Image")` (diffsynth/diffusion/flow_match.py, torch and numpy
    only), loaded from the installed package without its heavy package __init__; a missing package fails."""
    import importlib.util
    from pathlib import Path

    found = importlib.util.find_spec("diffsynth")
    assert found is not None, "diffsynth is a pinned test requirement (tools/requirements-nodeps.txt)"
    path = Path(found.submodule_search_locations[0]) / "diffusion" / "flow_match.py"
    spec = importlib.util.spec_from_file_location("diffsynth_flow_match", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scheduler = module.FlowMatchScheduler("Z-Image")
    scheduler.set_timesteps(steps, **kwargs)
    return scheduler


@pytest.mark.parametrize("steps, rounded", [
    (8, [0.257, 0.515, 0.818, 1.167, 1.55, 1.913, 2.1, 1.74]),
    (4, [0.606, 1.213, 2.005, 2.601]),
    (2, [2.0, 4.0]),
])
def test_student_step_weights_match_diffsynth(steps, rounded):
    student, _, _ = trajectory_grids(50, steps)
    theirs = diffsynth_scheduler(steps, training=True)
    assert torch.equal(student[:-1], theirs.sigmas)
    assert torch.allclose(student_step_weights(student), theirs.linear_timesteps_weights, rtol=0, atol=1e-6)
    assert torch.allclose(theirs.linear_timesteps_weights, torch.tensor(rounded), atol=1.5e-3)  # the note's table


@pytest.mark.parametrize("steps", [8, 4, 2])
def test_teacher_grid_is_diffsynths_with_the_student_timesteps(steps):
    """DiffSynth's trajectory imitation: the teacher's 50-step schedule with each student timestep put in place of
    its nearest teacher timestep (set_timesteps(target_timesteps=...))."""
    student, teacher, indices = trajectory_grids(50, steps)
    student_ts = diffsynth_scheduler(steps).timesteps
    theirs = diffsynth_scheduler(50, target_timesteps=student_ts)
    assert torch.allclose(teacher[:-1], theirs.sigmas, rtol=0, atol=1e-6)
    assert indices == [int(torch.argmin((theirs.timesteps - t).abs())) for t in student_ts]


def test_teacher_grid_holds_the_student_sigmas():
    student, teacher, indices = trajectory_grids(50, 8)
    assert indices == [0, 6, 12, 19, 25, 31, 37, 44]
    assert torch.allclose(student[:-1], torch.tensor([1.0, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3]), atol=1e-4)
    assert torch.equal(teacher[indices], student[:-1])
    assert bool((teacher[:-1] > teacher[1:]).all()) and float(teacher[-1]) == 0.0 and len(teacher) == 51
    assert trajectory_grids(50, 4)[2] == [0, 12, 25, 37] and trajectory_grids(50, 2)[2] == [0, 25]


def test_sigma_sampler_draws_from_the_grid_with_its_weights():
    sampler = SigmaSampler(3.0, 1000, "bell")
    sigma, weight = sampler.draw(4000, torch.Generator().manual_seed(0))
    assert set(sigma.tolist()) <= set(sampler.grid.tolist())
    assert abs(float(sigma.median()) - 0.75) < 0.03  # shift-3 quantiles: median 0.75
    plain = SigmaSampler(3.0, 1000, "none")
    assert torch.equal(plain.draw(10, torch.Generator().manual_seed(1))[1], torch.ones(10))


def test_sft_loss_is_weighted_velocity_mse():
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 4, 4, generator=gen), torch.randn(2, 16, 4, 4, generator=gen)
    sigma, weight = torch.tensor([0.3, 0.9]), torch.tensor([2.0, 0.5])
    seen = {}

    def model(x, s, caps):
        seen["x"] = x
        return torch.zeros_like(x)

    loss = sft_loss(model, x0, [None, None], noise, sigma, weight)
    s = sigma.view(-1, 1, 1, 1)
    assert torch.allclose(seen["x"], (1 - s) * x0 + s * noise)
    expected = ((noise - x0).pow(2).flatten(1).mean(1) * weight).mean()
    assert torch.allclose(loss, expected)


def test_x0_loss_identity_of_comfyui():
    gen = torch.Generator().manual_seed(3)
    x0, eps, v = (torch.randn(3, 16, 4, 4, generator=gen) for _ in range(3))
    sigma = torch.tensor([0.2, 0.5, 0.9]).view(-1, 1, 1, 1)
    x_t = (1 - sigma) * x0 + sigma * eps
    lhs = per_sample_mse(x_t - sigma * v, x0)
    rhs = sigma.flatten() ** 2 * per_sample_mse(v, eps - x0)
    assert torch.allclose(lhs, rhs, rtol=1e-5)


def test_oracle_velocity_integrates_to_x0():
    gen = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(1, 16, 4, 4, generator=gen), torch.randn(1, 16, 4, 4, generator=gen)
    oracle = lambda x, s, caps: (eps - x0).expand_as(x)  # noqa: E731
    _, grid, keep = trajectory_grids(50, 8)
    states = teacher_trajectory(oracle, eps, [None], None, grid, 1.0, keep)
    assert (states[-1] - x0).abs().max() < 1e-5
    assert torch.allclose(states[0], eps)


def test_self_consistency_and_chord_targets(tiny):
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 16, 8, 8, generator=gen)
    caps = [torch.randn(5, 48, generator=gen), torch.randn(7, 48, generator=gen)]
    student, _, _ = trajectory_grids(50, 8)
    # teacher == student on the student's own 8-step grid, cfg 1: every chord is the student's velocity
    states = teacher_trajectory(tiny, noise, caps, None, student, 1.0, list(range(8)))
    with torch.no_grad():
        loss = trajectory_loss(tiny, states, student, caps)
    assert float(loss) < 1e-10

    # a 50-step cfg-2 teacher: targets are the independent chord slopes
    _, grid, keep = trajectory_grids(50, 8)
    neg = [torch.zeros(1, 48), torch.zeros(1, 48)]
    states = teacher_trajectory(tiny, noise, caps, neg, grid, 2.0, keep)
    targets = chord_targets(states, student)
    for k in range(8):
        expected = (states[k + 1] - states[k]) / (float(student[k + 1]) - float(student[k]))
        assert torch.allclose(targets[k], expected, rtol=1e-5, atol=1e-6)

    # batched (one forward, or chunks) == DiffSynth's per-step loop, restated without the implementation's helpers:
    # its scheduler's training weights, the chord slope of each step, torch's mse_loss
    weights = diffsynth_scheduler(8, training=True).linear_timesteps_weights
    with torch.no_grad():
        batched = trajectory_loss(tiny, states, student, caps)
        chunked = trajectory_loss(tiny, states, student, caps, chunk=3)
        loop = 0.0
        for k in range(8):
            s_k, s_next = float(student[k]), float(student[k + 1])
            chord = (states[k + 1] - states[k]) / (s_next - s_k)
            loop = loop + weights[k] * torch.nn.functional.mse_loss(tiny(states[k], torch.full((2,), s_k), caps), chord)
    assert torch.allclose(batched, loop, rtol=1e-5) and torch.allclose(chunked, loop, rtol=1e-5)


def test_chord_denominator_keeps_its_sign():
    states = torch.stack([torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)])
    target = chord_targets(states, torch.tensor([0.5, 0.5 - 1e-9], dtype=torch.float64))
    assert float(target.flatten()[0]) == pytest.approx(-1e6, rel=1e-3)  # clamped to -1e-6, sign kept


def test_teacher_trajectory_counts_calls_and_needs_no_grad(tiny):
    calls = []

    def model(x, s, caps):
        calls.append(x.shape[0])
        return tiny(x, s, caps)

    _, grid, keep = trajectory_grids(50, 8)
    noise = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    states = teacher_trajectory(model, noise, [torch.randn(3, 48)], [torch.zeros(1, 48)], grid, 2.0, keep)
    assert len(calls) == 50 and set(calls) == {2}  # 50 calls, each pos + neg batched: 100 sample-forwards
    assert states.shape == (9, 1, 16, 4, 4) and not states.requires_grad
