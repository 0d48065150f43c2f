"""Stacking, exact removal, runtime branches for training, loud refusals, and the export format."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

import zimage_core
from zimage_core.lora import LoraError, LoraModule, LoraWeights, apply_loras, load_lora, new_lora, save_lora
from zimage_core.testing import tiny_model


def random_lora(model, seed, rank=4, alpha=None, targets=("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")):
    lora = new_lora(model, rank=rank, alpha=alpha, targets=targets, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    for module in lora.modules.values():
        module.up.copy_(0.1 * torch.randn(module.up.shape, generator=gen))
    return lora


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_identical(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert not changed, f"not restored bit-exactly: {changed[:5]}"


INPUTS = (torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0)), 0.4, [torch.ones(5, 48)])


@pytest.mark.parametrize("mode", ["merge", "runtime"])
def test_stack_of_user_lora_and_distillpatch_is_the_sum_and_removes_exactly(mode, tmp_path):
    """User LoRA (ai-toolkit file) + DistillPatch (DiffSynth layout) at different strengths: the merged weights are
    W + s1*d1 + s2*d2, runtime output equals merged output, and remove() gives back every tensor bit for bit."""
    model = tiny_model(seed=0)
    before = snapshot(model)
    user, patch = random_lora(model, 1, alpha=2.0), random_lora(model, 2, rank=8)
    patch_file = tmp_path / "distill_patch.safetensors"
    save_file({f"{p}.lora_{ab}.default.weight": t for p, m in patch.modules.items()
               for ab, t in (("A", m.down), ("B", m.up))}, str(patch_file))
    assert load_lora(patch_file).format == "diffsynth"
    stack = [(user, 0.8), (patch_file, 1.0)]
    with apply_loras(model, stack, mode="merge") as handle:
        merged = snapshot(model)
        merged_out = model(*INPUTS)
    assert [r.matched for r in handle.reports] == [28, 28]
    for path in user.modules:
        expected = before[f"{path}.weight"] + 0.8 * 0.5 * user.modules[path].up @ user.modules[path].down \
            + patch.modules[path].up @ patch.modules[path].down
        torch.testing.assert_close(merged[f"{path}.weight"], expected, rtol=0, atol=1e-6)
    assert_identical(model, before)
    handle = apply_loras(model, stack, mode=mode)
    out = model(*INPUTS)
    handle.remove()
    handle.remove()  # idempotent
    torch.testing.assert_close(out, merged_out, rtol=1e-5, atol=1e-5)
    assert_identical(model, before)


@pytest.mark.parametrize("mode", ["merge", "runtime"])
def test_strength_zero_and_fresh_lora_leave_outputs_bit_identical(mode):
    model = tiny_model(seed=0)
    base = model(*INPUTS)
    with apply_loras(model, [(random_lora(model, 1), 0.0)], mode=mode):
        assert torch.equal(model(*INPUTS), base)
    with apply_loras(model, [(new_lora(model, rank=8, seed=3), 1.0)], mode=mode):
        assert torch.equal(model(*INPUTS), base)


def test_removing_handles_out_of_order_restores_exactly():
    """Two merged stacks removed first-in-first-out: the remaining one stays exactly as if applied alone."""
    model = tiny_model(seed=0)
    before = snapshot(model)
    a, b = random_lora(model, 1), random_lora(model, 2)
    with apply_loras(model, [(b, 0.5)]):
        only_b = snapshot(model)
    ha, hb = apply_loras(model, [(a, 1.0)]), apply_loras(model, [(b, 0.5)])
    ha.remove()
    assert_identical(model, only_b)
    hb.remove()
    assert_identical(model, before)


def test_restore_rereads_the_checkpoint_instead_of_keeping_backups(tmp_path):
    """A model with `weight_source` (as load_transformer sets) is restored from it: no backup is kept, and the
    restored weights are what the source returns."""
    from zimage_core.lora import apply as apply_module

    model = tiny_model(seed=0)
    before = snapshot(model)
    reads = []

    class Source:
        dtype = torch.float32

        def __contains__(self, name):
            return name in before

        def shape(self, name):
            return tuple(before[name].shape)

        def read(self, name):
            reads.append(name)
            return before[name].clone()

    model.weight_source = Source()
    handle = apply_loras(model, [(random_lora(model, 1), 1.0)])
    state = apply_module._merge_state(model)
    assert len(state.backups) == 28 and all(v is None for v in state.backups.values())
    handle.remove()
    assert len(reads) == 28
    assert_identical(model, before)
    assert apply_module._merge_state(model) is None


def test_runtime_mode_trains_the_lora_tensors_in_bf16_under_checkpointing():
    """fp32 master LoRA weights, bf16 model: the branches read the LoraWeights tensors themselves, so gradients reach
    them (also through torch.utils.checkpoint), and the base weights get none."""
    model = tiny_model(seed=0, dtype=torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    lora = new_lora(model, rank=4, seed=0)
    for t in lora.parameters():
        t.requires_grad_(True)
    model.gradient_checkpointing = True
    with apply_loras(model, [(lora, 1.0)], mode="runtime"):
        model(*INPUTS).float().square().mean().backward()
    ups = [m.up.grad for m in lora.modules.values()]
    assert all(g is not None and g.dtype == torch.float32 for g in ups)
    assert sum(g.abs().sum() for g in ups) > 0
    assert all(p.grad is None for p in model.parameters())
    linear = model.layers[0].feed_forward.w1
    x = torch.randn(3, linear.in_features, dtype=torch.bfloat16)
    with apply_loras(model, [(lora, 1.0), (lora, 1.0)], mode="runtime"):  # two branches on one Linear
        y = checkpoint(linear, x, use_reentrant=False)
    assert y.dtype == torch.bfloat16


def test_new_lora_is_peft_initialised_and_deterministic():
    from peft import LoraConfig, inject_adapter_in_model

    model = tiny_model(seed=0)
    lora = new_lora(model, rank=8, seed=5)
    assert len(lora.modules) == 7 * 4 and lora.rank == 8
    assert all(torch.equal(a, b) for a, b in zip(lora.parameters(), new_lora(model, rank=8, seed=5).parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(lora.parameters(), new_lora(model, rank=8, seed=6).parameters()))
    torch.manual_seed(0)
    peft_model = inject_adapter_in_model(LoraConfig(r=8, lora_alpha=8, target_modules=list(
        ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"))), tiny_model(seed=0))
    peft_paths = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    assert peft_paths == set(lora.modules)
    bound = 1 / 96 ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 96
    down = lora.modules["layers.0.attention.to_q"].down
    assert down.abs().max() <= bound and down.abs().max() > 0.9 * bound
    assert all(not m.up.any() for m in lora.modules.values())
    with pytest.raises(ValueError, match="rank"):
        new_lora(model, rank=0)


def test_unmatched_keys_are_refused_by_default_and_reported_when_lenient(tmp_path):
    model = tiny_model(seed=0)
    before = snapshot(model)
    sd = {f"diffusion_model.{p}.lora_{ab}.weight": t for p, m in random_lora(model, 1).modules.items()
          for ab, t in (("A", m.down), ("B", m.up))}
    sd["diffusion_model.siglip_refiner.0.attention.to_q.lora_A.weight"] = torch.zeros(4, 96)
    sd["diffusion_model.siglip_refiner.0.attention.to_q.lora_B.weight"] = torch.zeros(96, 4)
    path = tmp_path / "omni.safetensors"
    save_file(sd, str(path))
    with pytest.raises(LoraError) as err:
        apply_loras(model, [(random_lora(model, 3), 1.0), (path, 1.0)])
    message = str(err.value)
    assert str(path) in message and "ai-toolkit" in message and "siglip_refiner.0.attention.to_q.lora_A" in message
    assert_identical(model, before)  # the first LoRA of the stack was not applied either
    with apply_loras(model, [(path, 1.0)], strict=False) as handle:
        assert handle.reports[0].matched == 28 and len(handle.reports[0].unmatched) == 2
        assert "2 keys NOT applied" in str(handle.reports[0])
    assert_identical(model, before)


def test_shape_mismatch_names_module_and_both_shapes(tmp_path):
    model = tiny_model(seed=0)
    before = snapshot(model)
    wide = random_lora(tiny_model(seed=0, dim=192, n_heads=3, axes_dims=(16, 24, 24)), 1)
    with pytest.raises(LoraError, match=r"module \w+\.0\.attention\.to_q.*\[192, 192\].*\[96, 96\]"):
        apply_loras(model, [(wide, 1.0)], mode="runtime")
    assert_identical(model, before)
    assert not any(m._forward_hooks for m in model.modules())


def test_pickles_checkpoints_and_text_files_are_rejected(tmp_path):
    model = tiny_model(seed=0)
    ckpt = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    with pytest.raises(LoraError, match="not a LoRA.*full model checkpoint"):
        load_lora(ckpt)
    text = tmp_path / "notes.safetensors"
    text.write_text("this is a text file, not a LoRA\n" * 4)
    with pytest.raises(LoraError, match="not a safetensors file"):
        apply_loras(model, [(text, 1.0)])
    pickle = tmp_path / "lora.pt"
    torch.save({"x": torch.zeros(1)}, pickle)
    with pytest.raises(LoraError, match="pickle"):
        load_lora(pickle)


def test_export_format_keys_alpha_and_metadata(tmp_path):
    model = tiny_model(seed=0)
    lora = random_lora(model, 1, alpha=2.0)
    lora.modules["layers.0.attention_norm1"] = LoraModule(kind="diff", diff=torch.full((96,), 0.01))
    path = save_lora(lora, tmp_path / "out.safetensors", metadata={"scheme": "sft", "steps": 100})
    keys = load_file(str(path))
    assert "diffusion_model.layers.0.attention.to_q.lora_A.weight" in keys
    assert keys["diffusion_model.layers.0.attention.to_q.alpha"].item() == 2.0
    assert "diffusion_model.layers.0.attention_norm1.diff" in keys
    back = load_lora(path)
    assert back.format == "zimage-turbo-nodes" and back.metadata["scheme"] == "sft"
    assert back.metadata["rank"] == "4" and json.loads(back.metadata["steps"]) == 100
    assert "attention.to_q" in back.metadata["targets"] and back.metadata["base_model"] == "Z-Image-Turbo"
    no_alpha = save_lora(random_lora(model, 1, alpha=4.0), tmp_path / "plain.safetensors")
    assert not any(k.endswith(".alpha") for k in load_file(str(no_alpha)))  # alpha == rank is not written
    a, b = snapshot(model), None
    with apply_loras(model, [(lora, 1.0)]):
        a = snapshot(model)
    with apply_loras(model, [(back, 1.0)]):
        b = snapshot(model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_weights_helpers():
    model = tiny_model(seed=0)
    lora = random_lora(model, 1, rank=4)
    half = lora.to(torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in half.parameters()) and len(list(half.parameters())) == 56
    assert isinstance(lora, LoraWeights) and lora.modules["layers.0.feed_forward.w1"].scale == 1.0
    assert zimage_core.load_lora is load_lora and zimage_core.apply_loras is apply_loras


def test_loaded_model_restores_from_its_checkpoint_file(tmp_path):
    """With the real loader: a bf16 model from a ComfyUI-layout file (fused qkv on disk) is patched and restored by
    re-reading its file (q/k/v rows included), bit for bit, without backups."""
    from zimage_core.checkpoint import load_transformer, save_transformer
    from zimage_core.lora import apply as apply_module

    path = save_transformer(tiny_model(seed=0), tmp_path / "model.safetensors", layout="comfyui", dtype=torch.bfloat16)
    model = load_transformer(path, dtype=torch.bfloat16)
    before = snapshot(model)
    handle = apply_loras(model, [(random_lora(model, 1), 1.0), (random_lora(model, 2), 0.5)])
    assert all(v is None for v in apply_module._merge_state(model).backups.values())
    assert not torch.equal(model.layers[0].attention.to_k.weight, before["layers.0.attention.to_k.weight"])
    handle.remove()
    assert_identical(model, before)


def test_a_dropped_model_with_a_merged_stack_is_freed():
    """The merge state lives on the model, so nothing global keeps a model (and its weights) alive."""
    import gc
    import weakref

    from zimage_core import apply_loras, new_lora
    from zimage_core.testing import tiny_model

    model = tiny_model(seed=7)
    lora = new_lora(model, rank=2, seed=3)
    with torch.no_grad():
        for module in lora.modules.values():
            module.up.normal_()
    handle = apply_loras(model, [(lora, 1.0)], mode="merge")
    assert handle.reports[0].matched > 0
    alive = weakref.ref(model)
    del model, handle
    gc.collect()
    assert alive() is None
