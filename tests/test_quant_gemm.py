"""zimage_core.quant.gemm: fp8 / int8 / nvfp4 GEMMs on quantized Linears, checked on CPU (torch's CPU `_scaled_mm` and
`_int_mm`, comfy-kitchen's eager backend compute the same products as the GPU kernels) against the dequantize path
and the exact fp32 product; the automatic choice never picks one the device lacks, and a forced one is refused by
name where it cannot run."""

from __future__ import annotations

import pytest
import torch

from zimage_core import apply_loras, new_lora
from zimage_core.quant import FORMATS, QuantizedLinear
from zimage_core.quant.fp8 import Fp8Linear, dequantize, quantize_fp8, to_fp8_storage
from zimage_core.quant.gemm import device_has, gemm_for, set_quantized_compute
from zimage_core.testing import tiny_model


def _layer(seed=0, tokens=256, d_in=512, d_out=384):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=g)
    x[:, 7] *= 20  # one outlier channel, as real activations have
    w = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
    return x, w


def _rel(a, b):
    return float((a.float() - b).norm() / b.norm())


def _errors(linear, x, exact, gemm):
    """(dequant error, gemm error) of one layer against the exact product, computed in bf16 without autograd."""
    with torch.no_grad():
        linear.compute = "dequant"
        dequant = linear(x.bfloat16())
        linear.compute = gemm
        quick = linear(x.bfloat16())
    return _rel(dequant, exact), _rel(quick, exact)


def test_fp8_gemm_error_next_to_the_dequant_path():
    """Per-token e4m3 activations add their rounding to the weights' (measured 3.28 % vs 2.61 %, 1.25x)."""
    x, w = _layer()
    linear = Fp8Linear(w.shape[1], w.shape[0], compute_dtype=torch.bfloat16)
    linear.weight.data, linear.weight_scale.data = quantize_fp8(w)
    e_dequant, e_fp8 = _errors(linear, x, x @ w.t(), "fp8_gemm")
    assert 0.005 < e_dequant < 0.05 and e_fp8 != e_dequant  # both real fp8 paths, not the same one
    assert e_fp8 <= 1.35 * e_dequant, (e_fp8, e_dequant)


def test_int8_gemm_on_a_comfy_int8_layer():
    x, w = _layer(seed=1)
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    linear = QuantizedLinear(w.shape[1], w.shape[0], FORMATS["comfy:int8_tensorwise"],
                             {"weight": torch.round(w / scale).to(torch.int8), "weight_scale": scale})
    assert gemm_for(linear) == "int8_gemm"
    e_dequant, e_int8 = _errors(linear, x, x @ w.t(), "int8_gemm")
    # int8 per-token rounding beside a x20 outlier loses the small values (fp8 keeps relative precision): 3.3 %
    assert e_dequant < 0.02 and e_dequant < e_int8 < 0.05, (e_dequant, e_int8)


def test_nvfp4_gemm_through_comfy_kitchen_on_a_comfy_nvfp4_layer(monkeypatch):
    """Our activation quantization (comfy-kitchen's quantize_nvfp4, per-tensor scale, rows padded to 16) and the
    kernel call's operands. The fp4 kernel itself has no CPU build (torch's CPU scaled_mm has no swizzled scales),
    so here `scaled_mm_nvfp4` is the product it computes, from comfy-kitchen's own eager dequantize of both
    operands: what the measured error below is."""
    import comfy_kitchen  # pinned test requirement: missing fails
    calls = []

    def product(a, b, tensor_scale_a, tensor_scale_b, block_scale_a, block_scale_b, bias=None, out_dtype=None,
                alpha=None):
        calls.append((a.shape, b.shape))
        a = comfy_kitchen.dequantize_nvfp4(a, tensor_scale_a, block_scale_a, torch.float32)
        b = comfy_kitchen.dequantize_nvfp4(b, tensor_scale_b, block_scale_b, torch.float32)
        return (a @ b.t()).to(out_dtype)

    monkeypatch.setattr(comfy_kitchen, "scaled_mm_nvfp4", product)
    x, w = _layer(seed=2, tokens=100)  # 100 tokens: padded to 112 for the kernel, sliced back
    tensor_scale = w.abs().amax().float() / (448 * 6)
    q, blocks = comfy_kitchen.quantize_nvfp4(w, tensor_scale)
    linear = QuantizedLinear(w.shape[1], w.shape[0], FORMATS["comfy:nvfp4"],
                             {"weight": q, "weight_scale": blocks, "weight_scale_2": tensor_scale})
    assert gemm_for(linear) == "nvfp4_gemm"
    e_dequant, e_fp4 = _errors(linear, x, x @ w.t(), "nvfp4_gemm")
    assert calls == [((112, 256), (384, 256))]
    assert 0.02 < e_dequant < 0.2 and e_dequant < e_fp4 < 2.5 * e_dequant, (e_dequant, e_fp4)


