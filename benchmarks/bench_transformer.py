"""Forward pass of zimage_core's transformer vs diffusers' ZImageTransformer2DModel on the same weights and inputs.

CPU, fp32, a mid-size config (dim 768, 8 layers, 12 heads, 64x64 latent = 1024 image tokens, 77-token caption).
Time: both models in one process, calls alternated, median of N. Memory: each model in its own fresh process,
peak RSS above the RSS after building the model (activation and workspace memory of one forward).
--compile: instead, zimage_core.compile's per-block compile (inductor) vs eager of the same storage, bf16 and bf16
with fp8 storage, one process, calls alternated after warm-up (compile time reported separately), and the max
relative difference compiled vs eager.
Usage: .venv/bin/python benchmarks/bench_transformer.py [--repeats 10] [--threads 2] [--compile]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RssPeak, median, peak_rss_mib, run_worker, timed  # noqa: E402

from zimage_core import ZImageConfig, ZImageTransformer  # noqa: E402
from zimage_core.testing import init_random_  # noqa: E402

CONFIG = ZImageConfig(dim=768, n_layers=8, n_refiner_layers=2, n_heads=12, cap_feat_dim=512, axes_dims=(16, 24, 24))


def build(which: str):
    ours = init_random_(ZImageTransformer(CONFIG), seed=0).eval()
    if which == "ours":
        return ours
    from diffusers import ZImageTransformer2DModel

    ref = ZImageTransformer2DModel(**{k: v for k, v in CONFIG.to_diffusers().items() if not k.startswith("_")})
    ref.load_state_dict(ours.state_dict())
    del ours
    return ref.eval()


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 16, 64, 64, generator=g), torch.tensor([0.6]), [torch.randn(77, 512, generator=g)]


def call(which, model, latents, sigmas, captions):
    with torch.no_grad():
        if which == "ours":
            return model(latents, sigmas, captions)
        out = model([latents[0, :, None]], 1.0 - sigmas, captions, return_dict=False)[0]
        return -out[0][:, 0][None]


def worker(which: str, threads: int):
    torch.set_num_threads(threads)
    model = build(which)
    data = inputs()
    with RssPeak() as first:
        call(which, model, *data)
    print(json.dumps({"which": which, "forward_peak_mib": first.delta_mib, "total_peak_mib": peak_rss_mib()}))


def compile_rows(repeats: int, threads: int, backend: str = "inductor") -> None:
    """Compiled vs eager on the same storage: per storage, an eager model and a compiled copy, calls alternated."""
    import copy
    import time

    from zimage_core.compile import enable_compile
    from zimage_core.quant.fp8 import to_fp8_storage

    data = inputs()
    print(f"config: dim {CONFIG.dim}, {CONFIG.n_layers} layers, 64x64 latent, 77-token caption, CPU, {threads} "
          f"threads, per-block compile ({backend}) vs eager of the same storage")
    for storage in ("bf16", "bf16 + fp8 storage"):
        eager = build("ours").to(torch.bfloat16)
        if "fp8" in storage:
            to_fp8_storage(eager)
        compiled = enable_compile(copy.deepcopy(eager), backend=backend)
        start = time.perf_counter()
        out_c = call("ours", compiled, *data)
        first = time.perf_counter() - start
        out_e = call("ours", eager, *data)
        err = float((out_c.float() - out_e.float()).abs().max() / out_e.float().abs().max())
        t_eager, t_comp = [], []
        for _ in range(repeats):
            t_eager += timed(lambda: call("ours", eager, *data), 1)
            t_comp += timed(lambda: call("ours", compiled, *data), 1)
        ratios = sorted(a / b for a, b in zip(t_eager, t_comp))
        print(f"{storage:20s} eager {median(t_eager) * 1e3:8.1f} ms  compiled {median(t_comp) * 1e3:8.1f} ms  "
              f"speed-up {median(t_eager) / median(t_comp):.3f}x (per-round {ratios[0]:.2f}-{ratios[-1]:.2f})  "
              f"first call {first:.1f} s  max rel diff {err:.2e}")
        del eager, compiled


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="compiled vs eager rows instead of vs diffusers")
    parser.add_argument("--worker", nargs="?")
    args, rest = parser.parse_known_args()
    if args.worker:
        return worker(args.worker, int(rest[0]) if rest else args.threads)
    torch.set_num_threads(args.threads)
    if args.compile:
        return compile_rows(args.repeats, args.threads)
    ours, ref = build("ours"), build("diffusers")
    data = inputs()
    diff = (call("ours", ours, *data) - call("diffusers", ref, *data)).abs().max().item()
    t_ours, t_ref = [], []
    for _ in range(args.repeats):  # alternate so drift in machine load hits both alike
        t_ours += timed(lambda: call("ours", ours, *data), 1)
        t_ref += timed(lambda: call("diffusers", ref, *data), 1)
    del ours, ref
    mem = {w: run_worker(Path(__file__), w, str(args.threads)) for w in ("ours", "diffusers")}
    print(f"config: dim {CONFIG.dim}, {CONFIG.n_layers} layers, 64x64 latent, fp32 CPU, {args.threads} threads; "
          f"max|ours - diffusers| = {diff:.2e}")
    print(f"forward time   ours {median(t_ours) * 1e3:8.1f} ms   diffusers {median(t_ref) * 1e3:8.1f} ms   "
          f"ratio {median(t_ours) / median(t_ref):.3f}")
    m_ours, m_ref = mem["ours"]["forward_peak_mib"], mem["diffusers"]["forward_peak_mib"]
    print(f"forward memory ours {m_ours:8.1f} MiB  diffusers {m_ref:8.1f} MiB  ratio {m_ours / max(m_ref, 1e-9):.3f}"
          f"   (process peak {mem['ours']['total_peak_mib']:.0f} vs {mem['diffusers']['total_peak_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
