"""The demo's main job (tools/demo.py): the toy world's workflows run in the real ComfyUI host through the pack's
loader, LoRA stack, sampler and trainer with the demo text encoder and VAE, and draw what the prompts ask for (the
toy world's classifier reads every sample; noise or a wrong encoder reads as nothing or the wrong thing). The
trainer runs a short version of the demo's "purple" training: its loss falls and the new LoRA draws purple."""

from __future__ import annotations

from pathlib import Path

import pytest

from comfy_fixtures import comfy_host  # noqa: F401
import demo
import workflows as wf

pytestmark = [pytest.mark.comfy, pytest.mark.slow]
TRAIN_STEPS = 120  # the demo trains 250; 120 already learns the trained image's colour (measured 4/4)


@pytest.fixture(scope="module")
def toy_host(comfy_host):  # noqa: F811
    demo.place_toy_world(comfy_host.base_dir)
    types = {n.type for w in demo.toy_workflows() for n in w.nodes}
    comfy_host.toy_info = {t: comfy_host.object_info(t) for t in types}
    return comfy_host


def _run(host, workflow) -> dict[str, list[tuple[str, str]]]:
    """Run a demo workflow; {SaveImage title (the prompt): what the classifier reads in each sample}."""
    ui = wf.build(workflow, host.toy_info)
    result = host.run(wf.to_api(ui, host.toy_info), fresh=True)
    assert result.success, result.error or result.validation_error
    titles = {str(n["id"]): n.get("title") for n in ui["nodes"] if n["type"] == "SaveImage"}
    output = Path(host.folder_paths.get_output_directory())
    return {titles[node]: [demo.classify_png((output / im["subfolder"] / im["filename"]).read_bytes())
                           for im in result.ui[node]["images"]]
            for node in titles}


def _hits(seen, prompt: str) -> int:
    return sum(s == tuple(prompt.split()) for s in seen)


def test_toy_t2i_in_comfyui_draws_the_prompted_shapes(toy_host):
    seen = _run(toy_host, demo.toy_t2i("toyworld_t2i", demo.BASE_PROMPTS))
    base = [p for p in demo.BASE_PROMPTS if not p.startswith("purple")]
    assert all(len(seen[p]) == demo.SAMPLES for p in demo.BASE_PROMPTS)
    colours = sum(s[0] == p.split()[0] for p in base for s in seen[p])
    assert colours >= len(base) * demo.SAMPLES - 1, seen  # measured 16/16
    assert sum(_hits(seen[p], p) for p in base) >= len(base) * demo.SAMPLES // 2, seen  # measured 13/16
    assert not any(s[0] == "purple" for s in seen["purple circle"]), seen  # a colour the model never saw


def test_toy_bar_lora_in_comfyui_draws_the_new_shape(toy_host):
    """The shipped bar LoRA (scheme 1's SFT LoRA) with the DistillPatch (scheme 4) in the real ComfyUI, 8 / cfg 1."""
    seen = _run(toy_host, demo.toy_t2i("toyworld_t2i_bar", demo.BAR_PROMPTS, lora=demo.TOY_BAR_LORA))
    bars = [p for p in demo.BAR_PROMPTS if p.endswith(" bar")]
    assert sum(_hits(seen[p], p) for p in bars) >= len(bars) * demo.SAMPLES // 2, seen
    assert sum(s[1] == "bar" for p in bars for s in seen[p]) > sum(s[1] == "bar" for s in seen["yellow square"]), seen


def test_toy_training_in_comfyui_loss_falls_and_the_lora_draws_purple(toy_host):
    _run(toy_host, demo.toy_train(TRAIN_STEPS))
    report = demo.training_report(toy_host.base_dir)
    first, last = demo.loss_fall(report["losses"])
    assert report["steps"] == TRAIN_STEPS and last < 0.5 * first, (first, last)  # measured 0.43 -> 0.11
    assert set(report["turbo_check"]) == {"base", "trained", "trained+distillpatch"}
    check = report["turbo_check"]  # higher keeps the Turbo; 'base' (no LoRA) does not draw purple at all
    assert check["trained+distillpatch"] > check["base"] and check["trained"] > check["base"], check
    assert report["turbo_check_meaning"].startswith("turbo check (higher keeps the Turbo)")
    work = toy_host.base_dir / "output" / "zimage_training" / demo.TOY_LORA
    assert (work / f"{demo.TOY_LORA}.loss.png").is_file() and (work / f"{demo.TOY_LORA}.grid.png").is_file()
    seen = _run(toy_host, demo.toy_t2i("toyworld_t2i_purple", ["purple circle", "red circle"],
                                       lora=f"{demo.TOY_LORA}.safetensors"))
    assert _hits(seen["purple circle"], "purple circle") >= demo.SAMPLES - 1, seen  # the trained image
    assert sum(s[0] == "red" for s in seen["red circle"]) >= demo.SAMPLES - 1, seen  # a base prompt still works


def test_demo_vae_round_trips_the_toy_world_through_comfy_latents(toy_host):
    """The demo VAE is the toy VAE behind ComfyUI's LATENT convention: Flux process_in of its output is exactly
    the toy latent, and decoding gives the image back."""
    import torch
    from toyworld import world
    from toyworld.vae import ToyVAE

    module = toy_host.pack_module("nodes.demo")
    vae = module.ZImageTurboDemoVAE.execute().result[0]
    images = world.prompt_batch(["red circle", "blue square"], generator=torch.Generator().manual_seed(0))
    raw = vae.encode(images.movedim(1, -1))
    assert raw.shape == (2, 16, 16, 16) and vae.spacial_compression_encode() == 2
    torch.testing.assert_close(vae.latent_format.process_in(raw), ToyVAE.load().encode(images))
    torch.testing.assert_close(vae.decode(raw).movedim(-1, 1), images, atol=1e-4, rtol=0)


def test_distillpatch_name_follows_what_the_user_has(toy_host):
    prompt = {"4": {"class_type": "ZImageTurboLoraStack", "inputs": {"distillpatch": wf.DISTILLPATCH_FILE}}}
    assert wf.DISTILLPATCH_FILE == "z_image_turbo_distill_patch_lora_bf16.safetensors"  # Comfy-Org's repackaging
    diffsynth = "z-image_turbo_distillpatch_comfyui.safetensors"
    assert wf.use_available_distillpatch(prompt, ["a.safetensors", diffsynth])["4"]["inputs"]["distillpatch"] \
        == diffsynth
    assert wf.use_available_distillpatch(prompt, [wf.DISTILLPATCH_FILE, diffsynth]) == prompt
    assert wf.use_available_distillpatch(prompt, []) == prompt  # nothing to pick: validation names the file
    listed = wf.combo_options(toy_host.object_info("ZImageTurboLoraStack")["input"]["required"]["distillpatch"])
    assert demo.TOY_DISTILLPATCH in listed  # what the demo's --models path reads the loras folder's files from
