"""Z-Image base (the non-distilled model): told apart from Turbo by name, sampled with its own recipe, trained with the
schemes that make sense on it, and its LoRA sampled on Turbo with the DistillPatch.

The "base" checkpoint here is a tiny random model of the same architecture as the Turbo one (they share every tensor
name and shape), saved under Comfy-Org's base file name so that the loader's auto detection is what is tested."""

import pytest
import torch
from safetensors import safe_open

from comfy_fixtures import comfy_host, comfy_models, t2i_prompt, train_prompt, write_tiny_transformer  # noqa: F401
from zimage_core.sampling import BASE, QUALITY, TURBO
from zimage_core.training import TrainConfig
from zimage_core.training.config import ConfigError
from zimage_core.variants import REFERENCE_RECIPE, detect_variant

BASE_FILE = "z_image_bf16.safetensors"  # Comfy-Org/z_image split_files/diffusion_models


@pytest.mark.parametrize("name,variant", [
    ("z_image_bf16.safetensors", "base"), ("z_image.safetensors", "base"), ("Z-Image/", "base"),
    ("z_image_fp8_e4m3fn.safetensors", "base"), ("zimage_base_v1.safetensors", "base"),
    ("z_image_de_turbo_v1_bf16.safetensors", "base"),  # ostris' de-distilled Turbo samples like base
    ("z_image_turbo_bf16.safetensors", "turbo"), ("Z-Image-Turbo/", "turbo"), ("zimage_tiny.safetensors", "turbo"),
    ("my_finetune_v3.safetensors", "turbo"),  # unknown names: Turbo (most fine-tunes are of Turbo)
])
def test_variant_from_the_file_name(name, variant):
    assert detect_variant(name) == variant


def test_base_recipe_is_the_official_one():
    """DiffSynth-Studio's Z-Image.py (num_inference_steps=50, cfg_scale=4) and ComfyUI's image_z_image template
    (KSampler 50 steps, cfg 4, ModelSamplingAuraFlow shift 3, empty negative)."""
    assert (BASE.steps, BASE.cfg) == (50, 4.0)
    assert REFERENCE_RECIPE == {"turbo": QUALITY, "base": BASE}


@pytest.mark.parametrize("scheme", ["differential", "trajectory"])
def test_turbo_keeping_schemes_are_refused_on_base(scheme):
    config = TrainConfig(scheme=scheme, model_variant="base", preset_lora="adapter.safetensors",
                         init_lora="sft.safetensors")
    with pytest.raises(ConfigError, match=rf"scheme '{scheme}'.*model_variant 'base'.*not distilled"):
        config.validate_settings()
    TrainConfig(scheme="sft", model_variant="base").validate_settings()
    TrainConfig(scheme="distillpatch", model_variant="base").validate_settings()
    with pytest.raises(ConfigError, match="model_variant must be one of turbo, base"):
        TrainConfig(model_variant="lightning").validate_settings()


@pytest.fixture(scope="module")
def base_file(comfy_host, comfy_models):
    path = comfy_host.models_dir / "diffusion_models" / BASE_FILE
    write_tiny_transformer(path, seed=5)
    yield BASE_FILE
    path.unlink()


def _core_reference(host, m, seed, steps, cfg, negative_text, model_seed):
    """zimage_core.sample on the same weights with KSampler's noise and the demo captions (see test_comfy_nodes)."""
    import comfy.latent_formats
    import comfy.sample
    from zimage_core import sample
    from zimage_core.testing import tiny_model

    fmt = comfy.latent_formats.Flux()
    noise = comfy.sample.prepare_noise(torch.zeros(1, 16, 4, 4), seed)
    hashed = host.pack_module("nodes.demo").hashed_features
    with torch.no_grad():
        out = sample(tiny_model(model_seed), noise, [hashed("a fox", m.config.cap_feat_dim)[0]],
                     [hashed(negative_text, m.config.cap_feat_dim)[0]], steps=steps, cfg=cfg, shift=3.0)
    return fmt.process_out(out.float())


@pytest.mark.slow
def test_base_checkpoint_through_loader_and_base_preset(comfy_host, comfy_models, base_file):
    """The loader names the variant (auto from the file name) and the sampler's base preset is exactly 50 steps at
    cfg 4 with the connected (empty) negative prompt."""
    m = comfy_models
    prompt = t2i_prompt(m, transformer=base_file, preset="base", seed=9, size=32, save=False, text="a fox")
    prompt["9"] = {"class_type": "ZImageTurboDemoConditioning", "inputs": {"text": "", "width": 2560,
                                                                          "model": ["1", 0]}}
    prompt["5"]["inputs"]["negative"] = ["9", 0]
    result = comfy_host.run(prompt, fresh=True)
    assert result.success, result.error
    assert result.output("1", 0).variant == "base" and "Z-Image base" in result.ui["1"]["text"][0]
    expected = _core_reference(comfy_host, m, 9, BASE.steps, BASE.cfg, "", model_seed=5)
    torch.testing.assert_close(result.output("5", 0)["samples"], expected, rtol=0, atol=0)
    # the override wins over the name, and Turbo files stay Turbo
    prompt["1"]["inputs"]["variant"] = "turbo"
    assert comfy_host.run(prompt).output("1", 0).variant == "turbo"
    assert comfy_host.run(t2i_prompt(m, save=False, size=32)).output("1", 0).variant == "turbo"


