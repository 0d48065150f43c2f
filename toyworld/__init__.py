"""A miniature Z-Image world: captioned shape images, a fixed linear "VAE", word-vector captions and a tiny
Z-Image-architecture teacher / turbo pair trained by `toyworld.build`, used to measure the four "keep the Turbo"
LoRA schemes end to end with zimage_core (see toyworld/RESULTS.md)."""

from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent / "weights"
