"""The LoRA engine: load any producer's Z-Image LoRA, apply a stack (merged or as runtime branches, its LoRAs summed
or combined by a mode of combine.py), remove it exactly, and save the one export format (see io.py)."""

from .apply import LoraHandle, LoraReport, apply_loras
from .combine import COMBINE_MODES, combine_stack
from .formats import detect_format, normalise
from .io import EXPORT_FORMAT, load_lora, save_lora
from .weights import DEFAULT_TARGETS, LoraError, LoraModule, LoraWeights, new_lora

__all__ = ["COMBINE_MODES", "DEFAULT_TARGETS", "EXPORT_FORMAT", "LoraError", "LoraHandle", "LoraModule", "LoraReport",
           "LoraWeights", "apply_loras", "combine_stack", "detect_format", "load_lora", "new_lora", "normalise", "save_lora"]
