"""LoRA stack combine modes and the sampler's seed variety, measured on the toy world (8 steps, cfg 1).

    PYTHONPATH=. python -m toyworld.stacking [--out toyworld/stacking.json] [--grids docs/]

Stacking: the colour LoRA (world.NEW_COLOUR) + the shape LoRA (world.NEW_SHAPE) + the DistillPatch, each at 1.0, on
turbo, through `apply_loras(..., combine=mode, keep_apart={DistillPatch})`, for the plain sum and every mode of
`zimage_core.lora.combine`, then with step ranges (`apply_loras(..., step_ranges=)` + `sample(..., lora_steps=)`). Per
row: the share of "<colour> <shape>" samples drawn as prompted (and its colour / shape parts), each LoRA's own concept
kept (the colour on the base shapes, the shape in the base colours), the base prompts kept, and sharpness. Seed variety
(`--part variety`): turbo on the 12 base prompts, and turbo + bar LoRA + DistillPatch on the bar prompts, 16 seeds each
(six independent seed sets, averaged), without and with `zimage_core.sampling.SeedVariety` at a few modes / strengths /
step counts: the mean pairwise pixel RMSE between the 16 samples of a prompt, the spread of their positions, the number
of distinct positions and sizes, and prompted fidelity.

Only toyworld's public names are used (weights by file name, `evaluate.generate` / `decode` / `lora_path`, the
metrics), so re-running on rebuilt toy weights is this one command."""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
from torch import Tensor

from zimage_core import apply_loras, load_lora, sample
from zimage_core.lora.combine import COMBINE_MODES
from zimage_core.sampling import SeedVariety
from zimage_core.scheduler import StepRange

from . import WEIGHTS, world
from .evaluate import decode, fixed_noise, load_model, lora_path
from .metrics import FOREGROUND, classify, edge_sharpness, fidelity, sharpness

STEPS, CFG = 8, 1.0
COMBINATION = f"{world.NEW_COLOUR} {world.NEW_SHAPE}"  # e.g. "purple cross"
STACK_FILES = (f"lora_sft_{world.NEW_COLOUR}", "lora_sft", "distill_patch")  # colour, shape LoRA, DistillPatch
VARIETY_SETTINGS = (  # (mode, strength, steps) of SeedVariety; the first is off
    ("off", 0.0, 0), ("shift", 0.25, 2), ("shift", 0.375, 2), ("shift", 0.5, 2), ("shift", 0.25, 3),
    ("shift", 0.375, 3), ("caption", 1.0, 1), ("caption", 2.0, 2))
SHIPPED_VARIETY = "shift 0.375, 2 steps"  # the row of the shipped workflow's setting (README picture: off and this)
SEEDS_PER_PROMPT = 16
VARIETY_NOISE_SEEDS = (12, 13, 14, 15, 16, 17)  # independent sets of 16 seeds per prompt; the figures are their mean
WORKAROUND_STRENGTH = 0.6  # users turn stacked LoRAs down to 0.3-0.7 (peers survey, complaint 3)
# Step ranges (zimage_core.lora.schedule), label -> ((colour, shape, DistillPatch) strengths, {stack index: range}),
# chosen from a sweep of ranges 0.5 / 0.625 / 0.75 / 0.875 x colour strength 1 / 1.5 / 2 (docs/lora-stacking.md);
# the last row is the control: the colour LoRA's higher strength without a range.
STEP_RANGE_ROWS = {
    "steps: shape LoRA 0-0.75": ((1.0, 1.0, 1.0), {1: StepRange(0.0, 0.75)}),
    "steps: colour LoRA 0.5-1 at 2": ((2.0, 1.0, 1.0), {0: StepRange(0.5, 1.0)}),
    "steps: shape 0-0.75, colour 0.75-1 at 2": ((2.0, 1.0, 1.0), {0: StepRange(0.75, 1.0), 1: StepRange(0.0, 0.75)}),
    "sum, colour LoRA at 2": ((2.0, 1.0, 1.0), {}),
}
CHOSEN_RANGES = "steps: shape LoRA 0-0.75"  # the best at 1.0 each; the shipped stacking workflow's setting


@torch.no_grad()
def generate(model, prompts: list[str], seed: int, variety: SeedVariety | None = None, batch: int = 64,
             lora_steps=None) -> Tensor:
    """Decoded 8-step / cfg-1 images from fixed noises (the seed), optionally with seed variety (its seed offset by
    the batch start, so every batch draws its own shifts / caption noise) and the stack's step ranges."""
    noise = fixed_noise(len(prompts), seed)
    out = []
    for i in range(0, len(prompts), batch):
        caps = [world.encode_text(p) for p in prompts[i:i + batch]]
        vary = None if variety is None else SeedVariety(variety.strength, variety.steps, variety.seed + i,
                                                        variety.mode)
        out.append(sample(model, noise[i:i + batch], caps, steps=STEPS, cfg=CFG, variety=vary, lora_steps=lora_steps))
    return decode(torch.cat(out))


