"""ComfyUI mixed-precision ("comfy_quant") weights: each format's torch dequantizer against comfy-kitchen's eager
backend (ComfyUI's own kernel library, the reference) on weights quantized by comfy-kitchen itself, and loading such
files (per-layer `comfy_quant` tensors and the older `_quantization_metadata` header) through `load_transformer`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from comfy_quant_fixtures import quantize, reference
from zimage_core.quant import comfy_quant as cq

ck = pytest.importorskip("comfy_kitchen")

# (fixture recipe, shapes): nvfp4 also at a shape comfy-kitchen pads (rows to 16, columns to 16)
CASES = [("float8_e4m3fn", (96, 256)), ("float8_e5m2", (96, 256)), ("nvfp4", (96, 256)), ("nvfp4", (72, 200)),
         ("mxfp8", (160, 96)), ("int8_tensorwise", (96, 256)), ("int8_rowwise", (96, 256)),
         ("int8_convrot", (96, 256)), ("float8_e4m3fn_rowwise", (96, 256)), ("float8_e4m3fn_blockwise", (96, 256)),
         ("convrot_w4a4", (96, 256))]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("recipe,shape", CASES, ids=[f"{r}-{s[0]}x{s[1]}" for r, s in CASES])
def test_each_format_equals_the_reference_bit_for_bit(recipe, shape):
    """Every format, in every compute dtype, is bit-identical to comfy-kitchen's eager dequantize (for the fp8 row-/
    block-wise layouts, which kitchen lacks, to convert_to_quant's dequantize restated in the fixtures); the only
    error left is the format's own rounding (checked against the float weight so that a zero output cannot pass)."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(len(recipe))) * 0.02
    stored, conf = quantize(w, recipe, group=256)  # ConvRot's default group (the file test uses 16)
    fmt = cq.FORMATS[cq.PREFIX + cq.format_key(conf)]
    tensors = {name: stored[name] for name in fmt.stored_names}
    for dtype in DTYPES:
        out = fmt.dequantize(tensors, shape, dtype)
        ref = reference(stored, conf, shape, dtype)
        assert out.dtype == dtype and out.shape == shape
        assert torch.equal(out, ref), (recipe, dtype)
    err = (fmt.dequantize(tensors, shape, torch.float32) - w).norm() / w.norm()
    assert 0 < err < 0.2  # 4-bit formats: ~0.1 (nvfp4) and ~0.13 (ConvRot W4A4) on random weights


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


# ---------------------------------------------------------------------------------------------- loading files
from comfy_quant_fixtures import reference_model, write_file  # noqa: E402
from zimage_core.checkpoint import load_transformer  # noqa: E402
from zimage_core.quant import QuantizedLinear  # noqa: E402
from zimage_core.testing import tiny_model  # noqa: E402


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.9, 0.3]), torch.randn(2, 9, 48, generator=g)


@pytest.fixture(scope="module")
def base():
    return tiny_model(seed=5)


@pytest.fixture(scope="module")
def mixed_file(base, tmp_path_factory):
    """Every format in one file (per-layer comfy_quant tensors, ComfyUI names, fused qkv), some with
    pre_quant_scale, plus the reference weights."""
    path = tmp_path_factory.mktemp("comfy_quant") / "z_image_mixed.safetensors"
    return path, write_file(base, path, pre_quant_every=4)


