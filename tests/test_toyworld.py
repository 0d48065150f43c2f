"""The toy world (toyworld/): the claim this pack exists for, measured on a model trained by this project.

On the shipped weights (toyworld/weights, built once by `python -m toyworld.build`), through zimage_core's loader,
LoRA engine and sampler: an ordinary SFT LoRA makes 8-step / cfg-1 samples blurry, each remedy (differential LoRA,
trajectory imitation, DistillPatch) restores their sharpness, and the scheme-1 LoRA is sharper at 30 steps / cfg 2.
Every test takes seconds; none trains the teacher."""

from __future__ import annotations

import functools

import pytest
import torch

from toyworld import WEIGHTS, world
from toyworld.evaluate import decode, generate, load_model, loras_applied, lora_path
from toyworld.metrics import classify, fidelity, sharpness
from toyworld.vae import ToyVAE

SHIPPED = ["vae", "teacher", "turbo", "training_adapter", "lora_sft", "lora_differential", "lora_trajectory",
           "lora_sft_purple", "lora_differential_purple", "lora_trajectory_purple", "generic_sft", "distill_patch"]
pytestmark = pytest.mark.skipif(not all((WEIGHTS / f"{n}.safetensors").exists() for n in SHIPPED),
                                reason="toyworld weights not built (python -m toyworld.build)")

PER_PROMPT = 12  # the table's setup (toyworld.evaluate): 48 concept samples, 48 base samples, seed 7
SEED = 7
BASE_FID_MIN = 0.5


@pytest.fixture(scope="module")
def turbo():
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    return load_model("turbo")


_MODELS: dict[int, object] = {}


@functools.lru_cache(maxsize=None)
def _measure(model_id: int, loras: tuple[str, ...], steps: int, cfg: float, which: str) -> tuple[float, float]:
    model = _MODELS[model_id]
    if which == "base":
        prompts = [p for _ in range(PER_PROMPT // 3) for p in world.base_prompts()]
        seed = SEED + 1
    else:
        concept = world.concept_prompts(which)
        prompts = [p for _ in range(PER_PROMPT * 4 // len(concept)) for p in concept]
        seed = SEED
    with loras_applied(model, [(lora_path(n), 1.0) for n in loras]):
        images = decode(generate(model, prompts, steps, cfg, seed=seed))
    return sharpness(images, prompts), fidelity(images, prompts)


def measure(model, loras=(), steps=8, cfg=1.0, which="cross") -> tuple[float, float]:
    """(sharpness, fidelity) of `model` + loras on a concept's (or the base) prompts from the table's fixed noises."""
    _MODELS[id(model)] = model
    return _measure(id(model), tuple(loras), steps, cfg, which)


def names(concept: str, *stems: str) -> list[str]:
    """LoRA file stems of a concept's scheme LoRAs (generic ones, e.g. distill_patch, unchanged)."""
    x = "" if concept == "cross" else f"_{concept}"
    return [s + x if s.startswith("lora_") else s for s in stems]


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
    crosses = images[len(world.base_prompts()):len(prompts)]
    assert classify(crosses) == [world.parse(p) for p in world.concept_prompts()]
    purple = world.concept_prompts("purple") * 4
    assert fidelity(world.prompt_batch(purple, generator=gen), purple) >= 0.9


def test_shipped_files_use_the_real_layouts():
    from zimage_core import inspect_checkpoint, load_lora
    cfg_t, layout_t = inspect_checkpoint(WEIGHTS / "teacher.safetensors")
    cfg_u, layout_u = inspect_checkpoint(WEIGHTS / "turbo.safetensors")
    assert cfg_t == cfg_u and cfg_u.cap_feat_dim == world.CAP_DIM
    assert layout_t != layout_u  # ComfyUI single-file (teacher) and diffusers (turbo) names
    assert load_lora(WEIGHTS / "distill_patch.safetensors").format == "diffsynth"
    for name in ("training_adapter", "lora_sft", "lora_differential", "lora_trajectory", "generic_sft",
                 "lora_sft_purple", "lora_differential_purple", "lora_trajectory_purple"):
        assert load_lora(WEIGHTS / f"{name}.safetensors").format == "zimage-turbo-nodes"
    total = sum(f.stat().st_size for f in WEIGHTS.glob("*.safetensors"))
    assert total < 16 * 2 ** 20


def test_turbo_is_a_distilled_teacher(turbo):
    """Turbo draws the base world at 8 steps / cfg 1 and is sharper there than the teacher at 8 steps / cfg 1."""
    teacher = load_model("teacher")
    sharp_t, fid_t = measure(teacher, which="base")
    sharp_u, fid_u = measure(turbo, which="base")
    assert fid_u >= BASE_FID_MIN, fid_u
    assert sharp_u > 1.2 * sharp_t, (sharp_u, sharp_t)


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


@pytest.mark.parametrize("concept", [
    pytest.param("cross", marks=pytest.mark.xfail(strict=True, reason=(
        "not reproduced for the new shape: the SFT LoRA turns turbo's blobs into spiky crosses, whose extra outline "
        "and edge artefacts outweigh the de-distillation blur (toyworld/RESULTS.md)"))),
    "purple"])
def test_concept_sft_lora_blurs_turbo_at_8_steps(turbo, concept):
    base, _ = measure(turbo, which=concept)
    sft, _ = measure(turbo, names(concept, "lora_sft"), which=concept)
    assert sft < 0.9 * base, (sft, base)


@pytest.mark.parametrize("concept", world.CONCEPTS)
@pytest.mark.parametrize("stems", [("lora_differential",), ("lora_trajectory",), ("lora_sft", "distill_patch")],
                         ids=["2-differential", "3-trajectory", "4-distillpatch"])
def test_each_remedy_is_sharper_than_sft_and_holds_the_concept(turbo, stems, concept):
    sft, sft_fid = measure(turbo, names(concept, "lora_sft"), which=concept)
    fixed, fid = measure(turbo, names(concept, *stems), which=concept)
    _, turbo_fid = measure(turbo, which=concept)
    assert fixed > 1.1 * sft, (fixed, sft)
    assert fid >= turbo_fid + 0.1 and fid >= sft_fid - 0.1, (fid, sft_fid, turbo_fid)


@pytest.mark.parametrize("concept", world.CONCEPTS)
def test_differential_lora_is_blurry_with_its_adapter_and_sharp_without(turbo, concept):
    kept, _ = measure(turbo, names(concept, "lora_differential", "training_adapter"), which=concept)
    dropped, _ = measure(turbo, names(concept, "lora_differential"), which=concept)
    assert kept < 0.92 * dropped, (kept, dropped)


@pytest.mark.parametrize("concept", world.CONCEPTS)
def test_scheme_1_is_sharper_at_30_steps_cfg_2_and_learned_the_concept(turbo, concept):
    fast, fast_fid = measure(turbo, names(concept, "lora_sft"), which=concept)
    slow, fid = measure(turbo, names(concept, "lora_sft"), steps=30, cfg=2.0, which=concept)
    _, turbo_fid = measure(turbo, steps=30, cfg=2.0, which=concept)
    assert slow > 1.1 * fast, (slow, fast)
    assert fid >= turbo_fid + 0.15 and fid >= fast_fid, (fid, fast_fid, turbo_fid)
