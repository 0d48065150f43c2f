"""GGUF transformers inside a real ComfyUI 0.3.75 (the in-process host of tools/comfy_host.py): the loader lists
.gguf files from diffusion_models, unet and ComfyUI-GGUF's unet_gguf folder, and a GGUF base runs the LoRA stack
(with the DistillPatch), the Turbo sampler, block offload and the MODEL bridge with the numbers of zimage_core."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf")

from comfy_host import comfy_host, comfy_models, t2i_prompt  # noqa: E402,F401  (fixtures)
from gguf_fixtures import dequantized_reference, write_gguf  # noqa: E402
from test_comfy_nodes import _core_reference, _sampler_latent  # noqa: E402

pytestmark = pytest.mark.comfy
NAME = "zimage_tiny-Q8_0.gguf"


def _types(name: str) -> str:  # a per-tensor mix, as llama-quantize's mixes: w2 kept at another type
    return "Q4_1" if ".w2." in name else "Q8_0"


@pytest.fixture(scope="module")
def gguf_file(comfy_host, comfy_models):
    from zimage_core.testing import tiny_model

    unet = comfy_host.models_dir / "unet"  # ComfyUI-GGUF users keep their files here
    unet.mkdir(exist_ok=True)
    path = write_gguf(unet / NAME, tiny_model(0), _types)
    reference = dequantized_reference(path, comfy_host.models_dir / "diffusion_models" / "zimage_tiny_deq.safetensors")
    return path, reference.name


def test_loader_lists_gguf_files_from_unet_diffusion_models_and_unet_gguf(comfy_host, gguf_file, tmp_path,
                                                                         monkeypatch):
    from zimage_core.testing import tiny_model

    loader = comfy_host.pack_module("nodes.loader")
    folder_paths = comfy_host.folder_paths
    assert "unet_gguf" not in folder_paths.folder_names_and_paths  # a host without ComfyUI-GGUF: still listed
    assert NAME in loader.model_options() and loader.resolve(NAME) == str(gguf_file[0])
    (comfy_host.models_dir / "diffusion_models" / "sub").mkdir(exist_ok=True)
    other = write_gguf(comfy_host.models_dir / "diffusion_models" / "sub" / "other.gguf", tiny_model(1))
    extra = tmp_path / "gguf_only"
    extra.mkdir()
    (extra / "third.gguf").write_bytes(other.read_bytes())
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "unet_gguf", ([str(extra)], {".gguf"}))
    options = loader.model_options()
    assert {NAME, "sub/other.gguf", "third.gguf"} <= set(options)
    assert loader.resolve("third.gguf") == str(extra / "third.gguf")
    assert loader.ZImageTurboModelLoader.validate_inputs("third.gguf") is True
    with pytest.raises(FileNotFoundError, match="missing.gguf' not found in the diffusion_models, unet, unet_gguf"):
        loader.resolve("missing.gguf")
    other.unlink()


@pytest.mark.parametrize("offload", ["none", "block"])
def test_gguf_base_with_lora_stack_and_distillpatch_samples_as_zimage_core(comfy_host, comfy_models, gguf_file,
                                                                           offload):
    from zimage_core import load_transformer

    QuantizedLinear = comfy_host.pack_module("zimage_core.quant").QuantizedLinear  # the pack's own copy
    m = comfy_models
    prompt = t2i_prompt(m, loras=[(m.user_lora, 0.7)], distillpatch=m.distillpatch, seed=3, size=32, save=False,
                        transformer=NAME)
    prompt["1"]["inputs"]["offload"] = offload
    result = comfy_host.run(prompt, fresh=True)
    assert result.success, result.error
    transformer = result.output("1", 0).transformer
    linears = [mod for mod in transformer.modules() if isinstance(mod, QuantizedLinear)]
    assert {mod.fmt for mod in linears} == {"gguf:Q8_0", "gguf:Q4_1"}
    assert result.ui["2"]["text"][0].count("modules patched") == 2
    loras = comfy_host.models_dir / "loras"
    expected = _core_reference(comfy_host, m, "a red fox in the snow", seed=3, steps=8, cfg=1.0,
                               loras=[(loras / m.user_lora, 0.7), (loras / m.distillpatch, 1.0)],
                               model=load_transformer(gguf_file[0], dtype=torch.float32))
    torch.testing.assert_close(_sampler_latent(result), expected, rtol=0, atol=0)


def test_bridge_ksampler_on_a_gguf_base_equals_the_dequantized_file(comfy_host, comfy_models, gguf_file):
    m = comfy_models

    def latent(model_name):
        prompt = t2i_prompt(m, loras=[(m.user_lora, 0.7)], seed=4, size=32, save=False, transformer=model_name)
        prompt["10"] = {"class_type": "ZImageTurboToModel", "inputs": {"model": ["2", 0]}}
        prompt["30"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["3", 0]}}
        prompt["5"] = {"class_type": "KSampler",
                       "inputs": {"model": ["10", 0], "seed": 4, "steps": 4, "cfg": 1.0, "sampler_name": "euler",
                                  "scheduler": "simple", "positive": ["3", 0], "negative": ["30", 0],
                                  "latent_image": ["4", 0], "denoise": 1.0}}
        result = comfy_host.run(prompt)
        assert result.success, result.error
        return _sampler_latent(result)

    quantized, plain = latent(NAME), latent(gguf_file[1])
    # the same weights; only the LoRA differs in rounding (a side branch on GGUF, merged into the fp32 file)
    assert (quantized - plain).abs().max() < 1e-4 and quantized.abs().max() > 0.1
