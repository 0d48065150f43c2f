"""Training data: dataset scan, aspect-ratio buckets and the encoded cache.

A dataset folder holds images with captions, either as DiffSynth's `metadata.csv` (columns `image`, `prompt`) or
as a sidecar `name.txt` per image (kohya / ai-toolkit). Images are resized and centre-cropped to a bucket (area
<= max_pixels, aspect kept, sides multiples of bucket_step >= 16), encoded once through caller-supplied encoders
(ComfyUI's VAE and text encoder inside ComfyUI; the core never loads them) and stored as safetensors in a cache
folder. File names key each tensor by the source hash, the encoder identity and the resolution, so a cache built
with a different encoder is rebuilt, never reused. With `flip=True` each image is also mirrored in pixel space and
encoded (as kohya's flip_aug with cached latents and ai-toolkit's flip_x do): the VAE is not exactly mirror
symmetric, so flipping the latent would train on latents no image encodes to. `manifest.json` makes the cache
self-contained: it is the input of the headless trainer (`python -m zimage_core train`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MANIFEST = "manifest.json"
CACHE_VERSION = 1
FLUX_VAE_FACTOR = 8  # the Flux VAE: latent side = pixel side / 8 (the default; encoders report their own)


class DatasetError(ValueError):
    """The dataset folder or cache cannot be used."""


@dataclass(frozen=True)
class Encoders:
    """Caller-supplied encoders. encode_image(PIL RGB at the bucket size) -> latent [C, h/factor, w/factor];
    encode_text(str) -> caption features [L, D]; encoder_id names both (model files, versions, settings) and keys
    the cache; factor is the image encoder's spatial downscale (8 for the Flux VAE)."""
    encode_image: Callable[[Image.Image], Tensor]
    encode_text: Callable[[str], Tensor]
    encoder_id: str
    factor: int = FLUX_VAE_FACTOR


@dataclass(frozen=True)
class DatasetItem:
    image: Path
    caption: str


