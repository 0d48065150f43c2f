"""Deterministic stand-in encoders and datasets for tests, benchmarks and demos of the trainer (no VAE, no text
encoder): a fixed linear "VAE" from 8x8 pixel blocks to latent channels and a hashed word-vector "text encoder"."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .data import Encoders


def toy_encoders(latent_channels: int = 16, cap_dim: int = 48, seed: int = 0, name: str = "toy") -> Encoders:
    """encode_image: mean of each 8x8 RGB block in [-1, 1], mapped by a fixed random 3 -> C matrix (plus a fixed
    per-channel offset); encode_text: one fixed random N(0, 1) vector per word after a start token, so the empty
    prompt is one row. encoder_id names the construction, its sizes and seed."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(latent_channels, 3, generator=gen)
    offset = 0.1 * torch.randn(latent_channels, 1, 1, generator=gen)

    def encode_image(image: Image.Image) -> Tensor:
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
        blocks = torch.nn.functional.avg_pool2d(pixels[None], 8)[0]  # [3, h, w]
        return torch.einsum("ck,khw->chw", mix, blocks) + offset

    def word_vector(word: str) -> Tensor:
        digest = hashlib.sha256(f"{name}:{seed}:{word}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        return torch.randn(cap_dim, generator=g)

    def encode_text(text: str) -> Tensor:
        return torch.stack([word_vector("<start>")] + [word_vector(w) for w in text.lower().split()])

    return Encoders(encode_image, encode_text, f"{name}-v1:c{latent_channels}:d{cap_dim}:s{seed}")


def make_toy_dataset(folder: str | Path, n: int = 4, sizes=((96, 96),), seed: int = 0, layout: str = "sidecar",
                     captions=None) -> Path:
    """Write n small images (coloured rectangles on noise) with captions, in the sidecar or metadata.csv layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = ["red", "green", "blue", "yellow", "white", "purple"]
    rows = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        array = (rng.random((h, w, 3)) * 60).astype(np.uint8)
        colour = colours[i % len(colours)]
        rgb = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 50, 220), "yellow": (230, 220, 40),
               "white": (240, 240, 240), "purple": (150, 40, 170)}[colour]
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        array[y0:y0 + h // 2, x0:x0 + w // 2] = rgb
        name = f"img_{i:03d}.png"
        Image.fromarray(array).save(folder / name)
        caption = captions[i] if captions is not None else f"a {colour} square on dark noise"
        rows.append((name, caption))
        if layout == "sidecar":
            (folder / name).with_suffix(".txt").write_text(caption, encoding="utf-8")
    if layout == "metadata":
        import csv
        with (folder / "metadata.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", "prompt"])
            writer.writerows(rows)
    return folder
