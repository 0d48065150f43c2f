"""Run ComfyUI's own Z-Image model code (comfy.ldm.lumina.model.NextDiT) on weights and inputs saved by a test.

Runs in its own process (ComfyUI's imports and global args stay out of the pytest process). Usage:
    python comfy_nextdit_worker.py COMFY_DIR STUB_DIR WEIGHTS.safetensors INPUTS.safetensors OUT.safetensors
WEIGHTS are in ComfyUI's single-file naming (optionally a mixed-precision file whose header names its quantized layers:
then ComfyUI's mixed-precision ops load them); INPUTS hold `latents`, `sigmas` and `caption`."""

import sys

import transformers.utils.import_utils as tf_imports

comfy_dir, stub_dir, weights, inputs, out_path = sys.argv[1:6]
tf_imports.is_torchvision_available()  # cache "absent" before the torchvision stand-in goes on sys.path
sys.path[:0] = [comfy_dir]
sys.path.append(stub_dir)

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from comfy.cli_args import args  # noqa: E402

args.cpu = True
import comfy.ops  # noqa: E402
from comfy.ldm.lumina.model import NextDiT  # noqa: E402
from comfy.ldm.modules.diffusionmodules.mmdit import TimestepEmbedder  # noqa: E402

state = load_file(weights)
data = load_file(inputs)
with open(weights, "rb") as f:  # a mixed-precision file (header `_quantization_metadata`) loads with ComfyUI's own ops
    header = __import__("json").loads(f.read(int.from_bytes(f.read(8), "little")))
quant = header.get("__metadata__", {}).get("_quantization_metadata")
dim, cap_feat_dim = state["cap_embedder.1.weight"].shape
head_dim = state["layers.0.attention.q_norm.weight"].shape[0]
n_layers = len({k.split(".")[1] for k in state if k.startswith("layers.")})
n_refiner = len({k.split(".")[1] for k in state if k.startswith("noise_refiner.")})
ops = comfy.ops.disable_weight_init if quant is None else \
    comfy.ops.mixed_precision_ops(__import__("json").loads(quant)["layers"], compute_dtype=torch.float32)
# The arguments comfy.model_detection uses for Z-Image (it only recognises dim 3840, so they are given here).
model = NextDiT(patch_size=2, in_channels=16, dim=dim, n_layers=n_layers, n_refiner_layers=n_refiner,
                n_heads=dim // head_dim, n_kv_heads=dim // head_dim, ffn_dim_multiplier=8.0 / 3.0, qk_norm=True,
                cap_feat_dim=cap_feat_dim, axes_dims=[int(a) for a in sys.argv[6].split(",")],
                axes_lens=[1536, 512, 512], rope_theta=256.0, z_image_modulation=True, time_scale=1000.0,
                pad_tokens_multiple=32, operations=ops, dtype=torch.float32)
# ComfyUI sizes the t-embedder's hidden layer min(dim, 1024); the released model (dim 3840) has 1024, like ours.
model.t_embedder = TimestepEmbedder(1024, output_size=min(dim, 256), operations=ops, dtype=torch.float32)
missing, unexpected = model.load_state_dict(state, strict=False)
assert missing == ["norm_final.weight"] and not unexpected, (missing, unexpected)
with torch.no_grad():
    caption = data["caption"][None]
    out = model(data["latents"], data["sigmas"], caption, num_tokens=caption.shape[1])
save_file({"velocity": out.contiguous()}, out_path)