# ------------------------------------------------------------------------------------------------------------ scan
def scan_dataset(folder: str | os.PathLike, strict: bool = False) -> tuple[list[DatasetItem], list[str]]:
    """List (image, caption) pairs. Returns the usable items and one line per skipped file (not an image, missing
    or unreadable caption, outside the folder). Raises DatasetError if the folder is missing or nothing is usable,
    and with strict=True if any file had to be skipped (the message lists them)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"dataset folder {folder} does not exist")
    skipped: list[str] = []
    pairs: list[tuple[Path, str | None]] = []
    metadata = folder / "metadata.csv"
    if metadata.is_file():
        try:
            with metadata.open(newline="", encoding="utf-8-sig") as handle:
                rows = list(csv.DictReader(handle))
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{metadata} is not UTF-8 text: {exc}") from exc
        if rows and not {"image", "prompt"} <= set(rows[0]):
            raise DatasetError(f"{metadata} needs the columns 'image' and 'prompt', found {list(rows[0])}")
        for row in rows:
            name = (row.get("image") or "").strip()
            if not name:
                skipped.append(f"{metadata.name}: a row without an image name")
                continue
            path = (folder / name).resolve()
            if not path.is_relative_to(folder.resolve()):
                skipped.append(f"{name}: listed in metadata.csv but outside the dataset folder")
                continue
            if not path.is_file():
                skipped.append(f"{name}: listed in metadata.csv but missing")
                continue
            prompt = row.get("prompt")
            pairs.append((path, prompt if prompt is not None and prompt.strip() else None))
    else:
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            sidecar = path.with_suffix(".txt")
            caption = None
            if sidecar.is_file():
                try:
                    caption = sidecar.read_text(encoding="utf-8").strip() or None
                except UnicodeDecodeError:
                    skipped.append(f"{_rel(sidecar, folder)}: caption file is not UTF-8 text")
                    continue
            pairs.append((path, caption))

    items = []
    for path, caption in pairs:
        if caption is None:
            skipped.append(f"{_rel(path, folder)}: no caption")
            continue
        try:
            with Image.open(path) as im:
                im.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            skipped.append(f"{_rel(path, folder)}: not a readable image ({type(exc).__name__})")
            continue
        items.append(DatasetItem(path, caption.strip()))
    if skipped and strict:
        raise DatasetError(f"dataset {folder}: {len(skipped)} file(s) cannot be used:\n  " + "\n  ".join(skipped))
    if skipped:
        warnings.warn(f"dataset {folder}: skipped {len(skipped)} file(s):\n  " + "\n  ".join(skipped), stacklevel=2)
    if not items:
        raise DatasetError(f"dataset folder {folder} has no usable image with a caption "
                           "(expected metadata.csv with image,prompt columns, or name.txt next to each image)")
    return items, skipped


def _rel(path: Path, folder: Path) -> str:
    try:
        return str(path.relative_to(folder.resolve() if path.is_absolute() else folder))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------------------------- buckets
def bucket_size(width: int, height: int, max_pixels: int = 1024 * 1024, step: int = 16) -> tuple[int, int]:
    """The training size of an image: scaled down (never up) to at most max_pixels with its aspect ratio kept, then
    each side floored to a multiple of `step` (at least one step). DiffSynth's dynamic resolution for step 16."""
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    w = max(step, int(width * scale) // step * step)
    h = max(step, int(height * scale) // step * step)
    return w, h


def crop_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize to cover width x height (aspect kept, bicubic), then centre-crop."""
    image = image.convert("RGB")
    scale = max(width / image.width, height / image.height)
    w, h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    image = image.resize((w, h), Image.BICUBIC)
    left, top = (w - width) // 2, (h - height) // 2
    return image.crop((left, top, left + width, top + height))


# ----------------------------------------------------------------------------------------------------------- cache
def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def _file_sha(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_cached(path: Path, encoder_id: str) -> Tensor | None:
    """The tensor of a cache file if it exists, is intact and was made by this encoder, else None."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("encoder_id") != encoder_id:
                return None
            return handle.get_tensor("value")
    except Exception:  # a partial or foreign file: rebuild it
        return None


def _write_atomic(path: Path, tensor: Tensor, metadata: dict[str, str]):
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({"value": tensor.detach().clone().contiguous().cpu()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


@dataclass(frozen=True)
class CacheEntry:
    image: str  # source image, for messages
    caption: str
    width: int  # pixel size of the bucket
    height: int
    latent_file: str
    caption_file: str
    flipped_file: str = ""  # the latent of the mirrored image ("" when the cache was built without flip)

    @property
    def bucket(self) -> tuple[int, int]:
        return self.width, self.height


class DatasetCache:
    """Encoded latents and caption features in a cache folder, plus the features of extra prompts (validation
    prompts and the empty negative prompt)."""

    def __init__(self, folder: str | os.PathLike, encoder_id: str, entries: list[CacheEntry], prompts: dict[str, str],
                 repeats: int = 1, factor: int = FLUX_VAE_FACTOR):
        self.folder = Path(folder)
        self.encoder_id = encoder_id
        self.factor = int(factor)  # pixels per latent cell: an entry's latent is [C, height/factor, width/factor]
        self.entries = list(entries)
        self.prompt_files = dict(prompts)
        self.repeats = int(repeats)
        self.memory_budget = 1 << 30  # bytes of tensors kept in RAM after their first read
        self._memory: dict[str, Tensor] = {}
        self._memory_used = 0
        if not self.entries:
            raise DatasetError(f"dataset cache {self.folder} is empty")

    def __len__(self) -> int:
        return len(self.entries)

    def latent(self, index: int, flipped: bool = False) -> Tensor:
        entry = self.entries[index]
        if flipped and not entry.flipped_file:
            raise DatasetError(f"cache {self.folder} has no mirrored latent of {entry.image}; rebuild it with flip "
                               "(flip_horizontal) on")
        return self._load(entry.flipped_file if flipped else entry.latent_file)

    @property
    def has_flips(self) -> bool:
        return all(e.flipped_file for e in self.entries)

    def caption(self, index: int) -> Tensor:
        return self._load(self.entries[index].caption_file)

    def has_prompt(self, prompt: str) -> bool:
        return prompt in self.prompt_files

    def prompt_features(self, prompt: str) -> Tensor:
        if prompt not in self.prompt_files:
            raise KeyError(f"prompt {prompt!r} is not in the cache {self.folder}; add it to the prompts encoded when "
                           "the cache is built (validation_prompts)")
        return self._load(self.prompt_files[prompt])

    def _load(self, name: str) -> Tensor:
        if name in self._memory:
            return self._memory[name]
        value = _read_cached(self.folder / name, self.encoder_id)
        if value is None:
            raise DatasetError(f"cache file {self.folder / name} is missing, damaged or from another encoder; "
                               "rebuild the cache")
        size = value.numel() * value.element_size()
        if self._memory_used + size <= self.memory_budget:  # small datasets stay in RAM after the first read
            self._memory[name] = value
            self._memory_used += size
        return value

    # ---------------------------------------------------------------------------------------------- batching
    def batches(self, epoch: int, batch_size: int, seed: int) -> list[list[int]]:
        """One epoch of batches of entry indices (each entry `repeats` times): shuffled with a generator seeded by
        (seed, epoch); every batch holds one bucket and is full (a bucket's last batch is completed by wrapping
        around that bucket)."""
        gen = torch.Generator().manual_seed(_mix(seed, epoch, 0x5EED))
        order = [i for i in torch.randperm(len(self.entries) * self.repeats, generator=gen).tolist()]
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for item in order:
            index = item % len(self.entries)
            by_bucket.setdefault(self.entries[index].bucket, []).append(index)
        batches = []
        for indices in by_bucket.values():
            for start in range(0, len(indices), batch_size):
                batch = indices[start:start + batch_size]
                while len(batch) < batch_size:
                    batch.append(indices[(len(batch) + start) % len(indices)])
                batches.append(batch)
        perm = torch.randperm(len(batches), generator=gen).tolist()
        return [batches[i] for i in perm]

    # ---------------------------------------------------------------------------------------------- manifest
    def save_manifest(self):
        data = {"version": CACHE_VERSION, "encoder_id": self.encoder_id, "repeats": self.repeats,
                "factor": self.factor,
                "entries": [e.__dict__ for e in self.entries], "prompts": self.prompt_files}
        tmp = self.folder / (MANIFEST + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, self.folder / MANIFEST)

    @classmethod
    def load(cls, folder: str | os.PathLike, encoder_id: str | None = None) -> "DatasetCache":
        """Open a cache folder written by build_cache. With encoder_id, refuse a cache made by another encoder."""
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise DatasetError(f"{folder} is not a training cache (no {MANIFEST}); build it with build_cache or the "
                               "ComfyUI training node first")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            entries = [CacheEntry(**e) for e in data["entries"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"{path} is damaged: {exc}") from exc
        if data.get("version") != CACHE_VERSION:
            raise DatasetError(f"{path} has cache version {data.get('version')}, expected {CACHE_VERSION}; rebuild it")
        if encoder_id is not None and data["encoder_id"] != encoder_id:
            raise DatasetError(f"cache {folder} was built with encoder {data['encoder_id']!r}, not {encoder_id!r}; "
                               "rebuild it")
        return cls(folder, data["encoder_id"], entries, data.get("prompts", {}), data.get("repeats", 1),
                   data.get("factor", FLUX_VAE_FACTOR))


def build_cache(dataset_dir: str | os.PathLike, cache_dir: str | os.PathLike, encoders: Encoders,
                max_pixels: int = 1024 * 1024, bucket_step: int = 16, repeats: int = 1,
                prompts: Iterable[str] = (), progress: Callable[[int, int], None] | None = None,
                strict: bool = False, flip: bool = False) -> DatasetCache:
    """Scan dataset_dir (strict: any unusable file is an error, see scan_dataset), encode every usable image and
    caption (reusing cache files made by the same encoder from the same bytes at the same size) and the extra
    prompts (the empty prompt is always added: caption dropout and the validation negative use it), write the
    manifest and return the cache. flip also encodes each mirrored image. Encoding runs without gradients: every
    caption and prompt first, then every image, so a text encoder and a VAE that take turns on the GPU (the
    headless encoders, ComfyUI's model management) swap once, not once per image.

    The manifest is what makes a cache folder a cache: an existing one is removed before anything is encoded and
    the new one is written last, so an interrupted build is never taken for a complete one, while the files it did
    finish are reused when the build runs again."""
    items, _ = scan_dataset(dataset_dir, strict=strict)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / MANIFEST).unlink(missing_ok=True)
    enc = _sha(encoders.encoder_id)[:16]
    meta = {"encoder_id": encoders.encoder_id}
    entries = []
    caption_files: dict[str, str] = {}

    def text_file(text: str) -> str:
        if text not in caption_files:
            name = f"cap_{_sha(text)[:24]}_{enc}.safetensors"
            if _read_cached(cache_dir / name, encoders.encoder_id) is None:
                with torch.no_grad():
                    features = _as_2d(encoders.encode_text(text), text)
                _write_atomic(cache_dir / name, features, {**meta, "text": text[:2000]})
            caption_files[text] = name
        return caption_files[text]

    for item in items:
        text_file(item.caption)
    prompt_files = {p: text_file(p) for p in ["", *prompts]}
    for n, item in enumerate(items):
        with Image.open(item.image) as im:
            width, height = bucket_size(im.width, im.height, max_pixels, bucket_step)
            source = _file_sha(item.image)
            names = {}
            for mirrored in (False, True) if flip else (False,):
                name = f"lat_{source[:24]}_{enc}_{width}x{height}{'_flip' if mirrored else ''}.safetensors"
                if _read_cached(cache_dir / name, encoders.encoder_id) is None:
                    pixels = crop_resize(im, width, height)
                    if mirrored:
                        pixels = pixels.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                    with torch.no_grad():
                        latent = encoders.encode_image(pixels)
                    latent = _check_latent(latent, width, height, item.image, encoders.factor)
                    _write_atomic(cache_dir / name, latent, {**meta, "source_sha256": source,
                                                             "size": f"{width}x{height}", "flipped": str(mirrored)})
                names[mirrored] = name
        entries.append(CacheEntry(str(item.image), item.caption, width, height, names[False], text_file(item.caption),
                                  names.get(True, "")))
        if progress is not None:
            progress(n + 1, len(items))
    cache = DatasetCache(cache_dir, encoders.encoder_id, entries, prompt_files, repeats, encoders.factor)
    cache.save_manifest()
    return cache


def _check_latent(latent: Tensor, width: int, height: int, source, factor: int) -> Tensor:
    if latent.ndim == 4 and latent.shape[0] == 1:
        latent = latent[0]
    expected = (height // factor, width // factor)
    if latent.ndim != 3 or tuple(latent.shape[-2:]) != expected:
        raise DatasetError(f"encode_image returned shape {list(latent.shape)} for {source} at {width}x{height}; "
                           f"expected [C, {expected[0]}, {expected[1]}] (encoder factor {factor})")
    return latent


def _as_2d(features: Tensor, text: str) -> Tensor:
    if features.ndim == 3 and features.shape[0] == 1:
        features = features[0]
    if features.ndim != 2 or features.shape[0] == 0:
        raise DatasetError(f"encode_text returned shape {list(features.shape)} for {text[:40]!r}; expected [L > 0, D]")
    return features


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    digest = hashlib.sha256(",".join(str(int(v)) for v in values).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
