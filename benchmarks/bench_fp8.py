"""The output error of fp8 weight storage (zimage_core.quant.fp8) against the same model in bf16.

Figures are relative RMS errors, ||y_fp8 - y_bf16|| / ||y_bf16||, with the bf16 model as the reference and bf16
compute on both sides:

1. scale granularity on real-width blocks (dim 3840, FFN 10240; random weights N(0, 1/fan_in), std 0.016/0.010
   like the released checkpoint's ~0.02): per output channel (what the pack uses), 128x128 block-wise and per tensor,
   on Gaussian weights and on weights with outlier input columns (1 % of columns x30);
2. one forward and an 8-step turbo sample of the tiny model and of a real-width model (dim 3840, 2 layers + 1+1
   refiners, a 32x32 latent = 256 image tokens, 32 caption tokens);
3. the toy world's trained turbo model (toyworld/weights): 8-step samples of its 12 base prompts from fixed noises,
   in latent and pixel space, plus its sharpness / fidelity metrics; writes docs/fp8_toyworld.png (rows: bf16,
   fp8, |difference| x 4).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_fp8.py [--skip-real] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from zimage_core import ZImageConfig, ZImageTransformer, sample
from zimage_core.quant.fp8 import QUANTIZED_MODULES, quantize_fp8, to_fp8_storage
from zimage_core.testing import init_random_, tiny_model
from zimage_core.transformer import TransformerBlock, rope_cos_sin

ROOT = Path(__file__).resolve().parents[1]
FP8 = torch.float8_e4m3fn


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# ---------------------------------------------------------------------------------------------- 1. granularity
def _pow2_scale(amax: torch.Tensor) -> torch.Tensor:
    return torch.where(amax > 0, torch.exp2(torch.ceil(torch.log2(amax / torch.finfo(FP8).max))), 1.0)


def per_channel(w: torch.Tensor) -> torch.Tensor:
    q, s = quantize_fp8(w)
    return q.float() * s


def block_wise(w: torch.Tensor, b: int = 128) -> torch.Tensor:
    o, i = w.shape
    blocks = w.float().reshape(o // b, b, i // b, b)
    s = _pow2_scale(blocks.abs().amax(dim=(1, 3), keepdim=True))
    return ((blocks / s).to(FP8).float() * s).reshape(o, i)


def per_tensor(w: torch.Tensor) -> torch.Tensor:
    s = _pow2_scale(w.float().abs().max())
    return (w.float() / s).to(FP8).float() * s


SCHEMES = {"per output channel (used)": per_channel, "block-wise 128x128": block_wise, "per tensor": per_tensor}


def block_linears(block: nn.Module) -> list[str]:
    """The fp8-covered Linears of a standalone block (quantized_paths expects them inside a transformer)."""
    return [path for path in dict(block.named_modules()) if path in QUANTIZED_MODULES]


def real_block(seed: int, outliers: bool) -> TransformerBlock:
    with torch.device("meta"):
        block = TransformerBlock(ZImageConfig.turbo(), modulation=True)
    block = init_random_(block.to(torch.bfloat16).to_empty(device="cpu"), seed)
    if outliers:  # a few input channels 30x larger, the pattern that favours finer scale groups
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for path in block_linears(block):
                w = block.get_submodule(path).weight
                cols = torch.randperm(w.shape[1], generator=gen)[: w.shape[1] // 100]
                w[:, cols] *= 30
    return block


def block_inputs(tokens: int = 256):
    """Seeded inputs of one real-width block: x [1, tokens, dim] and adaLN input in bf16, rope of a 16-wide grid."""
    cfg = ZImageConfig.turbo()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, tokens, cfg.dim, generator=gen).bfloat16()
    adaln = torch.randn(1, cfg.adaln_dim, generator=gen).bfloat16() * 0.1
    pos = torch.zeros(1, tokens, 3, dtype=torch.long)
    pos[0, :, 1], pos[0, :, 2] = torch.arange(tokens) // 16, torch.arange(tokens) % 16
    return x, rope_cos_sin(pos, cfg.axes_dims, cfg.rope_theta), adaln


@torch.no_grad()
def granularity(tokens: int = 256) -> None:
    cfg = ZImageConfig.turbo()
    x, rope, adaln = block_inputs(tokens)
    print(f"\n1. scale granularity, one real-width block (dim {cfg.dim}), {tokens} tokens, bf16 compute")
    print(f"   {'weights':<22} {'scales':<28} {'weight rel RMS':>15} {'block output rel RMS':>21}")
    for outliers in (False, True):
        block = real_block(1, outliers)
        ref = block(x, rope, None, adaln)
        originals = {p: block.get_submodule(p).weight.clone() for p in block_linears(block)}
        for name, fn in SCHEMES.items():
            num = den = 0.0
            for path, w in originals.items():
                deq = fn(w)
                num += float((deq - w.float()).pow(2).sum())
                den += float(w.float().pow(2).sum())
                block.get_submodule(path).weight.copy_(deq.bfloat16())  # power-of-two scales: exact in bf16
            out = block(x, rope, None, adaln)
            kind = "with outlier columns" if outliers else "Gaussian"
            print(f"   {kind:<22} {name:<28} {(num / den) ** 0.5:>15.4f} {rel(out, ref):>21.4f}")
        del block, originals


# ---------------------------------------------------------------------------------------------- 2. model error
@torch.no_grad()
def model_error(label: str, model: ZImageTransformer, latent_hw: int, cap_len: int) -> None:
    cfg = model.config
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(1, cfg.in_channels, latent_hw, latent_hw, generator=gen)
    caption = [torch.randn(cap_len, cfg.cap_feat_dim, generator=gen)]
    t = time.time()
    ref_fwd = model(noise, torch.tensor([0.6]), caption).float()
    ref_sample = sample(model, noise, caption, steps=8, cfg=1.0)
    to_fp8_storage(model)
    fwd = model(noise, torch.tensor([0.6]), caption).float()
    smp = sample(model, noise, caption, steps=8, cfg=1.0)
    print(f"   {label:<44} forward {rel(fwd, ref_fwd):.4f}   8-step sample {rel(smp, ref_sample):.4f}"
          f"   ({time.time() - t:.0f} s)")


def real_width_model(layers: int = 2, refiners: int = 1) -> ZImageTransformer:
    with torch.device("meta"):
        model = ZImageTransformer(ZImageConfig(n_layers=layers, n_refiner_layers=refiners))
    return init_random_(model.to(torch.bfloat16).to_empty(device="cpu"), 0).eval()


# ---------------------------------------------------------------------------------------------- 3. toy world
@torch.no_grad()
def toy_world(out_png: Path) -> None:
    from PIL import Image

    from toyworld import world
    from toyworld.evaluate import decode, generate, load_model
    from toyworld.metrics import fidelity, sharpness
    from toyworld.vae import to_pil

    prompts = world.base_prompts()
    latents, images = {}, {}
    for storage in ("bf16", "fp8"):
        model = load_model("turbo", dtype=torch.bfloat16)
        if storage == "fp8":
            to_fp8_storage(model)
        latents[storage] = generate(model, prompts, steps=8, cfg=1.0, seed=7)
        images[storage] = decode(latents[storage])
    a, b = images["bf16"], images["fp8"]
    psnr = float(10 * torch.log10(1.0 / (a - b).pow(2).mean()))
    print(f"\n3. toy world turbo ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters), "
          f"8 steps cfg 1, {len(prompts)} prompts, fixed noises (seed 7)")
    print(f"   latent rel RMS {rel(latents['fp8'], latents['bf16']):.4f}; pixels: mean |diff| "
          f"{float((a - b).abs().mean()):.4f}, max |diff| {float((a - b).abs().max()):.3f}, PSNR {psnr:.1f} dB")
    for storage, imgs in images.items():
        print(f"   {storage}: sharpness {sharpness(imgs, prompts):.3f}, fidelity {fidelity(imgs, prompts):.3f}")
    cell, pad = 64, 2
    rows = [a, b, ((a - b).abs() * 4).clamp(0, 1)]
    canvas = Image.new("RGB", (len(prompts) * (cell + pad), len(rows) * (cell + pad)), (255, 255, 255))
    for r, imgs in enumerate(rows):
        for c, img in enumerate(imgs):
            canvas.paste(to_pil(img).resize((cell, cell), Image.NEAREST), (c * (cell + pad), r * (cell + pad)))
    canvas.save(out_png)
    print(f"   wrote {out_png.relative_to(ROOT)} (rows: bf16, fp8 storage, |difference| x 4)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-real", action="store_true", help="skip the real-width parts (minutes of CPU)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--png", type=Path, default=ROOT / "docs" / "fp8_toyworld.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"fp8 (e4m3fn) weight storage vs bf16, relative RMS error; torch {torch.__version__}, "
          f"{args.threads} threads")
    if not args.skip_real:
        granularity()
    print("\n2. whole models (bf16 compute; fp8 storage vs the same weights in bf16)")
    model_error("tiny (dim 96, 2 layers, 8x8 latent)", tiny_model(0, dtype=torch.bfloat16), 8, 20)
    if not args.skip_real:
        model_error("real width (dim 3840, 2 layers + 2 refiners, 32x32)", real_width_model(), 32, 32)
    toy_world(args.png)


if __name__ == "__main__":
    main()
