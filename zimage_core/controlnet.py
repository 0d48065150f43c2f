"""alibaba-pai's Z-Image Fun ControlNet Union, in every released layout, and how its hints enter the transformer.

The files carry no config; the layout is read from their keys and shapes (VideoX-Fun's configs name them):

| release | control layers (hint after main layer) | control_in_dim | control-token refiner |
|---|---|---|---|
| Union 1.0 | 6 (0, 5, ..., 25) | 16 | 2 plain Z-Image blocks, no hints |
| Union 2.0 | 15 (0, 2, ..., 28) | 33 | the control layers themselves (VideoX-Fun `add_control_noise_refiner_correctly: false`); hints after noise_refiner 0, 1. The file's `control_noise_refiner` is untrained (`after_proj` all zero) and not loaded |
| Union 2.1, Tile 2.1 | 15 (0, 2, ..., 28) | 33 | 2 control blocks of their own; hints after noise_refiner 0, 1 |
| Union 2.1 lite | 3 (0, 10, 20) | 33 | as 2.1 |

A control block is a Z-Image block on the control tokens with two extra projections: the first block of a stage
starts from `before_proj(c) + stream` (the transformer's tokens at the start of that stage), and every block emits a
hint `after_proj(c)` that is added, times the strength, to the transformer's stream after its place. The control
latent is patchified and embedded like the image (padding = the transformer's `x_pad_token`); in the main stage its
tokens are joined with the transformer's refined caption tokens. control_in_dim 33 (2.x) reads
[control latent (16), keep mask = 1 - mask (1), masked-image latent (16)]; without a mask the last 17 channels are
zero (diffusers and VideoX-Fun), which is plain control.

Hints are computed just before the block that receives them (as ComfyUI does), so one hint and one control stream
are alive at a time instead of all of them.

Deviation from diffusers 0.42.1: its `ZImageControlNetModel` adds the refiner-stage hints only to its private copy of
the noise-refiner stream (they shape the main-stage hints) and never hands them to the transformer; VideoX-Fun's
`ZImageControlTransformer2DModel`, DiffSynth's `model_fn_z_image_turbo` and ComfyUI's `ZImageFunControlnet` add them
to the transformer's noise refiner. This module follows the original. Every main-stage hint, and all of Union 1.0,
agree with diffusers either way.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import LOOKALIKES, WeightSource, checkpoint_files, fill_from_source, map_sources
from .quant.fp8 import FP8_DTYPES, WEIGHT_STORAGE, check_fp8_support
from .config import ZImageConfig
from .safetensors_io import SafetensorsFile
from .scheduler import StepRange
from .transformer import StreamStage, TransformerBlock, ZImageTransformer, patchify

log = logging.getLogger("zimage_core")

REFINER_PLAIN = "plain"  # 1.0: plain blocks refine the control tokens; no refiner hints
REFINER_SHARED = "shared"  # 2.0: the control layers double as the refiner
REFINER_OWN = "own"  # 2.1: control blocks of their own refine and hint
_REQUIRED = ("control_all_x_embedder.2-1.weight", "control_layers.0.before_proj.weight")
_CONTROLNET_LOOKALIKES = [
    *[(f, w) for f, w in LOOKALIKES if not f.startswith("control_all_x_embedder")],
    ("controlnet_x_embedder", "a Flux ControlNet"),
    ("controlnet_cond_embedding", "a Stable Diffusion / SDXL ControlNet"),
    ("cap_embedder.", "a Z-Image transformer (load it with the Z-Image Turbo Model Loader)"),
]


@dataclass(frozen=True)
class ControlNetConfig:
    """Shape of a Fun ControlNet. `n_refiner_layers`: the noise-refiner blocks that receive refiner hints."""

    dim: int = 3840
    n_heads: int = 30
    n_control_layers: int = 15
    control_in_dim: int = 33
    refiner: str = REFINER_OWN
    n_refiner_layers: int = 2
    patch_size: int = 2
    ffn_hidden_dim: int | None = None

    def __post_init__(self):
        if self.refiner not in (REFINER_PLAIN, REFINER_SHARED, REFINER_OWN):
            raise ValueError(f"ControlNetConfig: refiner must be plain, shared or own, got {self.refiner!r}")
        if self.n_control_layers < 1:
            raise ValueError(f"ControlNetConfig: n_control_layers must be >= 1, got {self.n_control_layers}")

    @property
    def block_config(self) -> ZImageConfig:
        """The Z-Image block shape its control blocks share with the transformer."""
        return ZImageConfig(dim=self.dim, n_heads=self.n_heads, n_layers=1, patch_size=self.patch_size,
                            axes_dims=ZImageConfig.rope_axes_for(self.dim // self.n_heads),
                            ffn_hidden_dim=self.ffn_hidden_dim)

    @property
    def inpaint(self) -> bool:
        """control_in_dim 33: control latent + keep mask + masked-image latent (the 2.x models)."""
        return self.control_in_dim > self.block_config.in_channels

    def describe(self) -> str:
        release = {REFINER_PLAIN: "1.0", REFINER_SHARED: "2.0", REFINER_OWN: "2.1"}[self.refiner]
        if self.refiner == REFINER_OWN and self.n_control_layers == 3:
            release += " lite"
        return (f"Fun ControlNet Union {release} layout ({self.n_control_layers} control layers, "
                f"control_in_dim {self.control_in_dim})")

    def replace(self, **changes) -> "ControlNetConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def release(cls, name: str, **overrides) -> "ControlNetConfig":
        """The released layouts: "1.0", "2.0", "2.1" (also Tile 2.1), "2.1-lite"."""
        layouts = {
            "1.0": dict(n_control_layers=6, control_in_dim=16, refiner=REFINER_PLAIN),
            "2.0": dict(n_control_layers=15, control_in_dim=33, refiner=REFINER_SHARED),
            "2.1": dict(n_control_layers=15, control_in_dim=33, refiner=REFINER_OWN),
            "2.1-lite": dict(n_control_layers=3, control_in_dim=33, refiner=REFINER_OWN),
        }
        if name not in layouts:
            raise ValueError(f"unknown Fun ControlNet release {name!r}; one of {list(layouts)}")
        return cls(**{**layouts[name], **overrides})


class ControlBlock(TransformerBlock):
    """A modulated Z-Image block on the control tokens. The first block of a stage adds `before_proj(c)` to the
    transformer's stream; every block returns (hint = after_proj(c), c)."""

    def __init__(self, cfg: ZImageConfig, first: bool):
        super().__init__(cfg, modulation=True)
        if first:
            self.before_proj = nn.Linear(cfg.dim, cfg.dim)
        self.after_proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, c: Tensor, rope, mask, adaln, stream: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if stream is not None:
            c = self.before_proj(c) + stream
        c = super().forward(c, rope, mask, adaln)
        return self.after_proj(c), c


