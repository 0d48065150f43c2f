"""The pack inside a real ComfyUI 0.3.75 (in-process host of tools/comfy_host.py; no mocks of ComfyUI).

Tiny Z-Image models, LoRAs, a random Flux-architecture VAE and a small dataset are written into the host's models
folder; prompts run through ComfyUI's own validation and PromptExecutor."""

from __future__ import annotations

import dataclasses
import gc
import json
import os

import pytest
import torch
from PIL import Image

from comfy_fixtures import NODE_IDS, comfy_host, comfy_models, t2i_prompt, train_prompt  # noqa: F401  (fixtures)
from comfy_host import write_dataset

pytestmark = pytest.mark.comfy

# A saved workflow stores inputs by id; renaming or retyping one silently breaks users' graphs. Change this snapshot
# only together with a migration note in the CHANGELOG.
INPUT_SNAPSHOT = {
    "ZImageTurboModelLoader": {
        "required": [("model_name", "COMBO"), ("weight_dtype", "COMBO"), ("offload", "COMBO")],
        "optional": [("variant", "COMBO"), ("compile", "COMBO"), ("attention", "COMBO"),
                     ("quantized_compute", "COMBO")],
    },
    "ZImageTurboLoraStack": {
        "required": [("model", "ZIMAGE_MODEL"), ("lora_1", "COMBO"), ("strength_1", "FLOAT"), ("lora_2", "COMBO"),
                     ("strength_2", "FLOAT"), ("lora_3", "COMBO"), ("strength_3", "FLOAT"),
                     ("distillpatch", "COMBO"), ("distillpatch_strength", "FLOAT")],
        "optional": [("loras_from", "ZIMAGE_MODEL"), ("strict", "BOOLEAN"), ("combine", "COMBO"),
                     ("start_1", "FLOAT"), ("end_1", "FLOAT"), ("start_2", "FLOAT"), ("end_2", "FLOAT"),
                     ("start_3", "FLOAT"), ("end_3", "FLOAT")],
    },
    "ZImageTurboSampler": {
        "required": [("model", "ZIMAGE_MODEL"), ("positive", "CONDITIONING"), ("latent_image", "LATENT"),
                     ("preset", "COMBO"), ("steps", "INT"), ("cfg", "FLOAT"), ("shift", "FLOAT"), ("seed", "INT"),
                     ("denoise", "FLOAT")],
        "optional": [("negative", "CONDITIONING"), ("control", "ZIMAGE_CONTROL"), ("sampler", "COMBO"),
                     ("variety", "FLOAT"), ("variety_steps", "INT"), ("variety_mode", "COMBO")],
    },
    "ZImageTurboTrainLora": {
        "required": [("model", "ZIMAGE_MODEL"), ("clip", "CLIP"), ("vae", "VAE"), ("dataset_folder", "STRING"),
                     ("scheme", "COMBO"), ("preset_lora", "COMBO"), ("sft_lora", "COMBO"), ("steps", "INT"),
                     ("learning_rate", "FLOAT"), ("rank", "INT"), ("targets", "STRING"), ("max_pixels", "INT"),
                     ("seed", "INT"), ("validation_prompt", "STRING"), ("output_name", "STRING")],
        "optional": [("batch_size", "INT"), ("grad_accum", "INT"), ("alpha", "FLOAT"), ("target_preset", "COMBO"),
                     ("optimizer", "COMBO"), ("lr_schedule", "COMBO"), ("warmup_steps", "INT"),
                     ("caption_dropout_rate", "FLOAT"), ("flip_horizontal", "BOOLEAN"), ("ema_decay", "FLOAT"),
                     ("validation_every", "INT"), ("save_every", "INT"), ("keep_last", "INT"),
                     ("checkpoint_inputs_on_host", "BOOLEAN"), ("preservation_weight", "FLOAT"),
                     ("preservation_trigger", "STRING"), ("preservation_classes", "STRING"),
                     ("preservation_blank", "BOOLEAN")],
    },
    "ZImageTurboControlNetLoader": {"required": [("controlnet_name", "COMBO"), ("weight_dtype", "COMBO")],
                                    "optional": []},
    "ZImageTurboApplyControlNet": {
        "required": [("controlnet", "ZIMAGE_CONTROLNET"), ("vae", "VAE"), ("strength", "FLOAT"), ("start", "FLOAT"),
                     ("end", "FLOAT")],
        "optional": [("image", "IMAGE"), ("inpaint_image", "IMAGE"), ("mask", "MASK"), ("control", "ZIMAGE_CONTROL")],
    },
    "ZImageTurboToModel": {"required": [("model", "ZIMAGE_MODEL")], "optional": []},
}
OUTPUT_SNAPSHOT = {
    "ZImageTurboModelLoader": ["ZIMAGE_MODEL"],
    "ZImageTurboLoraStack": ["ZIMAGE_MODEL"],
    "ZImageTurboSampler": ["LATENT"],
    "ZImageTurboTrainLora": ["ZIMAGE_MODEL", "STRING", "IMAGE", "IMAGE", "IMAGE"],
    "ZImageTurboControlNetLoader": ["ZIMAGE_CONTROLNET"],
    "ZImageTurboApplyControlNet": ["ZIMAGE_CONTROL"],
    "ZImageTurboToModel": ["MODEL"],
}


def _input_type(spec) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def loader_module(host):
    return host.pack_module("nodes.loader")


def _sampler_latent(result, node="5") -> torch.Tensor:
    return result.output(node, 0)["samples"]