@pytest.mark.slow
def test_train_on_base_then_sample_on_turbo_with_the_distillpatch(comfy_host, comfy_models, base_file):
    """Scheme sft on the base checkpoint: the run reports its turbo check against the base recipe, the LoRA records
    the variant, and the stack's loras_from puts the trained LoRA on Turbo next to the DistillPatch (8 steps, cfg 1),
    which equals loading the same LoRA file into the stack by name."""
    m = comfy_models
    prompt = train_prompt(m, scheme="sft", steps=2, output_name="trained_on_base")
    prompt["1"]["inputs"]["model_name"] = base_file
    prompt["20"] = {"class_type": "ZImageTurboModelLoader",
                    "inputs": {"model_name": m.transformer, "weight_dtype": "fp32", "offload": "none"}}
    prompt["21"] = {"class_type": "ZImageTurboLoraStack",
                    "inputs": {**prompt["2"]["inputs"], "model": ["20", 0], "loras_from": ["11", 0],
                               "distillpatch": m.distillpatch}}
    prompt["5"]["inputs"]["model"] = ["21", 0]
    result = comfy_host.run(prompt, fresh=True)
    assert result.success, result.error
    sampler_steps = {e.total for e in comfy_host.progress if e.node_id == "5"}  # the sampler's progress bar
    texts = [d["text"] for e, d in comfy_host.server.messages if e == "progress_text" and d["node"] == "11"]
    assert any(f"turbo check on Z-Image base" in t and f"{BASE.steps} steps cfg {BASE.cfg:g}" in t for t in texts)
    lora_file = comfy_host.models_dir / "loras" / result.output("11", 1)
    with safe_open(str(lora_file), framework="pt") as f:
        assert f.metadata()["model_variant"] == "base"
    on_turbo = result.output("21", 0)
    assert on_turbo.variant == "turbo" and [s.role for s in on_turbo.loras] == ["trained", "distillpatch"]
    assert "2 modules patched" not in result.ui["21"]["text"][0] and result.ui["21"]["text"][0].count("patched") == 2

    by_name = t2i_prompt(m, loras=[(lora_file.name, 1.0)], distillpatch=m.distillpatch, seed=42, size=32, save=False)
    reference = comfy_host.run(by_name, fresh=True)
    assert reference.success, reference.error
    torch.testing.assert_close(result.output("5", 0)["samples"], reference.output("5", 0)["samples"], rtol=0, atol=0)
    assert sampler_steps == {TURBO.steps} == {8}  # train_prompt's sampler (preset turbo) ran 8 steps on turbo


def test_turbo_keeping_scheme_on_base_is_an_error_naming_the_variant(comfy_host, comfy_models, base_file):
    prompt = train_prompt(comfy_models, scheme="differential", preset_lora=comfy_models.user_lora,
                          output_name="trained_base_differential")
    prompt["1"]["inputs"]["model_name"] = base_file
    result = comfy_host.run(prompt, fresh=True)
    assert not result.success
    assert "model_variant 'base'" in str(result.error) and "differential" in str(result.error)


@pytest.mark.slow
def test_fun_lora_distill_recipe_on_base(comfy_host, comfy_models, base_file):
    """The README recipe: base + a Fun-Lora-Distill-layout LoRA (VideoX-Fun `lora_unet__` keys, alpha = rank) in the
    stack, preset turbo (8 steps, cfg 1): the node's latent equals zimage_core's sample with the same LoRA."""
    import comfy.latent_formats
    import comfy.sample
    from safetensors.torch import save_file
    from zimage_core import apply_loras, load_lora, sample
    from zimage_core.testing import tiny_model

    m = comfy_models
    model = tiny_model(5)
    gen = torch.Generator().manual_seed(3)
    sd = {}
    for path, mod in model.named_modules():
        if path.endswith(("to_q", "to_k", "to_v", "w1", "w2", "w3")):
            stem = "lora_unet__" + path.replace(".", "_")
            sd[f"{stem}.lora_down.weight"] = 0.1 * torch.randn(4, mod.in_features, generator=gen)
            sd[f"{stem}.lora_up.weight"] = 0.1 * torch.randn(mod.out_features, 4, generator=gen)
            sd[f"{stem}.alpha"] = torch.tensor(4.0)
    name = "Z-Image-Fun-Lora-Distill-8-Steps-2603.safetensors"
    path = comfy_host.models_dir / "loras" / name
    save_file(sd, str(path))
    try:
        prompt = t2i_prompt(m, transformer=base_file, loras=[(name, 1.0)], preset="turbo", seed=3, size=32,
                            save=False, text="a fox")
        result = comfy_host.run(prompt, fresh=True)
        assert result.success, result.error
        assert "format videox-fun" in result.ui["2"]["text"][0]
        fmt = comfy.latent_formats.Flux()
        noise = comfy.sample.prepare_noise(torch.zeros(1, 16, 4, 4), 3)
        caption = comfy_host.pack_module("nodes.demo").hashed_features("a fox", m.config.cap_feat_dim)[0]
        with torch.no_grad(), apply_loras(model, [(load_lora(path), 1.0)]):
            expected = fmt.process_out(sample(model, noise, [caption], steps=8, cfg=1.0, shift=3.0).float())
        torch.testing.assert_close(result.output("5", 0)["samples"], expected, rtol=0, atol=0)
    finally:
        path.unlink()
