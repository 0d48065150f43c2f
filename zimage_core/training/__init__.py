"""LoRA training for Z-Image-Turbo with the four "keep the Turbo" schemes (see trainer.py)."""

from .adapters import LoraMismatch, grow_lora
from .config import ConfigError, TrainConfig
from .data import DatasetCache, DatasetError, Encoders, build_cache, bucket_size, scan_dataset
from .losses import bell_weights, sft_loss, teacher_trajectory, trajectory_grids, trajectory_loss
from .trainer import TrainingDiverged, TrainResult, train, trajectory_pool_noise

__all__ = [
    "ConfigError", "DatasetCache", "DatasetError", "Encoders", "LoraMismatch", "TrainConfig", "TrainResult",
    "TrainingDiverged", "bell_weights", "bucket_size", "build_cache", "grow_lora", "scan_dataset", "sft_loss",
    "teacher_trajectory", "train", "trajectory_grids", "trajectory_loss", "trajectory_pool_noise",
]