# ----------------------------------------------------------------------------------------------- registration
def test_pack_loads_through_comfyui_loader_as_v3(comfy_host):
    pack = comfy_host.pack
    assert callable(pack.comfy_entrypoint)
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS"), "V1 mappings would make ComfyUI ignore the V3 entry point"
    for node_id in NODE_IDS:
        assert node_id in comfy_host.nodes.NODE_CLASS_MAPPINGS, f"{node_id} not registered"
        info = comfy_host.object_info(node_id)
        assert info["category"].startswith("ZImageTurbo")
        assert info["description"], f"{node_id} has no description"
    assert comfy_host.object_info("ZImageTurboTrainLora")["experimental"] is True
    for node_id in ("ZImageTurboDemoConditioning", "ZImageTurboDemoTextEncoder", "ZImageTurboDemoVAE"):
        assert comfy_host.object_info(node_id)["category"] == "ZImageTurbo/demo"


@pytest.mark.parametrize("node_id", NODE_IDS + ("ZImageTurboDemoConditioning", "ZImageTurboDemoTextEncoder",
                                                 "ZImageTurboDemoVAE"))
def test_every_input_and_output_has_a_tooltip(comfy_host, node_id):
    info = comfy_host.object_info(node_id)
    for group in ("required", "optional"):
        for name, spec in info["input"].get(group, {}).items():
            assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert len(info["output_tooltips"]) == len(info["output"])
    assert all(info["output_tooltips"]), f"{node_id} outputs without tooltips: {info['output_tooltips']}"


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_input_ids_and_types_snapshot(comfy_host, node_id):
    info = comfy_host.object_info(node_id)
    got = {group: [(name, _input_type(spec)) for name, spec in info["input"].get(group, {}).items()]
           for group in ("required", "optional")}
    assert got == INPUT_SNAPSHOT[node_id]
    assert info["input_order"]["required"] == [n for n, _ in INPUT_SNAPSHOT[node_id]["required"]]
    assert list(info["output"]) == OUTPUT_SNAPSHOT[node_id]


# ----------------------------------------------------------------------------------------------- generation
def test_text_to_image_with_user_lora_and_distillpatch(comfy_host, comfy_models):
    m = comfy_models
    result = comfy_host.run(t2i_prompt(m, loras=[(m.user_lora, 0.8)], distillpatch=m.distillpatch))
    assert result.success, result.error
    report = result.ui["2"]["text"][0]
    assert f"{m.user_lora} @ 0.8: format " in report and f"{m.distillpatch} [DistillPatch] @ 1" in report
    assert report.count(" modules patched, 0 keys left") == 2 and " 0 modules" not in report
    image = result.ui["8"]["images"][0]
    path = os.path.join(comfy_host.folder_paths.get_directory_by_type(image["type"]), image["subfolder"],
                        image["filename"])
    with Image.open(path) as im:
        assert im.size == (64, 64)
        lo, hi = im.convert("L").getextrema()
        assert hi > lo, "decoded image is constant"
    steps = [p for p in comfy_host.progress if p.node_id == "5"]
    assert [p.value for p in steps] == list(range(1, 9)) and all(p.total == 8 for p in steps)
    assert all(p.preview is not None and p.preview[0] == "JPEG" for p in steps), "no latent previews"
    texts = [d["text"] for e, d in comfy_host.server.messages if e == "progress_text" and d["node"] == "2"]
    assert texts and "DistillPatch" in texts[-1]


def _core_reference(host, m, text, seed, steps, cfg, latent=None, denoise=1.0, negative_text=None, loras=(),
                    model=None, combine="sum", variety=None, step_ranges=None):
    """What the sampler node must return, computed with zimage_core and ComfyUI's helpers directly: the noise of
    comfy.sample.prepare_noise (KSampler's), Flux process_in/out, zimage_core.sample on the same weights (`model`,
    default the tiny model the loader reads)."""
    import comfy.latent_formats
    import comfy.sample
    from zimage_core import sample
    from zimage_core.lora import apply_loras, load_lora
    from zimage_core.testing import tiny_model

    model = tiny_model(0) if model is None else model
    handle = apply_loras(model, [(load_lora(p), s) for p, s in loras], combine=combine,
                         keep_apart={i for i, (p, _) in enumerate(loras) if "distill" in str(p)},
                         step_ranges=step_ranges) if loras else None
    fmt = comfy.latent_formats.Flux()
    raw = latent if latent is not None else torch.zeros(1, 16, 4, 4)
    noise = comfy.sample.prepare_noise(raw, seed)
    start = fmt.process_in(raw) if torch.count_nonzero(raw) else torch.zeros_like(raw)
    hashed = host.pack_module("nodes.demo").hashed_features
    pos = [hashed(text, m.config.cap_feat_dim)[0]]
    neg = [hashed(negative_text, m.config.cap_feat_dim)[0]] if negative_text is not None else None
    with torch.no_grad():
        out = sample(model, noise, pos, neg, steps=steps, cfg=cfg, shift=3.0, denoise=denoise, init_latent=start,
                     variety=variety, lora_steps=handle.schedule if handle is not None else None)
    if handle is not None:
        handle.remove()
    return fmt.process_out(out.float())


