"""zimage_core.attention: SDPA by default; opt-in kernels fall back to SDPA (logged once) where they cannot run, and
an unknown choice is an error naming the option. The GPU kernels themselves are not on the CPU test machine: their
layout contract is checked with a stand-in `sageattn` that computes SDPA in the layout sage documents (NHD)."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from zimage_core import attention as attn
from zimage_core.testing import tiny_model


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.5]), [torch.randn(9, 48, generator=g)]


def test_unknown_backend_is_an_error_naming_the_option():
    with pytest.raises(ValueError, match=r"attention: unknown backend 'xformers'; choose one of \('sdpa'"):
        attn.set_attention_backend(tiny_model(), "xformers")


def test_missing_package_keeps_sdpa_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import fails as if not installed
    monkeypatch.setattr(attn, "_logged", set())
    model = tiny_model()
    with caplog.at_level(logging.WARNING, "zimage_core"):
        assert attn.set_attention_backend(model, "flash") == "sdpa"
        assert attn.set_attention_backend(model, "flash") == "sdpa"
    assert len([r for r in caplog.records if "flash_attn" in r.getMessage()]) == 1
    assert {m.attention_backend for m in model.modules() if hasattr(m, "attention_backend")} == {"sdpa"}


@pytest.fixture
def fake_sage(monkeypatch):
    calls = []

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False):
        calls.append(tensor_layout)
        assert tensor_layout == "NHD" and not is_causal
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    monkeypatch.setitem(sys.modules, "sageattention", types.SimpleNamespace(sageattn=sageattn))
    monkeypatch.setattr(attn, "_logged", set())
    return calls


def test_sage_layout_contract(fake_sage):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 40, 3, 64, generator=g) for _ in range(3))
    torch.testing.assert_close(attn.KERNELS["sage"](q, k, v), attn.sdpa(q, k, v, None), rtol=0, atol=0)
    assert fake_sage == ["NHD"]


def test_unsupported_calls_fall_back_to_sdpa_logged_once(fake_sage, caplog):
    """On the CPU (and for fp32, masks, other head sizes) the kernel is never called and the output is SDPA's."""
    model = tiny_model()
    reference = model(*_inputs())
    assert attn.set_attention_backend(model, "sage") == "sage"
    with caplog.at_level(logging.WARNING, "zimage_core"):
        out = model(*_inputs())
        model(*_inputs())
    assert fake_sage == [] and torch.equal(out, reference)
    assert [r.getMessage() for r in caplog.records] == ["attention 'sage' runs on CUDA only (the model is on cpu): "
                                                       "those calls use SDPA"]


@pytest.mark.parametrize("backend, shape, dtype, mask, reason", [
    ("sage", (1, 4, 2, 64), torch.float32, None, "fp16/bf16 only"),
    ("flash", (1, 4, 2, 64), torch.bfloat16, torch.ones(1, 1, 1, 4, dtype=torch.bool), "no key mask"),
    ("sage", (1, 4, 2, 96), torch.bfloat16, None, "head_dim 64 or 128, not 96"),
])
def test_reasons_name_what_the_kernel_cannot_take(monkeypatch, backend, shape, dtype, mask, reason):
    q = torch.zeros(shape, dtype=dtype)
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda", 0)))
    assert reason in attn.unsupported(backend, q, mask)
