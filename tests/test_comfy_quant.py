"""ComfyUI mixed-precision ("comfy_quant") weights: each format's torch dequantizer against comfy-kitchen's eager
backend (ComfyUI's own kernel library, the reference) on weights quantized by comfy-kitchen itself, and loading such
files (per-layer `comfy_quant` tensors and the older `_quantization_metadata` header) through `load_transformer`."""

from __future__ import annotations

import pytest
import torch

from comfy_quant_fixtures import quantize, reference
from zimage_core.quant import comfy_quant as cq

ck = pytest.importorskip("comfy_kitchen")

# (fixture recipe, shapes): nvfp4 also at a shape comfy-kitchen pads (rows to 16, columns to 16)
CASES = [("float8_e4m3fn", (96, 256)), ("float8_e5m2", (96, 256)), ("nvfp4", (96, 256)), ("nvfp4", (72, 200)),
         ("mxfp8", (160, 96)), ("int8_tensorwise", (96, 256)), ("int8_rowwise", (96, 256)),
         ("int8_convrot", (96, 256)), ("float8_e4m3fn_rowwise", (96, 256)), ("float8_e4m3fn_blockwise", (96, 256))]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("recipe,shape", CASES, ids=[f"{r}-{s[0]}x{s[1]}" for r, s in CASES])
def test_each_format_equals_the_reference_bit_for_bit(recipe, shape):
    """Every format, in every compute dtype, is bit-identical to comfy-kitchen's eager dequantize (for the fp8 row-/
    block-wise layouts, which kitchen lacks, to convert_to_quant's dequantize restated in the fixtures); the only
    error left is the format's own rounding (checked against the float weight so that a zero output cannot pass)."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(len(recipe))) * 0.02
    stored, conf = quantize(w, recipe)
    fmt = cq.FORMATS[cq.PREFIX + cq.format_key(conf)]
    tensors = {name: stored[name] for name in fmt.stored_names}
    for dtype in DTYPES:
        out = fmt.dequantize(tensors, shape, dtype)
        ref = reference(stored, conf, shape, dtype)
        assert out.dtype == dtype and out.shape == shape
        assert torch.equal(out, ref), (recipe, dtype)
    err = (fmt.dequantize(tensors, shape, torch.float32) - w).norm() / w.norm()
    assert 0 < err < 0.1


def test_pre_quant_scale_is_folded_into_the_weight():
    """A layer with `pre_quant_scale` computes as ComfyUI does, x * pre_quant_scale before the matmul: the folded
    weight W·diag(p) gives the same output (fp32, up to summation order)."""
    w = torch.randn(64, 128) * 0.02
    stored, conf = quantize(w, "nvfp4")
    stored["pre_quant_scale"] = torch.rand(128) + 0.5
    fmt = cq.FORMATS[cq.PREFIX + "nvfp4+" + cq.PQS]
    x = torch.randn(5, 128)
    plain = reference(stored, conf, (64, 128), torch.float32)
    ours = torch.nn.functional.linear(x, fmt.dequantize(stored, (64, 128), torch.float32))
    comfy = torch.nn.functional.linear(x * stored["pre_quant_scale"], plain)
    torch.testing.assert_close(ours, comfy, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours, torch.nn.functional.linear(x, plain), rtol=1e-2)


def test_swizzle_and_hadamard_match_comfy_kitchen():
    """The cuBLAS block-scale layout both ways and ConvRot's Hadamard matrix, against kitchen's own helpers."""
    from comfy_kitchen.float_utils import from_blocked, to_blocked
    from comfy_kitchen.tensor.int8_utils import _build_hadamard

    for rows, cols in ((5, 3), (130, 9), (256, 8)):
        grid = torch.randint(0, 255, (rows, cols), dtype=torch.uint8)
        blocked = to_blocked(grid, flatten=False)
        assert torch.equal(cq.swizzle(grid), blocked)
        assert torch.equal(cq.unswizzle(blocked, rows, cols), from_blocked(blocked, rows, cols))
    for size in (4, 64, 256):
        assert torch.equal(cq.hadamard(size), _build_hadamard(size))