def test_sampler_equals_zimage_core_sample_and_ksampler_noise(comfy_host, comfy_models):
    m = comfy_models
    prompt = t2i_prompt(m, seed=123, size=32, save=False, text="a blue house")
    result = comfy_host.run(prompt)
    assert result.success, result.error
    got = _sampler_latent(result)
    expected = _core_reference(comfy_host, m, "a blue house", seed=123, steps=8, cfg=1.0)
    assert got.shape == (1, 16, 4, 4)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # another seed gives other noise (the seed is used), and the quality preset (30 steps, cfg 2 with a negative)
    prompt = t2i_prompt(m, seed=7, size=32, save=False, text="a blue house", preset="quality")
    prompt["9"] = {"class_type": "ZImageTurboDemoConditioning",
                   "inputs": {"text": "blurry", "width": 2560, "model": ["1", 0]}}
    prompt["5"]["inputs"]["negative"] = ["9", 0]
    result = comfy_host.run(prompt)
    assert result.success, result.error
    expected = _core_reference(comfy_host, m, "a blue house", seed=7, steps=30, cfg=2.0, negative_text="blurry")
    torch.testing.assert_close(_sampler_latent(result), expected, rtol=0, atol=0)
    # a batch of 2: one noise draw for the whole batch, as KSampler
    prompt = t2i_prompt(m, seed=4, size=32, save=False, text="a blue house")
    prompt["4"]["inputs"]["batch_size"] = 2
    result = comfy_host.run(prompt)
    assert result.success, result.error
    expected = _core_reference(comfy_host, m, "a blue house", seed=4, steps=8, cfg=1.0, latent=torch.zeros(2, 16, 4, 4))
    torch.testing.assert_close(_sampler_latent(result), expected, rtol=0, atol=0)
    assert not torch.equal(expected[0], expected[1])


def test_image_to_image_applies_flux_process_in_and_ksampler_noise_scaling(comfy_host, comfy_models):
    m = comfy_models
    prompt = t2i_prompt(m, seed=5, size=32, save=False, text="a cat", preset="custom", steps=6)
    # image-to-image as users wire it: LoadImage -> VAEEncode (Flux VAE) -> sampler with denoise < 1
    prompt["20"] = {"class_type": "VAELoader", "inputs": {"vae_name": m.vae}}
    prompt["22"] = {"class_type": "LoadImage", "inputs": {"image": m.image}}
    prompt["23"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["22", 0], "vae": ["20", 0]}}
    prompt["5"]["inputs"]["latent_image"] = ["23", 0]
    prompt["5"]["inputs"]["denoise"] = 0.6
    result = comfy_host.run(prompt)
    assert result.success, result.error
    encoded = result.output("23", 0)["samples"]
    assert torch.count_nonzero(encoded) > 0
    expected = _core_reference(comfy_host, m, "a cat", seed=5, steps=6, cfg=1.0, latent=encoded, denoise=0.6)
    torch.testing.assert_close(_sampler_latent(result), expected, rtol=0, atol=0)


def test_empty_latent_image_4_channels_gets_ksampler_channel_fix(comfy_host, comfy_models):
    m = comfy_models
    prompt = t2i_prompt(m, seed=11, size=32, save=False, text="a tree")
    prompt["4"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}}
    result = comfy_host.run(prompt)
    assert result.success, result.error
    # KSampler widens an all-zero 4-channel latent to 16 channels before drawing the noise
    expected = _core_reference(comfy_host, m, "a tree", seed=11, steps=8, cfg=1.0)
    torch.testing.assert_close(_sampler_latent(result), expected, rtol=0, atol=0)


def test_lora_stack_output_equals_core_with_same_loras(comfy_host, comfy_models):
    m = comfy_models
    loras_dir = comfy_host.models_dir / "loras"
    prompt = t2i_prompt(m, loras=[(m.user_lora, 0.7)], distillpatch=m.distillpatch, seed=3, size=32, save=False)
    result = comfy_host.run(prompt)
    assert result.success, result.error
    expected = _core_reference(comfy_host, m, "a red fox in the snow", seed=3, steps=8, cfg=1.0,
                               loras=[(loras_dir / m.user_lora, 0.7), (loras_dir / m.distillpatch, 1.0)])
    torch.testing.assert_close(_sampler_latent(result), expected, rtol=0, atol=0)


def test_lora_stack_combine_input_runs_the_core_mode_and_switches_back(comfy_host, comfy_models):
    """The stack node's `combine` input: the orthogonal stack of two user LoRAs + the DistillPatch gives exactly
    zimage_core's apply_loras(combine='orthogonal', DistillPatch kept apart), differs from the sum, says so in the
    node's report, and switching back to the sum gives the sum's latent bit for bit."""
    m = comfy_models
    loras_dir = comfy_host.models_dir / "loras"
    loras = [(m.user_lora, 1.0), (m.user_lora2, 1.0)]
    files = [(loras_dir / n, s) for n, s in loras] + [(loras_dir / m.distillpatch, 1.0)]
    latents = {}
    for combine in ("sum", "orthogonal", "sum"):
        prompt = t2i_prompt(m, loras=loras, distillpatch=m.distillpatch, seed=5, size=32, save=False)
        prompt["2"]["inputs"]["combine"] = combine
        result = comfy_host.run(prompt)
        assert result.success, result.error
        if combine in latents:
            torch.testing.assert_close(_sampler_latent(result), latents[combine], rtol=0, atol=0)
            continue
        latents[combine] = _sampler_latent(result).clone()
        expected = _core_reference(comfy_host, m, "a red fox in the snow", seed=5, steps=8, cfg=1.0, loras=files,
                                   combine=combine)
        torch.testing.assert_close(latents[combine], expected, rtol=0, atol=0)
        report = " ".join(result.ui["2"]["text"])
        assert ("combine: orthogonal" in report) == (combine == "orthogonal")
        if combine == "orthogonal":
            assert "combined (orthogonal)" in report and report.count("combined (orthogonal)") == 2  # not the patch
    assert (latents["orthogonal"] - latents["sum"]).abs().max() > 1e-4


