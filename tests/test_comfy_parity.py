"""zimage_core equals ComfyUI's own Z-Image model (NextDiT from the ComfyUI test host that
tools/comfy_host.find_comfyui picks) on the same weights."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from zimage_core import save_transformer

from comfy_host import find_comfyui, stub_dir


@pytest.mark.comfy
@pytest.mark.parametrize("h, w, caption_len, sigma", [(12, 10, 37, 0.6), (16, 16, 32, 0.954545)])
def test_matches_comfyui_nextdit(tiny, tmp_path, h, w, caption_len, sigma):
    g = torch.Generator().manual_seed(9)
    latents, caption = torch.randn(1, 16, h, w, generator=g), torch.randn(caption_len, 48, generator=g)
    sigmas = torch.tensor([sigma])
    save_transformer(tiny, tmp_path / "comfy.safetensors", layout="comfyui")
    save_file({"latents": latents, "sigmas": sigmas, "caption": caption}, str(tmp_path / "inputs.safetensors"))
    axes = ",".join(str(a) for a in tiny.config.axes_dims)
    comfy = find_comfyui()  # raises when there is no host: a missing reference is a failure, not a skip
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("comfy_nextdit_worker.py")), str(comfy),
                           str(stub_dir(comfy) or ""), str(tmp_path / "comfy.safetensors"),
                           str(tmp_path / "inputs.safetensors"),
                           str(tmp_path / "out.safetensors"), axes], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = load_file(str(tmp_path / "out.safetensors"))["velocity"]
    with torch.no_grad():
        ours = tiny(latents, sigmas, [caption])
    assert ours.std() > 0.5
    diff = (ours - theirs).abs().max().item()
    print(f"max|zimage_core - ComfyUI NextDiT| = {diff:.2e}")
    assert diff <= 1e-4