def test_training_keeps_the_dequant_path():
    x, w = _layer(tokens=32)
    linear = Fp8Linear(w.shape[1], w.shape[0], compute_dtype=torch.float32)
    linear.weight.data, linear.weight_scale.data = quantize_fp8(w)
    linear.compute = "fp8_gemm"
    xr = x.clone().requires_grad_(True)
    out = linear(xr)  # autograd records: the dequant path, with its backward
    torch.testing.assert_close(out, x @ dequantize(linear.weight, linear.weight_scale, torch.float32).t())
    out.sum().backward()
    assert xr.grad is not None


@pytest.fixture(scope="module")
def fp8_model():
    return to_fp8_storage(tiny_model(seed=0, dtype=torch.bfloat16))


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 16, 16, 16, generator=g), torch.tensor([0.6]), [torch.randn(32, 48, generator=g)]


def test_model_with_fp8_gemm_stays_near_dequant(fp8_model):
    with torch.no_grad():
        set_quantized_compute(fp8_model, "dequant")
        dequant = fp8_model(*_data()).float()
        assert set_quantized_compute(fp8_model, "fp8_gemm", force=True) == {"fp8_gemm": 7 * len(fp8_model.blocks())}
        fp8 = fp8_model(*_data()).float()
    set_quantized_compute(fp8_model, "dequant")
    assert 0 < _rel(fp8, dequant) < 0.05


def test_lora_branch_beside_the_fp8_gemm_stays_in_the_compute_dtype():
    """A LoRA on a layer computing through the fp8 GEMM: the output is that GEMM's plus the branch computed in bf16
    from the unquantized activation, bit for bit."""
    from zimage_core.quant.gemm import fp8_rowwise_linear

    x, w = _layer(tokens=64)
    model = torch.nn.Sequential(Fp8Linear(w.shape[1], w.shape[0], compute_dtype=torch.bfloat16))
    linear = model[0]
    linear.weight.data, linear.weight_scale.data = quantize_fp8(w)
    lora = new_lora(model, rank=4, seed=3, targets=("0",))
    lora.modules["0"].up.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
    xb = x.bfloat16()
    set_quantized_compute(model, "fp8_gemm", force=True)
    with torch.no_grad(), apply_loras(model, [(lora, 0.7)]) as handle:
        out = model(xb)
        branch = linear.lora_branches[0]
        expected = fp8_rowwise_linear(xb, linear.weight, linear.weight_scale) + branch(xb)
    assert handle.reports[0].matched == 1 and branch(xb).dtype == torch.bfloat16
    assert torch.equal(out, expected)


def test_auto_and_forced_choices(fp8_model):
    assert not device_has("fp8_gemm", "cpu") and not device_has("int8_gemm", "cpu")
    assert set_quantized_compute(fp8_model, "auto", device="cpu") == {"dequant": 7 * len(fp8_model.blocks())}
    with pytest.raises(ValueError, match="quantized_compute: fp8_gemm is not available on cpu"):
        set_quantized_compute(fp8_model, "fp8_gemm", device="cpu")
    with pytest.raises(ValueError, match=r"quantized_compute: int8_gemm takes layers stored as \('comfy:int8"):
        set_quantized_compute(fp8_model, "int8_gemm", device="cpu")
    with pytest.raises(ValueError, match="unknown choice 'int4'"):
        set_quantized_compute(fp8_model, "int4")
    assert {m.compute for m in fp8_model.modules() if isinstance(m, QuantizedLinear)} == {"dequant"}
