"""The toy world: one flat-coloured, anti-aliased shape on a dark background per 32x32 RGB image, and its caption
"<colour> <shape>" encoded as fixed random word vectors (one token per word).

Base (pretraining) data: {circle, square, triangle} x {red, green, blue, yellow}. The new concept, absent from
pretraining, are the shape "bar" (a horizontal bar, twice as long as high) and the colour "purple"; their word
vectors are never seen by the teacher or the turbo model."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

IMG = 32  # pixels per side
BACKGROUND = 0.05
SUPERSAMPLE = 4
SIZE_RANGE = (9.0, 13.0)  # shape extent in pixels (diameter / side / height / bar length)
CAP_DIM = 32
EMPTY = "<empty>"

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.12),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
}
# A second new concept, a colour word absent from pretraining (drawn with the base shapes): it changes no outline,
# so its LoRAs isolate the sampler-level effect (blur) from the content change a new shape brings.
NEW_COLOUR = "purple"
ALL_COLOURS: dict[str, tuple[float, float, float]] = {**COLOURS, NEW_COLOUR: (0.62, 0.20, 0.85)}
BASE_SHAPES = ("circle", "square", "triangle")
# The new shape: a horizontal bar. The first choice, a plus sign ("cross", which _coverage still draws), was not
# learned (fidelity 0.10 at 8 steps, 0.21 at 30 steps / cfg 2 after 2000 SFT steps): its 3-4 px arms are thinner
# than one DiT token (4x4 px), and the model draws them ragged. A bar's defining feature, its elongated outline, is
# coarse (a 2.5:1 bar after 1000 SFT steps on the same turbo: 0.50 / 0.71).
NEW_SHAPE = "bar"
CONCEPTS = (NEW_SHAPE, NEW_COLOUR)
SHAPES = BASE_SHAPES + (NEW_SHAPE,)
COLOUR_NAMES = tuple(COLOURS)


def caption(colour: str, shape: str) -> str:
    return f"{colour} {shape}"


def base_prompts() -> list[str]:
    return [caption(c, s) for s in BASE_SHAPES for c in COLOUR_NAMES]


def concept_prompts(concept: str = NEW_SHAPE) -> list[str]:
    """The prompts of a new concept: "cross" (a new shape word, in the 4 base colours) or "purple" (a new colour
    word, on the 3 base shapes)."""
    if concept == NEW_SHAPE:
        return [caption(c, NEW_SHAPE) for c in COLOUR_NAMES]
    if concept == NEW_COLOUR:
        return [caption(NEW_COLOUR, s) for s in BASE_SHAPES]
    raise ValueError(f"unknown concept {concept!r}; known: {CONCEPTS}")


def parse(prompt: str) -> tuple[str, str]:
    colour, shape = prompt.split()
    return colour, shape


# ---------------------------------------------------------------------------------------------- rendering
def _masks(shape_idx: Tensor, size: Tensor, cx: Tensor, cy: Tensor, res: int = IMG, ss: int = SUPERSAMPLE) -> Tensor:
    """Coverage in [0, 1] of each shape on a res x res pixel grid, [B, res, res] (ss x ss supersampling)."""
    out = torch.empty(len(shape_idx), res, res)
    for s in shape_idx.unique().tolist():
        sel = (shape_idx == s).nonzero().flatten()
        for chunk in sel.split(512):
            out[chunk] = _coverage(SHAPES[s], size[chunk], cx[chunk], cy[chunk], res, ss)
    return out


def _coverage(shape: str, size: Tensor, cx: Tensor, cy: Tensor, res: int, ss: int) -> Tensor:
    coords = (torch.arange(res * ss, dtype=torch.float32) + 0.5) / ss  # pixel units
    dy = coords[None, :, None] - cy[:, None, None]
    dx = coords[None, None, :] - cx[:, None, None]
    half = (size / 2)[:, None, None]
    if shape == "circle":
        inside = dx ** 2 + dy ** 2 <= half ** 2
    elif shape == "square":
        inside = (dx.abs() <= half) & (dy.abs() <= half)
    elif shape == "triangle":  # apex up, base `size` wide
        inside = (dy >= -half) & (dy <= half) & (dx.abs() <= (dy + half) * 0.5)
    elif shape == "bar":  # a horizontal bar, `size` long and 0.4 size high
        inside = (dx.abs() <= half) & (dy.abs() <= 0.4 * half)
    elif shape == "cross":  # plus sign, arms size/3 wide
        arm = half / 3
        inside = ((dx.abs() <= arm) & (dy.abs() <= half)) | ((dy.abs() <= arm) & (dx.abs() <= half))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return torch.nn.functional.avg_pool2d(inside.float()[:, None], ss)[:, 0]


def render(shape_idx: Tensor, colour: Tensor, size: Tensor, cx: Tensor, cy: Tensor) -> Tensor:
    """Images [B, 3, 32, 32] in [0, 1]: colour [B, 3] over BACKGROUND with anti-aliased coverage."""
    cover = _masks(shape_idx, size, cx, cy)[:, None]
    return BACKGROUND + cover * (colour[:, :, None, None] - BACKGROUND)


@dataclass
class Batch:
    images: Tensor  # [B, 3, 32, 32]
    prompts: list[str]


def random_batch(n: int, shapes=BASE_SHAPES, colours=COLOUR_NAMES, generator: torch.Generator | None = None) -> Batch:
    """n random images: uniform shape and colour from the given lists, size U(SIZE_RANGE), centre uniform inside
    the canvas (positions are not captioned, so every caption's distribution is multimodal)."""
    g = generator
    s_idx = torch.randint(len(shapes), (n,), generator=g)
    c_idx = torch.randint(len(colours), (n,), generator=g)
    size = SIZE_RANGE[0] + (SIZE_RANGE[1] - SIZE_RANGE[0]) * torch.rand(n, generator=g)
    lo, span = size / 2, IMG - size
    cx = lo + span * torch.rand(n, generator=g)
    cy = lo + span * torch.rand(n, generator=g)
    shape_global = torch.tensor([SHAPES.index(shapes[i]) for i in s_idx.tolist()])
    rgb = torch.tensor([COLOURS[colours[i]] for i in c_idx.tolist()])
    prompts = [caption(colours[c], shapes[s]) for c, s in zip(c_idx.tolist(), s_idx.tolist())]
    return Batch(render(shape_global, rgb, size, cx, cy), prompts)


def prompt_batch(prompts: list[str], generator: torch.Generator | None = None) -> Tensor:
    """Real images for the given prompts (random size and position)."""
    n = len(prompts)
    g = generator
    size = SIZE_RANGE[0] + (SIZE_RANGE[1] - SIZE_RANGE[0]) * torch.rand(n, generator=g)
    lo, span = size / 2, IMG - size
    cx = lo + span * torch.rand(n, generator=g)
    cy = lo + span * torch.rand(n, generator=g)
    parsed = [parse(p) for p in prompts]
    shape_idx = torch.tensor([SHAPES.index(s) for _, s in parsed])
    rgb = torch.tensor([ALL_COLOURS[c] for c, _ in parsed])
    return render(shape_idx, rgb, size, cx, cy)


# ---------------------------------------------------------------------------------------------- captions
def word_vector(word: str, dim: int = CAP_DIM) -> Tensor:
    """A fixed N(0, 1) vector per word, seeded by a hash of the word (new words never change old ones)."""
    digest = hashlib.sha256(f"toyworld:{word}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randn(dim, generator=g)


def encode_text(text: str, dim: int = CAP_DIM) -> Tensor:
    """[L, dim]: one row per word; the empty prompt is the single `<empty>` token. The toy models read dim 32; other
    widths serve the pack's demo text encoder on tiny test models."""
    words = text.lower().split()
    return torch.stack([word_vector(w, dim) for w in (words or [EMPTY])])
