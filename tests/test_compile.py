"""zimage_core.compile: per-block compile that stays exact with runtime LoRAs (fp8 base), merged LoRAs, block
offload, every resolution and caption length, and training. Dynamo's graphs are counted with a CompileCounter
backend (dynamo traces exactly as for inductor; the graph then runs eagerly), so these tests take seconds."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from zimage_core import apply_loras, new_lora
from zimage_core.compile import compile_state, disable_compile, enable_compile, is_compiled
from zimage_core.offload import enable_block_offload
from zimage_core.quant.fp8 import to_fp8_storage
from zimage_core.testing import tiny_model

TOL = 1e-5


def random_lora(model, seed, rank=4):
    lora = new_lora(model, rank=rank, seed=seed, targets=("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"))
    gen = torch.Generator().manual_seed(seed + 100)
    for module in lora.modules.values():
        module.up.copy_(0.1 * torch.randn(module.up.shape, generator=gen))
    return lora


def inputs(h=8, w=8, caption=20, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, h, w, generator=g), torch.full((batch,), 0.6),
            [torch.randn(caption, 48, generator=g) for _ in range(batch)])


def run(model, data):
    with torch.no_grad():
        return model(*data)


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture
def pair():
    """(compiled model, eager twin, graph counter): fp32 compute, fp8-stored block weights, so every LoRA runs as
    a runtime branch (the case compile used to ignore)."""
    torch._dynamo.reset()
    eager = to_fp8_storage(tiny_model(seed=0))
    compiled = copy.deepcopy(eager)
    counter = CompileCounter()
    enable_compile(compiled, backend=counter)
    yield compiled, eager, counter
    torch._dynamo.reset()


@pytest.mark.slow  # dynamo traces the blocks (and backward): 15-60 s on the shared 2-core machine
def test_lora_add_strength_change_remove_and_distillpatch_stay_exact(pair):
    compiled, eager, counter = pair
    data = inputs()
    assert rel(run(compiled, data), run(eager, data)) <= TOL
    first = counter.frame_count
    assert 1 <= first <= 2  # modulated and unmodulated (context refiner) block variants

    def change(loras):
        """Apply `loras` to both models (removing what was there); return new graphs and the compiled error."""
        before = counter.frame_count
        for m in (compiled, eager):
            if getattr(m, "_test_handle", None) is not None:
                m._test_handle.remove()
            m._test_handle = apply_loras(m, loras) if loras else None
        out_c, out_e = run(compiled, data), run(eager, data)
        return counter.frame_count - before, rel(out_c, out_e), out_e

    user, distill = random_lora(eager, seed=1), random_lora(eager, seed=2, rank=8)
    base = run(eager, data)
    graphs, err, out = change([(user, 1.0)])
    assert graphs <= 2 and err <= TOL and rel(out, base) > 1e-3  # the LoRA acts and the compiled model sees it
    graphs, err, out2 = change([(user, 0.4)])
    assert graphs <= 2 and err <= TOL and rel(out2, out) > 1e-4
    graphs, err, out3 = change([(user, 0.4), (distill, 1.0)])
    assert graphs <= 2 and err <= TOL and rel(out3, out2) > 1e-4
    graphs, err, _ = change([(user, 0.4), (distill, 0.7)])
    assert graphs == 0 and err <= TOL  # strengths are graph inputs: nothing recompiles
    graphs, err, out5 = change([])
    assert graphs <= 2 and err <= TOL and torch.equal(out5, base)


def test_no_recompile_across_resolutions_and_caption_lengths(pair):
    compiled, eager, counter = pair
    run(compiled, inputs(8, 8, 20))
    first = counter.frame_count
    for h, w in [(8, 8), (12, 10), (16, 16), (6, 14), (20, 12)]:
        for caption in (7, 40, 77):
            data = inputs(h, w, caption)
            assert rel(run(compiled, data), run(eager, data)) <= TOL, (h, w, caption)
    assert counter.frame_count == first
    assert compile_state(compiled).eager_calls == 0


def test_merged_lora_and_bf16_weights():
    """A LoRA merged into the (non-fp8) weights in place is seen by the compiled blocks: weights are graph inputs."""
    torch._dynamo.reset()
    eager = tiny_model(seed=0)
    compiled = enable_compile(copy.deepcopy(eager), backend=CompileCounter())
    data = inputs()
    run(compiled, data)
    lora = random_lora(eager, seed=3)
    with apply_loras(compiled, [(lora, 0.8)]), apply_loras(eager, [(lora, 0.8)]):
        assert rel(run(compiled, data), run(eager, data)) <= TOL
    assert rel(run(compiled, data), run(eager, data)) <= TOL


def test_block_offload_hooks_run_outside_the_compiled_region(pair):
    compiled, eager, counter = pair
    enable_block_offload(compiled, "cpu")
    state = compiled._block_offload
    fetched = []
    take = state._take
    state._take = lambda index: fetched.append(index) or take(index)
    data = inputs()
    assert rel(run(compiled, data), run(eager, data)) <= TOL
    assert sorted(fetched) == list(range(len(compiled.blocks())))  # every block was streamed, once
    assert not state.active


def test_recompile_limit_fallback_is_logged_once_and_stays_correct(pair, caplog):
    compiled, eager, counter = pair
    with torch._dynamo.config.patch(recompile_limit=2), caplog.at_level(logging.WARNING, "zimage_core"):
        for batch in (1, 2, 3):  # each batch size is a new block variant (the adaLN broadcast)
            data = inputs(batch=batch)
            assert rel(run(compiled, data), run(eager, data)) <= TOL
    warnings = [r for r in caplog.records if "recompile limit" in r.getMessage()]
    assert len(warnings) == 1
    assert compile_state(compiled).eager_calls > 0


@pytest.mark.slow  # dynamo traces the blocks (and backward): 15-60 s on the shared 2-core machine
@pytest.mark.parametrize("storage", ["fp32", "fp8"])
def test_training_gradients_equal_eager(storage):
    """The trainer's path: runtime LoRA with fp32 tensors that require grad, gradient checkpointing, backward
    through AOT autograd's graphs (aot_eager); on a plain and on an fp8-stored (quantized) base."""
    from zimage_core.training.losses import sft_loss

    torch._dynamo.reset()
    eager = tiny_model(seed=0) if storage == "fp32" else to_fp8_storage(tiny_model(seed=0))
    compiled = enable_compile(copy.deepcopy(eager), backend="aot_eager")
    latents, sigma, captions = inputs(batch=2)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    grads = []
    for model in (compiled, eager):
        lora = random_lora(model, seed=4)
        params = list(lora.parameters())
        for p in params:
            p.requires_grad_(True)
        model.gradient_checkpointing = True
        with apply_loras(model, [(lora, 1.0)], mode="runtime"):
            sft_loss(model, latents, captions, noise, sigma).backward()
        grads.append([p.grad for p in params])
    assert all(g is not None and g.abs().sum() > 0 for g in grads[1][1::2])  # the up matrices get gradients
    worst = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(*grads) if b.any())
    assert worst <= TOL
    torch._dynamo.reset()


