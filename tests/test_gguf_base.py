"""A GGUF base under everything that uses a model: LoRAs (low-rank and full-size deltas) run as exact side branches
and never touch the stored bytes, removal is exact, block offload (which fetches the file's outsized bf16 refiner
blocks alone) and a Fun ControlNet give the numbers of the same weights held in fp32, and gradients flow to the input
only."""

import pytest
import torch

import gguf  # noqa: E402,F401  (pinned test requirement: missing fails)

import zimage_core as zc  # noqa: E402
from block_copies import BlockCopies  # noqa: E402
from gguf_fixtures import dequantized_reference, tiny_256, write_gguf  # noqa: E402
from zimage_core import load_transformer  # noqa: E402
from zimage_core.controlnet import ControlNetConfig, ZImageControlNet, control_residuals  # noqa: E402
from zimage_core.lora import LoraWeights, apply_loras, new_lora  # noqa: E402
from zimage_core.lora.weights import LoraModule  # noqa: E402
from zimage_core.offload import bytes_in_flight, disable_block_offload, enable_block_offload  # noqa: E402
from zimage_core.quant import QuantizedLinear  # noqa: E402
from zimage_core.testing import init_random_  # noqa: E402

G = torch.Generator().manual_seed(11)
LATENTS, CAPTION = torch.randn(1, 16, 8, 8, generator=G), torch.randn(20, 48, generator=G)


def _q4_k_m(name: str) -> str:  # llama-quantize's Q4_K_M mix for Z-Image names
    return "Q5_K" if ".qkv." in name else "Q6_K" if ".w2." in name else "Q4_K"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf_base")
    path = write_gguf(folder / "z-Q4_K_M.gguf", tiny_256(0), _q4_k_m)
    return path, dequantized_reference(path, folder / "deq.safetensors")


def _out(model, **kwargs):
    with torch.no_grad():
        return model(LATENTS, torch.tensor([0.6]), [CAPTION], **kwargs)