def test_lora_stack_step_ranges_run_the_core_schedule(comfy_host, comfy_models):
    """The stack node's start_i / end_i: two user LoRAs on steps 0-0.75 and 0.75-1 (+ the DistillPatch on every
    step) give exactly zimage_core's apply_loras(step_ranges=...) + sample(lora_steps=...), differ from the plain
    stack, and the report names the ranges; a start after its end is an error naming the slot and both values."""
    from zimage_core.scheduler import StepRange
    m = comfy_models
    loras_dir = comfy_host.models_dir / "loras"
    files = [(loras_dir / m.user_lora, 1.0), (loras_dir / m.user_lora2, 1.0), (loras_dir / m.distillpatch, 1.0)]
    prompt = t2i_prompt(m, loras=[(m.user_lora, 1.0), (m.user_lora2, 1.0)], distillpatch=m.distillpatch, seed=5,
                        size=32, save=False)
    prompt["2"]["inputs"].update(end_1=0.75, start_2=0.75)
    result = comfy_host.run(prompt)
    assert result.success, result.error
    expected = _core_reference(comfy_host, m, "a red fox in the snow", seed=5, steps=8, cfg=1.0, loras=files,
                               step_ranges={0: StepRange(0.0, 0.75), 1: StepRange(0.75, 1.0)})
    torch.testing.assert_close(_sampler_latent(result), expected, rtol=0, atol=0)
    plain = _core_reference(comfy_host, m, "a red fox in the snow", seed=5, steps=8, cfg=1.0, loras=files)
    assert (expected - plain).abs().max() > 1e-4
    report = " ".join(result.ui["2"]["text"])
    assert "on steps 0-0.75 of the sampling" in report and "on steps 0.75-1 of the sampling" in report
    prompt["2"]["inputs"].update(start_2=0.9, end_2=0.5)
    result = comfy_host.run(prompt)
    assert not result.success and "lora_2" in str(result.error) and "start_2 0.9 / end_2 0.5" in str(result.error)


def test_sampler_seed_variety_inputs(comfy_host, comfy_models):
    """The sampler's `variety` / `variety_steps` / `variety_mode`: on, the latent is zimage_core's sample with
    SeedVariety(strength, steps, seed + 1, mode) and differs from the classic one; variety 0 (the default) is the
    classic sampler bit for bit; a shift strength above 0.5 is refused, naming the value."""
    from zimage_core.sampling import SeedVariety
    m = comfy_models
    classic = _core_reference(comfy_host, m, "a red fox in the snow", seed=9, steps=8, cfg=1.0)
    for strength, steps, mode in ((0.0, 1, None), (0.5, 2, None), (0.5, 2, "shift"), (1.5, 2, "caption")):
        prompt = t2i_prompt(m, seed=9, size=32, save=False)
        prompt["5"]["inputs"].update(variety=strength, variety_steps=steps, **({"variety_mode": mode} if mode else {}))
        result = comfy_host.run(prompt)
        assert result.success, result.error
        expected = classic if strength == 0 else _core_reference(
            comfy_host, m, "a red fox in the snow", seed=9, steps=8, cfg=1.0,
            variety=SeedVariety(strength, steps, 10, mode=mode or "shift"))
        torch.testing.assert_close(_sampler_latent(result), expected, rtol=0, atol=0)
        assert strength == 0 or (expected - classic).abs().max() > 1e-3
    prompt = t2i_prompt(m, seed=9, size=32, save=False)
    prompt["5"]["inputs"].update(variety=0.75, variety_steps=2)
    result = comfy_host.run(prompt)
    assert not result.success and "0.75" in str(result.error)


def test_switching_loras_restores_the_base_exactly(comfy_host, comfy_models):
    m = comfy_models
    base_run = comfy_host.run(t2i_prompt(m, seed=21, size=32, save=False))
    assert base_run.success, base_run.error
    base_latent = _sampler_latent(base_run).clone()
    first = None
    for loras in ([(m.user_lora, 1.0)], [(m.user_lora2, 0.5)], [(m.user_lora, 1.0)]):
        run = comfy_host.run(t2i_prompt(m, loras=loras, seed=21, size=32, save=False))
        assert run.success, run.error
        if loras[0][0] == m.user_lora:
            first = _sampler_latent(run).clone() if first is None else first
            torch.testing.assert_close(_sampler_latent(run), first, rtol=0, atol=0)
    again = comfy_host.run(t2i_prompt(m, seed=21, size=32, save=False))
    torch.testing.assert_close(_sampler_latent(again), base_latent, rtol=0, atol=0)

    # 100 switches through the pack's own activation path, then the weights equal the file's bit for bit
    loader = comfy_host.pack_module("nodes.loader")
    types = comfy_host.pack_module("nodes.types")
    base = loader.load_base(m.transformer, "fp32", "none")
    wire = types.ZImageModel(base)
    lora_dir = comfy_host.models_dir / "loras"
    specs = [types.LoraSpec.from_file(str(lora_dir / n), n, s) for n, s in
             ((m.user_lora, 1.0), (m.user_lora2, -0.6), (m.distillpatch, 1.0))]
    stacks = [(specs[0],), (specs[1], specs[2]), (specs[0], specs[2]), ()]
    for i in range(100):
        wire.with_loras(*stacks[i % len(stacks)]).activate()
    wire.activate()
    from zimage_core.testing import tiny_model
    reference = tiny_model(0).state_dict()
    for name, value in base.transformer.state_dict().items():
        assert torch.equal(value, reference[name]), f"{name} drifted after 100 LoRA switches"