def share(images: Tensor, prompts: list[str]) -> dict:
    """Fidelity (colour and shape as prompted) and each half alone."""
    preds = classify(images)
    want = [world.parse(p) for p in prompts]
    n = len(prompts)
    return {"fid": fidelity(images, prompts),
            "colour": sum(p[0] == w[0] for p, w in zip(preds, want)) / n,
            "shape": sum(p[1] == w[1] for p, w in zip(preds, want)) / n}


def repeat(prompts: list[str], total: int) -> list[str]:
    return [prompts[i % len(prompts)] for i in range(total)]


# ---------------------------------------------------------------------------------------------- stacking
def measure_stack(model, stack, mode: str, n: int, step_ranges: dict[int, StepRange] | None = None) -> dict:
    combo = [COMBINATION] * n
    colour_set = repeat(world.concept_prompts(world.NEW_COLOUR), n)
    shape_set = repeat(world.concept_prompts(world.NEW_SHAPE), n)
    base = repeat(world.base_prompts(), n)
    with apply_loras(model, stack, combine=mode, keep_apart={len(stack) - 1}, step_ranges=step_ranges) as handle:
        steps = handle.schedule
        images = generate(model, combo, seed=7, lora_steps=steps)
        row = share(images, combo)
        row.update(sharp=sharpness(images, combo), edge=edge_sharpness(images, combo))
        row["colour_lora_kept"] = fidelity(generate(model, colour_set, seed=9, lora_steps=steps), colour_set)
        row["shape_lora_kept"] = fidelity(generate(model, shape_set, seed=10, lora_steps=steps), shape_set)
        base_images = generate(model, base, seed=8, lora_steps=steps)
        row["base_fid"] = fidelity(base_images, base)
        row["base_sharp"] = sharpness(base_images, base)
        row["notes"] = [note for r in handle.reports for note in r.notes]
    row["images"] = images[:16]
    return row


def run_stacking(n: int = 48, log=print) -> dict:
    model = load_model("turbo")
    loras = [load_lora(lora_path(name)) for name in STACK_FILES]
    stack = [(lora, 1.0) for lora in loras]
    rows = {}
    reference = {"turbo alone": [], "colour LoRA + DistillPatch": [stack[0], stack[2]],
                 "shape LoRA + DistillPatch": [stack[1], stack[2]]}
    for label, sub in reference.items():
        t = time.time()
        with apply_loras(model, sub):
            combo = [COMBINATION] * n
            images = generate(model, combo, seed=7)
            base = repeat(world.base_prompts(), n)
            rows[label] = {**share(images, combo), "sharp": sharpness(images, combo),
                           "base_fid": fidelity(generate(model, base, seed=8), base)}
        log(f"{label}: {_line(rows[label])} ({time.time() - t:.0f} s)")
    for mode in COMBINE_MODES:
        t = time.time()
        rows[mode] = measure_stack(model, stack, mode, n)
        log(f"stack, combine={mode}: {_line(rows[mode])} ({time.time() - t:.0f} s)")
    # what users do today instead: the plain sum with the LoRAs turned down (the DistillPatch stays at 1.0)
    label = f"sum, LoRAs at {WORKAROUND_STRENGTH:g}"
    rows[label] = measure_stack(model, [(lora, WORKAROUND_STRENGTH) for lora in loras[:2]] + [stack[2]], "sum", n)
    log(f"stack, {label}: {_line(rows[label])}")
    for label, (strengths, ranges) in STEP_RANGE_ROWS.items():
        t = time.time()
        rows[label] = measure_stack(model, [(lora, s) for lora, s in zip(loras, strengths)], "sum", n, ranges)
        log(f"stack, {label}: {_line(rows[label])} ({time.time() - t:.0f} s)")
    return rows


def _line(row: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in row.items() if isinstance(v, float))


# ---------------------------------------------------------------------------------------------- seed variety
def layout(images: Tensor) -> tuple[Tensor, Tensor]:
    """Foreground centroid [B, 2] (x, y in pixels) and size [B] (square root of the foreground area) of each sample,
    with the metrics' foreground threshold."""
    strength = (images.clamp(0, 1) - world.BACKGROUND).norm(dim=1)
    fg = (strength > FOREGROUND).float()
    area = fg.sum((1, 2)).clamp_min(1.0)
    ys, xs = torch.meshgrid(torch.arange(world.IMG).float() + 0.5, torch.arange(world.IMG).float() + 0.5,
                            indexing="ij")
    centre = torch.stack([(fg * xs).sum((1, 2)) / area, (fg * ys).sum((1, 2)) / area], dim=1)
    return centre, area.sqrt()


