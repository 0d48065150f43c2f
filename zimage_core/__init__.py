"""zimage_core: Z-Image-Turbo in plain PyTorch (no ComfyUI imports)."""

from .checkpoint import inspect_checkpoint, load_transformer, save_transformer
from .config import ZImageConfig
from .sampling import QUALITY, TURBO, sample
from .scheduler import sigmas
from .transformer import ZImageTransformer

__all__ = [
    "QUALITY", "TURBO", "ZImageConfig", "ZImageTransformer", "inspect_checkpoint", "load_transformer", "sample",
    "save_transformer", "sigmas",
]
