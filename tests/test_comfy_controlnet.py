"""The Fun ControlNet nodes inside a real ComfyUI 0.3.75 (in-process host): loader, Apply ControlNet (chained,
inpaint mode), the sampler's control input with LoRA stack + DistillPatch, and user errors by name."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from comfy_host import comfy_host, comfy_models, t2i_prompt, write_lora  # noqa: F401  (fixtures)

pytestmark = pytest.mark.comfy

CN_21 = "zimage_tiny_fun_controlnet_2.1.safetensors"  # in model_patches
CN_10 = "zimage_tiny_fun_controlnet_1.0.safetensors"  # in controlnet
CN_OTHER = "zimage_wide_fun_controlnet.safetensors"  # for a model of another width
LORA_AS_CN = "a_lora_not_a_controlnet.safetensors"


@pytest.fixture(scope="module")
def cn_files(comfy_host, comfy_models):
    from zimage_core import ZImageConfig
    from zimage_core.testing import tiny_controlnet

    base = comfy_models.config
    folders = {name: comfy_host.models_dir / folder for name, folder in (
        (CN_21, "model_patches"), (CN_10, "controlnet"), (CN_OTHER, "model_patches"), (LORA_AS_CN, "model_patches"))}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    save_file(tiny_controlnet("2.1", seed=1, base=base).state_dict(), str(folders[CN_21] / CN_21))
    save_file(tiny_controlnet("1.0", seed=2, base=base).state_dict(), str(folders[CN_10] / CN_10))
    wide = ZImageConfig.tiny(dim=192, n_heads=6, axes_dims=(8, 12, 12))
    save_file(tiny_controlnet("2.1", seed=3, base=wide).state_dict(), str(folders[CN_OTHER] / CN_OTHER))
    write_lora(folders[LORA_AS_CN] / LORA_AS_CN, base, "peft", seed=1)
    return {name: folder / name for name, folder in folders.items()}


def control_prompt(m, controls, size=32, loras=None, weight_dtype="fp32"):
    """t2i_prompt (LoRA + DistillPatch, fp32) with a chain of Apply ControlNet nodes into the sampler's control.
    controls: dicts with controlnet (file name), strength, start, end and optionally image (True: the test image),
    inpaint (True: test image + a mask of `mask_size`)."""
    prompt = t2i_prompt(m, loras=[(m.user_lora, 0.8)] if loras is None else loras, distillpatch=m.distillpatch,
                        size=size, save=False, seed=9)
    prompt["21"] = {"class_type": "VAELoader", "inputs": {"vae_name": m.vae}}
    prompt["22"] = {"class_type": "LoadImage", "inputs": {"image": m.image}}
    previous = None
    for n, c in enumerate(controls):
        loader, apply = str(30 + 2 * n), str(31 + 2 * n)
        prompt[loader] = {"class_type": "ZImageTurboControlNetLoader",
                          "inputs": {"controlnet_name": c["controlnet"], "weight_dtype": c.get("dtype", weight_dtype)}}
        inputs = {"controlnet": [loader, 0], "vae": ["21", 0], "strength": c.get("strength", 0.8),
                  "start": c.get("start", 0.0), "end": c.get("end", 1.0)}
        if c.get("image", True):
            inputs["image"] = ["22", 0]
        if c.get("inpaint"):  # mask: 1 (repaint) on the right half of a mask_size square
            size_m = c.get("mask_size", 32)
            empty, half, mask = str(60 + n), str(70 + n), str(80 + n)
            prompt[empty] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": size_m, "height": size_m}}
            prompt[half] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": size_m // 2,
                                                                  "height": size_m}}
            prompt[mask] = {"class_type": "MaskComposite", "inputs": {
                "destination": [empty, 0], "source": [half, 0], "x": size_m // 2, "y": 0, "operation": "add"}}
            inputs.update(inpaint_image=["22", 0], mask=[mask, 0])
        if previous is not None:
            inputs["control"] = [previous, 0]
        prompt[apply] = {"class_type": "ZImageTurboApplyControlNet", "inputs": inputs}
        previous = apply
    prompt["5"]["inputs"]["control"] = [previous, 0]
    return prompt


def _reference(host, m, cn_files, controls, size=32, loras=None):
    """What the sampler must return, from zimage_core and ComfyUI's own pieces: KSampler's noise, the stack merged
    by zimage_core, the test image encoded by ComfyUI's VAE (Flux process_in), the mask binarised and nearest-
    resized, the masked area grey."""
    import comfy.latent_formats
    import comfy.sample
    import comfy.sd
    import comfy.utils
    import nodes
    import zimage_core as zc
    from zimage_core.lora import apply_loras, load_lora
    from zimage_core.testing import tiny_model

    fmt = comfy.latent_formats.Flux()
    model = tiny_model(0)
    loras = [(m.user_lora, 0.8)] if loras is None else loras
    stack = [(host.models_dir / "loras" / name, s) for name, s in [*loras, (m.distillpatch, 1.0)]]
    handle = apply_loras(model, [(load_lora(p), s) for p, s in stack])
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(host.models_dir / "vae" / m.vae)))
    image = nodes.LoadImage().load_image(m.image)[0][..., :3]
    if image.shape[1] != size:
        image = comfy.utils.common_upscale(image.movedim(-1, 1), size, size, "area", "center").movedim(1, -1)
    inputs = []
    for c in controls:
        net = zc.load_controlnet(cn_files[c["controlnet"]], dtype=torch.float32)
        latent = fmt.process_in(vae.encode(image)) if c.get("image", True) else None
        mask = inpaint = None
        if c.get("inpaint"):
            m_px = torch.zeros(1, 1, size, size)
            m_px[..., size // 2:] = 1.0
            inpaint = fmt.process_in(vae.encode(image * (1 - m_px.movedim(1, -1)) + 0.5 * m_px.movedim(1, -1)))
            mask = F.interpolate(m_px, size=(size // 8, size // 8), mode="nearest")
        inputs.append(zc.ControlInput(net, latent, c.get("strength", 0.8), c.get("start", 0.0), c.get("end", 1.0),
                                      mask, inpaint))
    raw = torch.zeros(1, 16, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(raw, 9)
    pos = [host.pack_module("nodes.demo").hashed_features("a red fox in the snow", m.config.cap_feat_dim)[0]]
    with torch.no_grad():
        out = zc.sample(model, noise, pos, steps=8, cfg=1.0, control=inputs)
    handle.remove()
    return fmt.process_out(out)


def _latent(result):
    assert result.success, result.error
    return result.output("5", 0)["samples"]


def _error(result) -> str:
    assert not result.success
    if not result.valid:
        return json.dumps(result.node_errors or result.validation_error)
    return result.error["exception_message"]


def test_nodes_schema(comfy_host):
    loader = comfy_host.object_info("ZImageTurboControlNetLoader")
    apply = comfy_host.object_info("ZImageTurboApplyControlNet")
    assert list(loader["input"]["required"]) == ["controlnet_name", "weight_dtype"]
    assert list(apply["input"]["required"]) == ["controlnet", "vae", "strength", "start", "end"]
    assert list(apply["input"]["optional"]) == ["image", "inpaint_image", "mask", "control"]
    assert loader["output"] == ["ZIMAGE_CONTROLNET"] and apply["output"] == ["ZIMAGE_CONTROL"]
    assert comfy_host.object_info("ZImageTurboSampler")["input"]["optional"]["control"][0] == "ZIMAGE_CONTROL"
    for info in (loader, apply):
        for group in ("required", "optional"):
            assert all(spec[1].get("tooltip") for spec in info["input"].get(group, {}).values())
        assert all(info["output_tooltips"])


def test_loader_lists_model_patches_and_controlnet_folders(comfy_host, cn_files):
    spec = comfy_host.object_info("ZImageTurboControlNetLoader")["input"]["required"]["controlnet_name"]
    options = spec[1]["options"] if spec[0] == "COMBO" else spec[0]
    assert CN_21 in options and CN_10 in options


@pytest.mark.slow
def test_lora_stack_distillpatch_and_controlnet_equal_zimage_core(comfy_host, comfy_models, cn_files):
    m = comfy_models
    controls = [dict(controlnet=CN_21, strength=0.8)]
    got = _latent(comfy_host.run(control_prompt(m, controls)))
    torch.testing.assert_close(got, _reference(comfy_host, m, cn_files, controls), rtol=0, atol=1e-5)
    plain = _latent(comfy_host.run(t2i_prompt(m, loras=[(m.user_lora, 0.8)], distillpatch=m.distillpatch, size=32,
                                              save=False, seed=9)))
    assert (got - plain).abs().max() > 1e-3  # the control acts
    # chained: a 1.0 ControlNet (from the controlnet folder) on the first half of the steps, plus the 2.1 one
    controls = [dict(controlnet=CN_10, strength=0.6, end=0.5), dict(controlnet=CN_21, strength=0.8)]
    chained = _latent(comfy_host.run(control_prompt(m, controls)))
    torch.testing.assert_close(chained, _reference(comfy_host, m, cn_files, controls), rtol=0, atol=1e-5)
    assert (chained - got).abs().max() > 1e-4


@pytest.mark.slow
def test_inpaint_mode_equals_zimage_core(comfy_host, comfy_models, cn_files):
    m = comfy_models
    controls = [dict(controlnet=CN_21, inpaint=True, strength=0.9)]
    got = _latent(comfy_host.run(control_prompt(m, controls)))
    torch.testing.assert_close(got, _reference(comfy_host, m, cn_files, controls), rtol=0, atol=1e-5)
    without_image = [dict(controlnet=CN_21, inpaint=True, image=False, strength=0.9)]
    other = _latent(comfy_host.run(control_prompt(m, without_image)))
    torch.testing.assert_close(other, _reference(comfy_host, m, cn_files, without_image), rtol=0, atol=1e-5)


def test_control_image_of_another_size_is_resized(comfy_host, comfy_models, cn_files):
    m = comfy_models  # the test image is 32x32 px; the latent is 64x64 px
    controls = [dict(controlnet=CN_21)]
    got = _latent(comfy_host.run(control_prompt(m, controls, size=64)))
    assert got.shape == (1, 16, 8, 8)
    torch.testing.assert_close(got, _reference(comfy_host, m, cn_files, controls, size=64), rtol=0, atol=1e-5)


def _weights(comfy_host, m):
    base = comfy_host.pack_module("nodes.loader").load_base(m.transformer, "fp32")
    return {k: v.clone() for k, v in base.transformer.state_dict().items()}


@pytest.mark.parametrize("control,expected", [
    (dict(controlnet=CN_10, inpaint=True), ["mask: ControlNet", CN_10, "has no inpaint mode"]),
    (dict(controlnet=CN_21, inpaint=True, mask_size=64), ["mask is 64x64 px but inpaint_image is 32x32 px"]),
    (dict(controlnet=CN_OTHER), [CN_OTHER, "does not fit this Z-Image model: it has width 192"]),
    (dict(controlnet=LORA_AS_CN), [LORA_AS_CN, "looks like a LoRA"]),
    (dict(controlnet=CN_21, dtype="bf16"), [CN_21, "loaded in torch.bfloat16 but the model runs in torch.float32"]),
    (dict(controlnet="missing_cn.safetensors"), ["missing_cn.safetensors", "not found"]),
])
def test_bad_control_inputs_are_named_and_change_nothing(comfy_host, comfy_models, cn_files, control, expected):
    m = comfy_models
    comfy_host.run(t2i_prompt(m, loras=[(m.user_lora, 0.8)], distillpatch=m.distillpatch, size=32, save=False))
    before = _weights(comfy_host, m)
    message = _error(comfy_host.run(control_prompt(m, [control])))
    for fragment in expected:
        assert fragment in message, message
    after = _weights(comfy_host, m)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_controlnet_follows_the_model_block_offload(comfy_host, comfy_models, cn_files):
    from zimage_core.offload import is_offloaded

    m = comfy_models
    controls = [dict(controlnet=CN_21)]
    plain = _latent(comfy_host.run(control_prompt(m, controls)))
    prompt = control_prompt(m, controls)
    prompt["1"]["inputs"]["offload"] = "block"
    offloaded = _latent(comfy_host.run(prompt))
    torch.testing.assert_close(offloaded, plain, rtol=0, atol=1e-6)
    loaded = comfy_host.pack_module("nodes.controlnet").load(CN_21, "fp32")
    assert loaded.patcher.model.offload == "block" and is_offloaded(loaded.net)
    again = _latent(comfy_host.run(control_prompt(m, controls)))  # back to offload none
    torch.testing.assert_close(again, plain, rtol=0, atol=0)
    assert loaded.patcher.model.offload == "none" and not is_offloaded(loaded.net)


def test_fp8_model_and_controlnet(comfy_host, comfy_models, cn_files):
    has_fp8_storage = comfy_host.pack_module("zimage_core.quant.fp8").has_fp8_storage  # the pack's own classes
    m = comfy_models
    prompt = control_prompt(m, [dict(controlnet=CN_21)], weight_dtype="fp8_e4m3fn")
    prompt["1"]["inputs"]["weight_dtype"] = "fp8_e4m3fn"  # the model too: both compute in bf16
    result = comfy_host.run(prompt)
    assert torch.isfinite(_latent(result)).all()
    assert has_fp8_storage(comfy_host.pack_module("nodes.controlnet").load(CN_21, "fp8_e4m3fn").net)
