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
from zimage_core.training.turbo_check import turbo_check

from . import WEIGHTS, world
from .metrics import edge_sharpness, fidelity, shape_accuracy, sharpness
from .vae import ToyVAE

SETTINGS = {"8 st cfg 1": (8, 1.0), "30 st cfg 2": (30, 2.0), "4 st cfg 1": (4, 1.0), "2 st cfg 1": (2, 1.0)}
FAST, SLOW = "8 st cfg 1", "30 st cfg 2"
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


def measure(model, prompts: list[str], steps: int, cfg: float, seed: int, reference=None) -> dict:
    """Metrics of the samples (toyworld.metrics) and, against `reference` latents of the same prompts and noises,
    the turbo check (zimage_core.training.turbo_check: score, match, sharpness; higher keeps the Turbo)."""
    latents = generate(model, prompts, steps, cfg, seed)
    images = decode(latents)
    row = {"sharp": sharpness(images, prompts), "edge": edge_sharpness(images, prompts),
           "fid": fidelity(images, prompts), "shape_acc": shape_accuracy(images, prompts)}
    if reference is not None:
        row["turbo_check"] = turbo_check({"x": latents}, reference)["x"]
    return row, latents


def lora_path(name: str) -> Path:
    return WEIGHTS / f"{name}.safetensors"


def _suffix(concept: str) -> str:
    return "" if concept == world.NEW_SHAPE else f"_{concept}"


def scheme_rows(concept: str = world.NEW_SHAPE) -> list[tuple[str, str, list[tuple[str, float]], tuple[str, ...]]]:
    """(label, base model, [(lora file, strength)], settings) of every evaluated variant for one concept. The
    30-step / cfg-2 setting is measured where the claim needs it (scheme 1 recovers there; turbo for scale); the
    fewer-steps rows (trajectory imitation for 4 and 2 steps) at their own step counts."""
    L = lambda n: str(lora_path(n))  # noqa: E731
    x = _suffix(concept)
    fast, both = (FAST,), (FAST, SLOW)
    rows = [
        ("turbo (no LoRA)", "turbo", [], both + ("4 st cfg 1",)),
        ("1 SFT LoRA", "turbo", [(L(f"lora_sft{x}"), 1.0)], both + ("4 st cfg 1", "2 st cfg 1")),
        ("2 differential LoRA (adapter dropped)", "turbo", [(L(f"lora_differential{x}"), 1.0)], fast),
        ("2 differential LoRA + adapter kept", "turbo", [(L(f"lora_differential{x}"), 1.0),
                                                         (L("training_adapter"), 1.0)], fast),
        ("3 SFT + trajectory imitation", "turbo", [(L(f"lora_trajectory{x}"), 1.0)], fast + ("4 st cfg 1",)),
        ("4 SFT + DistillPatch", "turbo", [(L(f"lora_sft{x}"), 1.0), (L("distill_patch"), 1.0)], fast),
        ("3 trajectory imitation for 4 steps", "turbo", [(L(f"lora_trajectory4{x}"), 1.0)], ("4 st cfg 1",)),
        ("3 trajectory imitation for 2 steps", "turbo", [(L(f"lora_trajectory2{x}"), 1.0)], ("2 st cfg 1",)),
    ]
    if concept == world.NEW_SHAPE:  # concept-independent models, measured once (their base-prompt columns matter)
        rows += [
            ("adapter only (de-distilled turbo)", "turbo", [(L("training_adapter"), 1.0)], fast),
            ("generic SFT (DistillPatch's teacher)", "turbo", [(L("generic_sft"), 1.0)], fast),
            ("generic SFT + DistillPatch", "turbo", [(L("generic_sft"), 1.0), (L("distill_patch"), 1.0)], fast),
            ("turbo + DistillPatch", "turbo", [(L("distill_patch"), 1.0)], fast),
        ]
    return rows


