"""Metrics of the toy world, on decoded images in [0, 1]:

- sharpness: mean squared Laplacian (high-frequency energy) of the samples divided by that of real images of the
  same prompts after a VAE round trip. 1 = as sharp as real data, < 1 blurry, > 1 extra high-frequency content.
- classify: the (colour, shape) of a sample's nearest clean rendering. Colour: the palette colour nearest to the
  mean of the clearly-foreground pixels. Shape: the nearest coverage mask (projection of the image onto that
  colour's direction) in a bank of every shape at 5 sizes and all integer positions.
- fidelity: the share of samples whose (colour, shape) is the prompted one.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from . import world

_LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
BANK_SIZES = (9.0, 10.0, 11.0, 12.0, 13.0)
FOREGROUND = 0.25  # colour distance from the background that counts as "shape"


def laplacian_energy(images: Tensor) -> Tensor:
    """Per-image mean squared Laplacian [B] (images clamped to [0, 1], valid region only)."""
    x = images.clamp(0, 1).float()
    k = _LAPLACE.to(x)[None, None].expand(3, 1, 3, 3)
    return F.conv2d(x, k, groups=3).pow(2).mean(dim=(1, 2, 3))


@functools.lru_cache(maxsize=8)
def reference_energy(prompts: tuple[str, ...], n_per_prompt: int = 32, seed: int = 123) -> float:
    """Mean Laplacian energy of real images of the prompts, through the VAE round trip (lossless here)."""
    from .vae import ToyVAE
    vae = ToyVAE.load()
    g = torch.Generator().manual_seed(seed)
    images = world.prompt_batch([p for p in prompts for _ in range(n_per_prompt)], generator=g)
    return float(laplacian_energy(vae.decode(vae.encode(images))).mean())


def sharpness(images: Tensor, prompts: list[str]) -> float:
    return float(laplacian_energy(images).mean()) / reference_energy(tuple(sorted(set(prompts))))


@functools.lru_cache(maxsize=1)
def _bank() -> tuple[Tensor, list[str]]:
    masks, labels = [], []
    for shape in world.SHAPES:
        for size in BANK_SIZES:
            centres = torch.arange(size / 2, world.IMG - size / 2 + 1e-6, 1.0)
            cy, cx = torch.meshgrid(centres, centres, indexing="ij")
            cx, cy = cx.reshape(-1), cy.reshape(-1)
            n = len(cx)
            idx = torch.full((n,), world.SHAPES.index(shape))
            masks.append(world._masks(idx, torch.full((n,), size), cx, cy).reshape(n, -1))
            labels += [shape] * n
    return torch.cat(masks), labels


def classify(images: Tensor) -> list[tuple[str, str]]:
    """(colour, shape) of each image's nearest clean rendering; ("none", "none") for an empty image."""
    x = images.clamp(0, 1).float()
    bg = world.BACKGROUND
    names = list(world.ALL_COLOURS)
    palette = torch.tensor([world.ALL_COLOURS[c] for c in names])  # [K, 3]
    bank, labels = _bank()
    bank_sq = bank.pow(2).sum(1)
    diff = x - bg  # [B, 3, H, W]
    strength = diff.norm(dim=1)  # [B, H, W]
    fg = (strength > FOREGROUND).float()
    w = strength * fg
    mean_colour = (x * w[:, None]).sum((2, 3)) / w.sum((1, 2)).clamp_min(1e-6)[:, None]  # [B, 3]
    # nearest palette colour by direction from the background (brightness-invariant: anti-aliased rims are darker)
    k = (F.normalize(mean_colour - bg, dim=1) @ F.normalize(palette - bg, dim=1).T).argmax(1)  # [B]
    direction = palette[k] - bg  # [B, 3]
    cover = (torch.einsum("bc,bchw->bhw", direction, diff) / direction.pow(2).sum(1)[:, None, None]).clamp(0, 1)
    dist = bank_sq[None] - 2 * cover.reshape(len(x), -1) @ bank.T  # [B, bank]
    nearest = dist.argmin(1).tolist()
    empty = (fg.sum((1, 2)) < 4).tolist()
    return [("none", "none") if e else (names[c], labels[n])
            for e, c, n in zip(empty, k.tolist(), nearest)]


def fidelity(images: Tensor, prompts: list[str]) -> float:
    """Share of images whose nearest clean rendering has the prompted colour and shape."""
    preds = classify(images)
    return sum(p == world.parse(q) for p, q in zip(preds, prompts)) / len(prompts)


def shape_accuracy(images: Tensor, prompts: list[str]) -> float:
    preds = classify(images)
    return sum(p[1] == world.parse(q)[1] for p, q in zip(preds, prompts)) / len(prompts)


def _grad_energy(images: Tensor) -> Tensor:
    x = images.clamp(0, 1).float()
    dx = x[..., :, 1:] - x[..., :, :-1]
    dy = x[..., 1:, :] - x[..., :-1, :]
    return dx.pow(2).mean(dim=(1, 2, 3)) + dy.pow(2).mean(dim=(1, 2, 3))


@functools.lru_cache(maxsize=8)
def reference_edge(prompts: tuple[str, ...], n_per_prompt: int = 32, seed: int = 123) -> float:
    from .vae import ToyVAE
    vae = ToyVAE.load()
    g = torch.Generator().manual_seed(seed)
    images = vae.decode(vae.encode(world.prompt_batch([p for p in prompts for _ in range(n_per_prompt)], generator=g)))
    return float(laplacian_energy(images).sum() / _grad_energy(images).sum())


def edge_sharpness(images: Tensor, prompts: list[str]) -> float:
    """Laplacian energy per unit of gradient energy, relative to real data: how abrupt the edges are, independent
    of how much edge a sample has (a bar has more outline than a blob; a blurred edge of width w scores ~1/w²)."""
    ratio = float(laplacian_energy(images).sum() / _grad_energy(images).sum().clamp_min(1e-12))
    return ratio / reference_edge(tuple(sorted(set(prompts))))
