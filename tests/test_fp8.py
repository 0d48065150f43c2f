"""fp8 weight storage: loading (bf16 quantised at load, plain and ComfyUI scaled fp8 kept as stored), round trips,
bad files, the output error against bf16, and LoRAs / training on an fp8 base."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from zimage_core import load_transformer, save_transformer
from zimage_core.checkpoint import comfyui_state_dict
from zimage_core.quant.fp8 import Fp8Linear, QUANTIZED_MODULES, quantize_fp8, to_fp8_storage
from zimage_core.testing import tiny_model

G = torch.Generator().manual_seed(5)
LATENTS, CAPTION = torch.randn(1, 16, 8, 8, generator=G), torch.randn(20, 48, generator=G)
FP8 = torch.float8_e4m3fn


def _out(model, sigma=0.6):
    with torch.no_grad():
        return model(LATENTS, torch.tensor([sigma]), [CAPTION]).float()


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def bf16_file(tmp_path_factory):
    return save_transformer(tiny_model(seed=0), tmp_path_factory.mktemp("fp8") / "m_bf16.safetensors",
                            dtype=torch.bfloat16)


def _fp8_linears(model):
    return {path: m for path, m in model.named_modules() if isinstance(m, Fp8Linear)}


def test_bf16_file_is_quantised_at_load_into_fp8_block_linears(bf16_file):
    ref = load_transformer(bf16_file)
    model = load_transformer(bf16_file, weight_storage="fp8_e4m3fn")
    linears = _fp8_linears(model)
    assert len(linears) == len(QUANTIZED_MODULES) * len(model.blocks())
    assert all(m.weight.dtype == FP8 and m.weight_scale.shape == (m.out_features, 1) for m in linears.values())
    fp8_names = {f"{p}.{leaf}" for p in linears for leaf in ("weight", "weight_scale")}
    assert all(t.dtype == torch.bfloat16 for n, t in model.state_dict().items() if n not in fp8_names)
    assert model.dtype == torch.bfloat16  # the compute dtype
    # each fp8 weight is what quantize_fp8 makes of the stored bf16 weight; scales are powers of two
    q, s = quantize_fp8(ref.layers[0].feed_forward.w2.weight)
    w2 = model.layers[0].feed_forward.w2
    assert torch.equal(w2.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(w2.weight_scale, s)
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    fp8_bytes = sum(t.nbytes for m in linears.values() for t in m.parameters())
    bf16_bytes = sum(ref.get_submodule(p).weight.nbytes for p in linears)
    assert fp8_bytes < 0.55 * bf16_bytes  # 1 byte per weight + 4 per output row
    err = _rel(_out(model), _out(ref))
    assert 1e-3 < err < 0.08, err  # fp8 rounding (3 mantissa bits), not a broken model


def test_in_memory_quantisation_equals_quantisation_at_load(bf16_file):
    loaded = load_transformer(bf16_file, weight_storage="fp8_e4m3fn")
    converted = to_fp8_storage(load_transformer(bf16_file))
    assert torch.equal(_out(loaded), _out(converted))


@pytest.mark.parametrize("layout", ["diffusers", "comfyui"])
def test_fp8_storage_round_trips_bit_for_bit(bf16_file, tmp_path, layout):
    model = load_transformer(bf16_file, weight_storage="fp8_e4m3fn")
    path = save_transformer(model, tmp_path / "m_fp8.safetensors", layout=layout)
    again = load_transformer(path, weight_storage="fp8_e4m3fn")
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
    # the same file up-cast ("same" storage) computes the same numbers: power-of-two scales dequantise exactly
    assert torch.equal(_out(load_transformer(path)), _out(model))
    # and saving with a dtype writes the dequantised weights
    plain = load_transformer(save_transformer(model, tmp_path / "deq.safetensors", dtype=torch.bfloat16))
    assert not _fp8_linears(plain) and torch.equal(_out(plain), _out(model))


def _comfy_scaled_fp8(model, path, per_tensor=True, drop_scale=None, scale_shape=None, variant=FP8):
    """A ComfyUI "scaled fp8" single file: block Linears in fp8 with a per-tensor `scale_weight`."""
    stored = {}
    for key, value in comfyui_state_dict(model).items():
        if value.ndim == 2 and key.startswith(("layers.", "noise_refiner.", "context_refiner.")):
            scale = (value.abs().max() / torch.finfo(variant).max).reshape(())
            stored[key] = (value / scale).to(variant)
            if key.replace(".weight", "") != drop_scale:
                stored[key.replace(".weight", ".scale_weight")] = scale if scale_shape is None else \
                    scale.expand(scale_shape).contiguous()
            stored[key.replace(".weight", ".scale_input")] = torch.ones(())
        else:
            stored[key] = value
    stored["scaled_fp8"] = torch.zeros(0, dtype=FP8)
    save_file(stored, str(path))
    return stored


def test_comfyui_scaled_fp8_loads_straight_into_fp8_storage(tmp_path):
    tiny = tiny_model(seed=0)
    stored = _comfy_scaled_fp8(tiny, tmp_path / "scaled.safetensors")
    model = load_transformer(tmp_path / "scaled.safetensors", dtype=torch.float32, weight_storage="fp8_e4m3fn")
    qkv, scale = stored["layers.1.attention.qkv.weight"], stored["layers.1.attention.qkv.scale_weight"]
    to_k = model.layers[1].attention.to_k
    d = tiny.config.dim
    assert torch.equal(to_k.weight.view(torch.uint8), qkv[d:2 * d].view(torch.uint8))  # bits as stored
    assert torch.equal(to_k.weight_scale, scale.expand(d, 1))
    upcast = load_transformer(tmp_path / "scaled.safetensors", dtype=torch.float32)  # "same": fp32 weights
    assert torch.equal(_out(model), _out(upcast))


def test_e5m2_files_load_in_both_storages(tmp_path):
    tiny = tiny_model(seed=0)
    _comfy_scaled_fp8(tiny, tmp_path / "e5m2.safetensors", variant=torch.float8_e5m2)
    upcast = load_transformer(tmp_path / "e5m2.safetensors", dtype=torch.float32)
    requantised = load_transformer(tmp_path / "e5m2.safetensors", dtype=torch.float32, weight_storage="fp8_e4m3fn")
    assert all(m.weight.dtype == FP8 for m in _fp8_linears(requantised).values())
    # re-rounding e5m2 * scale to e4m3 (one more mantissa bit) adds less error than e5m2 itself carries
    assert _rel(_out(requantised), _out(upcast)) < 0.5 * _rel(_out(upcast), _out(tiny)) < 0.1


def test_bad_fp8_files_and_options_are_refused_by_name(tmp_path, bf16_file):
    tiny = tiny_model(seed=0)
    _comfy_scaled_fp8(tiny, tmp_path / "noscale.safetensors", drop_scale="layers.0.feed_forward.w1")
    with pytest.raises(ValueError, match=r"noscale.safetensors.*layers.0.feed_forward.w1.weight has no scale"):
        load_transformer(tmp_path / "noscale.safetensors", weight_storage="fp8_e4m3fn")
    _comfy_scaled_fp8(tiny, tmp_path / "badscale.safetensors", scale_shape=(3,))
    with pytest.raises(ValueError, match=r"scale .*scale_weight has shape \[3\].*needs a scalar or one value per"):
        load_transformer(tmp_path / "badscale.safetensors")
    with pytest.raises(ValueError, match="weight_storage must be one of"):
        load_transformer(bf16_file, weight_storage="fp8_e5m2")
    with pytest.raises(ValueError, match="compute dtype"):
        load_transformer(bf16_file, dtype=FP8)


def test_unknown_float8_variant_names_file_key_and_variant(tmp_path):
    raw = json.dumps({"layers.0.attention.to_q.weight": {"dtype": "F8_E4M3FNUZ", "shape": [2, 2],
                                                          "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "fnuz.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    with pytest.raises(ValueError, match=r"fnuz.safetensors: tensor 'layers.0.attention.to_q.weight' is stored as "
                                         r"the float8 variant F8_E4M3FNUZ"):
        load_transformer(path, weight_storage="fp8_e4m3fn")


def test_a_build_that_cannot_cast_fp8_is_refused_before_loading(bf16_file, monkeypatch):
    real_to = torch.Tensor.to

    def to_without_fp8(self, *args, **kwargs):  # what a torch build / backend without float8 kernels does
        if FP8 in args or kwargs.get("dtype") == FP8:
            raise RuntimeError("\"copy_kernel\" not implemented for 'Float8_e4m3fn'")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to_without_fp8)
    with pytest.raises(ValueError, match=r"weight_storage='fp8_e4m3fn': this torch build .* cannot cast"):
        load_transformer(bf16_file, weight_storage="fp8_e4m3fn")


# ---------------------------------------------------------------------------------------------- LoRAs on fp8
def _random_lora(model, seed=3, rank=4):
    from zimage_core.lora import new_lora
    lora = new_lora(model, rank=rank, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    for m in lora.modules.values():
        m.up.copy_(torch.randn(m.up.shape, generator=gen) * 0.3)
    return lora


def _fp8_bits(model):
    return {p: m.weight.view(torch.uint8).clone() for p, m in _fp8_linears(model).items()}


@pytest.mark.parametrize("mode", ["merge", "runtime"])
def test_loras_on_an_fp8_base_run_beside_the_weights_and_remove_exactly(bf16_file, mode):
    from zimage_core.lora import apply_loras
    model = load_transformer(bf16_file, dtype=torch.float32, weight_storage="fp8_e4m3fn")
    lora = _random_lora(model)
    base, bits = _out(model), _fp8_bits(model)
    with apply_loras(model, [(lora, 0.8)], mode=mode) as handle:
        assert all(torch.equal(bits[p], m.weight.view(torch.uint8)) for p, m in _fp8_linears(model).items())
        assert handle._patches == []  # nothing merged: every LoRA module is a side branch
        with_lora = _out(model)
    assert torch.equal(_out(model), base)  # removing hooks is exact
    # the branch computes exactly the LoRA on the dequantised weights (no fp8 rounding of the sum)
    plain = load_transformer(bf16_file, dtype=torch.float32)
    for path, m in _fp8_linears(model).items():
        plain.get_submodule(path).weight.data.copy_(m.dequantized(torch.float32))
    with apply_loras(plain, [(lora, 0.8)], mode="merge"):
        merged = _out(plain)
    assert (with_lora - merged).abs().max() < 1e-4 and (with_lora - base).abs().max() > 0.05


def test_full_size_deltas_on_fp8_are_branches_too(bf16_file):
    from zimage_core.lora import LoraWeights, apply_loras
    from zimage_core.lora.weights import LoraModule
    model = load_transformer(bf16_file, dtype=torch.float32, weight_storage="fp8_e4m3fn")
    gen = torch.Generator().manual_seed(9)
    w1 = model.layers[0].feed_forward.w1
    lokr = LoraModule(kind="lokr", alpha=None, factors={
        "lokr_w1": torch.randn(8, 4, generator=gen) * 0.1,
        "lokr_w2": torch.randn(w1.out_features // 8, w1.in_features // 4, generator=gen) * 0.1})
    diff = LoraModule(kind="diff", diff=torch.randn(96, 96, generator=gen) * 0.05)
    norm = LoraModule(kind="diff", diff=torch.randn(96, generator=gen) * 0.1)  # a bf16 norm: merged as before
    lora = LoraWeights({"layers.0.feed_forward.w1": lokr, "layers.1.attention.to_v": diff,
                        "layers.0.ffn_norm1": norm}, format="test")
    base, bits = _out(model), _fp8_bits(model)
    with apply_loras(model, [(lora, 1.0)]) as handle:
        assert [p.param for p in handle._patches] == ["layers.0.ffn_norm1.weight"]
        assert all(torch.equal(bits[p], m.weight.view(torch.uint8)) for p, m in _fp8_linears(model).items())
        applied = _out(model)
    plain = load_transformer(bf16_file, dtype=torch.float32)
    for path, m in _fp8_linears(model).items():
        plain.get_submodule(path).weight.data.copy_(m.dequantized(torch.float32))
    with apply_loras(plain, [(lora, 1.0)]):
        expected = _out(plain)
    assert (applied - expected).abs().max() < 1e-4 and (applied - base).abs().max() > 0.01
    assert torch.equal(_out(model), base)


def test_training_a_lora_on_a_frozen_fp8_base(tmp_path):
    from zimage_core.training import TrainConfig, build_cache, train
    from zimage_core.training.toy import make_toy_dataset, toy_encoders
    folder = make_toy_dataset(tmp_path / "data", n=2, sizes=((64, 64),))
    cache = build_cache(folder, tmp_path / "cache", toy_encoders(), prompts=["a red square", "a blue square"])
    model = to_fp8_storage(tiny_model(0).to(torch.bfloat16))
    model.gradient_checkpointing = True
    bits = _fp8_bits(model)
    cfg = TrainConfig(rank=4, lr=1e-3, steps=6, output_dir=str(tmp_path / "out"), validate=False,
                      checkpoint_every=0, log_every=0, base_model="tiny:0")
    result = train(model, cfg, cache, log=None, write_outputs=False)
    assert all(torch.equal(bits[p], m.weight.view(torch.uint8)) for p, m in _fp8_linears(model).items())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(result.losses)))
    ups = [m.up for path, m in result.lora.modules.items() if isinstance(model.get_submodule(path), Fp8Linear)]
    assert len(ups) == len(_fp8_linears(model)) and all(float(u.abs().max()) > 0 for u in ups)


def test_gradient_through_an_fp8_linear_equals_the_dequantised_linear():
    from zimage_core.quant.fp8 import Fp8Linear as Lin
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(24, 16, generator=gen) * 0.05
    lin = Lin(16, 24, compute_dtype=torch.float32)
    lin.weight.data, lin.weight_scale.data = quantize_fp8(weight)
    x = torch.randn(3, 16, generator=gen, requires_grad=True)
    lin(x).pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, lin.dequantized()).pow(2).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6) and lin.weight.grad is None
