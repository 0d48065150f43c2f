"""zimage_core: Z-Image-Turbo in plain PyTorch (no ComfyUI imports)."""

from .checkpoint import inspect_checkpoint, load_transformer, save_transformer
from .config import ZImageConfig
from .controlnet import ControlInput, ControlNetConfig, ZImageControlNet, load_controlnet
from .lora import LoraHandle, LoraWeights, apply_loras, load_lora, new_lora, save_lora
from .sampling import QUALITY, TURBO, SeedVariety, sample
from .scheduler import sigmas
from .training import DatasetCache, Encoders, TrainConfig, TrainResult, build_cache, train
from .transformer import ZImageTransformer

__all__ = [
    "QUALITY", "TURBO", "SeedVariety", "ZImageConfig", "ZImageTransformer", "inspect_checkpoint", "load_transformer", "sample",
    "save_transformer", "sigmas",
    "ControlInput", "ControlNetConfig", "ZImageControlNet", "load_controlnet",
    "LoraHandle", "LoraWeights", "apply_loras", "load_lora", "new_lora", "save_lora",
    "DatasetCache", "Encoders", "TrainConfig", "TrainResult", "build_cache", "train",
]
