"""Checkpointed block inputs in host RAM (zimage_core.host_checkpoint): the same gradients as the plain checkpointed
path, and the accelerator memory they save, measured on the meta device (the accelerator) with host RAM as the CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_memory  # noqa: E402

from zimage_core import ZImageConfig  # noqa: E402
from zimage_core.lora import apply_loras, new_lora  # noqa: E402
from zimage_core.offload import enable_block_offload  # noqa: E402
from zimage_core.testing import tiny_model  # noqa: E402
from zimage_core.training.config import ConfigError, TrainConfig  # noqa: E402


def _grads(host: bool, offload: bool):
    model = tiny_model(0).requires_grad_(False)
    if offload:
        enable_block_offload(model, "cpu", "cpu")
    model.gradient_checkpointing = True
    model.checkpoint_inputs_on_host = host
    lora = new_lora(model, rank=4, alpha=4, targets=["to_q", "w2"], seed=0)
    params = list(lora.parameters())
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
            p.requires_grad_(True)
    apply_loras(model, [(lora, 1.0)], mode="runtime")
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 16, 8, 8, generator=gen)
    caption = [torch.randn(20, model.config.cap_feat_dim, generator=gen)]
    loss = model(noise, torch.tensor([0.6]), caption).square().mean()
    loss.backward()
    return loss.detach(), [p.grad for p in params]


@pytest.mark.parametrize("offload", [False, True], ids=["resident", "block-offload"])
def test_host_inputs_give_bit_identical_loss_and_gradients(offload):
    loss, grads = _grads(False, offload)
    loss_host, grads_host = _grads(True, offload)
    assert torch.equal(loss, loss_host)
    assert all(g is not None and g.abs().max() > 0 for g in grads)
    for g, h in zip(grads, grads_host):
        assert torch.equal(g, h)


@pytest.mark.slow
@pytest.mark.parametrize("offload", [False, True], ids=["resident", "block-offload"])
def test_host_inputs_take_every_block_input_off_the_accelerator(offload):
    """Real width at 1024², 2 vs 4 layers: each extra checkpointed block adds its bf16 input (4352 tokens x 3840) to
    the SFT step's peak on the plain path, and with host inputs only the fp32 gradients of its rank-32 LoRA (which
    exist at the end of backward, when the peak then falls): 9.3 MB instead of 33.4 MB per block."""
    per_block = {}
    for host in (False, True):
        peaks = [bench_memory.sft_step("ours", ZImageConfig(n_layers=n, n_refiner_layers=1), 1024, "bf16", offload,
                                       host_inputs=host)["activations_gib"] * 2**30 for n in (2, 4)]
        per_block[host] = (peaks[1] - peaks[0]) / 2
    block_input = ((1024 // 16) ** 2 + bench_memory.CAPTION_TOKENS) * 3840 * 2
    dim, ffn, rank = 3840, 10240, bench_memory.RANK
    lora_grads = rank * (4 * (dim + dim) + 3 * (dim + ffn)) * 4  # q, k, v, out; w1, w2, w3 (fp32)
    assert per_block[False] == pytest.approx(block_input, rel=0.01)
    assert per_block[True] == pytest.approx(lora_grads, rel=0.01)


def test_host_inputs_need_gradient_checkpointing():
    with pytest.raises(ConfigError, match="checkpoint_inputs_on_host .* gradient_checkpointing = true"):
        TrainConfig(checkpoint_inputs_on_host=True, gradient_checkpointing=False).validate_settings()
    with pytest.raises(ConfigError, match="checkpoint_inputs_on_host must be true or false"):
        TrainConfig(checkpoint_inputs_on_host="yes").validate_settings()