def _stored(model):
    return {p: m.weight.clone() for p, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def _loras(model):
    """A low-rank LoRA on every attention / SwiGLU Linear, and a LoKr, a full diff and a norm diff."""
    lora = new_lora(model, rank=4, seed=3)
    gen = torch.Generator().manual_seed(3)
    for m in lora.modules.values():
        m.up.copy_(torch.randn(m.up.shape, generator=gen) * 0.05)
    w1 = model.layers[0].feed_forward.w1
    full = LoraWeights({
        "layers.0.feed_forward.w1": LoraModule(kind="lokr", alpha=None, factors={
            "lokr_w1": torch.randn(8, 4, generator=gen) * 0.1,
            "lokr_w2": torch.randn(w1.out_features // 8, w1.in_features // 4, generator=gen) * 0.02}),
        "layers.1.attention.to_v": LoraModule(kind="diff", diff=torch.randn(256, 256, generator=gen) * 0.01),
        "layers.0.ffn_norm1": LoraModule(kind="diff", diff=torch.randn(256, generator=gen) * 0.1)}, format="test")
    return [(lora, 0.8), (full, 1.0)]


@pytest.mark.parametrize("mode", ["merge", "runtime"])
def test_loras_on_a_gguf_base_are_exact_side_branches_and_remove_exactly(files, mode):
    model = load_transformer(files[0], dtype=torch.float32)
    plain = load_transformer(files[1], dtype=torch.float32)
    base, stored = _out(model), _stored(model)
    assert torch.equal(base, _out(plain))  # the same weights, dequantized at call time or at load
    loras = _loras(model)
    with apply_loras(model, loras, mode=mode) as handle:
        merged_into = {p.param.rpartition(".")[0] for p in handle._patches}  # merge mode: only plain weights
        assert "layers.0.ffn_norm1" in merged_into and not merged_into & set(stored)
        assert (mode == "runtime") == (merged_into == {"layers.0.ffn_norm1"})  # (the refiners are BF16 in the file)
        assert all(torch.equal(stored[p], m.weight) for p, m in model.named_modules() if p in stored)
        with_loras = _out(model)
    with apply_loras(plain, loras, mode="merge"):
        merged = _out(plain)
    assert (with_loras - merged).abs().max() < 1e-5 and (with_loras - base).abs().max() > 1e-2
    assert torch.equal(_out(model), base)


def test_a_lora_for_another_model_is_refused_on_a_gguf_base(files):
    from zimage_core.lora.weights import LoraError
    from zimage_core.testing import tiny_model

    model = load_transformer(files[0], dtype=torch.float32)
    with pytest.raises(LoraError, match=r"weight of shape \[96, 96\] but the model's weight is \[256, 256\]"):
        apply_loras(model, [(new_lora(tiny_model(0), rank=2), 1.0)])


def test_block_offload_of_a_gguf_base_gives_the_same_numbers(files):
    model = load_transformer(files[0], dtype=torch.float32)
    reference, stored = _out(model), _stored(model)
    enable_block_offload(model, "cpu")
    try:
        assert torch.equal(_out(model), reference)
        with apply_loras(model, _loras(model)[:1]):
            offloaded = _out(model)
    finally:
        disable_block_offload(model)
    with apply_loras(model, _loras(model)[:1]):
        assert torch.equal(_out(model), offloaded)
    assert all(torch.equal(stored[p], m.weight) for p, m in model.named_modules() if p in stored)


def test_block_offload_fetches_the_outsized_refiner_blocks_alone(tmp_path):
    """As in city96's files the refiner blocks stay unquantized, several times the size of a Q4_K_M main block: with
    offload one of them is never on the compute device beside another block (forward, recompute and backward of a
    LoRA step), while the main blocks still prefetch; the numbers are those without offload."""
    config = tiny_256(0).config.replace(n_layers=6)  # few outsized blocks among many, as the real 2 + 2 among 30
    model = load_transformer(write_gguf(tmp_path / "z-Q4_K_M.gguf", init_random_(zc.ZImageTransformer(config), 0),
                                       _q4_k_m), dtype=torch.float32).requires_grad_(False)
    lora = new_lora(model, rank=4, seed=3)
    for m in lora.modules.values():
        m.up.normal_(generator=torch.Generator().manual_seed(4))
    params = [p.requires_grad_(True) for p in lora.parameters()]

    def step():
        with apply_loras(model, [(lora, 1.0)], mode="runtime"):
            out = model(LATENTS, torch.tensor([0.6]), [CAPTION])
            grads = torch.autograd.grad(out.square().mean(), params)
        return out.detach(), grads

    reference = step()
    sizes = [sum(t.nbytes for t in [*b.parameters(), *b.buffers()]) for b in model.blocks()]
    refiners = frozenset({0, 1})  # noise_refiner, context_refiner
    assert min(sizes[:2]) > 3 * max(sizes[2:])
    enable_block_offload(model, "cpu")
    with BlockCopies(model) as copies:
        out, grads = step()
    assert torch.equal(out, reference[0]) and all(map(torch.equal, grads, reference[1]))
    assert all(len(together) == 1 for together in copies.together if together & refiners)
    assert all(frozenset({i, i + 1}) in copies.together for i in range(2, len(sizes) - 1))
    assert copies.peak_bytes == bytes_in_flight(sizes) == max(sizes)  # a refiner block: two main blocks weigh less

    enable_block_offload(model, "cpu", prefetch_budget_bytes=sum(sizes))  # every next block prefetched
    with BlockCopies(model) as copies:
        step()
    assert refiners in copies.together and copies.peak_bytes == bytes_in_flight(sizes, sum(sizes)) == sum(sizes[:2])


def test_a_controlnet_on_a_gguf_base_equals_the_dequantized_base(files):
    model = load_transformer(files[0], dtype=torch.float32)
    plain = load_transformer(files[1], dtype=torch.float32)
    cfg = model.config
    net = init_random_(ZImageControlNet(ControlNetConfig.release(
        "2.1", dim=cfg.dim, n_heads=cfg.n_heads, n_refiner_layers=cfg.n_refiner_layers, n_control_layers=1,
        ffn_hidden_dim=cfg.ffn_hidden_dim)), 1).eval()
    control = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2))

    def velocity(base):
        return _out(base, residuals=control_residuals(base, [zc.ControlInput(net, control)]))

    with_control = velocity(model)
    assert torch.equal(with_control, velocity(plain)) and not torch.equal(with_control, _out(model))


def test_gradients_reach_the_input_only(files):
    model = load_transformer(files[0], dtype=torch.float32)
    lin = model.layers[0].attention.to_q
    x = torch.randn(3, 256, generator=G, requires_grad=True)
    lin(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, lin.dequantized(torch.float32)).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6) and x.grad.abs().max() > 0
    assert all(p.grad is None for p in lin.parameters())