class ZImageControlNet(nn.Module):
    """The Fun ControlNet's own weights (parameter names as in the released files and diffusers). It runs inside a
    `ZImageTransformer` forward through `control_residuals` (below), reusing the transformer's embeddings."""

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = cfg = config
        blocks = cfg.block_config
        p = cfg.patch_size
        self.control_all_x_embedder = nn.ModuleDict({f"{p}-1": nn.Linear(p * p * cfg.control_in_dim, cfg.dim)})
        self.control_layers = nn.ModuleList(ControlBlock(blocks, first=i == 0) for i in range(cfg.n_control_layers))
        if cfg.refiner == REFINER_PLAIN:
            self.control_noise_refiner = nn.ModuleList(
                TransformerBlock(blocks, modulation=True) for _ in range(cfg.n_refiner_layers))
        elif cfg.refiner == REFINER_OWN:
            self.control_noise_refiner = nn.ModuleList(
                ControlBlock(blocks, first=j == 0) for j in range(cfg.n_refiner_layers))

    @property
    def x_embedder(self) -> nn.Linear:
        return self.control_all_x_embedder[f"{self.config.patch_size}-1"]

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.x_embedder.weight.device

    def blocks(self) -> list[nn.Module]:
        """Every block, for block offload (`zimage_core.offload` streams them like the transformer's)."""
        return [*getattr(self, "control_noise_refiner", ()), *self.control_layers]

    def refiner_blocks(self) -> nn.ModuleList:
        """The blocks that refine the control tokens at the noise-refiner stage (2.0: the control layers)."""
        return self.control_layers if self.config.refiner == REFINER_SHARED else self.control_noise_refiner

    def layer_places(self, n_layers: int) -> list[int]:
        """Main layers that receive the hints: evenly spread from layer 0 (30 layers: every 5th / 2nd / 10th)."""
        step = n_layers // self.config.n_control_layers
        return [k * step for k in range(self.config.n_control_layers)]

    def check_fits(self, model: ZImageTransformer, label: str = "the ControlNet") -> None:
        """Raise ValueError (naming `label`) unless this ControlNet was made for `model`'s architecture."""
        cfg, base = self.config, model.config
        problems = []
        if (cfg.dim, cfg.n_heads, cfg.patch_size) != (base.dim, base.n_heads, base.patch_size):
            problems.append(f"it has width {cfg.dim} / {cfg.n_heads} heads / patch {cfg.patch_size}, the model "
                            f"{base.dim} / {base.n_heads} / {base.patch_size}")
        if cfg.block_config.ffn_dim != base.ffn_dim:
            problems.append(f"its feed-forward width is {cfg.block_config.ffn_dim}, the model's {base.ffn_dim}")
        if cfg.n_control_layers > base.n_layers:
            problems.append(f"it has {cfg.n_control_layers} control layers for a model of {base.n_layers} layers")
        if cfg.refiner != REFINER_PLAIN and cfg.n_refiner_layers > base.n_refiner_layers:
            problems.append(f"it hints {cfg.n_refiner_layers} noise-refiner blocks, the model has "
                            f"{base.n_refiner_layers}")
        if cfg.control_in_dim not in (base.in_channels, 2 * base.in_channels + 1):
            problems.append(f"its control_in_dim {cfg.control_in_dim} is neither {base.in_channels} nor "
                            f"{2 * base.in_channels + 1}")
        if problems:
            raise ValueError(f"{label} does not fit this Z-Image model: " + "; ".join(problems)
                             + " (a ControlNet for another model or model size?)")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------------------------------------- running it
