"""GGUF files (zimage_core.quant.gguf): every ggml type's torch dequantizer against gguf-py's reference bit for bit,
loading through `load_transformer` (city96 / ComfyUI-GGUF "lumina2" files, stable-diffusion.cpp compat files, any
per-tensor mix) equal to the model rebuilt from `gguf.quants.dequantize`, resident memory = the file's bytes, and
bad files refused by name before anything loads."""

import itertools
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

from gguf_fixtures import (F16_FIELDS, HAS_QUANTIZER, dequantized_reference, random_blocks, sdcpp_type,  # noqa: E402
                           stored_bytes, tiny_256, write_gguf)
from zimage_core import load_transformer  # noqa: E402
from zimage_core.quant import FORMATS, QuantizedLinear  # noqa: E402
from zimage_core.quant.gguf import TYPES, dequantize  # noqa: E402
from zimage_core.quant.stored import BLOCK_PREFIXES  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
G = torch.Generator().manual_seed(5)
LATENTS, CAPTION = torch.randn(1, 16, 8, 8, generator=G), torch.randn(20, 48, generator=G)


def _out(model):
    with torch.no_grad():
        return model(LATENTS.to(model.dtype), torch.tensor([0.6]), [CAPTION.to(model.dtype)]).float()


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


# ---------------------------------------------------------------------------------------------- dequantizers
def _random_raw(kind: str, rng, rows=3, cols=512) -> np.ndarray:
    if kind in ("F32", "F16"):  # random bytes of a float type are mostly NaN/Inf patterns: use real values
        return rng.standard_normal((rows, cols)).astype(np.float32 if kind == "F32" else np.float16).view(np.uint8)
    elems, nbytes = gguf.GGML_QUANT_SIZES[T[kind]]
    if kind in F16_FIELDS:
        return random_blocks(kind, rows, cols, rng, scale=2e-2)
    raw = rng.integers(0, 256, size=(rows, cols // elems * nbytes), dtype=np.uint8)
    if kind != "BF16":  # legacy types: finite f16 d (and m) in the first bytes of each block
        blocks = raw.reshape(-1, nbytes)
        head = 4 if kind in ("Q4_1", "Q5_1") else 2
        blocks[:, :head] = rng.uniform(-2e-2, 2e-2, size=(blocks.shape[0], head // 2)).astype(np.float16).view(np.uint8)
    return raw


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(TYPES))
def test_each_type_dequantizes_bit_for_bit_like_gguf(kind, device):
    rng = np.random.default_rng(sum(map(ord, kind)))
    raw = _random_raw(kind, rng)
    ref = gguf.quants.dequantize(raw, T[kind])
    ours = dequantize(torch.from_numpy(raw).to(device), kind, ref.shape)
    assert ours.device.type == device and ours.dtype == torch.float32
    assert np.array_equal(_bits(ours.cpu().numpy()), _bits(ref))  # bit for bit (NaN payloads of BF16 included)
    assert np.isfinite(ref).mean() > 0.9 and np.nanmax(np.abs(ref)) > 0  # the blocks are real data, not all zero
    if kind in HAS_QUANTIZER and kind not in ("F32", "F16", "BF16"):  # and gguf's own quantizer's blocks
        weights = rng.standard_normal((4, 256)).astype(np.float32)
        q = gguf.quants.quantize(weights, T[kind])
        assert np.array_equal(_bits(dequantize(torch.from_numpy(q), kind, (4, 256)).numpy()),
                              _bits(gguf.quants.dequantize(q, T[kind])))
    # other compute dtypes: the fp32 values rounded once
    assert torch.equal(dequantize(torch.from_numpy(raw), kind, ref.shape, torch.bfloat16).view(torch.int16),
                       torch.from_numpy(ref).to(torch.bfloat16).view(torch.int16))


def test_the_format_table_covers_every_type_and_computes_a_linear():
    assert {f"gguf:{k}" for k in TYPES} <= set(FORMATS)
    rng = np.random.default_rng(1)
    raw = torch.from_numpy(random_blocks("Q4_K", 24, 512, rng, scale=1e-3))
    lin = QuantizedLinear(512, 24, FORMATS["gguf:Q4_K"], {"weight": raw})
    x = torch.randn(3, 512, generator=G)
    weight = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), T.Q4_K))
    assert torch.equal(lin(x), torch.nn.functional.linear(x, weight))


