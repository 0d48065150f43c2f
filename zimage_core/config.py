"""Hyperparameters of the Z-Image transformer (diffusers `ZImageTransformer2DModel` naming)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ADALN_EMBED_DIM = 256  # width of the timestep embedding every adaLN reads (min(dim, 256))
T_EMBED_MID = 1024  # hidden width of the timestep MLP; hard-coded in all references
FREQ_EMBED_DIM = 256  # sinusoidal timestep features
SEQ_MULTIPLE = 32  # caption and image token counts are padded to multiples of this


@dataclass(frozen=True)
class ZImageConfig:
    """Shape of a Z-Image DiT. `ZImageConfig.turbo()` is the released Z-Image-Turbo (6.15 B parameters)."""

    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    in_channels: int = 16
    patch_size: int = 2
    cap_feat_dim: int = 2560
    norm_eps: float = 1e-5
    qk_norm_eps: float = 1e-5
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    ffn_hidden_dim: int | None = None  # None: int(dim / 3 * 8), as the reference computes it

    def __post_init__(self):
        checks = [
            (self.dim > 0 and self.n_heads > 0, f"dim ({self.dim}) and n_heads ({self.n_heads}) must be positive"),
            (self.dim % max(self.n_heads, 1) == 0, f"dim {self.dim} is not divisible by n_heads {self.n_heads}"),
            (self.n_layers >= 1, f"n_layers must be >= 1, got {self.n_layers}"),
            (self.n_refiner_layers >= 0, f"n_refiner_layers must be >= 0, got {self.n_refiner_layers}"),
            (self.in_channels > 0 and self.cap_feat_dim > 0,
             f"in_channels ({self.in_channels}) and cap_feat_dim ({self.cap_feat_dim}) must be positive"),
            (self.patch_size >= 1, f"patch_size must be >= 1, got {self.patch_size}"),
            (all(d > 0 and d % 2 == 0 for d in self.axes_dims),
             f"every RoPE axis dim must be a positive even number, got {list(self.axes_dims)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"ZImageConfig: {message}")
        if sum(self.axes_dims) != self.head_dim:
            raise ValueError(
                f"ZImageConfig: RoPE axes_dims {list(self.axes_dims)} sum to {sum(self.axes_dims)}, "
                f"but head_dim = dim / n_heads = {self.dim} / {self.n_heads} = {self.head_dim}"
            )
        object.__setattr__(self, "axes_dims", tuple(self.axes_dims))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        return self.ffn_hidden_dim if self.ffn_hidden_dim is not None else int(self.dim / 3 * 8)

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, ADALN_EMBED_DIM)

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_channels

    @staticmethod
    def rope_axes_for(head_dim: int) -> tuple[int, int, int]:
        """The released split (1/4, 3/8, 3/8 of head_dim, e.g. [32, 48, 48] at 128), rounded to even numbers."""
        first = 2 * round(head_dim / 8)
        rest = head_dim - first
        second = 2 * round(rest / 4)
        return (first, second, rest - second)

    @classmethod
    def turbo(cls) -> "ZImageConfig":
        return cls()

    @classmethod
    def tiny(cls, **overrides) -> "ZImageConfig":
        """A ~1 M parameter model of the same architecture, for tests and demos."""
        base = dict(dim=96, n_layers=2, n_refiner_layers=1, n_heads=3, cap_feat_dim=48, axes_dims=(8, 12, 12))
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes) -> "ZImageConfig":
        return dataclasses.replace(self, **changes)

    def to_diffusers(self) -> dict:
        """The equivalent `config.json` of diffusers' ZImageTransformer2DModel."""
        return {
            "_class_name": "ZImageTransformer2DModel",
            "all_patch_size": [self.patch_size], "all_f_patch_size": [1], "in_channels": self.in_channels,
            "dim": self.dim, "n_layers": self.n_layers, "n_refiner_layers": self.n_refiner_layers,
            "n_heads": self.n_heads, "n_kv_heads": self.n_heads, "norm_eps": self.norm_eps, "qk_norm": True,
            "cap_feat_dim": self.cap_feat_dim, "rope_theta": self.rope_theta, "t_scale": self.t_scale,
            "axes_dims": list(self.axes_dims), "axes_lens": [1536, 512, 512],
        }

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "ZImageConfig":
        n_heads = cfg.get("n_heads", 30)
        if cfg.get("n_kv_heads", n_heads) != n_heads:
            raise ValueError(f"config.json: n_kv_heads {cfg['n_kv_heads']} != n_heads {n_heads} (GQA is not Z-Image)")
        if cfg.get("siglip_feat_dim"):
            raise ValueError("config.json describes a Z-Image Omni/Edit model (siglip_feat_dim); only text-to-image "
                             "Z-Image / Z-Image-Turbo transformers are supported")
        patch = cfg.get("all_patch_size", [2])
        return cls(
            dim=cfg.get("dim", 3840), n_layers=cfg.get("n_layers", 30), n_refiner_layers=cfg.get("n_refiner_layers", 2),
            n_heads=n_heads, in_channels=cfg.get("in_channels", 16), patch_size=int(patch[0]),
            cap_feat_dim=cfg.get("cap_feat_dim", 2560), norm_eps=cfg.get("norm_eps", 1e-5),
            rope_theta=float(cfg.get("rope_theta", 256.0)), t_scale=float(cfg.get("t_scale", 1000.0)),
            axes_dims=tuple(cfg.get("axes_dims", (32, 48, 48))),
        )
