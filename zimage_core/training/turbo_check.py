"""The turbo check: does a LoRA still give, at the Turbo's 8 steps / cfg 1, what it learned?

The reference is what the concept looks like at full quality: the LoRA's own samples at the slow reference recipe
(Turbo: 30 steps, cfg 2; for trajectory imitation, its SFT teacher's) on fixed noises. Each candidate (the LoRA at
8 steps / cfg 1, the LoRA + DistillPatch at 8 steps / cfg 1, ...) is sampled from the same noises and compared with
that one reference, so a remedy that changes the slow samples (a DistillPatch does) cannot flatter itself.

Two figures per candidate, both "higher is better", both in latent space (the headless trainer has no VAE):

- match: 1 - |C - R|^2 / |R - flat(R)|^2, the coefficient of determination of the candidate C against the reference
  R, where flat(R) is R's per-channel mean (a flat image of the right average colour). 1 = the same picture, 0 = no
  closer than that flat image, < 0 = further (e.g. a different picture). Each candidate is first aligned to its
  reference by the whole-picture shift (up to a quarter of the side, circular) that fits best: guidance moves where
  things sit (on the toy world the SFT LoRA's bars sit elsewhere at cfg 2 than at cfg 1: unaligned match 0.06 at 30
  steps cfg 2 against 0.92 at cfg 1, for the same LoRA and noises), which is not what the Turbo is about; what is
  drawn, and how sharply, is.
- sharpness: the candidate's high-frequency energy (mean squared Laplacian) relative to the reference's. 1 = as
  sharp as the full-quality samples, < 1 = blurry (the de-distilled look of a plain LoRA at 8 steps).
- score = match x min(sharpness, 1 / sharpness): the headline figure. 1 = the full-quality picture at full
  sharpness; blur, over-sharpening or a different picture lower it. Neither figure alone ranks every remedy above
  a plain SFT LoRA on the toy world (a differential LoRA draws a slightly different picture from the SFT
  reference, yet is sharp; an SFT LoRA draws the right picture, blurred); their product does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

def meaning(reference_steps: int = 30, reference_cfg: float = 2.0) -> str:
    """The one line that says what the figure means; the reference recipe is the model variant's (Turbo: 30 steps cfg
    2; Z-Image base: its own 50 steps cfg 4)."""
    return ("turbo check (higher keeps the Turbo): score = match x sharpness of the 8-step / cfg-1 samples against the "
            f"LoRA's own {reference_steps}-step / cfg-{reference_cfg:g} samples on the same noises; match 1 = the same "
            "picture (up to a shift), 0 = no closer than a flat image; sharpness 1 = as sharp, < 1 = blurry.")


MEANING = meaning()  # on Z-Image-Turbo

_LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def _stack(latents: Sequence[Tensor] | Tensor) -> Tensor:
    x = latents if isinstance(latents, Tensor) else torch.stack([t.reshape(t.shape[-3:]) for t in latents])
    return x.detach().float().cpu()


def laplacian_energy(latents: Tensor) -> Tensor:
    """Mean squared Laplacian per sample [B] of [B, C, H, W] latents (interior only)."""
    c = latents.shape[1]
    kernel = _LAPLACE.to(latents)[None, None].expand(c, 1, 3, 3)
    return F.conv2d(latents, kernel, groups=c).pow(2).mean(dim=(1, 2, 3))


MAX_SHIFT = 0.25  # of the latent's side: how far match looks for the best alignment


def aligned_error(candidate: Tensor, reference: Tensor, max_shift: float = MAX_SHIFT) -> Tensor:
    """Per sample [B]: min over circular shifts d (|d| <= max_shift x side, each axis) of |roll(C, d) - R|^2.

    |roll(C, d) - R|^2 = |C|^2 + |R|^2 - 2 xcorr(R, C)[d], with the cross-correlation of every shift from one FFT."""
    c, r = candidate.double(), reference.double()
    h, w = r.shape[-2:]
    xcorr = torch.fft.irfft2(torch.fft.rfft2(r) * torch.fft.rfft2(c).conj(), s=(h, w)).sum(dim=1)  # [B, h, w]
    dy, dx = torch.arange(h), torch.arange(w)
    dy, dx = torch.minimum(dy, h - dy), torch.minimum(dx, w - dx)  # circular distance of each shift from 0
    allowed = (dy[:, None] <= max_shift * h) & (dx[None, :] <= max_shift * w)
    best = xcorr.masked_fill(~allowed, float("-inf")).flatten(1).amax(dim=1)
    error = c.pow(2).sum(dim=(1, 2, 3)) + r.pow(2).sum(dim=(1, 2, 3)) - 2 * best
    return error.clamp_min(0).float()


def match(candidate: Sequence[Tensor] | Tensor, reference: Sequence[Tensor] | Tensor,
          max_shift: float = MAX_SHIFT) -> float:
    """1 - sum |align(C) - R|^2 / sum |R - flat(R)|^2 over all samples (paired by noise; module docstring)."""
    c, r = _stack(candidate), _stack(reference)
    if c.shape != r.shape:
        raise ValueError(f"turbo check: candidate samples {tuple(c.shape)} and reference samples {tuple(r.shape)} "
                         "must pair one to one (same noises, same size)")
    flat = r.mean(dim=(2, 3), keepdim=True)
    return float(1.0 - aligned_error(c, r, max_shift).sum() / (r - flat).pow(2).sum().clamp_min(1e-12))


def sharpness(candidate: Sequence[Tensor] | Tensor, reference: Sequence[Tensor] | Tensor) -> float:
    """High-frequency energy of the candidate relative to the reference (1 = as sharp, < 1 blurry)."""
    return float(laplacian_energy(_stack(candidate)).mean() / laplacian_energy(_stack(reference)).mean().clamp_min(
        1e-12))


def turbo_check(candidates: dict[str, Sequence[Tensor] | Tensor], reference: Sequence[Tensor] | Tensor
                ) -> dict[str, dict[str, float]]:
    """{candidate: {"score": ..., "match": ..., "sharpness": ...}} against one reference (module docstring)."""
    out = {}
    for name, samples in candidates.items():
        m, s = match(samples, reference), sharpness(samples, reference)
        out[name] = {"score": m * min(s, 1.0 / max(s, 1e-12)), "match": m, "sharpness": s}
    return out


def format_check(check: dict[str, dict[str, float]]) -> str:
    """One line for logs: 'trained 0.58 (match 0.71, sharpness 0.83); ...'."""
    return "; ".join(f"{name} {v['score']:.2f} (match {v['match']:.2f}, sharpness {v['sharpness']:.2f})"
                     for name, v in check.items())