class _ControlPass:
    """One ControlNet's work within one transformer forward: a `BlockResiduals` hook."""

    def __init__(self, net: ZImageControlNet, context: Tensor, strength: float, pad_token: Tensor,
                 places: list[int]):
        self.net, self.context, self.strength, self.pad_token = net, context, strength, pad_token
        self.main_places = {place: k for k, place in enumerate(places)}
        self.c: Tensor | None = None  # the control stream
        self._blocks, self._done = (), 0

    def __call__(self, stage: StreamStage) -> Callable[[int], Tensor | None] | None:
        net = self.net
        if stage.name == "noise_refiner":
            self.c = self._embed(stage)
            if net.config.refiner == REFINER_PLAIN:
                for block in net.control_noise_refiner:  # independent of the stream: refine the tokens now
                    self.c = block(self.c, stage.rope, None, stage.adaln)
                return None
            self._begin(net.refiner_blocks(), stage)
            hinted = range(net.config.n_refiner_layers)
            return lambda i: self._hint(i) if i in hinted else None
        if stage.name != "layers":
            return None
        while self._done < len(self._blocks):  # 2.0: the refiner pass runs through every control layer
            self._run_next()
        # Control tokens take the image's positions and join the transformer's refined caption tokens.
        self.c = torch.cat([self.c, stage.hidden[:, stage.img_len:]], dim=1)
        self._begin(net.control_layers, stage)
        return lambda i: self._hint(self.main_places[i]) if i in self.main_places else None

    def _embed(self, stage: StreamStage) -> Tensor:
        x = stage.hidden
        context = self.context.to(x.device, self.net.dtype)
        if context.shape[0] != x.shape[0]:
            context = context.repeat(x.shape[0] // context.shape[0], 1, 1, 1)
        tokens = self.net.x_embedder(patchify(context, self.net.config.patch_size)).to(x.dtype)
        pad = self.pad_token.to(x.dtype).expand(x.shape[0], stage.img_len - tokens.shape[1], -1)
        return torch.cat([tokens, pad], dim=1)

    def _begin(self, blocks, stage: StreamStage) -> None:
        self._blocks, self._done, self._stage, self._stream = blocks, 0, stage, stage.hidden

    def _run_next(self) -> Tensor:
        stage, block = self._stage, self._blocks[self._done]
        stream = self._stream if self._done == 0 else None
        hint, self.c = block(self.c, stage.rope, stage.mask, stage.adaln, stream)
        self._done += 1
        self._stream = None  # only the first block reads the stream
        return hint

    def _hint(self, k: int) -> Tensor:
        """Block k's hint, running the stage's blocks up to k (hints are requested in order, once each)."""
        while self._done <= k:
            hint = self._run_next()
        return hint * self.strength


class _Residuals:
    """Several controls on one forward: each sees the same stream and their residuals add up."""

    def __init__(self, passes: list[_ControlPass]):
        self.passes = passes

    def __call__(self, stage: StreamStage):
        adds = [f for f in (p(stage) for p in self.passes) if f is not None]
        if not adds:
            return None

        def residual(i: int) -> Tensor | None:
            parts = [r for r in (add(i) for add in adds) if r is not None]
            return sum(parts[1:], parts[0]) if parts else None
        return residual


@dataclass(frozen=True, eq=False)
class ControlInput:
    """One control for `sample(..., control=[...])`.

    image_latent: the control image's latent [1 or B, 16, h, w] in model space (Flux `process_in` applied), or
    None in inpaint mode without a control image (zeros, as VideoX-Fun). strength multiplies every hint. The control
    acts on step i of n when start <= i / n and (i + 1) / n <= end (diffusers' control_guidance_start/end).
    Inpaint mode (2.x models, control_in_dim 33): mask [1 or B, 1, h, w] at latent resolution, 1 = repaint, and
    inpaint_latent, the latent of the image with the masked area set to grey (pixel value 0.5)."""

    controlnet: ZImageControlNet
    image_latent: Tensor | None
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mask: Tensor | None = None
    inpaint_latent: Tensor | None = None

    def __post_init__(self):
        cfg = self.controlnet.config
        if not math.isfinite(self.strength):
            raise ValueError(f"control strength must be a finite number, got {self.strength}")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"control start/end must satisfy 0 <= start < end <= 1, got {self.start} / {self.end}")
        if (self.mask is None) != (self.inpaint_latent is None):
            raise ValueError("inpaint mode needs both mask and inpaint_latent (the masked image's latent)")
        if self.mask is not None and not cfg.inpaint:
            raise ValueError(f"a mask was given, but the ControlNet ({cfg.describe()}) has no inpaint mode: use a "
                             f"2.x Fun ControlNet (control_in_dim {2 * 16 + 1}) for inpainting")
        if self.image_latent is None and self.mask is None:
            raise ValueError("a control needs a control image latent, or a mask and inpaint_latent")
        shapes = {name: tuple(t.shape) for name, t in (("image_latent", self.image_latent), ("mask", self.mask),
                                                       ("inpaint_latent", self.inpaint_latent)) if t is not None}
        for name, shape in shapes.items():
            channels = 1 if name == "mask" else 16
            if len(shape) != 4 or shape[1] != channels:
                raise ValueError(f"control {name} must be [B, {channels}, h, w], got {list(shape)}")
        if len({shape[-2:] for shape in shapes.values()}) > 1:
            raise ValueError("control latents differ in size: " + ", ".join(
                f"{name} {s[-1] * 8}x{s[-2] * 8} px" for name, s in shapes.items()))

    @property
    def size(self) -> tuple[int, int]:
        """(h, w) of its latents."""
        return tuple(next(t for t in (self.image_latent, self.mask) if t is not None).shape[-2:])

    def context(self) -> Tensor:
        """The ControlNet input [B, control_in_dim, h, w] (fp32)."""
        parts = []
        ref = self.image_latent if self.image_latent is not None else self.inpaint_latent
        parts.append(ref.float() if self.image_latent is not None else torch.zeros_like(ref, dtype=torch.float32))
        if self.controlnet.config.inpaint:
            if self.mask is None:
                parts.append(torch.zeros(ref.shape[0], self.controlnet.config.control_in_dim - 16, *ref.shape[-2:],
                                         device=ref.device))
            else:
                batch = max(t.shape[0] for t in (ref, self.mask, self.inpaint_latent))
                parts = [t.expand(batch, -1, -1, -1) for t in parts]
                parts += [(1.0 - self.mask.float()).expand(batch, -1, -1, -1),
                          self.inpaint_latent.float().expand(batch, -1, -1, -1)]
        return torch.cat(parts, dim=1)

    def active(self, step: int, steps: int) -> bool:
        return StepRange(self.start, self.end).active(step, steps)