def run_concept(concept: str, per_prompt: int = 12, base_per_prompt: int = 4, seed: int = 7, log=print,
                only: str | None = None) -> dict:
    """per_prompt: samples per shape-concept prompt (48 in all; the colour concept gets the same total over its 3
    prompts). Turbo-check reference: the concept's SFT LoRA at 30 steps / cfg 2 on the same noises (what the
    concept looks like at full quality). only: measure just the rows whose label contains it (and scheme 1, the
    reference), e.g. to add the fewer-steps rows to an existing table."""
    models, results, reference = {}, {}, None
    base = prompt_set(world.base_prompts(), base_per_prompt)
    prompts = world.concept_prompts(concept)
    concept_set = prompt_set(prompts, per_prompt * 4 // len(prompts))
    for label, base_name, loras, settings in scheme_rows(concept):
        if only and only not in label and label != "1 SFT LoRA":
            continue
        if any(not Path(p).exists() for p, _ in loras):
            log(f"{concept} / {label}: weights missing, skipped")
            continue
        model = models.setdefault(base_name, load_model(base_name))
        t = time.time()
        row = {}
        with loras_applied(model, loras):
            for setting in sorted(settings, key=lambda s: s != SLOW):  # the reference first
                steps, cfg = SETTINGS[setting]
                row[setting], latents = measure(model, concept_set, steps, cfg, seed,
                                                None if setting == SLOW else reference)
                if label == "1 SFT LoRA" and setting == SLOW:
                    reference = latents
                if setting == FAST or label == "1 SFT LoRA":  # base prompts: what the LoRA did to the world
                    row[setting]["base"], _ = measure(model, base, steps, cfg, seed + 1)
        results[label] = row
        log(f"{concept} / {label}: " + " | ".join(
            f"{s}: sharp {r['sharp']:.2f} fid {r['fid']:.2f}"
            + (f" base-fid {r['base']['fid']:.2f}" if "base" in r else "")
            + (f" turbo {r['turbo_check']['score']:.2f}" if "turbo_check" in r else "")
            for s, r in row.items()) + f" ({time.time() - t:.0f} s)")
    return results


def run_base_models(base_per_prompt: int = 8, seed: int = 9, log=print) -> dict:
    """The world itself: real data, the teacher (at the turbo's distillation guidance, cfg 4, and at 8 / cfg 1)
    and the turbo, on the 12 base prompts."""
    rows = {}
    base_more = prompt_set(world.base_prompts(), base_per_prompt)
    real = world.prompt_batch(base_more, generator=torch.Generator().manual_seed(seed))
    rows["real data"] = {"sharp": sharpness(real, base_more), "edge": edge_sharpness(real, base_more),
                         "fid": fidelity(real, base_more), "shape_acc": shape_accuracy(real, base_more)}
    models = {}
    for name, steps, cfg in (("teacher", 50, 4.0), ("teacher", 30, 2.0), ("teacher", 8, 1.0), ("turbo", 8, 1.0),
                             ("turbo", 4, 1.0), ("turbo", 2, 1.0), ("turbo", 30, 2.0)):
        model = models.setdefault(name, load_model(name))
        rows[f"{name} {steps} st cfg {cfg:g}"], _ = measure(model, base_more, steps, cfg, seed)
        log(f"base prompts, {name} {steps} st cfg {cfg:g}: fid {rows[f'{name} {steps} st cfg {cfg:g}']['fid']:.2f}")
    return rows


def run(per_prompt: int = 12, base_per_prompt: int = 4, seed: int = 7, parts=None, log=print, only=None) -> dict:
    parts = parts or [*world.CONCEPTS, "_base_models"]
    results = {}
    for part in parts:
        results[part] = run_base_models(log=log) if part == "_base_models" else run_concept(
            part, per_prompt, base_per_prompt, seed, log, only)
    results["_setup"] = {"concept_samples": per_prompt * 4, "base_samples": base_per_prompt * 12, "seed": seed,
                         "base_models_samples": 96, "turbo_check_reference": "the concept's SFT LoRA, 30 st cfg 2"}
    return results


FRESH_SEEDS, FRESH_SAMPLES = (11, 12), 192


def fresh_prompts(prompts: list[str]) -> list[str]:
    """FRESH_SAMPLES prompts, the given ones in turn."""
    return prompt_set(prompts, FRESH_SAMPLES // len(prompts))


def drawn_as_prompted(model, prompts: list[str], seed: int, steps: int = 8, cfg: float = 1.0) -> float:
    """The share of the model's samples of the prompts (noises from seed) drawn as prompted."""
    return fidelity(decode(generate(model, prompts, steps, cfg, seed)), prompts)


# What every remedy copies at 8 steps: the concept's SFT LoRA at full quality (the turbo check's reference).
FULL_QUALITY = "1 SFT LoRA, 30 st cfg 2 (what the remedies copy)"


def fresh_check(log=print) -> dict:
    """The issue's figures on noises the tables never use (their 48 samples per cell carry +- 0.06): the share drawn
    as prompted at 8 steps / cfg 1 by the turbo and each scheme, on FRESH_SAMPLES concept and base-prompt samples per
    seed in FRESH_SEEDS; and the concept's SFT LoRA at 30 steps / cfg 2 (FULL_QUALITY), the picture the remedies
    imitate at 8 steps."""
    model, out = load_model("turbo"), {}
    base = fresh_prompts(world.base_prompts())
    for concept in world.CONCEPTS:
        prompts = fresh_prompts(world.concept_prompts(concept))
        schemes = scheme_rows(concept)[:6]  # turbo, the four schemes (differential twice)
        sft_loras = dict((label, loras) for label, _, loras, _ in schemes)["1 SFT LoRA"]
        settings = [(FULL_QUALITY, sft_loras, (30, 2.0), {"concept": prompts})]
        settings += [(label, loras, (8, 1.0), {"concept": prompts, "base": base}) for label, _, loras, _ in schemes]
        for label, loras, (steps, cfg), prompt_sets in settings:
            with loras_applied(model, loras):
                row = {which: [drawn_as_prompted(model, ps, seed, steps, cfg) for seed in FRESH_SEEDS]
                       for which, ps in prompt_sets.items()}
            out.setdefault(concept, {})[label] = row
            figures = (f"{which} " + " / ".join(f"{f:.2f}" for f in shares) for which, shares in row.items())
            log(f"{concept} / {label}: " + ", ".join(figures))
    return out


def _cell(row: dict, setting: str, key: str, base: bool = False) -> str:
    r = row.get(setting, {})
    r = r.get("base", {}) if base else r
    value = r.get("turbo_check", {}).get("score") if key == "turbo" else r.get(key)
    return "–" if value is None else f"{value:.2f}"


def table(results: dict) -> str:
    """Per concept: 8 st cfg 1 (sharp: HF energy vs real data; edge: HF energy per unit of gradient energy vs real
    data; fid: concept fidelity; turbo: the turbo check's score against the SFT LoRA's 30 st cfg 2 samples; base
    sharp / fid: the same LoRA on the 12 base prompts), then 30 st cfg 2; then the fewer-steps rows."""
    lines = []
    for concept in [c for c in results if not c.startswith("_")]:
        prompts = ", ".join(world.concept_prompts(concept)) if concept in world.CONCEPTS else concept
        rows = results[concept]
        lines += ["", f"Concept '{concept}' ({prompts}):", "",
                  "| model / scheme | 8 st cfg 1: sharp | edge | fid | turbo check | base sharp | base fid "
                  "| 30 st cfg 2: sharp | edge | fid | base fid |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for label, row in rows.items():
            if FAST not in row:
                continue
            cells = [_cell(row, FAST, k) for k in ("sharp", "edge", "fid", "turbo")]
            cells += [_cell(row, FAST, "sharp", True), _cell(row, FAST, "fid", True)]
            cells += [_cell(row, SLOW, k) for k in ("sharp", "edge", "fid")] + [_cell(row, SLOW, "fid", True)]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        few = [(label, s) for label, row in rows.items() for s in ("4 st cfg 1", "2 st cfg 1") if s in row]
        if few:
            lines += ["", f"Fewer steps, concept '{concept}' (turbo check against the same 30 st cfg 2 reference):", "",
                      "| model / scheme, setting | sharp | edge | fid | turbo check | match | sharpness | base fid |",
                      "|---|---|---|---|---|---|---|---|"]
            for label, s in sorted(few, key=lambda x: x[1], reverse=True):
                r = rows[label][s]
                tc = r.get("turbo_check", {})
                parts = " | ".join(f"{tc[k]:.2f}" if k in tc else "–" for k in ("score", "match", "sharpness"))
                lines.append(f"| {label}, {s} | {r['sharp']:.2f} | {r['edge']:.2f} | {r['fid']:.2f} | {parts} | "
                             f"{_cell(rows[label], s, 'fid', True)} |")
    if "_base_models" in results:
        lines += ["", "Base prompts (pretraining data), 96 samples:", "",
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
    p.add_argument("--parts", help="comma-separated subset of the concepts and _base_models (run in parallel, then "
                                   "--combine)")
    p.add_argument("--combine", nargs="+", help="merge these partial results files into --out (later files add rows)")
    p.add_argument("--only", help="measure only the rows whose label contains this (and scheme 1, the reference)")
    p.add_argument("--fresh", action="store_true", help="only the issue's figures on fresh noises (fresh_check), "
                                                        "printed and written to toyworld/fresh.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.fresh:
        (WEIGHTS.parent / "fresh.json").write_text(json.dumps(fresh_check(), indent=1))
        return
    if args.combine:
        results = {}
        for part in args.combine:
            for key, value in json.loads(Path(part).read_text()).items():
                if isinstance(value, dict) and isinstance(results.get(key), dict):
                    results[key].update(value)
                else:
                    results[key] = value
    else:
        results = run(args.per_prompt, args.base_per_prompt, parts=args.parts.split(",") if args.parts else None,
                      only=args.only)
    Path(args.out).write_text(json.dumps(results, indent=1))
    md = table(results)
    Path(args.out).with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
