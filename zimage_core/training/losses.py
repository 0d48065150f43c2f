"""Loss maths of the trainer: DiffSynth's bell weights, the SFT velocity loss and trajectory imitation.

Conventions (training-schemes.md §0): x_sigma = (1 - sigma) x0 + sigma eps, target v = eps - x0, Euler step
x_next = x + (sigma_next - sigma) v, CFG neg + c (pos - neg). `model(latents, sigmas, captions)` returns v.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..scheduler import insert_sigmas, sigmas as schedule_sigmas, training_sigmas

# A velocity model: (latents [B, C, H, W], sigmas [B], captions list of [L, D]) -> v [B, C, H, W]
VelocityFn = Callable[[Tensor, Tensor, list], Tensor]


def bell_weights(grid: Tensor, num_train_timesteps: int = 1000) -> Tensor:
    """DiffSynth's `set_training_weight` on a sigma grid: exp(-2 ((t - 500) / 1000)²) at t = 1000 sigma, minimum
    moved to 0, rescaled to sum to 1000 (mean 1 on the 1000-entry grid). On a shorter grid (the student steps of
    trajectory imitation) it is then multiplied by len / 1000 and its second entry is added (DiffSynth's
    empirical formula): 8 steps give [0.257, 0.515, 0.818, 1.167, 1.55, 1.913, 2.1, 1.74]."""
    t = grid.double() * 1000.0
    y = torch.exp(-2.0 * ((t - 500.0) / 1000.0) ** 2)
    y = y - y.min()
    w = y * (1000.0 / y.sum())
    if len(grid) != num_train_timesteps:
        w = w * (len(grid) / 1000.0)
        w = w + w[1]
    return w.float()


class SigmaSampler:
    """Draws training sigmas uniformly from the shifted training grid and returns their loss weights."""

    def __init__(self, shift: float = 3.0, num_train_timesteps: int = 1000, weighting: str = "bell"):
        self.grid = training_sigmas(num_train_timesteps, shift)
        self.weights = bell_weights(self.grid, num_train_timesteps) if weighting == "bell" else torch.ones_like(
            self.grid)

    def draw(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        index = torch.randint(0, len(self.grid), (n,), generator=generator)
        return self.grid[index], self.weights[index]


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per batch element, in fp32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def noised(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """x_sigma = (1 - sigma) x0 + sigma eps, per batch element, in fp32."""
    s = sigma.to(x0.device, torch.float32).view(-1, 1, 1, 1)
    return (1.0 - s) * x0.float() + s * noise.float()


def sft_loss(model: VelocityFn, x0: Tensor, captions: list, noise: Tensor, sigma: Tensor,
             weight: Tensor | None = None) -> Tensor:
    """DiffSynth's FlowMatchSFTLoss for a batch: mean_b w_b · MSE(v(x_sigma_b), eps_b - x0_b)."""
    x_t = noised(x0, noise, sigma)
    v = model(x_t, sigma.to(x0.device), captions)
    loss = per_sample_mse(v, noise.float() - x0.float())
    if weight is not None:
        loss = loss * weight.to(loss.device, torch.float32)
    return loss.mean()


# ---------------------------------------------------------------------------------------------- trajectory imitation
def trajectory_grids(teacher_steps: int = 50, student_steps: int = 8, shift: float = 3.0):
    """The student grid (student_steps + 1 sigmas ending in 0), the teacher grid with the student sigmas inserted
    (DiffSynth's target_timesteps) and the indices of the student sigmas in it ([0, 6, 12, 19, 25, 31, 37, 44] for
    50 / 8)."""
    student = schedule_sigmas(student_steps, shift)
    teacher, indices = insert_sigmas(schedule_sigmas(teacher_steps, shift), student[:-1])
    return student, teacher, indices


def student_step_weights(student_sigmas: Tensor) -> Tensor:
    """DiffSynth's per-step weights of the trajectory-imitation loss (bell formula on the student's sigmas)."""
    return bell_weights(student_sigmas[:-1])


@torch.no_grad()
def teacher_trajectory(teacher: VelocityFn, noise: Tensor, positive: list, negative: list | None, grid: Tensor,
                       cfg: float, keep: Sequence[int]) -> Tensor:
    """Euler-sample the teacher over `grid` (cfg: neg + cfg (pos - neg), one batched call for pos and neg) and
    return the states at the indices `keep` followed by the endpoint: [len(keep) + 1, B, C, H, W] (fp32).
    Runs without gradients."""
    batch = noise.shape[0]
    keep = list(keep)
    states: dict[int, Tensor] = {}
    x = noise.float()
    steps = len(grid) - 1
    guided = cfg != 1.0
    if guided and negative is None:
        raise ValueError("a teacher cfg other than 1 needs negative caption features")
    for i in range(steps):
        if i in keep:
            states[i] = x.clone()
        sigma, sigma_next = float(grid[i]), float(grid[i + 1])
        if guided:
            v_pos, v_neg = teacher(torch.cat([x, x]), torch.full((2 * batch,), sigma),
                                   list(positive) + list(negative)).float().chunk(2)
            v = v_neg + cfg * (v_pos - v_neg)
        else:
            v = teacher(x, torch.full((batch,), sigma), list(positive)).float()
        x = x + (sigma_next - sigma) * v
    return torch.stack([states[i] for i in keep] + [x])


def chord_targets(states: Tensor, student_sigmas: Tensor, eps: float = 1e-6) -> Tensor:
    """Chord velocities (X_{k+1} - X_k) / (s_{k+1} - s_k) between consecutive teacher states at the student sigmas,
    the denominator clamped to |d| >= eps with its sign kept (DiffSynth after commit b6866342). [K, B, C, H, W]."""
    d = (student_sigmas[1:] - student_sigmas[:-1]).double()
    d = torch.where(d <= 0, torch.clamp(d, max=-eps), torch.clamp(d, min=eps)).float()  # sigmas decrease
    return (states[1:] - states[:-1]) / d.view(-1, 1, 1, 1, 1).to(states.device)


def trajectory_loss(student: VelocityFn, states: Tensor, student_sigmas: Tensor, captions: list,
                    weights: Tensor | None = None, chunk: int = 0, backward_scale: float | None = None) -> Tensor:
    """sum_k w_k MSE(v_student(X_k, s_k), chord_k), averaged over the batch. states: [K + 1, B, C, H, W] teacher
    states at the student sigmas plus the endpoint. The K student evaluations run batched (chunk: steps per forward,
    0 = all at once; equal to DiffSynth's per-step loop up to fp rounding). With backward_scale, each chunk's
    loss * backward_scale is back-propagated immediately (bounded activation memory) and the returned total is
    detached."""
    k_steps, batch = states.shape[0] - 1, states.shape[1]
    targets = chord_targets(states, student_sigmas)
    if weights is None:
        weights = student_step_weights(student_sigmas)
    chunk = k_steps if chunk <= 0 else min(chunk, k_steps)
    total = None
    for start in range(0, k_steps, chunk):
        ks = range(start, min(start + chunk, k_steps))
        x = torch.cat([states[k] for k in ks])  # [n * B, C, H, W], step-major
        s = torch.cat([torch.full((batch,), float(student_sigmas[k])) for k in ks])
        v = student(x, s, [c for _ in ks for c in captions])
        mse = per_sample_mse(v, torch.cat([targets[k] for k in ks])).view(len(ks), batch)
        w = weights[list(ks)].to(mse.device, torch.float32).view(-1, 1)
        part = (mse * w).sum(0).mean()
        if backward_scale is not None:
            (part * backward_scale).backward()
            part = part.detach()
        total = part if total is None else total + part
    return total
