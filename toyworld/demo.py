"""The toy world in one run: a labelled sample grid (turbo vs the SFT LoRA vs the three remedies, at 8 steps / cfg 1
and 30 steps / cfg 2, on fixed noises) and the metrics table, written to OUTDIR.

    PYTHONPATH=. python -m toyworld.demo OUTDIR [--per-prompt 2]

Runs on the shipped weights in toyworld/weights through zimage_core's API (load_transformer, apply_loras, sample);
the toy VAE and word-vector captions are not ComfyUI's Flux VAE / Qwen3 encoder. Takes about a minute on one core."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from . import WEIGHTS, world
from .evaluate import decode, generate, load_model, loras_applied, lora_path, table
from .metrics import edge_sharpness, fidelity, sharpness
from .vae import to_pil

def demo_rows(concept: str) -> list[tuple[str, list[str]]]:
    x = "" if concept == world.NEW_SHAPE else f"_{concept}"
    return [
        ("turbo", []),
        ("1 SFT", [f"lora_sft{x}"]),
        ("2 differential", [f"lora_differential{x}"]),
        ("3 SFT + traj. imitation", [f"lora_trajectory{x}"]),
        ("4 SFT + DistillPatch", [f"lora_sft{x}", "distill_patch"]),
    ]


SETTINGS = [("8 st cfg 1", 8, 1.0), ("30 st cfg 2", 30, 2.0)]


def _label_strip(text: str, width: int, height: int):
    from PIL import Image, ImageDraw
    strip = Image.new("RGB", (width, height), (255, 255, 255))
    ImageDraw.Draw(strip).text((4, height // 2 - 6), text, fill=(0, 0, 0))
    return strip


def render_grid(rows: list[tuple[str, torch.Tensor]], prompts: list[str], path: Path, scale: int = 3) -> Path:
    from PIL import Image
    cell = world.IMG * scale
    label_w, head_h, pad = 190, 28, 2
    width = label_w + len(prompts) * (cell + pad)
    height = head_h + len(rows) * (cell + pad)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    from PIL import ImageDraw
    draw = ImageDraw.Draw(canvas)
    for j, p in enumerate(prompts):
        draw.text((label_w + j * (cell + pad) + 2, 2), p.replace(" ", "\n"), fill=(0, 0, 0))
    for i, (label, images) in enumerate(rows):
        y = head_h + i * (cell + pad)
        canvas.paste(_label_strip(label, label_w, cell), (0, y))
        for j, image in enumerate(images):
            canvas.paste(to_pil(image).resize((cell, cell), Image.NEAREST), (label_w + j * (cell + pad), y))
    canvas.save(path)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outdir")
    p.add_argument("--per-prompt", type=int, default=2, help="samples per prompt in the grid")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = load_model("turbo")
    base = [world.caption(c, s) for c, s in zip(world.COLOUR_NAMES, world.BASE_SHAPES + ("circle",))]
    quick, grids = {}, []
    for concept in world.CONCEPTS:
        concept_prompts = world.concept_prompts(concept)
        concept_set = [q for q in concept_prompts for _ in range(args.per_prompt)]
        prompts = concept_set + base
        grid_rows = [("real data", world.prompt_batch(prompts, generator=torch.Generator().manual_seed(args.seed)))]
        for label, names in demo_rows(concept):
            if any(not lora_path(n).exists() for n in names):
                print(f"{concept} / {label}: weights missing, skipped")
                continue
            with loras_applied(model, [(lora_path(n), 1.0) for n in names]):
                for setting, steps, cfg in SETTINGS:
                    images = decode(generate(model, prompts, steps, cfg, seed=args.seed))
                    grid_rows.append((f"{label}\n{setting}", images))
                    c = images[:len(concept_set)]
                    quick[f"{concept}: {label} | {setting}"] = {
                        "sharp": round(sharpness(c, concept_set), 3), "edge": round(edge_sharpness(c, concept_set), 3),
                        "concept fid": round(fidelity(c, concept_set), 3),
                        "base fid": round(fidelity(images[len(concept_set):], base), 3)}
        grids.append(render_grid(grid_rows, prompts, out / f"toyworld_grid_{concept}.png"))
    lines = ["# Toy world demo", "",
             "Grids: " + ", ".join(g.name for g in grids) + " (columns: prompts; rows: real data, then each scheme at "
             "8 steps / cfg 1 and 30 steps / cfg 2, same noises). New concepts: the shape word 'bar' and the colour "
             "word 'purple', each trained by the scheme's LoRA; the last 4 columns are base prompts.", "",
             "## Metrics on these grid samples (small sample, indicative)", "",
             "| concept: scheme, setting | sharp | edge | concept fid | base fid |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['sharp']:.2f} | {v['edge']:.2f} | {v['concept fid']:.2f} | {v['base fid']:.2f} |"
              for k, v in quick.items()]
    shipped = WEIGHTS.parent / "results.json"
    if shipped.exists():
        lines += ["", "## The measured table (toyworld/results.json, produced by `python -m toyworld.evaluate`)", "",
                  table(json.loads(shipped.read_text()))]
        shutil.copy(shipped, out / "toyworld_results.json")
    (out / "toyworld_table.md").write_text("\n".join(lines) + "\n")
    (out / "toyworld_quick.json").write_text(json.dumps(quick, indent=1))
    print("\n".join(lines))
    print(f"wrote {', '.join(str(g) for g in grids)} and {out / 'toyworld_table.md'} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