def variety(images: Tensor, prompts: list[str]) -> dict:
    """Per prompt, averaged over prompts: the mean pairwise pixel RMSE between its samples, the spread of their
    positions (RMS distance of the centroids from their mean, pixels), how many of the 16 cells of an 8-px grid hold
    a centroid, and how many 1-px size bins appear."""
    figures = {"pairwise": [], "spread": [], "positions": [], "sizes": []}
    for prompt in sorted(set(prompts)):
        idx = [i for i, p in enumerate(prompts) if p == prompt]
        x = images[idx].flatten(1)
        figures["pairwise"].append(sum(float((x[a] - x[b]).pow(2).mean().sqrt())
                                       for a, b in itertools.combinations(range(len(idx)), 2))
                                   / (len(idx) * (len(idx) - 1) / 2))
        centre, size = layout(images[idx])
        figures["spread"].append(float((centre - centre.mean(0)).pow(2).sum(1).mean().sqrt()))
        figures["positions"].append(len({(int(cx // 8), int(cy // 8)) for cx, cy in centre.tolist()}))
        figures["sizes"].append(len({int(v) for v in size.tolist()}))
    return {k: sum(v) / len(v) for k, v in figures.items()}


VARIETY_CASES = {  # label -> (LoRA files, prompts): plain turbo, and a LoRA trained on 8 images (fewer layouts)
    "turbo, base prompts": ((), world.base_prompts()),
    f"turbo + {world.NEW_SHAPE} LoRA + DistillPatch, {world.NEW_SHAPE} prompts": (("lora_sft", "distill_patch"),
                                                                              world.concept_prompts(world.NEW_SHAPE)),
}


def run_variety(log=print) -> dict:
    """Per case: real data of the same prompts (the variety the world has), then every VARIETY_SETTINGS row; each
    row's figures are the mean over VARIETY_NOISE_SEEDS (independent sets of 16 seeds per prompt)."""
    model = load_model("turbo")
    results = {}
    for case, (files, base_prompts) in VARIETY_CASES.items():
        prompts = [p for p in base_prompts for _ in range(SEEDS_PER_PROMPT)]
        rows = {"real data (reference)": _mean_row([real_row(prompts, seed) for seed in VARIETY_NOISE_SEEDS])}
        with apply_loras(model, [(load_lora(lora_path(name)), 1.0) for name in files]):
            for mode, strength, steps in VARIETY_SETTINGS:
                t = time.time()
                label = "off" if mode == "off" else f"{mode} {strength:g}, {steps} step{'s' * (steps > 1)}"
                sets = []
                for seed in VARIETY_NOISE_SEEDS:
                    option = None if mode == "off" else SeedVariety(strength, steps, seed=1000 * seed, mode=mode)
                    images = generate(model, prompts, seed=seed, variety=option)
                    sets.append({**variety(images, prompts), "fid": fidelity(images, prompts),
                                 "sharp": sharpness(images, prompts),
                                 "images": images[:SEEDS_PER_PROMPT]})  # the first prompt's 16 seeds, for the grid
                rows[label] = _mean_row(sets)
                log(f"variety, {case}, {label}: {_line(rows[label])} ({time.time() - t:.0f} s)")
        results[case] = rows
    return results


def real_row(prompts: list[str], seed: int) -> dict:
    real = world.prompt_batch(prompts, generator=torch.Generator().manual_seed(seed))
    return {**variety(real, prompts), "fid": fidelity(real, prompts), "sharp": sharpness(real, prompts),
            "images": real[:SEEDS_PER_PROMPT]}


def _mean_row(sets: list[dict]) -> dict:
    """The figures averaged over the seed sets, the first set's images."""
    return {**{k: sum(s[k] for s in sets) / len(sets) for k in sets[0] if k != "images"}, "images": sets[0]["images"]}


# ---------------------------------------------------------------------------------------------- report
def tables(stacking: dict, varieties: dict) -> str:
    lines = [f"Stack: colour LoRA + shape LoRA + DistillPatch at 1.0 each, prompt '{COMBINATION}', {STEPS} steps, "
             f"cfg {CFG:g}:", "",
             f"| stack / combine | as prompted | colour | shape | sharp | {world.NEW_COLOUR} kept | {world.NEW_SHAPE} kept "
             f"| base kept |",
             "|---|---|---|---|---|---|---|---|"]
    for label, r in stacking.items():
        lines.append(f"| {label} | {r['fid']:.2f} | {r['colour']:.2f} | {r['shape']:.2f} | {r['sharp']:.2f} | "
                     f"{r.get('colour_lora_kept', float('nan')):.2f} | {r.get('shape_lora_kept', float('nan')):.2f} "
                     f"| {r['base_fid']:.2f} |")
    for case, rows in varieties.items():
        off = rows["off"]  # the ratios are against the sampler without the option
        lines += ["", f"Seed variety, {case}: {SEEDS_PER_PROMPT} seeds per prompt, mean of {len(VARIETY_NOISE_SEEDS)} "
                      f"seed sets, {STEPS} steps, cfg {CFG:g}:", "",
                  "| seed variety | pairwise RMSE | x off | position spread (px) | x off | positions (of 16 cells) "
                  "| sizes | fid | sharp |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for label, r in rows.items():
            lines.append(f"| {label} | {r['pairwise']:.3f} | {r['pairwise'] / off['pairwise']:.2f} | "
                         f"{r['spread']:.1f} | {r['spread'] / off['spread']:.2f} | {r['positions']:.1f} | "
                         f"{r['sizes']:.1f} | {r['fid']:.2f} | {r['sharp']:.2f} |")
    return "\n".join(lines)


def save_grid(rows: dict[str, Tensor], path: Path, scale: int = 3, label_width: int = 200) -> None:
    """One labelled row of 16 images per entry, nearest-upscaled."""
    from PIL import Image, ImageDraw
    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows.values()], dim=1)  # [3, H*rows, W*16]
    grid = torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    pixels = Image.fromarray((grid.clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy())
    canvas = Image.new("RGB", (pixels.width + label_width, pixels.height), "white")
    canvas.paste(pixels, (label_width, 0))
    draw = ImageDraw.Draw(canvas)
    row_height = pixels.height // len(rows)
    for i, label in enumerate(rows):
        draw.text((6, i * row_height + row_height // 2 - 6), label, fill="black")
    canvas.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(WEIGHTS.parent / "stacking.json"))
    p.add_argument("--grids", default=None, help="folder for the PNG grids (e.g. docs/)")
    p.add_argument("--samples", type=int, default=48, help="samples per prompt set in the stacking part")
    p.add_argument("--part", choices=("both", "stacking", "variety"), default="both")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    stacking = run_stacking(args.samples) if args.part != "variety" else {}
    varieties = run_variety() if args.part != "stacking" else {}
    # a part not re-run keeps its figures from the last run's --out file, so the tables stay whole
    last = json.loads(Path(args.out).read_text()) if args.part != "both" and Path(args.out).exists() else {}
    kept_stacking = stacking or last.get("stacking", {})
    kept_variety = varieties or last.get("variety", {})
    md = tables(kept_stacking, kept_variety)
    if args.grids:
        out = Path(args.grids)
        if stacking:
            save_grid({m: stacking[m]["images"] for m in (*COMBINE_MODES, *STEP_RANGE_ROWS)},
                      out / "lora_stacking_grid.png", label_width=260)
            save_grid({"sum": stacking["sum"]["images"][:8], CHOSEN_RANGES: stacking[CHOSEN_RANGES]["images"][:8]},
                      out / "lora_stacking_sum_vs_steps.png", scale=6, label_width=180)  # the README's picture
        for i, rows in enumerate(varieties.values()):
            save_grid({label: r["images"] for label, r in rows.items()}, out / f"seed_variety_grid_{i + 1}.png")
        if varieties:  # the LoRA case's 16 seeds of one prompt, without and with the shipped setting
            lora_rows = list(varieties.values())[-1]
            save_grid({"off": lora_rows["off"]["images"], SHIPPED_VARIETY: lora_rows[SHIPPED_VARIETY]["images"]},
                      out / "seed_variety_off_on.png", label_width=130)
    strip = lambda rows: {k: {n: v for n, v in r.items() if n != "images"} for k, r in rows.items()}  # noqa: E731
    Path(args.out).write_text(json.dumps({"stacking": strip(kept_stacking),
                                          "variety": {case: strip(rows) for case, rows in kept_variety.items()},
                                          "setup": {"samples": args.samples, "seeds_per_prompt": SEEDS_PER_PROMPT,
                                                    "variety_noise_seeds": VARIETY_NOISE_SEEDS,
                                                    "stack": STACK_FILES}}, indent=1))
    Path(args.out).with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