class ControlSchedule:
    """The controls of one `sample` call: checked once against the model and latent, contexts built once, and a
    `BlockResiduals` hook for each step (None on steps where no control acts)."""

    def __init__(self, model: ZImageTransformer, controls: Sequence[ControlInput], latent_shape):
        self.model = model
        self.controls = list(controls)
        self.contexts = []
        for n, control in enumerate(self.controls):
            label = f"control {n + 1} ({control.controlnet.config.describe()})"
            control.controlnet.check_fits(model, label)
            if control.size != tuple(latent_shape[-2:]):
                h, w = control.size
                raise ValueError(f"{label}: its image is {w * 8}x{h * 8} px but the latent is "
                                 f"{latent_shape[-1] * 8}x{latent_shape[-2] * 8} px; resize the control image")
            self.contexts.append(control.context())
            if self.contexts[-1].shape[0] not in (1, latent_shape[0]):
                raise ValueError(f"{label}: {self.contexts[-1].shape[0]} control images for a batch of "
                                 f"{latent_shape[0]}")

    def at(self, step: int, steps: int):
        passes = [_ControlPass(c.controlnet, ctx, c.strength, self.model.x_pad_token,
                               c.controlnet.layer_places(self.model.config.n_layers))
                  for c, ctx in zip(self.controls, self.contexts) if c.active(step, steps)]
        return _Residuals(passes) if passes else None


