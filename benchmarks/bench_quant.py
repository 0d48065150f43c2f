"""What each quantized file format costs in output error, against the same weights in bf16 (as bench_fp8.py does for
fp8 storage), and what dequantizing per call costs in forward time.

The files are those of benchmarks/quant_formats.py (GGUF Q8_0 / Q4_K_M / Q3_K_S with city96's per-tensor mixes,
comfy_quant nvfp4 and int8-ConvRot on every block Linear, nunchaku svdq-int4 r32). Each weight the file quantizes
is rounded through that format and back (`roundtrip`), and the model computes in bf16 on the result: exactly what
a QuantizedLinear's "dequant" path computes (dequantize to the compute dtype, then F.linear). How each weight is
rounded:

* Q8_0: gguf-py's own quantizer and dequantizer (llama.cpp's reference, bit-exact with the C code).
* Q3_K / Q4_K / Q5_K / Q6_K: gguf-py has no K-quant quantizer, so this file fits them itself, round-to-nearest
  per sub-block with the formats' exact value sets (6-bit sub-block scales and mins under fp16 super-block scales,
  int8 scales for Q6_K; quantized-formats.md §1.2). llama.cpp's quantizer searches each sub-block's scale
  (make_qkx2_quants / make_qx_quants) and lands somewhat lower: these K-quant figures are upper bounds.
* nvfp4, int8 (per-row, ConvRot group 256): comfy-kitchen's own quantizers (QuantizedTensor.from_float).
* svdq-int4 r32: the rank-32 SVD of the weight in bf16 plus its residual in int4 with a bf16 scale per 64 inputs,
  without nunchaku's calibrated smoothing (no calibration data here). nunchaku also quantizes the activations to
  int4 (W4A4); the pack dequantizes the weight and computes in bf16, so only the weight error counts here.

Figures are relative RMS errors ||y_q - y_bf16|| / ||y_bf16||:
1. one real-width block (dim 3840, FFN 10240, 256 tokens; bench_fp8's random N(0, 1/fan_in) weights);
2. one forward and an 8-step turbo sample of a real-width model (2 layers + 1+1 refiners, 32x32 latent);
3. the toy world's turbo model: 8-step samples of its base prompts, PSNR against bf16 and its fidelity metric.
   Its widths (128, FFN 341) are not multiples of the block sizes: for it alone each row is zero-padded to whole
   blocks before quantizing (a real file would keep such tensors in F16);
4. --timing: forward time on bench_transformer's mid CPU config with every block Linear a QuantizedLinear that
   dequantizes per call (fp32 compute, as bench_transformer), relative to the plain model, at 4096 image tokens
   (a 128x128 latent; `sides` of timing() sets others); and the dequantizations' own time per forward against
   the plain forward (5.), which a busy machine disturbs less than whole forwards.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_quant.py [--skip-real] [--skip-toy] [--timing] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fp8 import block_inputs, real_block, real_width_model, rel  # noqa: E402
from quant_formats import FILES, linear_types  # noqa: E402

from zimage_core import ZImageConfig, sample  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- round trips
def _f16(t: Tensor) -> Tensor:
    return t.half().float()  # GGUF's super-block scales are stored as IEEE half


def _affine_k(w: Tensor, bits: int) -> Tensor:
    """Q4_K (bits 4) / Q5_K (bits 5): per 256 weights, 8 sub-blocks of 32, value = d*sc*q - dmin*m with 6-bit sc, m
    and fp16 d, dmin."""
    x = w.reshape(-1, 8, 32)
    lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
    nmax = 2**bits - 1
    scale, the_min = (hi - lo) / nmax, -lo
    d, dmin = _f16(scale.amax(-1, keepdim=True) / 63), _f16(the_min.amax(-1, keepdim=True) / 63)
    ds = d * torch.where(d > 0, scale / d, 0).round().clamp(0, 63)
    dm = dmin * torch.where(dmin > 0, the_min / dmin, 0).round().clamp(0, 63)
    q = torch.where(ds[..., None] > 0, (x + dm[..., None]) / ds[..., None], 0).round().clamp(0, nmax)
    return (ds[..., None] * q - dm[..., None]).reshape(w.shape)


def _signed_max(x: Tensor) -> Tensor:
    """The element of largest magnitude along the last dim, with its sign (llama.cpp maps it to -nmax)."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)