def test_loader_reads_comfyui_layout_and_caches_by_path_mtime_dtype(comfy_host, comfy_models):
    m = comfy_models
    loader = comfy_host.pack_module("nodes.loader")
    # a diffusers folder (config.json + weights) is one choice 'name/', its weight files are not listed
    folder = comfy_host.models_dir / "diffusion_models" / "zimage_tiny_diffusers"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(m.config.to_diffusers()))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(
        (comfy_host.models_dir / "diffusion_models" / m.transformer).read_bytes())
    options = comfy_host.object_info("ZImageTurboModelLoader")["input"]["required"]["model_name"][1]["options"]
    assert "zimage_tiny_diffusers/" in options and not any(o.startswith("zimage_tiny_diffusers/d") for o in options)
    from_folder = loader.load_base("zimage_tiny_diffusers/", "fp32", "none")
    a = loader.load_base(m.transformer_comfy, "fp32", "none")
    assert loader.load_base(m.transformer_comfy, "fp32", "none") is a
    assert loader.load_base(m.transformer_comfy, "bf16", "none") is not a
    ref = loader.load_base(m.transformer, "fp32", "none")
    for other in (a, from_folder):
        for (name, x), y in zip(other.transformer.state_dict().items(), ref.transformer.state_dict().values()):
            assert torch.equal(x, y), name
    result = comfy_host.run(t2i_prompt(m, transformer=m.transformer_comfy, weight_dtype="bf16", size=32, save=False))
    assert result.success, result.error
    assert torch.isfinite(_sampler_latent(result)).all()


def test_chained_stacks_and_block_offload_give_the_same_image(comfy_host, comfy_models):
    m = comfy_models
    single = comfy_host.run(t2i_prompt(m, loras=[(m.user_lora, 0.7), (m.user_lora2, 0.5)],
                                       distillpatch=m.distillpatch, seed=8, size=32, save=False))
    assert single.success, single.error
    # the same LoRAs over two chained stack nodes, on a block-offloaded model
    prompt = t2i_prompt(m, loras=[(m.user_lora, 0.7)], seed=8, size=32, save=False)
    prompt["1"]["inputs"]["offload"] = "block"
    prompt["2b"] = {"class_type": "ZImageTurboLoraStack",
                    "inputs": {**prompt["2"]["inputs"], "model": ["2", 0], "lora_1": m.user_lora2, "strength_1": 0.5,
                               "distillpatch": m.distillpatch}}
    prompt["5"]["inputs"]["model"] = ["2b", 0]
    chained = comfy_host.run(prompt)
    assert chained.success, chained.error
    torch.testing.assert_close(_sampler_latent(chained), _sampler_latent(single), rtol=0, atol=0)
    assert chained.ui["2b"]["text"][0].count("modules patched") == 3
    # a second DistillPatch down the chain is refused, naming it
    prompt["2"]["inputs"]["distillpatch"] = m.distillpatch
    twice = comfy_host.run(prompt)
    assert not twice.success and "already has a DistillPatch" in twice.error["exception_message"]


def test_compiled_blocks_follow_lora_strength_changes_between_queued_runs(comfy_host, comfy_models, monkeypatch):
    """Loader compile = blocks on an fp8-stored model (its LoRAs are runtime branches, which a compiled graph used
    to ignore): two queued runs with the LoRA at 0.8 then 0.3 each equal the uncompiled run. dynamo traces with the
    "eager" backend here (inductor would take minutes on the test machine; tests/test_compile.py has one)."""
    from zimage_core.compile import CompileSettings, is_compiled

    m = comfy_models
    loader = loader_module(comfy_host)
    monkeypatch.setattr(loader, "COMPILE_SETTINGS", CompileSettings(backend="eager"))

    def latent(strength, compile):
        prompt = t2i_prompt(m, loras=[(m.user_lora, strength)], weight_dtype="fp8_e4m3fn", seed=3, size=32,
                            steps=2, save=False)
        prompt["1"]["inputs"]["compile"] = compile
        result = comfy_host.run(prompt)
        assert result.success, result.error
        assert is_compiled(result.output("1", 0).transformer) == (compile == "blocks")
        return _sampler_latent(result)

    compiled = [latent(0.8, "blocks"), latent(0.3, "blocks")]
    # quantized_compute auto on a CPU host: the dequant path; forcing the fp8 GEMM is refused by name
    assert {mod.compute for mod in loader.load_base(m.transformer, "fp8_e4m3fn", "none").transformer.modules()
            if hasattr(mod, "compute")} == {"dequant"}
    prompt = t2i_prompt(m, weight_dtype="fp8_e4m3fn", size=32, steps=1, save=False)
    prompt["1"]["inputs"]["quantized_compute"] = "fp8_gemm"
    refused = comfy_host.run(prompt)
    assert not refused.success and "quantized_compute: fp8_gemm is not available on cpu" in \
        refused.error["exception_message"]
    eager = [latent(0.8, "none"), latent(0.3, "none")]
    assert (eager[0] - eager[1]).abs().max() > 1e-3  # the strength matters
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-4)


def test_fp8_file_is_upcast_with_the_quality_warning_in_the_ui(comfy_host, comfy_models):
    from comfy_fixtures import write_tiny_transformer

    m = comfy_models
    write_tiny_transformer(comfy_host.models_dir / "diffusion_models" / "zimage_tiny_fp8.safetensors", seed=0,
                           layout="comfyui", dtype=torch.float8_e4m3fn)
    result = comfy_host.run(t2i_prompt(m, transformer="zimage_tiny_fp8.safetensors", weight_dtype="bf16", size=32,
                                       save=False))
    assert result.success, result.error
    assert "fp8" in result.ui["1"]["text"][0] and "WARNING" in result.ui["1"]["text"][0]
    model = result.output("1", 0)
    assert model.transformer.dtype == torch.bfloat16 and torch.isfinite(_sampler_latent(result)).all()