def test_disable_restores_eager_forwards():
    model = tiny_model(seed=0)
    enable_compile(model, backend="eager")
    assert is_compiled(model) and "forward" in model.layers[0].__dict__
    disable_compile(model)
    assert not is_compiled(model) and "forward" not in model.layers[0].__dict__


def test_unknown_backend_is_refused_by_name():
    with pytest.raises(ValueError, match="compile: unknown torch.compile backend 'nope'"):
        enable_compile(tiny_model(seed=0), backend="nope")


@pytest.mark.slow
def test_inductor_output_equals_eager():
    """One real inductor compile (C++ backend on CPU), fp8 storage: the dequantize is traced into the graph."""
    torch._dynamo.reset()
    eager = to_fp8_storage(tiny_model(seed=0))
    compiled = enable_compile(copy.deepcopy(eager), backend="inductor")
    lora = random_lora(eager, seed=6)
    for m in (compiled, eager):
        apply_loras(m, [(lora, 0.5)])
    data = inputs()
    assert rel(run(compiled, data), run(eager, data)) <= TOL
    torch._dynamo.reset()


def test_inductor_without_its_code_generator_is_refused_at_setup(monkeypatch):
    """No triton on a CUDA machine (or no C++ compiler on CPU): a clear error when compile is enabled, naming the
    option, instead of a failure at the first compiled call in the middle of sampling."""
    import torch.utils._triton

    from zimage_core.compile import check_compile_support

    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    with pytest.raises(ValueError, match="compile: inductor needs triton on CUDA"):
        check_compile_support("inductor", "cuda")
    import torch._inductor.cpp_builder as builder

    monkeypatch.setattr(builder, "get_cpp_compiler", lambda: (_ for _ in ()).throw(RuntimeError("no g++")))
    model = tiny_model(seed=0)
    with pytest.raises(ValueError, match=r"compile: inductor needs a C\+\+ compiler on CPU \(RuntimeError: no g\+\+\)"):
        enable_compile(model, device="cpu")
    assert not is_compiled(model)