def control_residuals(model: ZImageTransformer, controls: Sequence[ControlInput]):
    """A `BlockResiduals` hook applying `controls` (all of them, ignoring start/end) to one `model(...)` call."""
    schedule = ControlSchedule(model, controls, next(
        (c.image_latent if c.image_latent is not None else c.mask).shape for c in controls))
    return schedule.at(0, 1)


# ---------------------------------------------------------------------------------------------- loading
def _count(shapes, prefix: str) -> int:
    return len({int(m.group(1)) for k in shapes if (m := re.match(rf"^{prefix}\.(\d+)\.", k))})


def config_from_shapes(shapes: dict[str, tuple], label: str, refiner_trained: Callable[[], bool]) -> ControlNetConfig:
    """Infer the layout; `refiner_trained()` reads whether `control_noise_refiner.0.after_proj` is non-zero
    (2.1), the one thing that tells 2.0 from 2.1 (ComfyUI tells them apart the same way)."""
    dim, in_width = shapes["control_all_x_embedder.2-1.weight"]
    if in_width % 4:
        raise ValueError(f"{label}: control_all_x_embedder.2-1.weight has input width {in_width}, not 2*2*C")
    head_dim = shapes.get("control_layers.0.attention.norm_q.weight", (128,))[0]
    n_refiner = _count(shapes, "control_noise_refiner")
    if "control_noise_refiner.0.after_proj.weight" in shapes:
        refiner = REFINER_OWN if refiner_trained() else REFINER_SHARED
    else:
        refiner = REFINER_PLAIN if n_refiner else REFINER_SHARED
    ffn = shapes["control_layers.0.feed_forward.w1.weight"][0]
    return ControlNetConfig(dim=dim, n_heads=dim // head_dim, n_control_layers=_count(shapes, "control_layers"),
                            control_in_dim=in_width // 4, refiner=refiner, n_refiner_layers=n_refiner or 2,
                            ffn_hidden_dim=None if ffn == int(dim / 3 * 8) else ffn)