def _symmetric_k(w: Tensor, nmax: int, scale_max: int) -> Tensor:
    """Q3_K (nmax 4, 6-bit scales: scale_max 32) / Q6_K (nmax 32, int8 scales: 128): per 256 weights, 16 sub-blocks
    of 16, value = d*sc*q with q in [-nmax, nmax-1], sc in [-scale_max, scale_max-1], fp16 d."""
    x = w.reshape(-1, 16, 16)
    scale = -_signed_max(x) / nmax
    d = _f16(-_signed_max(scale)[..., None] / scale_max)
    ds = d * torch.where(d != 0, scale / d, 0).round().clamp(-scale_max, scale_max - 1)
    q = torch.where(ds[..., None] != 0, x / ds[..., None], 0).round().clamp(-nmax, nmax - 1)
    return (ds[..., None] * q).reshape(w.shape)


def _q8_0(w: Tensor) -> Tensor:
    from gguf import GGMLQuantizationType, quants

    raw = quants.quantize(w.numpy().astype(np.float32), GGMLQuantizationType.Q8_0)
    return torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType.Q8_0).astype(np.float32)).reshape(w.shape)


def _kitchen(layout: str, **kw):
    def run(w: Tensor) -> Tensor:
        from comfy_kitchen.tensor import QuantizedTensor

        return QuantizedTensor.from_float(w.bfloat16(), layout, **kw).dequantize().float()
    return run


def _svdq(rank: int):
    def run(w: Tensor) -> Tensor:
        u, s, v = torch.svd_lowrank(w, q=rank + 8, niter=4)
        low = (u[:, :rank] * s[:rank]).bfloat16().float() @ v[:, :rank].T.bfloat16().float()
        res = (w - low).reshape(w.shape[0], -1, 64)
        scale = (res.abs().amax(-1, keepdim=True) / 7).bfloat16().float()
        q = torch.where(scale > 0, res / scale, 0).round().clamp(-8, 7)
        return low + (q * scale).reshape(w.shape)
    return run


# stored type (quant_formats) -> (block along the input dimension, fp32 [out, in] -> rounded fp32 [out, in])
ROUNDTRIPS = {
    "Q8_0": (32, _q8_0),
    "Q3_K": (256, lambda w: _symmetric_k(w, 4, 32)),
    "Q4_K": (256, lambda w: _affine_k(w, 4)),
    "Q5_K": (256, lambda w: _affine_k(w, 5)),
    "Q6_K": (256, lambda w: _symmetric_k(w, 32, 128)),
    "nvfp4": (16, _kitchen("TensorCoreNVFP4Layout")),
    "int8": (256, _kitchen("TensorWiseINT8Layout", per_channel=True, convrot=True, convrot_groupsize=256)),
    "svdq_r32": (64, _svdq(32)),
}


def roundtrip(kind: str, w: Tensor, pad: bool = False) -> Tensor:
    """`w` [out, in] through stored type `kind` and back, in fp32. pad: zero-pad rows to whole blocks (toy widths)."""
    block, fn = ROUNDTRIPS[kind]
    w = w.float()
    cols = w.shape[1]
    if cols % block:
        if not pad:
            raise ValueError(f"{kind}: in_features {cols} is not a multiple of its block {block}")
        w = torch.nn.functional.pad(w, (0, -cols % block))
    return fn(w)[:, :cols]


@torch.no_grad()
def quantize_weights_(model: torch.nn.Module, file: str, prefix: str = "", pad: bool = False) -> int:
    """Round every weight `file` quantizes through its type, in place (the model keeps computing in its dtype).
    `prefix` names a standalone block as the model's ("layers.0."). Returns the number of weights rounded."""
    types = linear_types(model, file, prefix)
    for path, kind in types.items():
        linear = model.get_submodule(path)
        linear.weight.copy_(roundtrip(kind, linear.weight, pad).to(linear.weight.dtype))
    return len(types)


