"""The toy world (toyworld/): the claim this pack exists for, measured on a model trained by this project.

On the shipped weights (toyworld/weights, built once by `python -m toyworld.build`), through zimage_core's loader,
LoRA engine, sampler and turbo check: the turbo draws the base world at 8 steps / cfg 1; an ordinary SFT LoRA learns
a new shape ("bar") and a new colour ("purple") but is blurry at 8 steps / cfg 1 and recovers at 30 steps / cfg 2;
each remedy (differential LoRA, trajectory imitation, DistillPatch) draws the concept at 8 steps / cfg 1, sharper,
with a better turbo check; trajectory imitation for 4 and 2 steps beats the SFT LoRA there; trained with output
preservation, the LoRAs keep most base prompts. What is not reached is a strict xfail with the measured reason.
Every test takes seconds; none trains anything."""

from __future__ import annotations

import functools

import pytest
import torch

from toyworld import WEIGHTS, world
from toyworld.evaluate import (FRESH_SEEDS, decode, drawn_as_prompted, fresh_prompts, generate, load_model,
                               loras_applied, lora_path)
from toyworld.metrics import classify, fidelity, sharpness
from toyworld.vae import ToyVAE
from zimage_core.training.turbo_check import turbo_check

SHIPPED = ["vae", "teacher", "turbo", "training_adapter", "lora_sft", "lora_differential", "lora_trajectory",
           "lora_trajectory4", "lora_trajectory2", "lora_sft_purple", "lora_differential_purple",
           "lora_trajectory_purple", "lora_trajectory4_purple", "lora_trajectory2_purple", "generic_sft", "distill_patch"]
pytestmark = pytest.mark.skipif(not all((WEIGHTS / f"{n}.safetensors").exists() for n in SHIPPED),
                                reason="toyworld weights not built (python -m toyworld.build)")

PER_PROMPT = 12  # the table's setup (toyworld.evaluate): 48 concept samples, 48 base samples, seed 7
SEED = 7
REMEDIES = [("lora_differential",), ("lora_trajectory",), ("lora_sft", "distill_patch")]
REMEDY_IDS = ["2-differential", "3-trajectory", "4-distillpatch"]
# Issue #19 asks >= 0.9 (turbo, base prompts), >= 0.8 (each remedy, concept) and >= 0.8 (base prompts kept with
# the LoRA). Measured on these noises (toyworld/RESULTS.md): turbo 0.90 here, 0.93 on the table's 96 noises; remedies
# 0.90-0.92 on "bar", 0.65-0.83 on "purple" (on 192 fresh samples 0.89-0.94 and 0.71-0.77, against 0.95 and 0.81 for
# the SFT LoRA at 30 steps / cfg 2); base prompts kept 0.88-0.98 with output preservation (0.08-0.23 without). The
# thresholds assert what holds with a margin under those figures; what misses is a strict xfail.
BASE_FID_MIN = 0.85
TURBO_FID_ISSUE = 0.9  # on the table's 96 base samples (seed 9): 0.93
LEARNED_AT_30 = 0.8  # scheme 1 at 30 steps / cfg 2: bar 0.94, purple 0.88 (2 x 192 fresh: 0.95 / 0.92, 0.81 / 0.72)
REMEDY_FID_MIN = {"bar": 0.8, "purple": 0.6}
REMEDY_FID_ISSUE = 0.8
BASE_FID_KEPT = 0.8  # the issue's figure: 0.88-0.98
BASE_FID_PRESERVED = 0.75  # the SFT LoRAs and every remedy with output preservation: 0.88-0.98 (without: 0.08-0.23)
PURPLE_SHORT = pytest.mark.xfail(strict=True, reason=(
    "purple at 8 steps / cfg 1 on 192 fresh samples: differential 0.71, trajectory imitation 0.77, SFT + DistillPatch "
    "0.77 drawn as prompted, under the issue's 0.8 (on the table's 48: 0.65 / 0.83 / 0.67), because the purple SFT "
    "LoRA they imitate draws only 0.81 / 0.72 even at 30 steps / cfg 2 on 2 x 192 fresh samples (its squares read as "
    "circles at 8 steps); the remedies keep 0.87-1.04 of that (toyworld/RESULTS.md, 'Where it falls short')"))


@pytest.fixture(scope="module")
def turbo():
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    return load_model("turbo")


_MODELS: dict[int, object] = {}


