"""The normalised in-memory LoRA: one `LoraModule` per model module, addressed by the model's own module path.

Every producer's file (diffusers/peft, DiffSynth, ai-toolkit, musubi/kohya, ComfyUI) is reduced to this one form by
`formats.py`, so merging, runtime branches, saving and training only ever deal with one layout."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")


class LoraError(ValueError):
    """A LoRA file or stack that cannot be applied as asked; the message names the file, format, key and shapes."""


def split_scale(scale: float) -> tuple[float, float]:
    """diffusers' split of alpha/r into a factor for `down` and a power-of-two factor for `up`.

    diffusers folds the scale into the two matrices at load time, moving powers of two from `down` to `up` while the
    down factor is under half the up factor. Multiplying by a power of two is exact in floating point, so computing
    the delta as (up * s_up) @ (down * s_down) reproduces diffusers + peft bit for bit, and equals ComfyUI's
    (scale * (up @ down)) whenever the scale itself is a power of two."""
    s_down, s_up = scale, 1.0
    while s_down * 2 < s_up:
        s_down *= 2
        s_up /= 2
    return s_down, s_up


@dataclass
class LoraModule:
    """The change one file makes to one module.

    kind "lora": delta W = scale * up @ down, down [r, in], up [out, r], scale = alpha / r (1 without alpha).
    kind "diff": a full-size delta `diff` of `.weight`, ComfyUI's form for norms. `diff_b`, a full-size delta of
    `.bias`, may accompany any kind. kind "lokr" / "loha": LyCORIS factors in `factors` (ComfyUI's key names without the module prefix), with
    `alpha` divided by the rank the way ComfyUI does; `rows` selects a row block of the full delta (a fused qkv
    factorisation applied onto separate q/k/v). `keys` are the file keys this module came from, for messages."""

    kind: str = "lora"
    down: Tensor | None = None
    up: Tensor | None = None
    alpha: float | None = None
    diff: Tensor | None = None
    diff_b: Tensor | None = None
    factors: dict[str, Tensor] = field(default_factory=dict)
    rows: tuple[int, int] | None = None
    keys: tuple[str, ...] = ()

    @property
    def rank(self) -> int:
        if self.kind == "lora":
            return self.down.shape[0]
        if self.kind == "loha":
            return self.factors["hada_w1_b"].shape[0]
        if self.kind == "lokr":
            for name in ("lokr_w2_b", "lokr_w1_b"):
                if name in self.factors:
                    return self.factors[name].shape[0]
        return 0

    @property
    def scale(self) -> float:
        """alpha / rank, or 1 when the file stores no alpha (LoKr with full factors also uses 1, as ComfyUI does)."""
        rank = self.rank
        return self.alpha / rank if self.alpha is not None and rank else 1.0

    def tensors(self) -> Iterator[Tensor]:
        for t in (self.down, self.up, self.diff, self.diff_b, *self.factors.values()):
            if t is not None:
                yield t

    def weight_delta(self, strength: float = 1.0, device=None) -> Tensor | None:
        """strength * delta W in fp32 on `device`, computed the way the reference loaders compute it (see
        `split_scale`); None for a module that changes only a bias."""
        def f32(t: Tensor) -> Tensor:
            return t.detach().to(device=device, dtype=torch.float32)

        if self.kind == "lora":
            s_down, s_up = split_scale(self.scale)
            up, down = f32(self.up), f32(self.down)
            delta = (up * s_up if s_up != 1.0 else up) @ (down * s_down if s_down != 1.0 else down)
        elif self.kind == "diff":
            if self.diff is None:
                return None
            delta = f32(self.diff)
        else:  # ComfyUI's order: (strength * alpha / rank) * full delta
            delta = (strength * self.scale) * self._lycoris_full(f32)
            return delta if self.rows is None else delta[self.rows[0]:self.rows[1]]
        return delta * strength if strength != 1.0 else delta

    def _lycoris_full(self, f32) -> Tensor:
        """The full LyCORIS delta before scaling: kron(w1, w2) for LoKr, (w1a @ w1b) * (w2a @ w2b) for LoHa."""
        f = {name: f32(t) for name, t in self.factors.items()}
        if self.kind == "loha":
            return (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
        return torch.kron(w1, w2)

    def delta_shape(self) -> tuple[int, ...] | None:
        """Shape of the weight this module patches, from the tensors alone (for shape checks before any maths)."""
        if self.kind == "lora":
            return (self.up.shape[0], self.down.shape[1])
        if self.kind == "diff":
            return tuple(self.diff.shape) if self.diff is not None else None
        f = self.factors
        if self.kind == "loha":
            shape = (f["hada_w1_a"].shape[0], f["hada_w1_b"].shape[1])
        else:
            def dims(name):
                return f[name].shape if name in f else (f[name + "_a"].shape[0], f[name + "_b"].shape[1])
            (a, b), (c, d) = dims("lokr_w1"), dims("lokr_w2")
            shape = (a * c, b * d)
        if self.rows is not None:
            shape = (self.rows[1] - self.rows[0], shape[1])
        return shape


@dataclass
class LoraWeights:
    """A LoRA normalised to the model's module paths (e.g. `layers.0.attention.to_q`).

    `format` is the detected producer, `metadata` the source file's metadata, `source` its path. `unmatched` lists
    file keys that map to no Z-Image module; `redundant` maps keys that were skipped on purpose to the reason (e.g. a
    fused qkv copy next to split q/k/v keys, which diffusers skips too); `text_encoder` lists the keys of a text-encoder
    part, which this engine never applies (the caller refuses or reports them)."""

    modules: dict[str, LoraModule]
    format: str = "zimage"
    metadata: dict = field(default_factory=dict)
    source: str | None = None
    unmatched: list[str] = field(default_factory=list)
    redundant: dict[str, str] = field(default_factory=dict)
    text_encoder: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.source or f"<in-memory {self.format} LoRA>"

    @property
    def rank(self) -> int:
        """The largest rank of its modules (files this pack writes use one rank throughout)."""
        return max((m.rank for m in self.modules.values()), default=0)

    def parameters(self) -> Iterator[Tensor]:
        """The trainable down/up tensors, each once (fused-qkv splits share one `down`)."""
        seen = set()
        for module in self.modules.values():
            for t in (module.down, module.up):
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    yield t

    def to(self, dtype: torch.dtype | None = None, device=None) -> "LoraWeights":
        """A copy with every tensor cast (a no-op view where nothing changes, as `Tensor.to` does)."""
        def cast(t):
            return None if t is None else t.to(device=device, dtype=dtype)
        modules = {path: replace(m, down=cast(m.down), up=cast(m.up), diff=cast(m.diff), diff_b=cast(m.diff_b),
                                 factors={k: cast(v) for k, v in m.factors.items()})
                   for path, m in self.modules.items()}
        return replace(self, modules=modules)

    def __len__(self) -> int:
        return len(self.modules)


def new_lora(model: nn.Module, rank: int = 32, alpha: float | None = None,
             targets: Sequence[str] = DEFAULT_TARGETS, seed: int = 0,
             dtype: torch.dtype = torch.float32) -> LoraWeights:
    """A fresh LoRA initialised as peft does (down: kaiming_uniform(a=sqrt(5)), up: zeros), so that the model's
    output is unchanged until training moves `up`. It covers every nn.Linear whose path ends with one of `targets`
    (all layers and both refiners), in module order, from a private generator seeded with `seed`; the tensors are on
    the CPU and do not require grad (the trainer decides both)."""
    if rank <= 0:
        raise ValueError(f"new_lora: rank must be a positive integer, got {rank}")
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(path == t or path.endswith("." + t) for t in targets):
            down = torch.empty(rank, module.in_features)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=gen)
            up = torch.zeros(module.out_features, rank)
            modules[path] = LoraModule(down=down.to(dtype), up=up.to(dtype), alpha=alpha)
    if not modules:
        raise ValueError(f"new_lora: no nn.Linear module of the model ends with any of {list(targets)}")
    return LoraWeights(modules, format="zimage", metadata={"targets": ",".join(targets)})
