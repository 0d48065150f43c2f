"""The quantized-weight package (zimage_core.quant): the QuantizedLinear autograd path, family detection from the
file, and the refusal of a family that has no reader."""

import json

import pytest
import torch
from safetensors.torch import save_file

from zimage_core import load_transformer
from zimage_core.quant import READERS, QuantizedLinear, detect_family
from zimage_core.quant.fp8 import FP8_CHANNEL, quantize_fp8


def test_a_quantized_linear_saves_its_stored_tensors_not_the_dequantized_weight():
    gen = torch.Generator().manual_seed(0)
    q, scale = quantize_fp8(torch.randn(48, 32, generator=gen))
    lin = QuantizedLinear(32, 48, FP8_CHANNEL, {"weight": q, "weight_scale": scale})
    x = torch.randn(5, 32, generator=gen, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = lin(x)
    # what autograd keeps: the stored tensors (fp8 bytes + fp32 [48, 1] scale), no [48, 32] up-cast weight
    assert [(t.dtype, tuple(t.shape)) for t in saved] == [(torch.float8_e4m3fn, (48, 32)), (torch.float32, (48, 1))]
    out.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, lin.dequantized(torch.float32)).square().sum().backward()
    assert torch.equal(out, torch.nn.functional.linear(x.detach(), lin.dequantized(torch.float32)))
    assert torch.allclose(x.grad, x2.grad, atol=1e-6) and all(p.grad is None for p in lin.parameters())
    assert lin.fmt == "fp8_channel" and lin.shape == (48, 32) and lin.stored_names == ("weight", "weight_scale")


def _st(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_the_family_is_detected_from_the_file(tmp_path):
    w = torch.zeros(4, 4)
    assert detect_family(_st(tmp_path / "plain.safetensors", {"a.weight": w})) == "safetensors"
    flag = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    assert detect_family(_st(tmp_path / "cq.safetensors", {"a.weight": w, "a.comfy_quant": flag})) == "comfy_quant"
    header = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": {}})}
    assert detect_family(_st(tmp_path / "old.safetensors", {"a.weight": w}, header)) == "comfy_quant"
    svdq = {"a.qweight": w.to(torch.int8), "a.proj_down": torch.zeros(4, 2), "a.proj_up": torch.zeros(4, 2)}
    assert detect_family(_st(tmp_path / "svdq.safetensors", svdq)) == "svdquant"
    (tmp_path / "renamed.bin").write_bytes(b"GGUF" + bytes(60))  # GGUF by its magic, whatever the suffix
    assert detect_family(tmp_path / "renamed.bin") == "gguf"
    (tmp_path / "empty.gguf").write_bytes(b"")  # and by its suffix: the GGUF reader then names what is wrong
    assert detect_family(tmp_path / "empty.gguf") == "gguf"
    assert detect_family(tmp_path) == "safetensors"  # a diffusers folder


def test_a_family_without_a_reader_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.delitem(READERS, "svdquant", raising=False)
    path = _st(tmp_path / "svdq.safetensors", {"a.qweight": torch.zeros(2, 2, dtype=torch.int8),
                                              "a.proj_down": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"svdq.safetensors is a nunchaku SVDQuant safetensors file, which this "
                                         r"version of the pack cannot load"):
        load_transformer(path)
