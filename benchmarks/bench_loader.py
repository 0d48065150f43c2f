"""Loader memory: peak resident memory while loading a bf16 checkpoint, relative to the checkpoint size.

Writes a real-width checkpoint (dim 3840, ComfyUI fused-qkv layout, bf16) holding only a few blocks (the block
count is inferred when loading), then loads it in a fresh process into bf16 and reports peak RSS growth / file size
(1.0 = exactly one copy of the weights); for scale, a plain safetensors.load_file with every tensor cloned.
Usage: .venv/bin/python benchmarks/bench_loader.py [--layers 2] [--keep PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RssPeak, run_worker  # noqa: E402

from zimage_core import ZImageConfig, ZImageTransformer, load_transformer, save_transformer  # noqa: E402


def write_checkpoint(path: Path, layers: int) -> None:
    config = ZImageConfig.turbo().replace(n_layers=layers, n_refiner_layers=1)
    with torch.device("meta"):
        model = ZImageTransformer(config)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    save_transformer(model, path, layout="comfyui", prefix="model.diffusion_model.")


def worker(which: str, path: str):
    torch.set_num_threads(1)
    start = time.perf_counter()
    with RssPeak() as peak:
        if which == "zimage_core":
            n = load_transformer(path, dtype=torch.bfloat16).num_parameters()
        else:  # a plain full read of the file for scale: every tensor materialised in memory
            from safetensors.torch import load_file

            n = sum(t.clone().numel() for t in load_file(path).values())
    print(json.dumps({"which": which, "peak_mib": peak.delta_mib, "seconds": time.perf_counter() - start,
                      "params": n}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--keep")
    parser.add_argument("--worker", nargs="?")
    args, rest = parser.parse_known_args()
    if args.worker:
        return worker(args.worker, rest[0])
    folder = Path(tempfile.mkdtemp())
    path = Path(args.keep) if args.keep else folder / "z_image_turbo_partial_bf16.safetensors"
    if not path.exists():
        write_checkpoint(path, args.layers)
    size_mib = path.stat().st_size / 2**20
    print(f"checkpoint: {path.name}, {size_mib:.0f} MiB, dim 3840, {args.layers} layers + 1+1 refiners, bf16 (ComfyUI layout)")
    for which in ("zimage_core", "load_file+clone"):
        r = run_worker(Path(__file__), which, str(path))
        print(f"{which:22s} peak RSS growth {r['peak_mib']:7.0f} MiB = {r['peak_mib'] / size_mib:.2f}x checkpoint, "
              f"{r['seconds']:.1f} s, {r['params'] / 1e6:.0f} M params")
    if not args.keep:
        path.unlink()


if __name__ == "__main__":
    main()
