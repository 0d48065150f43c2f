"""ComfyUI mixed-precision and nunchaku SVDQuant transformers through the pack's nodes in a real ComfyUI 0.3.75 (the
in-process host of tools/comfy_host.py): the loader lists and loads them quantized, and the LoRA stack (with the
DistillPatch), block offload and the Turbo sampler give exactly zimage_core's numbers on the same file."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("comfy_kitchen")  # builds the comfy_quant fixture

import comfy_quant_fixtures  # noqa: E402
import svdquant_fixtures  # noqa: E402
from comfy_host import comfy_host, comfy_models, t2i_prompt  # noqa: E402,F401  (fixtures)
from test_comfy_nodes import _core_reference, _sampler_latent  # noqa: E402

pytestmark = [pytest.mark.comfy, pytest.mark.slow]
COMFY_NAME, SVDQ_NAME = "zimage_tiny_comfy_mixed.safetensors", "svdq-int4_r32-zimage_tiny.safetensors"


@pytest.fixture(scope="module")
def quant_files(comfy_host, comfy_models):
    from zimage_core.testing import tiny_model

    folder = comfy_host.models_dir / "diffusion_models"
    comfy_quant_fixtures.write_file(tiny_model(0), folder / COMFY_NAME, pre_quant_every=4)
    svdquant_fixtures.write_file(tiny_model(0, **svdquant_fixtures.tiny_config()), folder / SVDQ_NAME)
    return folder / COMFY_NAME, folder / SVDQ_NAME


def _graph_and_core(comfy_host, m, path, offload: str, seed: int, with_loras: bool):
    """The sampler's latent for the file `path` through the nodes (loader, LoRA stack with the user LoRA at 0.7 and
    the DistillPatch when `with_loras`, Turbo sampler), zimage_core's latent on load_transformer of the same file,
    the quantized formats the loader made, and the stack's report."""
    from zimage_core import load_transformer

    loras = [(m.user_lora, 0.7)] if with_loras else []
    prompt = t2i_prompt(m, loras=loras, distillpatch=m.distillpatch if with_loras else None, seed=seed, size=32,
                        save=False, transformer=path.name)
    prompt["1"]["inputs"]["offload"] = offload
    result = comfy_host.run(prompt, fresh=True)
    assert result.success, result.error
    quantized = comfy_host.pack_module("zimage_core.quant").QuantizedLinear  # the pack's own copy
    formats = {mod.fmt.split("+")[0] for mod in result.output("1", 0).transformer.modules()
               if isinstance(mod, quantized)}
    folder = comfy_host.models_dir / "loras"
    stack = [(folder / name, strength) for name, strength in loras + [(m.distillpatch, 1.0)] * with_loras]
    expected = _core_reference(comfy_host, m, "a red fox in the snow", seed=seed, steps=8, cfg=1.0, loras=stack,
                               model=load_transformer(path, dtype=torch.float32))
    return _sampler_latent(result), expected, formats, result.ui.get("2", {}).get("text", [""])[0]


@pytest.mark.parametrize("offload", ["none", "block"])
def test_comfy_quant_base_with_lora_stack_samples_as_zimage_core(comfy_host, comfy_models, quant_files, offload):
    loader = comfy_host.pack_module("nodes.loader")
    assert COMFY_NAME in loader.model_options() and SVDQ_NAME in loader.model_options()
    latent, expected, formats, report = _graph_and_core(comfy_host, comfy_models, quant_files[0], offload, seed=3,
                                                        with_loras=True)
    assert {"comfy:nvfp4", "comfy:mxfp8", "comfy:int8_tensorwise_convrot16", "comfy:convrot_w4a4_g64"} <= formats
    assert report.count("modules patched") == 2
    torch.testing.assert_close(latent, expected, rtol=0, atol=0)


def test_svdquant_base_with_block_offload_samples_as_zimage_core(comfy_host, comfy_models, quant_files):
    latent, expected, formats, _ = _graph_and_core(comfy_host, comfy_models, quant_files[1], "block", seed=5,
                                                   with_loras=False)
    assert formats == {"svdq:int4"}
    torch.testing.assert_close(latent, expected, rtol=0, atol=0)
