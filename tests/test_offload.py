"""Block offload: the same numbers for sampling and for training (every scheme, bit-exact on CPU), each block's weights
only on the compute device while it runs (forward, checkpoint recompute, backward), at most two blocks there at any
time (the next one prefetched: a uniform model always), and re-enabling / switching modes keeps the model and its LoRA
stack right. The outsized blocks of a GGUF file: tests/test_gguf_base.py."""

import weakref

import pytest
import torch
from block_copies import BlockCopies

from zimage_core import offload as offload_module
from zimage_core.lora import apply_loras, new_lora, save_lora
from zimage_core.offload import bytes_in_flight, disable_block_offload, enable_block_offload, is_offloaded
from zimage_core.testing import tiny_model
from zimage_core.training import TrainConfig, build_cache, train
from zimage_core.training.toy import make_toy_dataset, toy_encoders


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.9, 0.3]), torch.randn(2, 9, 48, generator=g)


def _run(model):
    with torch.no_grad():
        return model(*_inputs())


def _homes(model):
    return [(id(p), p.data_ptr()) for b in model.blocks() for p in b.parameters()]


def test_offloaded_model_gives_identical_outputs():
    model = tiny_model(seed=2)
    expected = _run(model)
    enable_block_offload(model, "cpu")
    assert is_offloaded(model)
    assert torch.equal(_run(model), expected)
    with torch.inference_mode():  # how ComfyUI's sampler calls it
        assert torch.equal(model(*_inputs()), expected)
    disable_block_offload(model)
    assert not is_offloaded(model)
    assert torch.equal(_run(model), expected)


class _Spy:
    """Records, at every block entry, which blocks are live on the compute device (fetched copies still alive)."""

    def __init__(self, monkeypatch, model):
        self.copies: list[tuple[int, weakref.ref]] = []
        self.events: list[tuple[str, int, list[int]]] = []
        original = offload_module.BlockOffload._copy

        def copy(offload, index):
            fetched = original(offload, index)
            self.copies += [(index, weakref.ref(t)) for t in fetched.tensors.values()]
            return fetched

        monkeypatch.setattr(offload_module.BlockOffload, "_copy", copy)
        for i, block in enumerate(model.blocks()):
            block.register_forward_pre_hook(lambda m, a, i=i: self.events.append(
                ("backward" if offload_module._in_backward() else "forward", i, self.live())), prepend=True)

    def live(self) -> list[int]:
        return sorted({i for i, ref in self.copies if ref() is not None})


def test_each_block_is_fetched_just_in_time_and_released(monkeypatch):
    model = tiny_model(seed=2)
    enable_block_offload(model, "cpu")
    homes = _homes(model)
    spy = _Spy(monkeypatch, model)
    _run(model)
    n = len(model.blocks())
    assert [i for _, i, _ in spy.events] == list(range(n))  # in execution order
    for _, i, live in spy.events:
        assert set(live) <= {i}, live  # when block i starts only its own prefetch exists (no other block)
    assert spy.live() == []  # nothing stays on the compute device after the call
    assert _homes(model) == homes  # the module holds its home tensors again (same objects, same memory)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_training_pass_with_offload_equals_without_and_keeps_two_blocks(monkeypatch, checkpointing):
    def grads(model, spy=None):
        lora = new_lora(model, rank=4, seed=1)
        for m in lora.modules.values():
            m.up.normal_(generator=torch.Generator().manual_seed(9))
        params = list(lora.parameters())
        for p in params:
            p.requires_grad_(True)
        model.gradient_checkpointing = checkpointing
        with apply_loras(model, [(lora, 1.0)], mode="runtime"):
            out = model(*_inputs())
            out.pow(2).mean().backward()
        return out.detach(), [p.grad for p in params]

    reference = tiny_model(seed=2).requires_grad_(False)
    out_ref, grads_ref = grads(reference)
    model = enable_block_offload(tiny_model(seed=2).requires_grad_(False), "cpu")
    homes = _homes(model)
    spy = _Spy(monkeypatch, model)
    out, got = grads(model, spy)
    assert torch.equal(out, out_ref)
    assert all(torch.equal(a, b) for a, b in zip(got, grads_ref))
    n = len(model.blocks())
    forward = [e for e in spy.events if e[0] == "forward"]
    backward = [e for e in spy.events if e[0] == "backward"]
    assert [i for _, i, _ in forward] == list(range(n))
    assert sorted(i for _, i, _ in backward) == list(range(n))  # every block recomputed once (always checkpointed)
    for _, i, live in spy.events:
        assert len(live) <= 2, f"block {i}: blocks {live} on the compute device"  # current + prefetch at most
    assert spy.live() == [] and _homes(model) == homes  # backward freed every copy; homes untouched