# ---------------------------------------------------------------------------------------------- loading
MIX = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]


def _mixed():
    """A different type for each quantized tensor in turn (12 of them in the tiny model: every type used once)."""
    types = itertools.cycle(MIX)
    return lambda name: next(types)


@pytest.fixture(scope="module")
def tiny():
    return tiny_256(0)


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return {
        "Q8_0": write_gguf(folder / "z-Q8_0.gguf", tiny, "Q8_0"),
        "Q4_K": write_gguf(folder / "z-Q4_K.gguf", tiny, "Q4_K"),
        "mixed": write_gguf(folder / "z-mixed.gguf", tiny, _mixed()),
        "sdcpp": write_gguf(folder / "z-sdcpp.gguf", tiny, "Q4_0", arch=None, prefix="model.diffusion_model.",
                            rules=sdcpp_type),
    }


@pytest.mark.parametrize("which", ["Q8_0", "Q4_K", "mixed", "sdcpp"])
def test_a_gguf_model_equals_the_model_rebuilt_from_the_reference_dequantizer(files, which, tmp_path):
    path = files[which]
    model = load_transformer(path, dtype=torch.float32)
    reference = load_transformer(dequantized_reference(path, tmp_path / "ref.safetensors"), dtype=torch.float32)
    assert (_out(model) - _out(reference)).abs().max() <= 1e-6
    # every quantized block tensor of the file became QuantizedLinears of its own type, nothing else did
    # (embedders a file quantizes are dequantized at load: the model reads its dtype from them)
    prefix = "model.diffusion_model." if which == "sdcpp" else ""
    types = {name.removeprefix(prefix): kind for name, (kind, _) in stored_bytes(path).items()}
    linears = {p: m for p, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    quantized = {n for n, k in types.items() if k not in ("F32", "F16", "BF16") and n.startswith(BLOCK_PREFIXES)}
    assert len(linears) == sum(3 if ".qkv." in n else 1 for n in quantized) > 0
    for path_, module in linears.items():
        comfy = (path_.replace("to_q", "qkv").replace("to_k", "qkv").replace("to_v", "qkv")
                 .replace("to_out.0", "out").replace("all_x_embedder.2-1", "x_embedder")
                 .replace("all_final_layer.2-1", "final_layer"))
        assert module.fmt == f"gguf:{types[comfy + '.weight']}", path_
    if which == "mixed":
        assert {m.fmt for m in linears.values()} == {f"gguf:{k}" for k in MIX}
    if which == "sdcpp":  # sd.cpp quantizes the refiners and embedders too, and stores the pad tokens 1-D
        assert any(p.startswith("noise_refiner.") for p in linears) and types["x_embedder.weight"] == "Q4_0"
        shapes = {t.name: tuple(t.shape) for t in gguf.GGUFReader(str(path)).tensors}
        assert shapes[prefix + "x_pad_token"] == (256,) and model.x_pad_token.shape == (1, 256)


def test_fused_qkv_is_split_by_rows_of_stored_blocks(files, tiny):
    reader = gguf.GGUFReader(str(files["Q4_K"]))
    qkv = next(t for t in reader.tensors if t.name == "layers.1.attention.qkv.weight")
    model = load_transformer(files["Q4_K"], dtype=torch.float32)
    dim = tiny.config.dim
    for i, proj in enumerate(("to_q", "to_k", "to_v")):
        stored = getattr(model.layers[1].attention, proj).weight
        assert stored.dtype == torch.uint8 and torch.equal(stored, torch.tensor(qkv.data[i * dim:(i + 1) * dim]))


@pytest.mark.parametrize("which", ["Q8_0", "Q4_K", "mixed"])
def test_resident_bytes_are_the_files_tensor_bytes(files, which):
    model = load_transformer(files[which], dtype=torch.bfloat16)
    resident = sum(t.nbytes for t in model.parameters())
    in_file = sum(n for _, n in stored_bytes(files[which]).values())
    assert abs(resident / in_file - 1) < 0.05, (resident, in_file)
    assert all(not t.requires_grad for t in model.parameters())


# ---------------------------------------------------------------------------------------------- bad files
def test_a_truncated_gguf_is_refused_by_name(files, tmp_path):
    data = files["Q8_0"].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 4096])
    with pytest.raises(ValueError, match=r"cut.gguf is not a readable GGUF file .*truncated"):
        load_transformer(cut)