# ---------------------------------------------------------------------------------------------- 1. one block
@torch.no_grad()
def block_error(tokens: int = 256) -> dict:
    x, rope, adaln = block_inputs(tokens)
    out = {}
    print(f"\n1. one real-width block (dim {ZImageConfig.turbo().dim}), {tokens} tokens, bf16 compute: block output rel RMS")
    for file in FILES:
        block = real_block(1, False)
        ref = block(x, rope, None, adaln)
        quantize_weights_(block, file, prefix="layers.0.")
        out[file] = rel(block(x, rope, None, adaln), ref)
        print(f"   {file:<14} {out[file]:.4f}", flush=True)
        del block
    return out


# ---------------------------------------------------------------------------------------------- 2. a model
@torch.no_grad()
def model_error(latent_hw: int = 32, cap_len: int = 32) -> dict:
    print("\n2. real-width model (dim 3840, 2 layers + 1+1 refiners, 32x32 latent), bf16 compute: rel RMS of one "
          "forward and of an 8-step sample")
    model = real_width_model()
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(1, model.config.in_channels, latent_hw, latent_hw, generator=gen)
    caption = [torch.randn(cap_len, model.config.cap_feat_dim, generator=gen)]
    ref_fwd = model(noise, torch.tensor([0.6]), caption).float()
    ref_sample = sample(model, noise, caption, steps=8, cfg=1.0)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    out = {}
    for file in FILES:
        t = time.time()
        model.load_state_dict(original)
        quantize_weights_(model, file)
        fwd = rel(model(noise, torch.tensor([0.6]), caption), ref_fwd)
        smp = rel(sample(model, noise, caption, steps=8, cfg=1.0), ref_sample)
        out[file] = {"forward": fwd, "sample": smp}
        print(f"   {file:<14} forward {fwd:.4f}   8-step sample {smp:.4f}   ({time.time() - t:.0f} s)", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- 3. toy world
@torch.no_grad()
def toy_world() -> dict:
    from toyworld import world
    from toyworld.evaluate import decode, generate, load_model
    from toyworld.metrics import fidelity

    prompts = world.base_prompts()
    ref = decode(generate(load_model("turbo", dtype=torch.bfloat16), prompts, steps=8, cfg=1.0, seed=7))
    out = {"bf16": {"fidelity": fidelity(ref, prompts)}}
    print(f"\n3. toy world turbo, 8 steps cfg 1, {len(prompts)} prompts, fixed noises (seed 7); bf16 fidelity "
          f"{out['bf16']['fidelity']:.3f}")
    for file in FILES:
        model = load_model("turbo", dtype=torch.bfloat16)
        quantize_weights_(model, file, pad=True)
        images = decode(generate(model, prompts, steps=8, cfg=1.0, seed=7))
        mse = float((images - ref).pow(2).mean())
        psnr = 10 * math.log10(1.0 / mse) if mse > 0 else float("inf")
        out[file] = {"psnr_db": psnr, "fidelity": fidelity(images, prompts)}
        print(f"   {file:<14} PSNR {psnr:.1f} dB, fidelity {out[file]['fidelity']:.3f}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- 4. forward time
def _write(file: str, model, path: Path) -> Path:
    """`model` saved as `file` by the formats' reference writers (the test fixtures: gguf-py's GGUFWriter with
    city96's rules, comfy-kitchen's quantizers, nunchaku's packing); K-quant values are random, which costs the
    same time to dequantize."""
    sys.path.insert(0, str(ROOT / "tests"))
    if file in ("Q8_0", "Q4_K_M", "Q3_K_S"):
        from gguf_fixtures import write_gguf

        mix = {"Q4_K_M": lambda name: "Q5_K" if ".attention.qkv." in name else (
            "Q6_K" if ".feed_forward.w2." in name else "Q4_K"), "Q3_K_S": "Q3_K", "Q8_0": "Q8_0"}[file]
        return write_gguf(path.with_suffix(".gguf"), model, mix)
    if file in ("nvfp4", "int8"):
        from comfy_quant_fixtures import write_file

        write_file(model, path, recipes=({"nvfp4": "nvfp4", "int8": "int8_convrot"}[file],))
        return path
    from svdquant_fixtures import write_file

    write_file(model, path, rank=32)
    return path


@torch.no_grad()
def timing(repeats: int = 3, files=("Q8_0", "Q4_K_M", "nvfp4", "int8", "svdq-int4 r32"), config=None,
           sides=(128,)) -> dict:
    """Forward time with every quantized Linear dequantizing per call, relative to the same model in plain fp32,
    on bench_transformer's mid config (dim 768, 8 layers + 2+2 refiners, fp32 CPU); latent sides 128 = 4096 image
    tokens."""
    import tempfile

    from bench_transformer import CONFIG, call
    from common import median, timed

    from zimage_core import ZImageTransformer
    from zimage_core.checkpoint import load_transformer
    from zimage_core.testing import init_random_

    config = config or CONFIG
    plain = init_random_(ZImageTransformer(config), seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    caption = [torch.randn(77, config.cap_feat_dim, generator=gen)]
    out = {}
    print(f"\n4. forward time, dim {config.dim}, {config.n_layers} layers, fp32 CPU, "
          f"{torch.get_num_threads()} threads, median of {repeats} alternating calls; quantized / plain")
    with tempfile.TemporaryDirectory() as tmp:
        for file in files:
            model = load_transformer(_write(file, plain, Path(tmp) / f"mid_{file.replace(' ', '_')}.safetensors"),
                                     dtype=torch.float32)
            out[file] = {}
            for side in sides:
                data = (torch.randn(1, 16, side, side, generator=gen), torch.tensor([0.6]), caption)
                t_plain, t_quant = [], []
                for _ in range(repeats):
                    t_plain += timed(lambda: call("ours", plain, *data), 1)
                    t_quant += timed(lambda: call("ours", model, *data), 1)
                tokens = (side // 2) ** 2
                out[file][tokens] = ratio = median(t_quant) / median(t_plain)
                print(f"   {file:<14} {tokens} tokens: plain {median(t_plain):6.2f} s, quantized "
                      f"{median(t_quant):6.2f} s, ratio {ratio:.3f}", flush=True)
            del model
    return out


@torch.no_grad()
def dequant_share(repeats: int = 3, files=("Q8_0", "Q4_K_M", "nvfp4", "int8", "svdq-int4 r32"), config=None,
                  side: int = 128) -> dict:
    """The per-call dequantization cost by itself, less sensitive to a busy machine than whole forwards: the sum
    over a model's QuantizedLinears of each one's fastest of `repeats` dequantizations (once per forward), against
    the fastest of `repeats` plain forwards at `side`² / 4 image tokens (bench_transformer's mid config, fp32)."""
    import tempfile

    from bench_transformer import CONFIG, call

    from zimage_core import ZImageTransformer
    from zimage_core.checkpoint import load_transformer
    from zimage_core.quant import QuantizedLinear
    from zimage_core.testing import init_random_

    config = config or CONFIG
    plain = init_random_(ZImageTransformer(config), seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    data = (torch.randn(1, 16, side, side, generator=gen), torch.tensor([0.6]),
            [torch.randn(77, config.cap_feat_dim, generator=gen)])
    forward = min(_seconds(lambda: call("ours", plain, *data)) for _ in range(repeats))
    tokens = (side // 2) ** 2
    print(f"\n5. dequantization per forward, dim {config.dim}, {config.n_layers} layers, fp32 CPU, "
          f"{torch.get_num_threads()} threads: plain forward at {tokens} tokens {forward:.2f} s (fastest of {repeats})")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for file in files:
            model = load_transformer(_write(file, plain, Path(tmp) / f"mid_{file.replace(' ', '_')}.safetensors"),
                                     dtype=torch.float32)
            linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
            seconds = sum(min(_seconds(lambda: m.dequantized(torch.float32)) for _ in range(repeats))
                          for m in linears)
            out[file] = seconds / forward
            print(f"   {file:<14} {len(linears)} Linears: {seconds:.2f} s per forward = {100 * out[file]:.1f} % of "
                  "the plain forward", flush=True)
            del model
    return out


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-real", action="store_true", help="skip the real-width parts (minutes of CPU)")
    parser.add_argument("--skip-toy", action="store_true")
    parser.add_argument("--timing", action="store_true", help="forward time of per-call dequantization (mid config)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"quantized formats vs bf16, relative RMS error; torch {torch.__version__}, {args.threads} threads")
    if not args.skip_real:
        block_error()
        model_error()
    if not args.skip_toy:
        toy_world()
    if args.timing:
        timing()
        dequant_share()


if __name__ == "__main__":
    main()