@functools.lru_cache(maxsize=None)
def _samples(model_id: int, loras: tuple[str, ...], steps: int, cfg: float, which: str):
    model = _MODELS[model_id]
    if which == "base":
        prompts = [p for _ in range(PER_PROMPT // 3) for p in world.base_prompts()]
        seed = SEED + 1
    else:
        concept = world.concept_prompts(which)
        prompts = [p for _ in range(PER_PROMPT * 4 // len(concept)) for p in concept]
        seed = SEED
    with loras_applied(model, [(lora_path(n), 1.0) for n in loras]):
        latents = generate(model, prompts, steps, cfg, seed=seed)
    return latents, prompts


def samples(model, loras=(), steps=8, cfg=1.0, which=world.NEW_SHAPE):
    """(latents, prompts) of `model` + loras on a concept's (or the base) prompts from the table's fixed noises."""
    _MODELS[id(model)] = model
    return _samples(id(model), tuple(loras), steps, cfg, which)


def measure(model, loras=(), steps=8, cfg=1.0, which=world.NEW_SHAPE) -> tuple[float, float]:
    """(sharpness, fidelity) of the decoded samples."""
    latents, prompts = samples(model, loras, steps, cfg, which)
    images = decode(latents)
    return sharpness(images, prompts), fidelity(images, prompts)


def turbo_score(model, loras, concept, steps=8) -> float:
    """The turbo check's score of loras at `steps` / cfg 1 against the concept's SFT LoRA at 30 steps / cfg 2."""
    reference, _ = samples(model, names(concept, "lora_sft"), 30, 2.0, concept)
    candidate, _ = samples(model, loras, steps, 1.0, concept)
    return turbo_check({"x": candidate}, reference)["x"]["score"]


def names(concept: str, *stems: str) -> list[str]:
    """LoRA file stems of a concept's scheme LoRAs (generic ones, e.g. distill_patch, unchanged)."""
    x = "" if concept == world.NEW_SHAPE else f"_{concept}"
    return [s + x if s.startswith("lora_") else s for s in stems]


_FRESH: dict[tuple, float] = {}


def fresh_fidelity(model, concept: str, loras: list[str], steps: int = 8, cfg: float = 1.0) -> float:
    """Share drawn as prompted on FRESH_SAMPLES concept samples from fresh_check's first seed (cached: two tests
    read the same figures)."""
    key = (concept, tuple(loras), steps, cfg)
    if key not in _FRESH:
        with loras_applied(model, [(lora_path(n), 1.0) for n in loras]):
            _FRESH[key] = drawn_as_prompted(model, fresh_prompts(world.concept_prompts(concept)), FRESH_SEEDS[0],
                                            steps, cfg)
    return _FRESH[key]


# ---------------------------------------------------------------------------------------------- the world itself
def test_vae_is_exact_and_metrics_rank_real_data():
    gen = torch.Generator().manual_seed(0)
    prompts = world.base_prompts() + world.concept_prompts()
    images = world.prompt_batch(prompts * 4, generator=gen)
    vae = ToyVAE.load()
    latents = vae.encode(images)
    assert latents.shape == (64, 16, 16, 16)
    assert (vae.decode(latents) - images).abs().max() < 1e-4
    assert fidelity(images, prompts * 4) == 1.0
    assert 0.8 < sharpness(images, prompts * 4) < 1.2
    blurred = torch.nn.functional.avg_pool2d(images, 3, 1, 1)
    assert sharpness(blurred, prompts * 4) < 0.5
    bars = images[len(world.base_prompts()):len(prompts)]
    assert classify(bars) == [world.parse(p) for p in world.concept_prompts()]
    purple = world.concept_prompts("purple") * 4
    assert fidelity(world.prompt_batch(purple, generator=gen), purple) >= 0.9


def test_shipped_files_use_the_real_layouts():
    from zimage_core import inspect_checkpoint, load_lora
    cfg_t, layout_t = inspect_checkpoint(WEIGHTS / "teacher.safetensors")
    cfg_u, layout_u = inspect_checkpoint(WEIGHTS / "turbo.safetensors")
    assert cfg_t == cfg_u and cfg_u.cap_feat_dim == world.CAP_DIM
    assert layout_t != layout_u  # ComfyUI single-file (teacher) and diffusers (turbo) names
    assert load_lora(WEIGHTS / "distill_patch.safetensors").format == "diffsynth"
    for name in SHIPPED[3:-1]:
        assert load_lora(WEIGHTS / f"{name}.safetensors").format == "zimage-turbo-nodes"
    total = sum(f.stat().st_size for f in WEIGHTS.glob("*.safetensors"))
    assert total < 20 * 2 ** 20  # tens of MB at most (issue #19)


def test_turbo_is_a_distilled_teacher(turbo):
    """Turbo draws the base world at 8 steps / cfg 1 and is sharper there than the teacher at 8 steps / cfg 1."""
    teacher = load_model("teacher")
    sharp_t, fid_t = measure(teacher, which="base")
    sharp_u, fid_u = measure(turbo, which="base")
    assert fid_u >= BASE_FID_MIN, fid_u
    assert sharp_u > 1.2 * sharp_t, (sharp_u, sharp_t)


def test_turbo_draws_base_prompts_as_prompted_in_90_percent(turbo):
    """The issue's figure on the table's base-model set: 8 samples per base prompt, seed 9 (measured 0.93)."""
    prompts = [p for _ in range(8) for p in world.base_prompts()]
    assert fidelity(decode(generate(turbo, prompts, 8, 1.0, seed=9)), prompts) >= TURBO_FID_ISSUE


# ---------------------------------------------------------------------------------------------- the claim
@pytest.mark.parametrize("lora", ["generic_sft", "training_adapter"])
def test_an_ordinary_fm_lora_blurs_turbo_at_8_steps(turbo, lora):
    """Plain flow-matching LoRAs trained on generic data (real images; turbo's own outputs at low lr) de-distil."""
    base, _ = measure(turbo, which="base")
    blurred, _ = measure(turbo, [lora], which="base")
    assert blurred < 0.9 * base, (blurred, base)


def test_distill_patch_restores_a_generic_sft(turbo):
    sft, _ = measure(turbo, ["generic_sft"], which="base")
    patched, _ = measure(turbo, ["generic_sft", "distill_patch"], which="base")
    assert patched > 1.15 * sft, (patched, sft)


@pytest.mark.parametrize("concept", world.CONCEPTS)
def test_scheme_1_learns_the_concept_blurry_at_8_steps_and_recovers_at_30_steps_cfg_2(turbo, concept):
    fast, fast_fid = measure(turbo, names(concept, "lora_sft"), which=concept)
    slow, fid = measure(turbo, names(concept, "lora_sft"), steps=30, cfg=2.0, which=concept)
    _, turbo_fid = measure(turbo, steps=30, cfg=2.0, which=concept)
    assert slow > 1.1 * fast, (slow, fast)
    assert fid >= LEARNED_AT_30 and fid >= fast_fid and turbo_fid < 0.2, (fid, fast_fid, turbo_fid)


@pytest.mark.parametrize("concept, stems", [
    pytest.param(c, stems, id=f"{c}-{i}") for c in world.CONCEPTS for stems, i in zip(REMEDIES, REMEDY_IDS)])
def test_each_remedy_draws_the_concept_at_8_steps_sharper_than_sft(turbo, stems, concept):
    sft, sft_fid = measure(turbo, names(concept, "lora_sft"), which=concept)
    fixed, fid = measure(turbo, names(concept, *stems), which=concept)
    assert fixed > 1.05 * sft, (fixed, sft)  # measured 1.06x (purple + DistillPatch) to 1.42x (bar, trajectory)
    assert fid >= REMEDY_FID_MIN[concept] and fid >= sft_fid, (fid, sft_fid)


@pytest.mark.parametrize("concept, stems", [
    pytest.param(c, stems, id=f"{c}-{i}", marks=PURPLE_SHORT if c == world.NEW_COLOUR else ())
    for c in world.CONCEPTS for stems, i in zip(REMEDIES, REMEDY_IDS)])
def test_each_remedy_reaches_the_issues_figure(turbo, stems, concept):
    """On FRESH_SAMPLES samples from noises the table never used (toyworld.evaluate.fresh_check's first seed; the
    table's 48 samples carry +- 0.06): bar measured 0.89-0.94."""
    fid = fresh_fidelity(turbo, concept, names(concept, *stems))
    assert fid >= REMEDY_FID_ISSUE, fid


KEPT_OF_FULL_QUALITY = 0.85  # measured on seed 11: bar 0.93-0.98, purple 0.87-0.95 (seed 12: 0.94-0.99, 0.94-1.04)


@pytest.mark.parametrize("concept", world.CONCEPTS)
def test_each_remedy_draws_at_8_steps_what_its_lora_draws_at_full_quality(turbo, concept):
    """What keeping the Turbo means for content: each remedy at 8 steps / cfg 1 draws the concept about as often as
    the concept's SFT LoRA does at 30 steps / cfg 2 (the picture it imitates), on the same fresh samples; purple's
    remedies miss the issue's 0.8 because that full-quality figure is itself 0.81 / 0.72."""
    full = fresh_fidelity(turbo, concept, names(concept, "lora_sft"), 30, 2.0)
    kept = [fresh_fidelity(turbo, concept, names(concept, *stems)) / full for stems in REMEDIES]
    assert min(kept) >= KEPT_OF_FULL_QUALITY, (full, kept)


@pytest.mark.parametrize("concept", world.CONCEPTS)
def test_output_preservation_keeps_most_base_prompts(turbo, concept):
    """The concept LoRAs are trained with output preservation (the concept word replaced by the base words it must
    not take over); without it every LoRA drew its concept for every prompt (base prompts 0.08-0.23)."""
    kept = [measure(turbo, names(concept, *stems), which="base")[1] for stems in [("lora_sft",), *REMEDIES]]
    assert min(kept) >= BASE_FID_PRESERVED, kept


@pytest.mark.parametrize("concept", world.CONCEPTS)
def test_the_remedies_keep_the_base_prompts(turbo, concept):
    kept = [measure(turbo, names(concept, *stems), which="base")[1] for stems in REMEDIES]
    assert min(kept) >= BASE_FID_KEPT, kept


@pytest.mark.parametrize("concept, stems", [
    pytest.param(c, stems, id=f"{c}-{i}") for c in world.CONCEPTS for stems, i in zip(REMEDIES, REMEDY_IDS)])
def test_turbo_check_ranks_every_remedy_above_plain_sft(turbo, stems, concept):
    """The pack's turbo check (zimage_core.training.turbo_check), higher = keeps the Turbo: every remedy scores
    above the SFT LoRA at 8 steps / cfg 1, and the model without any LoRA (which does not draw the concept) below."""
    sft = turbo_score(turbo, names(concept, "lora_sft"), concept)
    fixed = turbo_score(turbo, names(concept, *stems), concept)
    none = turbo_score(turbo, [], concept)
    assert fixed > sft > none, (fixed, sft, none)


@pytest.mark.parametrize("concept", world.CONCEPTS)
def test_differential_lora_is_blurry_with_its_adapter_and_sharp_without(turbo, concept):
    kept, _ = measure(turbo, names(concept, "lora_differential", "training_adapter"), which=concept)
    dropped, _ = measure(turbo, names(concept, "lora_differential"), which=concept)
    assert kept < 0.92 * dropped, (kept, dropped)


@pytest.mark.parametrize("concept", world.CONCEPTS)
@pytest.mark.parametrize("steps", [4, 2])
def test_trajectory_imitation_for_fewer_steps_beats_sft_there(turbo, concept, steps):
    """Scheme 3 trained for 4 (or 2) student steps, sampled at that many steps / cfg 1, against the SFT LoRA there."""
    stem = f"lora_trajectory{steps}"
    sft, sft_fid = measure(turbo, names(concept, "lora_sft"), steps=steps, which=concept)
    fewer, fid = measure(turbo, names(concept, stem), steps=steps, which=concept)
    assert fewer > 1.1 * sft and fid >= sft_fid - 0.05, (fewer, sft, fid, sft_fid)
    assert turbo_score(turbo, names(concept, stem), concept, steps=steps) > \
        turbo_score(turbo, names(concept, "lora_sft"), concept, steps=steps)


def test_step_ranges_draw_the_stacked_concepts(turbo):
    """Issue #20 on the shipped LoRAs: colour LoRA + shape LoRA + DistillPatch at 1.0 each, prompted with the
    combination. The plain sum loses the colour (measured 0.12 as prompted); the shape LoRA on steps 0-0.75 draws it
    (0.81) and keeps the base prompts (0.92; toyworld/stacking.md)."""
    from zimage_core import apply_loras, load_lora
    from zimage_core.scheduler import StepRange
    from toyworld.stacking import COMBINATION, STACK_FILES, generate, repeat, share

    stack = [(load_lora(lora_path(name)), 1.0) for name in STACK_FILES]  # colour, shape, DistillPatch
    combo, base = [COMBINATION] * 48, repeat(world.base_prompts(), 48)
    drawn = {}
    for label, ranges in (("sum", {}), ("ranged", {1: StepRange(0.0, 0.75)})):
        with apply_loras(turbo, stack, keep_apart={2}, step_ranges=ranges) as handle:
            drawn[label] = share(generate(turbo, combo, seed=7, lora_steps=handle.schedule), combo)["fid"]
            if ranges:
                drawn["base"] = share(generate(turbo, base, seed=8, lora_steps=handle.schedule), base)["fid"]
    assert drawn["ranged"] >= 0.6 and drawn["ranged"] >= drawn["sum"] + 0.3 and drawn["base"] >= 0.8, drawn