def load_controlnet(path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                    device: str | torch.device = "cpu", weight_storage: str = "same") -> ZImageControlNet:
    """Load a Z-Image Fun ControlNet `.safetensors` file (any released layout), streamed into `dtype` on `device`;
    weight_storage "fp8_e4m3fn" holds its blocks' attention and SwiGLU Linears in fp8, as `load_transformer` does.
    Raises FileNotFoundError / ValueError naming the file: a LoRA, a transformer or another model's ControlNet is
    refused with what it looks like."""
    if weight_storage not in WEIGHT_STORAGE:
        raise ValueError(f"weight_storage must be one of {WEIGHT_STORAGE}, got {weight_storage!r}")
    fp8_dtype = FP8_DTYPES.get(weight_storage)
    if fp8_dtype is not None:
        check_fp8_support(device, fp8_dtype, option=f"weight_storage={weight_storage!r}")
    path = Path(path)
    files, _ = checkpoint_files(path)
    sources, shapes, layout = map_sources([SafetensorsFile(f) for f in files], str(path), required=_REQUIRED,
                                          what="a Z-Image Fun ControlNet", lookalikes=_CONTROLNET_LOOKALIKES)
    if "cap_embedder.1.weight" in shapes:
        raise ValueError(f"{path} holds a whole Z-Image transformer next to its ControlNet weights; this loader "
                         f"takes the ControlNet file alone (alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union)")
    source = WeightSource(sources, dtype, layout, files)
    probe = "control_noise_refiner.0.after_proj.weight"
    config = config_from_shapes(shapes, str(path), lambda: bool(torch.count_nonzero(source.read(probe))))
    with torch.device("meta"):
        net = ZImageControlNet(config)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    unused = {k for k in shapes if config.refiner == REFINER_SHARED and k.startswith("control_noise_refiner.")}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected) - unused)
    wrong = [f"{k} is {list(shapes[k])}, the layout needs {list(v)}" for k, v in expected.items()
             if k in shapes and tuple(shapes[k]) != v]
    if missing or unexpected or wrong:
        raise ValueError(f"{path} does not match a {config.describe()}: "
                         + "; ".join(filter(None, [missing and f"missing {missing[:5]}",
                                                   unexpected and f"unexpected {unexpected[:5]}",
                                                   wrong and "wrong shapes: " + ", ".join(wrong[:3])])))
    net, fp8_paths = fill_from_source(net, source, dtype, device, fp8_dtype)
    log.info("loaded ControlNet %s (%s, %.2f B parameters, %s%s)", path, config.describe(),
             net.num_parameters() / 1e9, dtype, f", fp8 storage for {len(fp8_paths)} Linears" if fp8_paths else "")
    return net.eval().requires_grad_(False)
