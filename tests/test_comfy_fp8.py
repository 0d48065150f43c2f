"""fp8 storage and memory bookkeeping inside a real ComfyUI (the in-process host of tools/comfy_host.py):
the loader's fp8_e4m3fn weight dtype, the LoRA stack on it, and the sizes and activation estimate ComfyUI's model
management plans with."""

from __future__ import annotations

import pytest
import torch

from comfy_fixtures import comfy_host, comfy_models, t2i_prompt  # noqa: F401  (fixtures)

pytestmark = pytest.mark.comfy


def _latent(result):
    return result.output("5", 0)["samples"]


def _patcher_for(result):
    return result.output("1", 0).patcher


def test_fp8_loader_lora_stack_and_sampler(comfy_host, comfy_models):
    Fp8Linear = comfy_host.pack_module("zimage_core.quant.fp8").Fp8Linear  # the pack's own copy of the module
    m = comfy_models
    prompt = t2i_prompt(m, loras=[(m.user_lora, 0.8)], distillpatch=m.distillpatch, weight_dtype="fp8_e4m3fn",
                        seed=3, size=32, save=False)
    result = comfy_host.run(prompt, fresh=True)  # the stack's report (ui) exists only when it runs, not from cache
    assert result.success, result.error
    transformer = result.output("1", 0).transformer
    linears = [mod for mod in transformer.modules() if isinstance(mod, Fp8Linear)]
    assert len(linears) == 7 * len(transformer.blocks()) and transformer.dtype == torch.bfloat16
    bits = [mod.weight.view(torch.uint8).clone() for mod in linears]
    assert result.ui["2"]["text"][0].count("modules patched") == 2  # the stack node, unchanged, on an fp8 base
    fp8 = _latent(result)
    assert torch.isfinite(fp8).all()
    # the same graph in bf16: fp8 storage is close to it, and the stack left the fp8 bits alone
    prompt["1"]["inputs"]["weight_dtype"] = "bf16"
    bf16 = comfy_host.run(prompt)
    assert bf16.success, bf16.error
    err = float((fp8 - _latent(bf16)).norm() / _latent(bf16).norm())
    assert err < 0.15, err
    assert all(torch.equal(b, mod.weight.view(torch.uint8)) for b, mod in zip(bits, linears))


def test_model_management_sees_the_true_resident_size(comfy_host, comfy_models):
    import comfy.model_management as mm

    m = comfy_models
    loader = comfy_host.pack_module("nodes.loader")
    bases = [loader.load_base(m.transformer, dtype, offload)  # held: the loader caches bases weakly
             for dtype, offload in (("bf16", "none"), ("fp8_e4m3fn", "none"), ("fp8_e4m3fn", "block"))]
    bf16, fp8, block = (b.patcher for b in bases)
    tensors = lambda t: [*t.parameters(), *t.buffers()]  # noqa: E731
    fp8_block_weights = sum(mod.weight.nbytes for mod in fp8.model.diffusion_model.modules()
                            if type(mod).__name__ == "Fp8Linear")
    assert bf16.model_size() - fp8.model_size() == pytest.approx(fp8_block_weights, rel=0.05)  # 1 byte, not 2
    blocks = block.model.diffusion_model.blocks()
    per_block = [sum(t.nbytes for t in tensors(b)) for b in blocks]
    # block offload: less than the whole model, more than what stays on the GPU without any block
    assert fp8.model_size() - sum(per_block) < block.model_size() < fp8.model_size()
    assert block.model_size() == fp8.model_size() - sum(per_block) + max(map(sum, zip(per_block, per_block[1:])))

    # what load_models_gpu plans with: after loading, nothing is left to load, so nothing else gets evicted for it
    for patcher, offload in ((fp8, "none"), (block, "block")):
        prompt = t2i_prompt(m, weight_dtype="fp8_e4m3fn", seed=5, size=16, steps=1, save=False)
        prompt["1"]["inputs"]["offload"] = offload
        assert comfy_host.run(prompt).success
        entry = next(lm for lm in mm.current_loaded_models if lm.model is patcher)
        assert entry.model_loaded_memory() == patcher.model_size() > 0
        assert entry.model_offloaded_memory() == 0 and entry.model_memory_required(entry.device) == 0


def test_memory_required_equals_comfyuis_own_zimage_model(comfy_host, comfy_models, monkeypatch):
    """The activation estimate ComfyUI frees memory against equals the one of ComfyUI's own Z-Image model built
    from the same file, also once the host's factor changes (newer ComfyUI ships other values: read at run time)."""
    import comfy.supported_models

    from comfy_reference import comfy_zimage_model

    m = comfy_models
    shell = comfy_host.pack_module("nodes.loader").load_base(m.transformer, "bf16", "none").patcher.model
    own_file = comfy_host.models_dir / "diffusion_models" / m.transformer_comfy
    shape = (2, 16, 128, 96)
    for factor in (comfy.supported_models.ZImage.memory_usage_factor, 2.8):
        monkeypatch.setattr(comfy.supported_models.ZImage, "memory_usage_factor", factor)
        own = comfy_zimage_model(own_file, m.config.axes_dims, torch.bfloat16).model  # built with this factor
        assert own.memory_usage_factor == factor
        assert own.memory_required(shape) > 0
        assert shell.memory_required(shape) == pytest.approx(own.memory_required(shape), rel=1e-12)