def _resident_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def test_mixed_file_loads_quantized_and_computes_like_the_reference(base, mixed_file):
    """Every block Linear stays as stored (a QuantizedLinear of its comfy: format, q/k/v cut from the fused qkv),
    and the model's output is bit-identical to the same model built from comfy-kitchen's dequantized weights."""
    path, refs = mixed_file
    model = load_transformer(path, torch.float32)
    quantized = {p: m.fmt for p, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    # q, k, v, out, w1, w2, w3 in 2 layers + 2 refiners, one adaLN (with a bias); the quantized x_embedder (outside
    # the blocks) is dequantized at load
    assert len(quantized) == 7 * 4 + 1 and "all_x_embedder.2-1" not in quantized
    assert {re.sub(r"(convrot|_g)\d+$", r"\1", f.split("+")[0]) for f in quantized.values()} == {  # no groups
        "comfy:float8_e4m3fn", "comfy:float8_e5m2", "comfy:nvfp4", "comfy:mxfp8", "comfy:int8_tensorwise",
        "comfy:int8_tensorwise_convrot", "comfy:float8_e4m3fn_rowwise", "comfy:float8_e4m3fn_blockwise",
        "comfy:convrot_w4a4_g"}
    assert any(f.endswith("+pre_quant_scale") for f in quantized.values())
    expected = reference_model(base, refs)
    with torch.no_grad():
        assert torch.equal(model(*_inputs()), expected(*_inputs()))


def test_resident_memory_is_the_file_size(base, mixed_file):
    """Loaded in bf16 (the dtype of the file's plain tensors), the model holds what the file holds: within 5 %
    (the file also carries its header, the comfy_quant JSON and input scales)."""
    path, _ = mixed_file
    model = load_transformer(path, torch.bfloat16)
    ratio = _resident_bytes(model) / path.stat().st_size
    assert 0.95 < ratio <= 1.0, ratio


def test_header_metadata_file_with_prefix_loads(base, tmp_path):
    """The older per-file `_quantization_metadata` header (layer names without the file's `model.diffusion_model.`
    key prefix): same weights, same output as the reference."""
    path = tmp_path / "z_image_nvfp4_header.safetensors"
    refs = write_file(base, path, recipes=("nvfp4", "int8_convrot"), header=True, prefix="model.diffusion_model.")
    model = load_transformer(path, torch.float32)
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 29
    with torch.no_grad():
        assert torch.equal(model(*_inputs()), reference_model(base, refs)(*_inputs()))


def _rewrite(src, dst, drop=(), conf: dict | None = None, add: dict | None = None):
    """Copy a safetensors file, dropping keys, replacing one layer's comfy_quant JSON and adding tensors."""
    from safetensors.torch import load_file, save_file

    from comfy_quant_fixtures import conf_tensor

    state = {k: v for k, v in load_file(str(src)).items() if k not in drop}
    for key, value in (conf or {}).items():
        state[key] = conf_tensor(value)
    state.update(add or {})
    save_file(state, str(dst))
    return dst


QKV = "layers.0.attention.qkv"


@pytest.mark.parametrize("change,message", [
    (dict(drop=(f"{QKV}.weight_scale",)), f"{QKV}.weight_scale"),
    (dict(conf={f"{QKV}.comfy_quant": {"format": "float7_e3m3"}}), "'float7_e3m3': an unknown format"),
    (dict(conf={f"{QKV}.comfy_quant": {"format": "awq_w4a16"}}), "'awq_w4a16': a ComfyUI format this pack does not"),
    (dict(conf={f"{QKV}.comfy_quant": {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 8}}),
     "ConvRot group 8 is not a power of 4"),
], ids=["missing-scale", "unknown-format", "unsupported-format", "bad-convrot-group"])
def test_bad_files_are_refused_naming_file_and_tensor(mixed_file, tmp_path, change, message):
    """Each defect is a ValueError naming the file and the layer/tensor/format at fault, raised by the header
    check before any model exists."""
    path, _ = mixed_file
    bad = _rewrite(path, tmp_path / "bad.safetensors", **change)
    with pytest.raises(ValueError) as err:
        load_transformer(bad, torch.float32)
    assert str(bad) in str(err.value) and message in str(err.value), str(err.value)


def test_integer_weight_without_comfy_quant_is_refused(mixed_file, tmp_path):
    """An int8/uint8 weight that no comfy_quant entry describes would load as garbage: refused by name."""
    from safetensors import safe_open

    path, _ = mixed_file
    with safe_open(str(path), "pt") as f:
        layer = next(k[: -len(".weight")] for k in sorted(f.keys())
                     if k.endswith(".weight") and f.get_slice(k).get_dtype() in ("I8", "U8"))
    bad = _rewrite(path, tmp_path / "bad.safetensors", drop=(f"{layer}.comfy_quant",))
    with pytest.raises(ValueError, match=re.escape(f"{layer}.weight is stored as")) as err:
        load_transformer(bad, torch.float32)
    assert str(bad) in str(err.value)


COMFY = Path(__file__).resolve().parents[1] / ".venv" / "ComfyUI"


@pytest.mark.comfy
@pytest.mark.slow  # ~19 s: ComfyUI's imports in a worker process
@pytest.mark.skipif(not (COMFY / "main.py").is_file(), reason="ComfyUI test host not set up (tools/setup_env.sh)")
def test_float8_file_matches_comfyuis_own_mixed_precision_loader(base, tmp_path):
    """The consumer these files are written for: ComfyUI 0.3.75's mixed-precision ops (header metadata, float8
    e4m3fn, the formats that version knows) load the same file into its own NextDiT; the velocities agree as the bf16
    parity test's do (test_comfy_parity.py)."""
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    path = tmp_path / "z_image_fp8_mixed.safetensors"
    # without input_scale: with it ComfyUI also rounds each Linear's input to fp8 (its fp8 GEMM), which this pack
    # does not do (it computes with the exact weight the file stores)
    write_file(base, path, recipes=("float8_e4m3fn",), header=True, input_scale=False)
    g = torch.Generator().manual_seed(9)
    latents, caption, sigmas = torch.randn(1, 16, 12, 10, generator=g), torch.randn(37, 48, generator=g), \
        torch.tensor([0.6])
    save_file({"latents": latents, "sigmas": sigmas, "caption": caption}, str(tmp_path / "inputs.safetensors"))
    axes = ",".join(str(a) for a in base.config.axes_dims)
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("comfy_nextdit_worker.py")), str(COMFY),
                           str(COMFY.parent / "comfy-stubs"), str(path), str(tmp_path / "inputs.safetensors"),
                           str(tmp_path / "out.safetensors"), axes], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = load_file(str(tmp_path / "out.safetensors"))["velocity"]
    with torch.no_grad():
        ours = load_transformer(path, torch.float32)(latents, sigmas, [caption])
    assert ours.std() > 0.5
    diff = (ours - theirs).abs().max().item()
    print(f"max|zimage_core - ComfyUI mixed-precision NextDiT| = {diff:.2e}")
    assert diff <= 1e-4
