"""nunchaku SVDQuant int4 weights: the unpacker inverts nunchaku's packed layout exactly (fixtures packed by a
restatement of nunchaku's packer in tests/svdquant_fixtures.py), the dequantized weight equals comfy-kitchen's eager
SVDQuant and the float formula, and nunchaku files load through `load_transformer` (svdq-fp4 refused by name)."""

from __future__ import annotations

import pytest
import torch

import svdquant_fixtures as fx
from zimage_core.checkpoint import load_transformer
from zimage_core.quant import QuantizedLinear
from zimage_core.quant import svdquant as sq
from zimage_core.testing import tiny_model


@pytest.mark.parametrize("rank", [32, 128, 256])
def test_unpacking_inverts_nunchakus_layout_exactly(rank):
    """Every stored tensor (qweight nibbles in MMA tiles, wscales, smooth_factor and bias in pack_scale order, the
    16 x 16 low-rank fragments) comes back bit for bit in the natural layout."""
    lin = fx.random_linear(384, 256, rank, torch.Generator().manual_seed(rank))
    packed = fx.nunchaku_tensors(lin)
    natural = sq.unpack_linear(packed)
    assert torch.equal(sq.unpack_natural_int4(natural["qweight"]), lin["values"])
    assert torch.equal(natural["wscales"], lin["scales"].t())
    assert torch.equal(natural["smooth_factor"], lin["smooth"])
    assert torch.equal(natural["proj_down"], lin["down"].t())
    assert torch.equal(natural["proj_up"], lin["up"])
    bias = torch.randn(384).to(torch.bfloat16)
    assert torch.equal(sq.unpack_vector(fx.pack_scale(bias)), bias)
    assert not torch.equal(packed["smooth_factor"], lin["smooth"])  # the fixture really is permuted


def test_weight_equals_comfy_kitchen_and_the_float_formula():
    """W_eff = Wres·diag(1/smooth) + up·down: in fp32 within 1e-6 of the fp64 formula, and within 2 fp32 ulps of
    comfy-kitchen's TensorCoreSVDQuantW4A4Layout.dequantize, which feeds an identity matrix through its own
    activation quantizer (each 1/smooth_k is rounded once more as 7·((1/smooth_k)/7)), hence not bit-equal."""
    from comfy_kitchen.tensor import QuantizedTensor, TensorCoreSVDQuantW4A4Layout

    n, k, rank = 384, 256, 32
    lin = fx.random_linear(n, k, rank, torch.Generator().manual_seed(1))
    t = {name: v.float() for name, v in sq.unpack_linear(fx.nunchaku_tensors(lin)).items()}
    t["qweight"] = t["qweight"].to(torch.int8)
    ours = sq.dequantize(t, (n, k), torch.float32)
    exact = fx.float_weight(lin)
    assert ((ours.double() - exact).abs().max() / exact.abs().max()) < 1e-6
    params = TensorCoreSVDQuantW4A4Layout.Params(
        scale=t["wscales"], orig_dtype=torch.float32, orig_shape=(n, k), proj_down=t["proj_down"],
        proj_up=t["proj_up"], smooth_factor=t["smooth_factor"])
    kitchen = QuantizedTensor(t["qweight"], "TensorCoreSVDQuantW4A4Layout", params).dequantize()
    torch.testing.assert_close(ours, kitchen, rtol=2 ** -22, atol=2 ** -22 * kitchen.abs().max().item())
    # nunchaku's own arithmetic (4-bit activations) through kitchen: the W4A4 error on top of this weight
    x = torch.randn(7, k)
    w4a4 = sq.linear_w4a4(x, t)
    assert torch.equal(w4a4, torch.nn.functional.linear(x, QuantizedTensor(t["qweight"], "TensorCoreSVDQuantW4A4Layout",
                                                                           params)))
    rel = (w4a4 - x @ ours.t()).norm() / w4a4.norm()
    assert 0.01 < rel < 0.2


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.9, 0.3]), torch.randn(2, 9, 48, generator=g)


@pytest.fixture(scope="module")
def base():
    return tiny_model(seed=7, **fx.tiny_config())


def _unique_bytes(model) -> int:
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("rank,skip_refiners", [(32, False), (128, True)])
def test_nunchaku_file_loads_and_computes_like_the_reference(base, tmp_path, rank, skip_refiners):
    """A nunchaku Z-Image file (fused qkv and w3/w1, bf16 refiners with skip_refiners) loads with every quantized
    Linear as "svdq:int4" and gives the output of the same model built from the float W_eff (fp32 rounding of
    W_eff is the only difference); loaded in bf16 it holds the file's bytes (within 5 %)."""
    path = tmp_path / f"svdq-int4_r{rank}-z-image-tiny.safetensors"
    refs = fx.write_file(base, path, rank=rank, skip_refiners=skip_refiners)
    model = load_transformer(path, torch.float32)
    quantized = {p for p, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert quantized == set(refs)
    assert {m.fmt for m in model.modules() if isinstance(m, QuantizedLinear)} == {"svdq:int4"}
    assert len(quantized) == 7 * (2 if skip_refiners else 4)
    expected = fx.reference_model(base, refs)
    with torch.no_grad():
        out, ref = model(*_inputs()), expected(*_inputs())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    ratio = _unique_bytes(load_transformer(path, torch.bfloat16)) / path.stat().st_size
    assert 0.95 < ratio <= 1.0, ratio


def test_inspect_reads_the_layout_without_unpacking(base, tmp_path, monkeypatch):
    """inspect_checkpoint gives the config and the rank from the header; no Linear is unpacked for it."""
    from zimage_core import inspect_checkpoint

    path = tmp_path / "svdq-int4_r32.safetensors"
    fx.write_file(base, path)
    monkeypatch.setattr(sq, "unpack_linear", lambda tensors: pytest.fail("unpacked while inspecting"))
    config, layout = inspect_checkpoint(path)
    assert (config.dim, config.n_layers, config.ffn_hidden_dim) == (128, 2, 384)
    assert layout == "nunchaku SVDQuant int4 r32"


def test_svdq_fp4_is_refused_by_name(base, tmp_path):
    path = tmp_path / "svdq-fp4_r32-z-image-tiny.safetensors"
    fx.write_file(base, path, fp4=True)
    with pytest.raises(ValueError, match="svdq-fp4.*ComfyUI-nunchaku") as err:
        load_transformer(path, torch.float32)
    assert str(path) in str(err.value)


def test_incomplete_layer_is_refused_naming_the_tensor(base, tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "svdq.safetensors"
    fx.write_file(base, path)
    state = load_file(str(path))
    del state["layers.1.feed_forward.net.2.proj_up"]
    bad = tmp_path / "svdq-missing.safetensors"
    save_file(state, str(bad))
    with pytest.raises(ValueError, match="layers.1.feed_forward.net.2.proj_up") as err:
        load_transformer(bad, torch.float32)
    assert str(bad) in str(err.value)


def test_w4a4_path_names_the_missing_package(monkeypatch):
    """comfy-kitchen is optional: loading and the dequantizing path never need it; the W4A4 comparison path
    says what to install."""
    import sys

    monkeypatch.setitem(sys.modules, "comfy_kitchen", None)
    with pytest.raises(ImportError, match="pip install comfy-kitchen packaging"):
        sq.linear_w4a4(torch.zeros(1, 128), {})