# ----------------------------------------------------------------------------------------------- interrupt, memory
def test_cancel_stops_the_sampler_within_one_step(comfy_host, comfy_models):
    m = comfy_models
    comfy_host.interrupt_at_step(2, node_id="5")
    result = comfy_host.run(t2i_prompt(m, seed=99, size=32, save=False), fresh=True)
    assert not result.success
    assert result.error["event"] == "execution_interrupted", result.error
    assert [p.value for p in comfy_host.progress if p.node_id == "5"] == [1, 2]


def test_model_takes_part_in_comfy_memory_management_without_leaks(comfy_host, comfy_models):
    import comfy.model_management as mm

    m = comfy_models
    types = comfy_host.pack_module("nodes.types")

    def ours():  # loaded transformers (a Fun ControlNet of an earlier test has a ZImagePatcher too)
        return [lm for lm in mm.current_loaded_models if isinstance(lm.model, types.ZImagePatcher)
                and type(lm.model.model.diffusion_model).__name__ == "ZImageTransformer"]

    mm.unload_all_models()  # start from what this test loads (earlier test files leave their own models loaded)
    gc.collect()
    for i in range(50):  # 50 queued runs: new seeds, alternating stacks and dtypes
        loras = [(m.user_lora, 1.0)] if i % 2 else []
        result = comfy_host.run(t2i_prompt(m, loras=loras, seed=1000 + i, size=16, steps=1, save=False,
                                           weight_dtype="fp32" if i % 5 else "bf16"))
        assert result.success, result.error
        assert len(ours()) <= 2, f"run {i}: {len(ours())} Z-Image models registered as loaded"
    gc.collect()
    live = [o for o in gc.get_objects() if type(o).__name__ == "ZImageTransformer"
            and type(o).__module__.startswith(comfy_host.pack.__name__)]
    assert len(live) <= 3, f"{len(live)} transformers alive after 50 runs (cached: fp32, bf16, comfy layout)"
    assert ours(), "the sampler did not register the model with ComfyUI's model management"
    # a model that is loaded stays loaded across runs (load_models_gpu must not unload and reload it each time)
    prompt = t2i_prompt(m, seed=1, size=16, steps=1, save=False)
    prompt["1"]["inputs"]["offload"] = "block"
    assert comfy_host.run(prompt).success
    offload = loader_module(comfy_host).load_base(m.transformer, "fp32", "block").transformer._block_offload
    prompt["5"]["inputs"]["seed"] = 2
    assert comfy_host.run(prompt).success
    assert loader_module(comfy_host).load_base(m.transformer, "fp32", "block").transformer._block_offload is offload
    loaded = ours()[0].model
    assert loaded.loaded_size() > 0
    mm.unload_all_models()  # what /free and OOM recovery do
    assert not ours() and loaded.loaded_size() == 0
    assert loaded.model.device == mm.unet_offload_device()


# ----------------------------------------------------------------------------------------------- trainer
@pytest.mark.parametrize("scheme", ["sft", "differential", "distill"])
def test_trainer_schemes_then_sampler(comfy_host, comfy_models, scheme):
    m = comfy_models
    extra = {"differential": {"preset_lora": m.user_lora}, "distill": {"sft_lora": m.user_lora}}.get(scheme, {})
    name = f"trained_{scheme}"
    result = comfy_host.run(train_prompt(m, scheme=scheme, steps=3, output_name=name, **extra))
    assert result.success, result.error
    lora_name = result.output("11", 1)
    assert lora_name == f"{name}.safetensors"
    assert (comfy_host.models_dir / "loras" / lora_name).is_file()
    for index in (2, 3):  # loss curve, validation grid: ComfyUI IMAGE tensors
        image = result.output("11", index)
        assert image.ndim == 4 and image.shape[-1] == 3 and image.shape[1] > 16 and float(image.std()) > 0
    model = result.output("11", 0)
    assert [s.name for s in model.loras] == [lora_name]
    assert "8" in result.ui and "12" in result.ui and "13" in result.ui
    losses = [d["text"] for e, d in comfy_host.server.messages if e == "progress_text" and d["node"] == "11"]
    assert any("loss" in t for t in losses)
    # the returned model samples with the new LoRA: differs from the base model
    trained = _sampler_latent(result)
    base = comfy_host.run(t2i_prompt(m, seed=42, size=32, save=False))
    assert not torch.equal(trained, _sampler_latent(base))


def test_trainer_keeps_distillpatch_for_validation_only(comfy_host, comfy_models):
    m = comfy_models
    result = comfy_host.run(train_prompt(m, steps=2, output_name="trained_with_patch", distillpatch=m.distillpatch))
    assert result.success, result.error
    model = result.output("11", 0)
    assert [s.role for s in model.loras] == ["distillpatch", "trained"]
    texts = [d["text"] for e, d in comfy_host.server.messages if e == "progress_text" and d["node"] == "11"]
    assert any("trained+distillpatch" in t for t in texts), texts[-3:]


