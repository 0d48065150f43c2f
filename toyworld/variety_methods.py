"""Why a LoRA's seeds collapse, and the seed-variety methods that were tried before `SeedVariety`'s shift mode was
shipped, measured on the toy world (8 steps, cfg 1, the two cases and figures of `toyworld.stacking`'s variety part).

    PYTHONPATH=. python -m toyworld.variety_methods [--out toyworld/variety_methods.md]

Diagnosis: (1) the centroid of each step's x0 estimate against the final one (which step settles the layout);
(2) the initial noise's low-frequency part (k x k latent-pixel blocks) taken from another seed: does the final
position follow that seed or the rest of the noise?

Methods, each as (strength, steps), on the first `steps` steps of a copy of the Euler loop (cfg 1):
- ancestral: the step's predicted noise becomes sqrt(1 - s^2) * itself + s * fresh noise (an SDE-like start);
- ancestral, low frequency: the same on the 4 x 4-block means of the predicted noise only;
- low-frequency initial noise: s times fresh 4 x 4-block noise added to the initial noise, renormalised (steps unused);
- repel: the x0 estimate pushed away from the prompt's seed-free estimate (the model on a zero latent):
  x0 + s * (x0 - x0_zero) (one more model call per step);
- shift, edge-padded: the shipped shift, but the x0 estimate translated with its border repeated instead of rolled;
- shift and caption: the shipped `SeedVariety` modes, through `zimage_core.sample` itself.
Each row is the mean over NOISE_SEEDS (three sets of 16 seeds per prompt)."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from zimage_core import apply_loras, load_lora
from zimage_core.sampling import SeedVariety
from zimage_core.scheduler import DEFAULT_SHIFT, denoise_sigmas

from . import WEIGHTS, world
from .evaluate import decode, fixed_noise, load_model, lora_path
from .metrics import fidelity, sharpness
from .stacking import SEEDS_PER_PROMPT, STEPS, VARIETY_CASES, generate, layout, variety

NOISE_SEEDS = (12, 13, 14)  # sets of 16 seeds per prompt (the first three of toyworld.stacking's)

METHODS = (  # (method, strength, steps)
    ("off", 0.0, 0),
    ("ancestral", 0.5, 1), ("ancestral", 0.5, 2), ("ancestral", 1.0, 2),
    ("ancestral, low frequency", 0.5, 1), ("ancestral, low frequency", 1.0, 2),
    ("low-frequency initial noise", 1.0, 0), ("low-frequency initial noise", 2.0, 0),
    ("repel", 0.5, 1), ("repel", 1.0, 2),
    ("shift, edge-padded", 0.25, 2), ("shift, edge-padded", 0.25, 3),
    ("shift", 0.25, 2), ("shift", 0.25, 3), ("caption", 2.0, 2))


def blocks(x: torch.Tensor, k: int = 4) -> torch.Tensor:
    """The k x k-block means of a latent, at full size (its low-frequency part)."""
    return F.interpolate(F.avg_pool2d(x, k), scale_factor=k, mode="nearest")


@torch.no_grad()
def euler(model, noise, caps, method="off", strength=0.0, steps=0, seed=0, record=None):
    """The cfg-1 Euler loop of `zimage_core.sample`, with one of the tried methods on its first `steps` steps."""
    sigmas = [float(s) for s in denoise_sigmas(STEPS, 1.0, DEFAULT_SHIFT)]
    batch, gen = noise.shape[0], torch.Generator().manual_seed(seed)
    x = noise.float().clone()
    if method == "low-frequency initial noise":
        x = x + strength * blocks(torch.randn(x.shape, generator=gen))
        x = x / x.std(dim=(1, 2, 3), keepdim=True)
    zero_x0 = {}
    for i in range(STEPS):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = x - s * model(x, torch.full((batch,), s), caps).float()
        if record is not None:
            record.append(x0)
        eps = (x - (1 - s) * x0) / s
        if i < steps and method == "ancestral":
            eps = math.sqrt(max(0.0, 1 - strength ** 2)) * eps + strength * torch.randn(x.shape, generator=gen)
        elif i < steps and method == "ancestral, low frequency":
            low = blocks(eps)
            eps = eps - low + math.sqrt(max(0.0, 1 - strength ** 2)) * low \
                + strength * blocks(torch.randn(x.shape, generator=gen))
        elif i < steps and method == "repel":
            if i not in zero_x0:
                zero = torch.zeros_like(x)
                zero_x0[i] = zero - s * model(zero, torch.full((batch,), s), caps).float()
            x0 = x0 + strength * (x0 - zero_x0[i])
        elif i < steps and method == "shift, edge-padded":
            side = x.shape[-1]
            reach = round(strength * side)
            padded = F.pad(x0, (reach,) * 4, mode="replicate")
            for b in range(batch):
                dy, dx = torch.randint(-reach, reach + 1, (2,), generator=gen).tolist()
                x0[b] = padded[b, :, reach - dy:reach - dy + side, reach - dx:reach - dx + side]
                eps[b] = torch.roll(eps[b], (dy, dx), (-2, -1))
        x = (1 - s_next) * x0 + s_next * eps  # the Euler step, in x0 / noise form
    return x


def images_of(model, prompts, method, strength, steps, seed):
    if method in ("off", "shift", "caption"):
        option = None if method == "off" else SeedVariety(strength, steps, seed=1000 * seed, mode=method)
        return generate(model, prompts, seed=seed, variety=option)
    noise, caps = fixed_noise(len(prompts), seed), [world.encode_text(p) for p in prompts]
    return decode(torch.cat([euler(model, noise[i:i + 64], caps[i:i + 64], method, strength, steps, 1000 * seed + i)
                             for i in range(0, len(prompts), 64)]))


def diagnose(model, prompts, lines):
    noise, caps = fixed_noise(len(prompts), NOISE_SEEDS[0]), [world.encode_text(p) for p in prompts]
    record = []
    final = decode(euler(model, noise, caps, record=record))
    centre, _ = layout(final)
    lines.append("| x0 estimate after step | position spread (px) | centroid distance to the final one (px) |")
    lines.append("|---|---|---|")
    for i, x0 in enumerate(record):
        images = decode(x0)
        c, _ = layout(images)
        lines.append(f"| {i + 1} | {variety(images, prompts)['spread']:.1f} | "
                     f"{float((c - centre).pow(2).sum(1).mean().sqrt()):.1f} |")
    other = fixed_noise(len(prompts), 99)
    other_centre, _ = layout(decode(euler(model, other, caps)))
    lines += ["", f"Two seeds' final centroids lie {float((centre - other_centre).norm(dim=1).mean()):.1f} px apart. "
                  "Seed A's noise with its k x k-block means replaced by seed B's:", "",
              "| k (latent px) | distance to A's picture (px) | to B's (px) |", "|---|---|---|"]
    for k in (8, 4, 2):
        mixed = noise - blocks(noise, k) + blocks(other, k)
        c, _ = layout(decode(euler(model, mixed / mixed.std(dim=(1, 2, 3), keepdim=True), caps)))
        lines.append(f"| {k} | {float((c - centre).norm(dim=1).mean()):.1f} | "
                     f"{float((c - other_centre).norm(dim=1).mean()):.1f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(WEIGHTS.parent / "variety_methods.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = load_model("turbo")
    lines = []
    for case, (files, base_prompts) in VARIETY_CASES.items():
        prompts = [q for q in base_prompts for _ in range(SEEDS_PER_PROMPT)]
        with apply_loras(model, [(load_lora(lora_path(name)), 1.0) for name in files]):
            lines += [f"## {case}", "", "Diagnosis (first seed set):", ""]
            diagnose(model, prompts, lines)
            lines += ["", f"Methods, {SEEDS_PER_PROMPT} seeds per prompt, mean of {len(NOISE_SEEDS)} seed sets:",
                      "", "| method | strength | steps | pairwise RMSE | position spread (px) | x off | positions | "
                          "sizes | fid | sharp |", "|---|---|---|---|---|---|---|---|---|---|"]
            off = None
            for method, strength, steps in METHODS:
                t = time.time()
                sets = []
                for seed in NOISE_SEEDS:
                    images = images_of(model, prompts, method, strength, steps, seed)
                    sets.append({**variety(images, prompts), "fid": fidelity(images, prompts),
                                 "sharp": sharpness(images, prompts)})
                r = {k: sum(s[k] for s in sets) / len(sets) for k in sets[0]}
                off = off or r
                lines.append(f"| {method} | {strength:g} | {steps} | {r['pairwise']:.3f} | {r['spread']:.1f} | "
                             f"{r['spread'] / off['spread']:.2f} | {r['positions']:.1f} | {r['sizes']:.1f} | "
                             f"{r['fid']:.2f} | {r['sharp']:.2f} |")
                print(case, lines[-1], f"({time.time() - t:.0f} s)", flush=True)
            lines.append("")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
