"""TrainConfig: every setting of a training run, its TOML form and its validation.

Defaults are DiffSynth-Studio's Z-Image-Turbo LoRA recipe (training-schemes.md §1-§3): rank 32, alpha = rank, the
seven attention/FFN targets in all blocks, AdamW lr 1e-4 wd 0.01, batch 1, sigma from the shift-3 1000-entry grid
with the bell loss weight, max_pixels 1024², teacher 50 steps / cfg 2 and 8 student steps for trajectory imitation.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .optimizers import OPTIMIZERS
from ..variants import VARIANTS

SCHEMES = ("sft", "differential", "trajectory", "distillpatch")
# On Z-Image base: the differential adapter and trajectory imitation exist to keep Turbo's distillation, which base
# does not have (making base 8-step capable is a full distillation, e.g. alibaba-pai's Fun-Lora-Distill at rank 128).
BASE_SCHEMES = ("sft", "distillpatch")
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")
# Names usable in `targets` that stand for a group of modules in every block (layers and both refiners). The
# embedders and the final layer are never targets: peers train the blocks only, and the export layout covers those.
TARGET_PRESETS = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "attention_ffn": DEFAULT_TARGETS,
    "all_linear": (*DEFAULT_TARGETS, "adaLN_modulation.0"),
}
LR_SCHEDULES = ("constant", "constant_with_warmup", "cosine", "linear", "diffsynth")
WARMUP_SCHEDULES = ("constant_with_warmup", "cosine", "linear")
LOSS_WEIGHTINGS = ("bell", "none")
SAVE_DTYPES = ("bf16", "fp16", "fp32")


class ConfigError(ValueError):
    """A training setting is missing, unknown or out of range."""


@dataclass
class TrainConfig:
    # what to train
    scheme: str = "sft"  # sft | differential | trajectory | distillpatch (= sft, validated with the DistillPatch)
    base_model: str = ""  # a name recorded in the LoRA metadata; the CLI loads it (a path, or "tiny:SEED")
    model_variant: str = "turbo"  # "turbo" | "base" (zimage_core.variants): the validation recipe and allowed schemes
    rank: int = 32
    alpha: float | None = None  # None: alpha = rank (scale 1), as DiffSynth
    targets: tuple[str, ...] = DEFAULT_TARGETS
    preset_lora: str | None = None  # scheme 2: frozen during training, removed for previews and export
    preset_strength: float = 1.0
    init_lora: str | None = None  # scheme 3 (required): the SFT LoRA the student starts from and the teacher uses
    distill_patch: str | None = None  # scheme 4: validation also previews trained LoRA + DistillPatch at 8/cfg 1

    # data
    dataset_dir: str | None = None
    cache_dir: str | None = None
    max_pixels: int = 1024 * 1024
    bucket_step: int = 16  # bucket sides are multiples of this (16 = DiffSynth's per-image resolution)
    repeats: int = 1
    caption_dropout_rate: float = 0.0  # share of samples trained on the empty caption (ai-toolkit's option)
    flip_horizontal: bool = False  # half the samples use the mirrored image (encoded in pixel space, cached)

    # output preservation (preservation.py; ai-toolkit's Differential Output Preservation): 0 = off
    preservation_weight: float = 0.0  # weight of the preservation loss (ai-toolkit's multiplier; 1.0 is usual)
    preservation_trigger: str = ""  # the word of the captions that names the new concept ("bar", "ohwx")
    preservation_classes: tuple[str, ...] = ()  # what it is replaced by for preservation (one drawn per sample)
    preservation_blank: bool = False  # also hold the output for the empty prompt (ai-toolkit's Blank Prompt
    # Preservation): classifier-free guidance subtracts it, so a LoRA that moves it moves every cfg > 1 sample

    # optimisation
    steps: int = 250
    batch_size: int = 1  # the global batch: split evenly over the processes under torch.distributed
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    lr_schedule: str = "constant"  # see schedules.py; "diffsynth": the first 5 steps at lr/3, then lr
    warmup_steps: int = 0  # linear warm-up of constant_with_warmup, cosine and linear
    optimizer: str = "adamw"  # see optimizers.py: adamw | adafactor | prodigy | adamw8bit
    ema_decay: float = 0.0  # 0: no EMA; else an EMA of the LoRA tensors, exported next to the LoRA as NAME_ema
    seed: int = 0
    shift: float = 3.0
    num_train_timesteps: int = 1000
    loss_weighting: str = "bell"  # DiffSynth's bell weight over the training grid, or "none"
    gradient_checkpointing: bool = True
    # checkpointed blocks keep their input in host RAM between forward and backward (zimage_core.host_checkpoint):
    # 0.7 GiB less accelerator memory for a rank-32 step at 1024² (benchmarks/bench_memory.py --quant), same losses
    checkpoint_inputs_on_host: bool = False

    # trajectory imitation (scheme 3)
    teacher_steps: int = 50
    teacher_cfg: float = 2.0
    student_steps: int = 8
    trajectory_noises: int = 0  # 0: fresh noise every step (DiffSynth); N: a fixed pool of N noises per image
    cache_teacher: bool = True  # with a noise pool, compute each teacher trajectory once and reuse it
    # student steps per forward and backward (0: all in one batched forward). 1 by default: at 1024² all 8 at once
    # need 21.8 GiB even with fp8 + block offload, one at a time 4.4 GiB (benchmarks/bench_memory.py), same loss
    student_chunk: int = 1

    # outputs
    output_dir: str = "output"
    output_name: str = "zimage_lora"
    checkpoint_every: int = 100  # 0: only at the end and on interrupt
    save_every: int = 0  # 0: no intermediate LoRA files; N: NAME.stepNNNNNN.safetensors every N steps
    keep_last: int = 0  # with save_every: keep only the newest K intermediate LoRA files (0: keep all)
    resume: str | None = None  # a checkpoint path, or "auto" for the run's own checkpoint if it exists
    validation_prompts: list[str] = field(default_factory=list)
    validation_seed: int = 0
    validation_width: int = 0  # 0: the first training image's bucket
    validation_height: int = 0
    validate: bool = True
    validation_every: int = 0  # 0: only before and after; N: also a grid (and the loss curve) every N steps
    log_every: int = 10
    save_dtype: str = "bf16"  # dtype of the exported LoRA file (DiffSynth saves bf16); training is always fp32

    # ------------------------------------------------------------------ derived
    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def output_path(self, suffix: str) -> Path:
        """A file of this run inside output_dir (the name was checked to contain no path parts)."""
        root = Path(self.output_dir).resolve()
        path = (root / f"{self.output_name}{suffix}").resolve()
        if path.parent != root:
            raise ConfigError(f"output file {path} would leave the output folder {root}")
        return path

    @property
    def checkpoint_path(self) -> Path:
        return self.output_path(".ckpt.safetensors")

    # ------------------------------------------------------------------ validation
    def validate_settings(self) -> "TrainConfig":
        """Check every field; raise ConfigError with a message naming the field. Returns self."""
        self.targets = expand_targets(self.targets)
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        self.validation_prompts = [str(p) for p in self.validation_prompts]
        if isinstance(self.preservation_classes, str):  # a node input / CLI flag: comma-separated
            self.preservation_classes = self.preservation_classes.split(",")
        self.preservation_classes = tuple(str(c).strip() for c in self.preservation_classes if str(c).strip())
        self.preservation_trigger = str(self.preservation_trigger).strip()

        def need(ok: bool, message: str):
            if not ok:
                raise ConfigError(message)

        need(self.scheme in SCHEMES, f"scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        need(self.model_variant in VARIANTS,
             f"model_variant must be one of {', '.join(VARIANTS)}, got {self.model_variant!r}")
        need(self.model_variant != "base" or self.scheme in BASE_SCHEMES,
             f"scheme {self.scheme!r} keeps a distilled Turbo sharp at 8 steps, but model_variant 'base' is Z-Image "
             f"base, which is not distilled: there is no Turbo to keep. Train scheme 'sft' on base (then sample it "
             f"on Turbo with the DistillPatch, or on base with a distillation LoRA such as Z-Image-Fun-Lora-Distill)")
        need(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > 0,
             f"rank must be a positive integer, got {self.rank!r}")
        need(self.alpha is None or (_finite(self.alpha) and self.alpha > 0), f"alpha must be > 0, got {self.alpha!r}")
        need(len(self.targets) > 0 and all(isinstance(t, str) and t for t in self.targets),
             f"targets must be a non-empty list of module names, got {list(self.targets)}")
        need(_finite(self.preset_strength), f"preset_strength must be a finite number, got {self.preset_strength!r}")
        if self.scheme == "differential":
            need(bool(self.preset_lora), "scheme 'differential' needs preset_lora (the frozen training adapter)")
        elif self.preset_lora and self.scheme == "trajectory":
            raise ConfigError("preset_lora cannot be combined with scheme 'trajectory'")
        if self.scheme == "trajectory":
            need(bool(self.init_lora), "scheme 'trajectory' needs init_lora (the SFT LoRA to distil)")
        for name in ("max_pixels", "steps", "batch_size", "grad_accum", "repeats", "num_train_timesteps",
                     "teacher_steps", "student_steps"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{name} must be an integer >= 1, got {value!r}")
        for name in ("trajectory_noises", "student_chunk", "checkpoint_every", "log_every", "seed",
                     "validation_width", "validation_height", "warmup_steps", "save_every", "keep_last",
                     "validation_every"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                 f"{name} must be an integer >= 0, got {value!r}")
        need(self.bucket_step >= 16 and self.bucket_step % 16 == 0,
             f"bucket_step must be a positive multiple of 16, got {self.bucket_step!r}")
        need(self.max_pixels >= self.bucket_step ** 2, f"max_pixels {self.max_pixels} is below one {self.bucket_step}² "
                                                       "bucket")
        need(self.validation_width % 16 == 0 and self.validation_height % 16 == 0,
             f"validation_width/height must be multiples of 16, got {self.validation_width}x{self.validation_height}")
        need(_finite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        need(_finite(self.weight_decay) and self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        need(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
             f"adam_betas must be two numbers in [0, 1), got {list(self.adam_betas)}")
        need(_finite(self.adam_eps) and self.adam_eps > 0, f"adam_eps must be > 0, got {self.adam_eps!r}")
        need(self.save_dtype in SAVE_DTYPES, f"save_dtype must be one of {SAVE_DTYPES}, got {self.save_dtype!r}")
        need(self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        need(self.warmup_steps == 0 or self.lr_schedule in WARMUP_SCHEDULES,
             f"warmup_steps ({self.warmup_steps}) needs lr_schedule {', '.join(WARMUP_SCHEDULES)}; lr_schedule "
             f"{self.lr_schedule!r} has no warm-up")
        need(self.lr_schedule != "constant_with_warmup" or self.warmup_steps >= 1,
             "lr_schedule 'constant_with_warmup' needs warmup_steps >= 1")
        need(self.warmup_steps < self.steps,
             f"warmup_steps ({self.warmup_steps}) must be fewer than steps ({self.steps}): the run would end "
             "before the warm-up")
        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        need(_finite(self.ema_decay) and 0 <= self.ema_decay < 1,
             f"ema_decay must be in [0, 1) (0 = no EMA; 1 would never update the average), got {self.ema_decay!r}")
        need(_finite(self.caption_dropout_rate) and 0 <= self.caption_dropout_rate <= 1,
             f"caption_dropout_rate must be in [0, 1], got {self.caption_dropout_rate!r}")
        need(isinstance(self.flip_horizontal, bool), f"flip_horizontal must be true or false, got "
                                                     f"{self.flip_horizontal!r}")
        need(isinstance(self.checkpoint_inputs_on_host, bool),
             f"checkpoint_inputs_on_host must be true or false, got {self.checkpoint_inputs_on_host!r}")
        need(not self.checkpoint_inputs_on_host or self.gradient_checkpointing,
             "checkpoint_inputs_on_host moves the inputs that gradient checkpointing keeps: it needs "
             "gradient_checkpointing = true")
        need(self.keep_last == 0 or self.save_every > 0,
             f"keep_last ({self.keep_last}) needs save_every > 0 (it limits the intermediate LoRA files)")
        need(self.validation_every == 0 or self.validate,
             f"validation_every ({self.validation_every}) needs validate = true")
        need(_finite(self.preservation_weight) and self.preservation_weight >= 0,
             f"preservation_weight must be >= 0 (0 = off), got {self.preservation_weight!r}")
        if self.preservation_weight > 0:
            need(bool(self.preservation_trigger), "preservation_weight > 0 needs preservation_trigger: the word of "
                                                  "the captions that names the new concept")
            need(len(self.preservation_classes) > 0,
                 "preservation_weight > 0 needs preservation_classes: one or more words the trigger is replaced by "
                 f"(e.g. 'circle, square'), got {list(self.preservation_classes)}")
            need(isinstance(self.preservation_blank, bool),
                 f"preservation_blank must be true or false, got {self.preservation_blank!r}")
            need(self.preservation_trigger.lower() not in (c.lower() for c in self.preservation_classes),
                 f"preservation_classes must not contain the trigger {self.preservation_trigger!r} itself")
        need(not self.preservation_blank or self.preservation_weight > 0,
             "preservation_blank needs preservation_weight > 0 (it extends output preservation)")
        need(self.loss_weighting in LOSS_WEIGHTINGS,
             f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}")
        need(_finite(self.shift) and self.shift > 0, f"shift must be > 0, got {self.shift!r}")
        need(_finite(self.teacher_cfg) and self.teacher_cfg >= 0, f"teacher_cfg must be >= 0, got {self.teacher_cfg!r}")
        need(self.student_steps < self.teacher_steps,
             f"student_steps ({self.student_steps}) must be fewer than teacher_steps ({self.teacher_steps})")
        check_output_name(self.output_name)
        need(bool(str(self.output_dir)), "output_dir must not be empty")
        return self

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict, base_dir: str | os.PathLike | None = None) -> "TrainConfig":
        """Build from a flat dict, or a TOML-style dict whose tables ([lora], [data], ...) are merged into the top
        level. Unknown keys are errors. Relative paths are taken relative to base_dir when given."""
        flat: dict = {}
        for key, value in data.items():
            if isinstance(value, dict):
                for sub, sub_value in value.items():
                    if sub in flat:
                        raise ConfigError(f"setting {sub!r} is given twice (in [{key}] and elsewhere)")
                    flat[sub] = sub_value
            else:
                if key in flat:
                    raise ConfigError(f"setting {key!r} is given twice")
                flat[key] = value
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(flat) - names)
        if unknown:
            raise ConfigError(f"unknown training setting(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        if base_dir is not None:
            for key in ("base_model", "preset_lora", "init_lora", "distill_patch", "dataset_dir", "cache_dir",
                        "output_dir"):
                value = flat.get(key)
                if value and not os.path.isabs(value) and not (key == "base_model" and value.startswith("tiny:")):
                    flat[key] = str(Path(base_dir) / value)
            resume = flat.get("resume")
            if resume and resume != "auto" and not os.path.isabs(resume):
                flat["resume"] = str(Path(base_dir) / resume)
        for key in ("alpha", "preset_lora", "init_lora", "distill_patch", "dataset_dir", "cache_dir", "resume"):
            if flat.get(key) == "":
                flat[key] = None
        return cls(**flat).validate_settings()

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"training config {path} does not exist")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"training config {path} is not valid TOML: {exc}") from exc
        return cls.from_dict(data, base_dir=path.parent)


def expand_targets(targets) -> tuple[str, ...]:
    """Module names with the preset names of TARGET_PRESETS replaced by their modules (order kept, no repeats).
    A single string is one name or a comma-separated list."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    out: list[str] = []
    for name in targets:
        for module in TARGET_PRESETS.get(name, (name,)) if isinstance(name, str) else (name,):
            if module not in out:
                out.append(module)
    return tuple(out)