def test_trainer_cancel_saves_checkpoint_and_requeue_resumes(comfy_host, comfy_models):
    m = comfy_models
    prompt = train_prompt(m, steps=4, output_name="trained_cancel")
    comfy_host.interrupt_at_step(2, node_id="11", total=4)
    first = comfy_host.run(prompt, fresh=True)
    assert first.error and first.error["event"] == "execution_interrupted", first.error
    from zimage_core.training import TrainConfig

    work = comfy_host.base_dir / "output" / "zimage_training" / "trained_cancel"
    ckpt = TrainConfig(output_dir=str(work), output_name="trained_cancel").checkpoint_path  # the core's own name
    assert ckpt.is_file()
    assert not (comfy_host.models_dir / "loras" / "trained_cancel.safetensors").exists()
    second = comfy_host.run(prompt, fresh=True)
    assert second.success, second.error
    texts = [d["text"] for e, d in comfy_host.server.messages if e == "progress_text" and d["node"] == "11"]
    assert any("resumed from" in t for t in texts), texts[:5]


# ----------------------------------------------------------------------------------------------- user errors
def _error_message(result) -> str:
    assert not result.success
    if not result.valid:
        return json.dumps(result.node_errors or result.validation_error)
    assert result.error and result.error["event"] == "execution_error", result.error
    return result.error["exception_message"]


def test_error_missing_model_file_names_it(comfy_host, comfy_models):
    message = _error_message(comfy_host.run(t2i_prompt(comfy_models, transformer="gone.safetensors", save=False)))
    assert "gone.safetensors" in message


def test_error_missing_file_at_execution_names_it(comfy_host, comfy_models):
    """A model file deleted between queueing (the prompt validated) and execution: ComfyUI's executor reports the
    loader's error naming the file."""
    import shutil
    import uuid

    folder = comfy_host.models_dir / "diffusion_models"
    shutil.copyfile(folder / comfy_models.transformer, folder / "vanished.safetensors")
    prompt = t2i_prompt(comfy_models, transformer="vanished.safetensors", save=False)
    ok, _error, outputs, node_errors = comfy_host.validate(prompt)
    assert ok and not node_errors
    (folder / "vanished.safetensors").unlink()
    comfy_host.executor.execute(prompt, str(uuid.uuid4()), extra_data={}, execute_outputs=outputs)
    errors = [d for e, d in comfy_host.executor.status_messages if e == "execution_error"]
    assert not comfy_host.executor.success and errors and errors[0]["node_id"] == "1"
    assert "vanished.safetensors" in errors[0]["exception_message"]


def test_error_non_zimage_checkpoint_names_the_file(comfy_host, comfy_models):
    m = comfy_models
    message = _error_message(comfy_host.run(t2i_prompt(m, transformer=m.foreign_model, save=False)))
    assert m.foreign_model in message and "not a Z-Image transformer" in message


def test_error_lora_for_another_model_names_the_file(comfy_host, comfy_models):
    m = comfy_models
    message = _error_message(comfy_host.run(t2i_prompt(m, loras=[(m.foreign_lora, 1.0)], save=False)))
    assert m.foreign_lora in message


