"""Measure the four "keep the Turbo" schemes on the toy world and print / write the table.

    PYTHONPATH=. python -m toyworld.evaluate [--out toyworld/results.json] [--per-prompt 12]

Every model is the shipped turbo (or teacher) with LoRAs applied through zimage_core.lora.apply_loras; samples use
zimage_core.sample on fixed noises and the toy VAE; metrics are toyworld.metrics."""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from zimage_core import apply_loras, load_lora, load_transformer, sample

from . import WEIGHTS, world
from .metrics import edge_sharpness, fidelity, shape_accuracy, sharpness
from .vae import ToyVAE

SETTINGS = {"8 st cfg 1": (8, 1.0), "30 st cfg 2": (30, 2.0)}
LATENT_SHAPE = (16, 16, 16)


def load_model(name: str = "turbo", dtype=torch.float32):
    return load_transformer(WEIGHTS / f"{name}.safetensors", dtype=dtype)


def fixed_noise(n: int, seed: int) -> torch.Tensor:
    return torch.randn((n, *LATENT_SHAPE), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def generate(model, prompts: list[str], steps: int, cfg: float, seed: int = 0, batch: int = 64) -> torch.Tensor:
    """Latents for the prompts from fixed noises (seed), negative = the empty prompt."""
    noise = fixed_noise(len(prompts), seed)
    empty = world.encode_text("")
    out = []
    for i in range(0, len(prompts), batch):
        caps = [world.encode_text(p) for p in prompts[i:i + batch]]
        out.append(sample(model, noise[i:i + batch], caps, [empty] * len(caps), steps=steps, cfg=cfg))
    return torch.cat(out)


def decode(latents: torch.Tensor) -> torch.Tensor:
    return ToyVAE.load().decode(latents).clamp(0, 1)


@contextmanager
def loras_applied(model, loras):
    """loras: [(LoraWeights or path, strength)]; merged for speed, removed bit-exactly afterwards."""
    handle = apply_loras(model, [(load_lora(l) if isinstance(l, (str, Path)) else l, s) for l, s in loras],
                         mode="merge") if loras else None
    try:
        yield model
    finally:
        if handle is not None:
            handle.remove()


def prompt_set(prompts: list[str], per_prompt: int) -> list[str]:
    return [p for _ in range(per_prompt) for p in prompts]


def measure(model, prompts: list[str], steps: int, cfg: float, seed: int) -> dict:
    images = decode(generate(model, prompts, steps, cfg, seed))
    return {"sharp": sharpness(images, prompts), "edge": edge_sharpness(images, prompts),
            "fid": fidelity(images, prompts),
            "shape_acc": shape_accuracy(images, prompts)}


def lora_path(name: str) -> Path:
    return WEIGHTS / f"{name}.safetensors"


def scheme_rows(concept: str = "cross") -> list[tuple[str, str, list[tuple[str, float]]]]:
    """(label, base model, [(lora file, strength)]) of every evaluated variant for one concept."""
    L = lambda n: str(lora_path(n))  # noqa: E731
    x = "" if concept == "cross" else f"_{concept}"
    rows = [
        ("turbo (no LoRA)", "turbo", []),
        ("1 SFT LoRA", "turbo", [(L(f"lora_sft{x}"), 1.0)]),
        ("2 differential LoRA (adapter dropped)", "turbo", [(L(f"lora_differential{x}"), 1.0)]),
        ("2 differential LoRA + adapter kept", "turbo", [(L(f"lora_differential{x}"), 1.0),
                                                         (L("training_adapter"), 1.0)]),
        ("3 SFT + trajectory imitation", "turbo", [(L(f"lora_trajectory{x}"), 1.0)]),
        ("4 SFT + DistillPatch", "turbo", [(L(f"lora_sft{x}"), 1.0), (L("distill_patch"), 1.0)]),
    ]
    if concept == "cross":  # concept-independent models, measured once
        rows[1:1] = [("teacher (no LoRA)", "teacher", [])]
        rows += [
            ("adapter only (de-distilled turbo)", "turbo", [(L("training_adapter"), 1.0)]),
            ("generic SFT (DistillPatch's teacher)", "turbo", [(L("generic_sft"), 1.0)]),
            ("generic SFT + DistillPatch", "turbo", [(L("generic_sft"), 1.0), (L("distill_patch"), 1.0)]),
            ("turbo + DistillPatch", "turbo", [(L("distill_patch"), 1.0)]),
        ]
    return rows


def run(per_prompt: int = 12, base_per_prompt: int = 4, seed: int = 7, log=print) -> dict:
    """per_prompt: samples per cross prompt (48 in all; the purple concept gets the same total over its 3 prompts)."""
    models = {}
    results = {}
    base = prompt_set(world.base_prompts(), base_per_prompt)
    for concept in world.CONCEPTS:
        prompts = world.concept_prompts(concept)
        concept_set = prompt_set(prompts, per_prompt * 4 // len(prompts))
        results[concept] = {}
        for label, base_name, loras in scheme_rows(concept):
            if any(not Path(p).exists() for p, _ in loras) or not (WEIGHTS / f"{base_name}.safetensors").exists():
                log(f"{concept} / {label}: weights missing, skipped")
                continue
            model = models.setdefault(base_name, load_model(base_name))
            t = time.time()
            row = {}
            with loras_applied(model, loras):
                for setting, (steps, cfg) in SETTINGS.items():
                    row[setting] = measure(model, concept_set, steps, cfg, seed)
                    row[setting]["base"] = measure(model, base, steps, cfg, seed + 1)
            results[concept][label] = row
            log(f"{concept} / {label}: " + " | ".join(
                f"{s}: sharp {r['sharp']:.2f} edge {r['edge']:.2f} fid {r['fid']:.2f} base-fid {r['base']['fid']:.2f}"
                for s, r in row.items()) + f" ({time.time() - t:.0f} s)")
    world_rows = {}
    base_more = prompt_set(world.base_prompts(), base_per_prompt * 2)
    real = world.prompt_batch(base_more, generator=torch.Generator().manual_seed(seed))
    world_rows["real data"] = {"sharp": sharpness(real, base_more), "edge": edge_sharpness(real, base_more),
                               "fid": fidelity(real, base_more),
                               "shape_acc": shape_accuracy(real, base_more)}
    for name, steps, cfg in (("teacher", 50, 2.0), ("teacher", 8, 1.0), ("turbo", 8, 1.0), ("turbo", 30, 2.0)):
        if name in models:
            world_rows[f"{name} {steps} st cfg {cfg:g}"] = measure(models[name], base_more, steps, cfg, seed + 2)
    results["_base_models"] = world_rows
    log("base prompts: " + "; ".join(f"{k}: sharp {v['sharp']:.2f} fid {v['fid']:.2f}" for k, v in world_rows.items()))
    results["_setup"] = {"concept_samples": per_prompt * 4, "base_samples": len(base), "seed": seed}
    return results


def table(results: dict) -> str:
    """sharp: HF energy vs real data; edge: HF energy per unit of gradient energy vs real data (blur regardless of
    how much outline or contrast the content has); fid: concept fidelity; base: the same on the 12 base prompts."""
    lines = []
    for concept in world.CONCEPTS:
        if concept not in results:
            continue
        prompts = ", ".join(world.concept_prompts(concept))
        lines += ["", f"Concept '{concept}' ({prompts}):", "",
                  "| model / scheme | 8 st cfg 1: sharp | edge | fid | base sharp | base edge | base fid "
                  "| 30 st cfg 2: sharp | edge | fid | base sharp | base edge | base fid |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for label, row in results[concept].items():
            cells = []
            for setting in SETTINGS:
                r, b = row[setting], row[setting]["base"]
                cells += [f"{r['sharp']:.2f}", f"{r.get('edge', float('nan')):.2f}", f"{r['fid']:.2f}",
                          f"{b['sharp']:.2f}", f"{b.get('edge', float('nan')):.2f}", f"{b['fid']:.2f}"]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if "_base_models" in results:
        lines += ["", "Base prompts (pretraining data), sampled from more noises:", "",
                  "| model, setting | sharp | edge | fid (colour and shape) | shape accuracy |",
                  "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['sharp']:.2f} | {v.get('edge', float('nan')):.2f} | {v['fid']:.2f} | {v['shape_acc']:.2f} |"
                  for k, v in results["_base_models"].items()]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(WEIGHTS.parent / "results.json"))
    p.add_argument("--per-prompt", type=int, default=12)
    p.add_argument("--base-per-prompt", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = run(args.per_prompt, args.base_per_prompt)
    Path(args.out).write_text(json.dumps(results, indent=1))
    md = table(results)
    Path(args.out).with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
