"""`python -m zimage_core encode`: build the headless trainer's dataset cache with the real encoders, no ComfyUI.

The cache is the one the ComfyUI training node builds (zimage_core.training.data), so `python -m zimage_core train`
reads it. A run that stops half-way leaves no manifest.json (so nothing mistakes the folder for a complete cache);
running the same command again encodes only what is missing.
"""

from __future__ import annotations

import argparse
import sys
import time

EPILOG = """\
examples:
  # the diffusers repository of Z-Image-Turbo (text_encoder/, tokenizer/, vae/)
  python -m zimage_core encode --dataset my_images --cache my_cache --model Z-Image-Turbo
  # ComfyUI's single files, with a tokenizer folder (Z-Image-Turbo's tokenizer/, or ComfyUI's own
  # comfy/text_encoders/qwen25_tokenizer), taking dataset_dir, cache_dir, sizes and validation prompts from the
  # training config
  python -m zimage_core encode --config configs/train_sft.toml \\
      --text-encoder ComfyUI/models/text_encoders/qwen_3_4b.safetensors \\
      --tokenizer ComfyUI/comfy/text_encoders/qwen25_tokenizer --vae ComfyUI/models/vae/ae.safetensors

needs: pip install transformers diffusers tqdm (optional dependencies of the headless path only)
"""


def configure(parser: argparse.ArgumentParser) -> None:
    from ..training.cli import DEVICES, DTYPES

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--dataset", help="image folder: images with same-name .txt captions, or a metadata.csv "
                                          "with image,prompt columns (default: the config's dataset_dir)")
    parser.add_argument("--cache", help="cache folder to build (default: the config's cache_dir)")
    parser.add_argument("--config", help="a training config (TOML): dataset_dir, cache_dir, max_pixels, bucket_step, "
                                         "repeats, flip_horizontal and validation_prompts are read from it; flags "
                                         "override them")
    parser.add_argument("--model", help="Z-Image-Turbo in the diffusers repository layout (text_encoder/, "
                                        "tokenizer/, vae/)")
    parser.add_argument("--text-encoder", help="Qwen3-4B: a transformers folder, or ComfyUI's qwen_3_4b.safetensors "
                                               "(overrides --model's)")
    parser.add_argument("--tokenizer", help="the Qwen tokenizer folder (needed with a single-file text encoder)")
    parser.add_argument("--vae", help="the Flux VAE: a diffusers folder, or ae.safetensors (overrides --model's)")
    parser.add_argument("--prompt", action="append", default=[],
                        help="an extra prompt to encode, e.g. a validation prompt (repeatable)")
    parser.add_argument("--max-pixels", type=int, help="images are scaled down to at most this many pixels "
                                                       "(default: the config's, else 1048576)")
    parser.add_argument("--bucket-step", type=int, help="bucket sides are multiples of this (default 16)")
    parser.add_argument("--repeats", type=int, help="times each image appears per epoch (default 1)")
    parser.add_argument("--flip", action="store_true",
                        help="also encode each image mirrored, for flip_horizontal training (on when the config "
                             "sets flip_horizontal)")
    parser.add_argument("--skip-bad-files", action="store_true",
                        help="skip unreadable images and missing or non-UTF-8 captions (listed in a warning) "
                             "instead of stopping")
    parser.add_argument("--device", default="auto", choices=DEVICES, help="auto: cuda if available")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="text encoder dtype (auto: bf16 on GPU, fp32 on CPU); the VAE runs in fp32")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..training.cli import resolve_device_dtype
    from ..training.config import TrainConfig
    from ..training.data import build_cache
    from ..training.preservation import preservation_prompts
    from . import load_encoders

    config = TrainConfig.from_toml(args.config) if args.config else TrainConfig()
    dataset = args.dataset or config.dataset_dir
    cache_dir = args.cache or config.cache_dir
    if not dataset or not cache_dir:
        raise ValueError("encode needs --dataset and --cache (or a --config with dataset_dir and cache_dir)")
    settings = TrainConfig(max_pixels=args.max_pixels or config.max_pixels,
                           bucket_step=args.bucket_step or config.bucket_step,
                           repeats=args.repeats or config.repeats).validate_settings()
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    start = time.time()
    encoders = load_encoders(args.model, args.text_encoder, args.tokenizer, args.vae, device=device, dtype=dtype)
    loaded = time.time()
    prompts = list(dict.fromkeys([*config.validation_prompts, *args.prompt, *preservation_prompts(config, dataset)]))
    bar = None
    if not args.quiet:
        from tqdm import tqdm
        bar = tqdm(desc="encode", unit="image")

    def progress(done: int, total: int):
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    try:
        cache = build_cache(dataset, cache_dir, encoders, max_pixels=settings.max_pixels,
                            bucket_step=settings.bucket_step, repeats=settings.repeats, prompts=prompts,
                            progress=progress, strict=not args.skip_bad_files,
                            flip=args.flip or config.flip_horizontal)  # flip training needs mirrored latents
    except KeyboardInterrupt:
        print(f"interrupted: {cache_dir} is incomplete (no manifest.json); run the same command again to finish it "
              "(what was encoded is kept)", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    buckets = sorted({e.bucket for e in cache.entries})
    print(f"encoded {len(cache)} image(s) in {len(buckets)} bucket(s) "
          f"({', '.join(f'{w}x{h}' for w, h in buckets[:6])}{', ...' if len(buckets) > 6 else ''}) and "
          f"{len(cache.prompt_files)} prompt(s) into {cache.folder} in {time.time() - loaded:.1f} s "
          f"(encoders loaded in {loaded - start:.1f} s on {device})")
    return 0
