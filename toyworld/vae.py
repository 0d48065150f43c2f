"""The toy "VAE": a fixed, exactly invertible linear map from 2x2 RGB pixel blocks (12 values) to 16 latent
channels at half resolution, so a 32x32 image is a 16x16x16 latent (64 DiT tokens of 4x4 pixels after the DiT's own
2x2 patchify). Encoding: pixel-unshuffle 2, subtract the data mean, multiply by a fixed 16x12 matrix with
orthonormal columns and one global scale. Decoding is the transpose (a projection: latent directions outside the
12-dim image subspace are dropped)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import WEIGHTS

LATENT_CHANNELS = 16
FACTOR = 2


class ToyVAE:
    def __init__(self, weight: Tensor, mean: Tensor, scale: float):
        self.weight = weight.float()  # [16, 12], orthonormal columns
        self.mean = mean.float()  # [12]
        self.scale = float(scale)

    @classmethod
    def fit(cls, images: Tensor, seed: int = 0) -> "ToyVAE":
        """A fixed random orthonormal embedding, the data mean of each block value and the global scale that
        gives the encoded data unit standard deviation."""
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(LATENT_CHANNELS, 3 * FACTOR * FACTOR, generator=g))
        blocks = F.pixel_unshuffle(images.float(), FACTOR)
        mean = blocks.mean(dim=(0, 2, 3))
        vae = cls(q, mean, 1.0)
        vae.scale = float(1.0 / vae.encode(images).std())
        return vae

    def encode(self, images: Tensor) -> Tensor:
        """[B, 3, 32, 32] in [0, 1] -> [B, 16, 16, 16]."""
        blocks = F.pixel_unshuffle(images.float(), FACTOR) - self.mean[:, None, None]
        return self.scale * torch.einsum("ck,bkhw->bchw", self.weight, blocks)

    def decode(self, latents: Tensor) -> Tensor:
        """[B, 16, 16, 16] -> [B, 3, 32, 32] (not clamped)."""
        blocks = torch.einsum("ck,bchw->bkhw", self.weight, latents.float()) / self.scale
        return F.pixel_shuffle(blocks + self.mean[:, None, None], FACTOR)

    def encode_pil(self, image) -> Tensor:
        """A PIL image (any size multiple of 2) -> [16, h/2, w/2], for the trainer's `Encoders`."""
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return self.encode(torch.from_numpy(array).permute(2, 0, 1)[None])[0]

    def state_dict(self) -> dict[str, Tensor]:
        return {"weight": self.weight.contiguous(), "mean": self.mean.contiguous(),
                "scale": torch.tensor([self.scale], dtype=torch.float32)}

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file
        save_file(self.state_dict(), str(path), metadata={"what": "toyworld linear VAE: pixel_unshuffle(2), "
                                                          "z = scale * W (x - mean)"})

    @classmethod
    def load(cls, path: str | Path = WEIGHTS / "vae.safetensors") -> "ToyVAE":
        from safetensors.torch import load_file
        state = load_file(str(path))
        return cls(state["weight"], state["mean"], float(state["scale"][0]))


def to_pil(image: Tensor):
    from PIL import Image
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(array)
