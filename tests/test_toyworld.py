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
           "generic_sft", "distill_patch"]
pytestmark = pytest.mark.skipif(not all((WEIGHTS / f"{n}.safetensors").exists() for n in SHIPPED),
                                reason="toyworld weights not built (python -m toyworld.build)")

PER_PROMPT = 4  # 16 concept samples per measurement
SEED = 11


@pytest.fixture(scope="module")
def turbo():
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    return load_model("turbo")


@functools.lru_cache(maxsize=None)
def _measure(model_id: int, loras: tuple[str, ...], steps: int, cfg: float) -> tuple[float, float]:
    model = _MODELS[model_id]
    prompts = [p for _ in range(PER_PROMPT) for p in world.concept_prompts()]
    with loras_applied(model, [(lora_path(n), 1.0) for n in loras]):
        images = decode(generate(model, prompts, steps, cfg, seed=SEED))
    return sharpness(images, prompts), fidelity(images, prompts)


_MODELS: dict[int, object] = {}


def measure(model, loras=(), steps=8, cfg=1.0):
    _MODELS[id(model)] = model
    return _measure(id(model), tuple(loras), steps, cfg)


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
    # a wrong prompt is caught: every red cross classified as a red cross, never as a circle
    assert {c for c in classify(images[len(world.base_prompts()):len(prompts)])} == {
        world.parse(p) for p in world.concept_prompts()}


def test_shipped_files_use_the_real_layouts():
    from zimage_core import inspect_checkpoint, load_lora
    cfg_t, layout_t = inspect_checkpoint(WEIGHTS / "teacher.safetensors")
    cfg_u, layout_u = inspect_checkpoint(WEIGHTS / "turbo.safetensors")
    assert cfg_t == cfg_u and cfg_u.cap_feat_dim == world.CAP_DIM
    assert "comfy" in layout_t.lower() and "diffusers" in layout_u.lower()
    assert load_lora(WEIGHTS / "distill_patch.safetensors").format == "diffsynth"
    for name in ("training_adapter", "lora_sft", "lora_differential", "lora_trajectory"):
        lora = load_lora(WEIGHTS / f"{name}.safetensors")
        assert lora.format == "zimage-turbo-nodes"
    total = sum(f.stat().st_size for f in WEIGHTS.glob("*.safetensors"))
    assert total < 16 * 2 ** 20


def test_turbo_draws_the_base_world_at_8_steps(turbo):
    prompts = [p for _ in range(2) for p in world.base_prompts()]
    images = decode(generate(turbo, prompts, 8, 1.0, seed=SEED))
    assert fidelity(images, prompts) >= BASE_FID_MIN


# ---------------------------------------------------------------------------------------------- the claim
def test_sft_lora_blurs_turbo_at_8_steps(turbo):
    base, _ = measure(turbo)
    sft, _ = measure(turbo, ["lora_sft"])
    assert sft < 0.9 * base, (sft, base)


@pytest.mark.parametrize("loras", [("lora_differential",), ("lora_trajectory",), ("lora_sft", "distill_patch")],
                         ids=["2-differential", "3-trajectory", "4-distillpatch"])
def test_each_remedy_restores_8_step_sharpness(turbo, loras):
    sft, _ = measure(turbo, ["lora_sft"])
    fixed, _ = measure(turbo, loras)
    assert fixed > 1.15 * sft, (fixed, sft)


def test_differential_lora_is_blurry_with_its_adapter_and_sharp_without(turbo):
    kept, _ = measure(turbo, ["lora_differential", "training_adapter"])
    dropped, _ = measure(turbo, ["lora_differential"])
    assert kept < 0.9 * dropped, (kept, dropped)


def test_scheme_1_is_sharper_at_30_steps_cfg_2(turbo):
    fast, _ = measure(turbo, ["lora_sft"])
    slow, _ = measure(turbo, ["lora_sft"], steps=30, cfg=2.0)
    assert slow > 1.15 * fast, (slow, fast)
