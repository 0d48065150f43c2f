"""Step rules of the sampling loop (k-diffusion form, as ComfyUI's KSampler runs them).

A step rule gets the latent `x` at `sigmas[i]` and the model's clean-latent estimate `denoised` (x0) there, and
returns the latent at `sigmas[i + 1]`. For the flow-matching parametrisation x = (1 - s) x0 + s noise,
`(x - denoised) / s` is the velocity noise - x0, so Euler on it is the flow-matching Euler step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import Tensor

StepRule = Callable[[Tensor, Tensor, int], Tensor]


def euler(sigmas: Sequence[float]) -> StepRule:
    """The first-order (flow-matching) Euler step: ComfyUI's `euler`, diffusers' FlowMatchEulerDiscreteScheduler."""

    def step(x: Tensor, denoised: Tensor, i: int) -> Tensor:
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        return x + (sigma_next - sigma) * ((x - denoised) / sigma)

    return step


def res_multistep(sigmas: Sequence[float]) -> StepRule:
    """ComfyUI's `res_multistep` (k_diffusion `sample_res_multistep`, eta 0): the second-order exponential multistep
    method of RES (arXiv 2308.02157) in log-sigma time t = -log(sigma), reusing the previous step's x0 estimate.
    The first step and the step onto sigma 0 are Euler steps. Deterministic: no noise is added."""
    previous: list[Tensor] = []  # the last step's denoised

    def step(x: Tensor, denoised: Tensor, i: int) -> Tensor:
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if sigma_next == 0 or not previous:
            out = x + (sigma_next - sigma) * ((x - denoised) / sigma)
        else:
            t, t_next, t_prev = -math.log(sigma), -math.log(sigma_next), -math.log(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t) / h
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b1, b2 = phi1 - phi2 / c2, phi2 / c2
            out = math.exp(-h) * x + h * (b1 * denoised + b2 * previous[0])
        previous[:] = [denoised]
        return out

    return step


SAMPLERS: dict[str, Callable[[Sequence[float]], StepRule]] = {"euler": euler, "res_multistep": res_multistep}


def step_rule(name: str, sigmas: Sequence[float]) -> StepRule:
    """A fresh step rule (with its own history) for one sampling run over `sigmas`."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {list(SAMPLERS)}")
    return SAMPLERS[name]([float(s) for s in sigmas])
