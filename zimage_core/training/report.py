"""Run reports: the loss curve and the validation grid (drawn with PIL only), and the figures as JSON."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

Decode = Callable[[Tensor], Image.Image]  # latent [C, h, w] -> RGB image


def latent_preview(latent: Tensor) -> Image.Image:
    """A plain RGB view of a latent without a VAE: its three principal channel directions, each stretched to
    0..255 (robust to the latent's scale; colours are arbitrary but structure is visible)."""
    x = latent.detach().float().cpu()
    if x.ndim == 4:
        x = x[0]
    c, h, w = x.shape
    flat = x.reshape(c, -1)
    flat = flat - flat.mean(1, keepdim=True)
    u, _, _ = torch.linalg.svd(flat, full_matrices=False)
    rgb = (u[:, :3].T @ flat) if c >= 3 else flat.repeat(3, 1)[:3]
    if rgb.shape[0] < 3:
        rgb = torch.cat([rgb, rgb[:1].expand(3 - rgb.shape[0], -1)])
    lo, hi = rgb.quantile(0.01, dim=1, keepdim=True), rgb.quantile(0.99, dim=1, keepdim=True)
    rgb = ((rgb - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    array = (rgb.reshape(3, h, w).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(array, "RGB")


def _font():
    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def smooth(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def loss_curve_png(losses: Sequence[float], path: str | os.PathLike, title: str = "training loss",
                   size: tuple[int, int] = (640, 360)) -> Path:
    """Raw per-step loss (light) and its moving average (dark) on a log-free linear axis."""
    width, height = size
    margin_l, margin_r, margin_t, margin_b = 56, 16, 28, 28
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = _font()
    draw.text((margin_l, 6), title, fill="black", font=font)
    finite = [v for v in losses if math.isfinite(v)]
    if finite:
        lo, hi = min(finite), max(finite)
        if hi - lo < 1e-12:
            hi = lo + 1.0
        pw, ph = width - margin_l - margin_r, height - margin_t - margin_b
        n = max(len(losses) - 1, 1)

        def point(i, v):
            return margin_l + pw * i / n, margin_t + ph * (1 - (v - lo) / (hi - lo))

        draw.rectangle([margin_l, margin_t, margin_l + pw, margin_t + ph], outline=(180, 180, 180))
        for series, colour in ((list(losses), (160, 190, 230)), (smooth(list(losses), max(1, len(losses) // 20)),
                                                                 (20, 60, 160))):
            pts = [point(i, v) for i, v in enumerate(series) if math.isfinite(v)]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=1 if colour[0] > 100 else 2)
            elif pts:
                draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
        draw.text((4, margin_t - 6), f"{hi:.3g}", fill="black", font=font)
        draw.text((4, margin_t + ph - 6), f"{lo:.3g}", fill="black", font=font)
        draw.text((margin_l, margin_t + ph + 6), "step 1", fill="black", font=font)
        draw.text((margin_l + pw - 60, margin_t + ph + 6), f"step {len(losses)}", fill="black", font=font)
    path = Path(path)
    _save_png_atomic(image, path)
    return path


def grid_png(rows: Sequence[tuple[str, Sequence[Image.Image]]], columns: Sequence[str], path: str | os.PathLike,
             cell: int = 192) -> Path:
    """A labelled grid: one row per (label, images), one column per prompt. Images are fitted into cell x cell."""
    font = _font()
    label_w, header_h = 200, 36
    n_cols = max((len(images) for _, images in rows), default=0)
    image = Image.new("RGB", (label_w + n_cols * cell, header_h + len(rows) * cell), "white")
    draw = ImageDraw.Draw(image)
    for j, name in enumerate(columns[:n_cols]):
        draw.text((label_w + j * cell + 4, 4), _clip(name, 30), fill="black", font=font)
    for i, (label, images) in enumerate(rows):
        y = header_h + i * cell
        for k, line in enumerate(_wrap(label, 26)[:8]):
            draw.text((4, y + 4 + 14 * k), line, fill="black", font=font)
        for j, im in enumerate(images):
            fitted = im.convert("RGB")
            scale = (cell - 6) / max(fitted.width, fitted.height)
            resample = Image.NEAREST if scale >= 2 else Image.BICUBIC
            fitted = fitted.resize((max(1, round(fitted.width * scale)), max(1, round(fitted.height * scale))),
                                   resample)
            image.paste(fitted, (label_w + j * cell + (cell - fitted.width) // 2, y + (cell - fitted.height) // 2))
    path = Path(path)
    _save_png_atomic(image, path)
    return path


def report_json(path: str | os.PathLike, steps: int, losses: Sequence[float], turbo_check: dict[str, float],
                turbo_check_detail: dict[str, dict[str, float]] | None = None, turbo_check_meaning: str = "") -> Path:
    """The run's figures for scripts: the step count, every step's loss and the turbo check (score per candidate,
    higher keeps the Turbo; its match / sharpness parts and what it means: zimage_core/training/turbo_check.py)."""
    from .turbo_check import MEANING

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    figures = {"steps": steps, "losses": list(losses), "turbo_check": turbo_check}
    if turbo_check:
        figures.update(turbo_check_detail=turbo_check_detail or {}, turbo_check_meaning=turbo_check_meaning or MEANING)
    tmp.write_text(json.dumps(figures))
    os.replace(tmp, path)
    return path


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def _wrap(text: str, n: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > n:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def _save_png_atomic(image: Image.Image, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
