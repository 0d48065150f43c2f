"""zimage_core: Z-Image-Turbo in plain PyTorch (no ComfyUI imports)."""

from .config import ZImageConfig
from .transformer import ZImageTransformer

__all__ = ["ZImageConfig", "ZImageTransformer"]