def test_a_uniform_model_always_has_the_next_block_in_flight():
    """The default prefetch budget (twice the median block) holds any two blocks of a model without outsized ones
    (the context refiner, without adaLN, is the smallest): every next block is fetched while one runs."""
    model = tiny_model(seed=2)
    expected = _run(model)
    enable_block_offload(model, "cpu")
    with BlockCopies(model) as copies:
        assert torch.equal(_run(model), expected)
    n = len(model.blocks())
    assert all(frozenset({i, i + 1}) in copies.together for i in range(n - 1))
    assert max(map(len, copies.together)) == 2
    sizes = [sum(t.nbytes for t in [*b.parameters(), *b.buffers()]) for b in model.blocks()]
    assert copies.peak_bytes == bytes_in_flight(sizes) == max(map(sum, zip(sizes, sizes[1:])))
    enable_block_offload(model, "cpu", prefetch_budget_bytes=0)  # the same devices: only the budget changes
    with BlockCopies(model) as copies:
        assert torch.equal(_run(model), expected)
    assert max(map(len, copies.together)) == 1  # no prefetch: each block fetched when it runs


def test_blocks_computed_on_another_device_than_their_home_stay_there_through_backward():
    # "meta" stands in for the GPU: a tensor autograd saved from the home (CPU) copy would fail with a device error
    model = enable_block_offload(tiny_model(seed=2).requires_grad_(False), "meta", offload_device="cpu")
    lora = new_lora(model, rank=4).to(device="meta")
    params = list(lora.parameters())
    for p in params:
        p.requires_grad_(True)
    with apply_loras(model, [(lora, 1.0)], mode="runtime"):
        x, sigma, caps = (t.to("meta") for t in _inputs())
        out = model(x, sigma, caps)
        out.pow(2).mean().backward()
    assert out.device.type == "meta" and {p.grad.device.type for p in params} == {"meta"}
    assert {p.device.type for b in model.blocks() for p in b.parameters()} == {"cpu"}


def test_block_weights_that_require_grad_are_refused():
    model = enable_block_offload(tiny_model(seed=2), "cpu")  # requires_grad left on
    with pytest.raises(RuntimeError, match="block 0 has parameters that require grad"):
        model(*_inputs())
    assert _run(model.requires_grad_(False)) is not None  # and the model is still usable


def test_reenable_and_switch_modes_keep_the_merged_stack_exact(tmp_path):
    model = tiny_model(seed=2)
    base = _run(model)
    lora = new_lora(model, rank=4, seed=1)
    for m in lora.modules.values():
        m.up.normal_(generator=torch.Generator().manual_seed(4))
    save_lora(lora, tmp_path / "l.safetensors")
    reference = tiny_model(seed=2)
    with apply_loras(reference, [(tmp_path / "l.safetensors", 0.7)]):
        merged = _run(reference)

    enable_block_offload(model, "cpu")
    handle = apply_loras(model, [(tmp_path / "l.safetensors", 0.7)])  # merged into the offloaded weights
    state = model._block_offload
    enable_block_offload(model, "cpu")  # again: nothing changes
    assert model._block_offload is state
    assert torch.equal(_run(model), merged)
    enable_block_offload(model, "cpu", offload_device=torch.device("cpu", 0))  # another offload device: re-homed
    assert model._block_offload is not state and model._block_offload.offload == torch.device("cpu", 0)
    assert torch.equal(_run(model), merged)
    disable_block_offload(model)
    assert torch.equal(_run(model), merged)
    enable_block_offload(model, "cpu")
    handle.remove()  # removal on the offloaded model restores the base bit-exactly
    assert torch.equal(_run(model), base)
    disable_block_offload(model)
    assert torch.equal(_run(model), base)


# ----------------------------------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("offload_train")
    folder = make_toy_dataset(tmp / "data", n=2, sizes=((64, 64),))
    cache = build_cache(folder, tmp / "cache", toy_encoders())
    model = tiny_model(0)
    lora = new_lora(model, rank=4, seed=1)
    for m in lora.modules.values():
        m.up.normal_(generator=torch.Generator().manual_seed(5)).mul_(0.25)
    save_lora(lora, tmp / "lora.safetensors")
    return tmp, cache


SCHEMES = {
    "sft": {},
    "differential": {"preset_lora": "lora.safetensors"},
    "trajectory": {"init_lora": "lora.safetensors", "trajectory_noises": 2, "teacher_steps": 6, "student_steps": 2},
    "distillpatch": {"distill_patch": "lora.safetensors"},
}


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_training_with_offload_equals_training_without(data, scheme):
    tmp, cache = data
    extra = {k: str(tmp / v) if v == "lora.safetensors" else v for k, v in SCHEMES[scheme].items()}

    def run(offload: bool, checkpointing: bool = True):
        model = tiny_model(0)
        if offload:
            enable_block_offload(model, "cpu")
        config = TrainConfig(scheme=scheme, rank=4, lr=1e-3, steps=2, output_dir=str(tmp / f"{scheme}{offload}"),
                             validate=False, checkpoint_every=0, log_every=0,
                             gradient_checkpointing=checkpointing, **extra)
        result = train(model, config, cache, log=None, write_outputs=False)
        assert is_offloaded(model) == offload  # the trainer leaves the offload as it found it
        return result

    plain, offloaded = run(False), run(True)
    assert offloaded.losses == plain.losses
    assert all(torch.equal(a, b) for a, b in zip(offloaded.lora.parameters(), plain.lora.parameters()))
    if scheme == "sft":  # offload checkpoints even when the config does not: the same numbers again
        unchecked = run(True, checkpointing=False)
        assert all(torch.equal(a, b) for a, b in zip(unchecked.lora.parameters(), plain.lora.parameters()))