@pytest.mark.parametrize("arch", ["flux", "wan", "llama"])
def test_a_gguf_of_another_architecture_is_refused_by_name(tiny, tmp_path, arch):
    path = write_gguf(tmp_path / f"{arch}.gguf", tiny, "Q8_0", arch=arch)
    with pytest.raises(ValueError, match=rf"{arch}.gguf is a GGUF of architecture '{arch}', not a Z-Image"):
        load_transformer(path)


def test_a_compat_gguf_of_another_model_is_refused_with_a_guess(tmp_path):
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(tmp_path / "flux.gguf"), arch="unused")
    for kv in writer.kv_data:
        kv.pop(gguf.Keys.General.ARCHITECTURE, None)
    writer.add_tensor("double_blocks.0.img_attn.qkv.weight", rng.standard_normal((96, 32)).astype(np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(ValueError, match=r"flux.gguf \(GGUF, architecture None\) is not a Z-Image transformer: "
                                         r"missing .*a Flux transformer"):
        load_transformer(tmp_path / "flux.gguf")


def test_an_unsupported_type_is_refused_naming_tensor_and_type(tiny, tmp_path):
    elems, nbytes = gguf.GGML_QUANT_SIZES[T.IQ2_XXS]
    raw = np.zeros((4, 256 // elems * nbytes), dtype=np.uint8)
    path = write_gguf(tmp_path / "iq2.gguf", tiny, "Q8_0", extra={"layers.0.extra.weight": (raw, "IQ2_XXS")})
    with pytest.raises(ValueError, match=r"iq2.gguf: tensor 'layers.0.extra.weight' is stored as ggml type IQ2_XXS"):
        load_transformer(path)


def test_without_the_gguf_package_a_gguf_load_names_the_install(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # what `import gguf` does where it is not installed
    with pytest.raises(ImportError, match=r"z-Q8_0.gguf is a GGUF file: .*pip install gguf"):
        load_transformer(files["Q8_0"])


def test_fp8_storage_is_refused_for_an_already_quantized_file(files):
    with pytest.raises(ValueError, match=r"weight_storage='fp8_e4m3fn' .*z-Q8_0.gguf is a GGUF file"):
        load_transformer(files["Q8_0"], weight_storage="fp8_e4m3fn")


def test_inspect_and_save_a_gguf_model(files, tiny, tmp_path):
    from zimage_core import inspect_checkpoint, save_transformer

    config, layout = inspect_checkpoint(files["sdcpp"])
    assert config == tiny.config and "compat" in layout and "model.diffusion_model." in layout
    model = load_transformer(files["Q4_K"], dtype=torch.float32)
    with pytest.raises(ValueError, match=r"layers.0.attention.to_q holds a gguf:Q4_K weight, .* pass a dtype"):
        save_transformer(model, tmp_path / "x.safetensors")
    saved = save_transformer(model, tmp_path / "deq.safetensors", dtype=torch.float32)  # dequantized
    assert torch.equal(_out(load_transformer(saved, dtype=torch.float32)), _out(model))