def check_output_name(name: str) -> str:
    """An output name is a bare file stem: no path separators, no '..', not empty, not hidden."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("output_name must be a non-empty file name")
    if "/" in name or "\\" in name or ".." in name or os.sep in name or (os.altsep and os.altsep in name):
        raise ConfigError(f"output_name {name!r} must be a plain file name (no path separators or '..'): "
                          "outputs stay inside output_dir")
    if name.startswith(".") or "\x00" in name or ":" in name:
        raise ConfigError(f"output_name {name!r} is not a valid plain file name")
    return name


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# The tables of a TOML config, for `train --help` and the shipped configs/train_*.toml. They only group: from_dict
# merges every table into the top level, so any setting may also stand outside them.
SECTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "": ("what to train", ("scheme", "base_model", "model_variant")),
    "lora": ("the trained LoRA and the LoRAs around it", (
        "rank", "alpha", "targets", "preset_lora", "preset_strength", "init_lora", "distill_patch")),
    "data": ("the encoded dataset (python -m zimage_core encode builds cache_dir)", (
        "dataset_dir", "cache_dir", "max_pixels", "bucket_step", "repeats", "caption_dropout_rate",
        "flip_horizontal")),
    "optim": ("optimisation", (
        "steps", "batch_size", "grad_accum", "lr", "weight_decay", "adam_betas", "adam_eps", "lr_schedule",
        "warmup_steps", "optimizer", "ema_decay", "seed", "shift", "num_train_timesteps", "loss_weighting",
        "gradient_checkpointing", "checkpoint_inputs_on_host")),
    "preservation": ("output preservation: keep what the other words draw (0 = off)", (
        "preservation_weight", "preservation_trigger", "preservation_classes", "preservation_blank")),
    "trajectory": ("trajectory imitation (scheme trajectory)", (
        "teacher_steps", "teacher_cfg", "student_steps", "trajectory_noises", "cache_teacher", "student_chunk")),
    "output": ("files, checkpoints and validation", (
        "output_dir", "output_name", "checkpoint_every", "save_every", "keep_last", "resume", "validation_prompts",
        "validation_seed", "validation_width", "validation_height", "validate", "validation_every", "log_every",
        "save_dtype")),
}