def test_trainer_options_reach_the_trainer(comfy_host, comfy_models):
    """The inputs appended for issue 12 run through ComfyUI's validation into the core trainer and its files."""
    from safetensors import safe_open

    from zimage_core.lora import load_lora
    from zimage_core.training.checkpoint import load_checkpoint

    m, name = comfy_models, "trained_options"
    result = comfy_host.run(train_prompt(
        m, steps=3, output_name=name, batch_size=1, grad_accum=2, alpha=2.0, target_preset="all_linear",
        optimizer="adafactor", lr_schedule="cosine", warmup_steps=1, caption_dropout_rate=0.5, flip_horizontal=True,
        ema_decay=0.9, validation_every=2, save_every=1, keep_last=1, preservation_weight=0.5,
        preservation_trigger="picture", preservation_classes="photo, drawing", preservation_blank=True))
    assert result.success, result.error
    loras = comfy_host.models_dir / "loras"
    lora = load_lora(loras / f"{name}.safetensors")
    assert "layers.0.adaLN_modulation.0" in lora.modules and not lora.unmatched
    with safe_open(str(loras / f"{name}.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["optimizer"], meta["lr_schedule"], meta["alpha"]) == ("adafactor", "cosine", "2.0")
    assert (meta["preservation_weight"], meta["preservation_trigger"], meta["preservation_classes"],
            meta["preservation_blank"]) == ("0.5", "picture", "photo,drawing", "true")
    assert load_lora(loras / f"{name}_ema.safetensors").modules.keys() == lora.modules.keys()
    grids = result.output("11", 4)  # one validation point (step 2) of 3 steps
    assert grids.ndim == 4 and grids.shape[0] == 1 and float(grids.std()) > 0
    work = comfy_host.base_dir / "output" / "zimage_training" / name
    assert sorted(p.name for p in work.glob(f"{name}*.step*.safetensors")) == [
        f"{name}.step000002.safetensors", f"{name}_ema.step000002.safetensors"]
    config = load_checkpoint(work / f"{name}.ckpt.safetensors")["config"]
    assert (config["caption_dropout_rate"], config["flip_horizontal"], config["grad_accum"], config["ema_decay"],
            config["warmup_steps"]) == (0.5, True, 2, 0.9, 1)


def test_error_contradictory_trainer_options_name_the_input(comfy_host, comfy_models):
    m = comfy_models
    message = _error_message(comfy_host.run(train_prompt(m, steps=3, output_name="never_warm", lr_schedule="cosine",
                                                         warmup_steps=3)))
    assert "warmup_steps" in message and "steps (3)" in message
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        message = _error_message(comfy_host.run(train_prompt(m, output_name="never_8bit", optimizer="adamw8bit")))
        assert "pip install bitsandbytes" in message
    assert not (comfy_host.base_dir / "output" / "zimage_training" / "never_warm" / "cache").exists()


def test_error_empty_dataset_names_the_folder(comfy_host, comfy_models):
    m = comfy_models
    message = _error_message(comfy_host.run(train_prompt(m, dataset=m.empty_dataset, output_name="never")))
    assert m.empty_dataset in message


@pytest.mark.parametrize("kind", ["absolute", "home", "escape", "escape_inside"])
def test_trainer_reads_datasets_only_from_the_input_folder(comfy_host, comfy_models, tmp_path, kind):
    """A dataset outside ComfyUI's input folder is refused when the prompt is queued (validation), by name, with
    where to put it, though the folder exists and holds a valid dataset; nothing is encoded or trained."""
    m = comfy_models
    outside = write_dataset(tmp_path / "outside_dataset", n=2, size=32)
    input_dir = comfy_host.base_dir / "input"
    folder = {"absolute": str(outside), "home": "~/outside_dataset",
              "escape": os.path.relpath(outside, input_dir),
              "escape_inside": f"{m.dataset}/../../{os.path.relpath(outside, comfy_host.base_dir)}"}[kind]
    result = comfy_host.run(train_prompt(m, dataset=folder, output_name=f"never_{kind}"))
    assert not result.valid, "the prompt must be refused before it runs"
    message = _error_message(result)
    assert json.dumps(folder)[1:-1] in message and str(input_dir) in message
    assert ("absolute path" if kind in ("absolute", "home") else "leaves ComfyUI's input folder") in message
    assert not (comfy_host.base_dir / "output" / "zimage_training" / f"never_{kind}").exists()
    assert not (comfy_host.models_dir / "loras" / f"never_{kind}.safetensors").exists()


def test_trainer_finds_a_dataset_in_a_registered_datasets_folder(comfy_host, comfy_models, tmp_path):
    """Where the host registers a `datasets` folder (newer ComfyUI), a dataset there is found by its name; a
    subfolder of the input folder keeps working."""
    import folder_paths

    train = comfy_host.pack_module("nodes.train")
    registered = "datasets" in folder_paths.folder_names_and_paths
    saved = folder_paths.folder_names_and_paths.get("datasets")
    try:
        folder_paths.add_model_folder_path("datasets", str(tmp_path / "datasets"))
        write_dataset(tmp_path / "datasets" / "faces", n=1, size=32)
        assert train.dataset_path("faces") == tmp_path / "datasets" / "faces"
        assert train.dataset_path(comfy_models.dataset) == comfy_host.base_dir / "input" / comfy_models.dataset
    finally:
        if registered:
            folder_paths.folder_names_and_paths["datasets"] = saved
        else:
            folder_paths.folder_names_and_paths.pop("datasets", None)


def test_error_trainer_never_overwrites_a_foreign_lora(comfy_host, comfy_models):
    m = comfy_models
    stem = m.user_lora.removesuffix(".safetensors")
    before = (comfy_host.models_dir / "loras" / m.user_lora).read_bytes()
    message = _error_message(comfy_host.run(train_prompt(m, output_name=stem)))
    assert m.user_lora in message and "not written by this trainer" in message
    assert (comfy_host.models_dir / "loras" / m.user_lora).read_bytes() == before


def test_error_trainer_refuses_a_stack_with_step_ranges(comfy_host, comfy_models):
    m = comfy_models
    prompt = train_prompt(m, output_name="never_written")
    prompt["2"]["inputs"].update(lora_1=m.user_lora, strength_1=1.0, end_1=0.5)
    message = _error_message(comfy_host.run(prompt))
    assert "trainer" in message and f"'{m.user_lora}' (steps 0-0.5)" in message
    assert not (comfy_host.models_dir / "loras" / "never_written.safetensors").exists()


@pytest.mark.parametrize("name", ["../escape", "sub/dir", "..\\up"])
def test_error_output_name_outside_loras_folder(comfy_host, comfy_models, name):
    message = _error_message(comfy_host.run(train_prompt(comfy_models, output_name=name)))
    assert name in message or json.dumps(name)[1:-1] in message
    assert not list(comfy_host.models_dir.glob("escape*"))
    assert not (comfy_host.base_dir / "escape.safetensors").exists()


def test_every_node_has_a_description_and_search_aliases_where_the_host_has_them(comfy_host, monkeypatch):
    """The node library's info panel shows each node's description (in /object_info); the search aliases go to
    the host's V3 Schema only where it has the field (newer ComfyUI), and a host without it (0.3.75) still loads."""
    from comfy_api.latest import io

    nodes = comfy_host.pack_module("nodes").NODES
    has_field = "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}
    for cls in nodes:
        schema = cls.define_schema()
        assert len(schema.description) > 60, schema.node_id
        assert comfy_host.object_info(schema.node_id)["description"] == schema.description
        assert ("zimage" in (getattr(schema, "search_aliases", None) or [])) == has_field, schema.node_id

    @dataclasses.dataclass
    class NewerSchema(io.Schema):  # the field as newer ComfyUI declares it
        search_aliases: list[str] = None

    monkeypatch.setattr(io, "Schema", NewerSchema)
    aliases = {cls.define_schema().node_id: cls.define_schema().search_aliases for cls in nodes}
    assert all({"zimage", "z-image", "turbo"} <= set(a) for a in aliases.values()), aliases
    assert "lora trainer" in aliases["ZImageTurboTrainLora"]
    assert "apply controlnet" in aliases["ZImageTurboApplyControlNet"]
