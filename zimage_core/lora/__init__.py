"""The LoRA engine: load any producer's Z-Image LoRA, apply a stack (merged or as runtime branches), remove it
exactly, and save the one export format (see io.py)."""

from .apply import LoraHandle, LoraReport, apply_loras
from .formats import detect_format, normalise
from .io import EXPORT_FORMAT, load_lora, save_lora
from .weights import DEFAULT_TARGETS, LoraError, LoraModule, LoraWeights, new_lora

__all__ = ["DEFAULT_TARGETS", "EXPORT_FORMAT", "LoraError", "LoraHandle", "LoraModule", "LoraReport", "LoraWeights",
           "apply_loras", "detect_format", "load_lora", "new_lora", "normalise", "save_lora"]
