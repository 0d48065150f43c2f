"""ZImageTurboModelLoader: a Z-Image transformer from ComfyUI's diffusion_models folder as a `ZIMAGE_MODEL`."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import torch
from typing_extensions import override

import folder_paths
from comfy_api.latest import io, ui
from server import PromptServer

from ..zimage_core import load_transformer
from ..zimage_core.variants import LABELS, VARIANTS, detect_variant
from .model_cache import KeepLastCache
from .types import OFFLOAD_MODES, ZIMAGE_MODEL, LoadedBase, ZImageModel, log

# weight_dtype option -> (compute dtype, weight storage of zimage_core.load_transformer)
DTYPES = {"bf16": (torch.bfloat16, "same"), "fp16": (torch.float16, "same"), "fp32": (torch.float32, "same"),
          "fp8_e4m3fn": (torch.bfloat16, "fp8_e4m3fn")}
FOLDER = "diffusion_models"
GGUF_FOLDERS = ("diffusion_models", "unet", "unet_gguf")  # unet_gguf: registered by ComfyUI-GGUF when installed
AUTO = "auto"

_cache: KeepLastCache[LoadedBase] = KeepLastCache()  # (path, mtime, dtype, storage, offload) -> LoadedBase


def _diffusers_folders() -> dict[str, str]:
    """Sharded diffusers transformers inside diffusion_models: option name ('folder/') -> absolute folder."""
    found = {}
    for root in folder_paths.get_folder_paths(FOLDER):
        if not os.path.isdir(root):
            continue
        for dirpath, _dirs, files in os.walk(root, followlinks=True):
            if "config.json" in files and any(f.endswith(".safetensors") for f in files):
                rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
                if rel != ".":
                    found[rel + "/"] = dirpath
    return found


def _gguf_files() -> dict[str, str]:
    """GGUF transformers: option name (path under its folder) -> absolute path. ComfyUI's diffusion_models list
    filters .gguf out, so the folders are walked here: diffusion_models, unet (models/unet) and unet_gguf where
    ComfyUI-GGUF registered it, each only if this host knows the folder name; the first folder wins a name."""
    found: dict[str, str] = {}
    for folder in GGUF_FOLDERS:
        try:
            roots = folder_paths.get_folder_paths(folder)
        except KeyError:  # a host without this folder name
            continue
        for root in roots:
            if not os.path.isdir(root):
                continue
            for dirpath, _dirs, files in os.walk(root, followlinks=True):
                for file in files:
                    if file.lower().endswith(".gguf"):
                        full = os.path.join(dirpath, file)
                        found.setdefault(os.path.relpath(full, root).replace(os.sep, "/"), full)
    return found


def model_options() -> list[str]:
    """Single files, each diffusers folder as one entry ('name/') instead of its shards, and GGUF files."""
    folders = _diffusers_folders()
    files = [f for f in folder_paths.get_filename_list(FOLDER)
             if not any(f.replace(os.sep, "/").startswith(d) for d in folders)]
    return sorted(set(files) | set(folders) | set(_gguf_files()))


def resolve(name: str) -> str:
    if name.lower().endswith(".gguf"):
        ggufs = _gguf_files()
        if name not in ggufs:
            raise FileNotFoundError(f"Z-Image GGUF '{name}' not found in the {', '.join(GGUF_FOLDERS)} folders")
        return ggufs[name]
    if name.endswith("/"):
        folders = _diffusers_folders()
        if name not in folders:
            raise FileNotFoundError(f"Z-Image model folder '{name}' not found in "
                                    f"{folder_paths.get_folder_paths(FOLDER)}")
        return folders[name]
    try:
        return folder_paths.get_full_path_or_raise(FOLDER, name)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"Z-Image model '{name}' not found in the diffusion_models folder "
                                f"({', '.join(folder_paths.get_folder_paths(FOLDER))})") from e


def _mtime(path: str) -> float:
    if os.path.isdir(path):
        return max((os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs), default=0.0)
    return os.path.getmtime(path)


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextmanager
def core_warnings():
    """Collect zimage_core's warnings (e.g. the fp8 quality warning) so the node can show them in the UI."""
    handler, logger = _Warnings(), logging.getLogger("zimage_core")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def load_base(name: str, weight_dtype: str = "bf16", offload: str = "none") -> LoadedBase:
    path = resolve(name)
    dtype, storage = DTYPES[weight_dtype]
    key = (path, _mtime(path), dtype, storage, offload)

    def load() -> LoadedBase:
        # Load outside inference mode: ComfyUI runs nodes under torch.inference_mode(), and inference-mode weights
        # could not be used by the trainer's backward pass.
        with torch.inference_mode(False):
            try:
                transformer = load_transformer(path, dtype=dtype, device="cpu", weight_storage=storage)
            except (ValueError, KeyError) as e:
                raise ValueError(f"'{name}' cannot be loaded as a Z-Image transformer: {e}") from e
        base = LoadedBase.create(transformer, path, name, dtype, offload)
        log.info("ZImageTurbo: loaded %s (%s, offload %s)", name, weight_dtype, offload)
        return base

    return _cache.get_or_load(key, load)


class ZImageTurboModelLoader(io.ComfyNode):
    @classmethod
    @override
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZImageTurboModelLoader",
            display_name="Z-Image Turbo Model Loader",
            category="ZImageTurbo",
            description="Loads a Z-Image / Z-Image-Turbo transformer from models/diffusion_models: a single "
                        ".safetensors in diffusers or ComfyUI (fused qkv) layout, with or without key prefixes, a "
                        "diffusers folder, or a GGUF file (Q8_0 ... Q2_K, also from models/unet; needs the gguf "
                        "package), whose quantized weights stay as stored. fp8 files are up-cast to the chosen dtype "
                        "(with a quality warning), or kept in fp8 with weight_dtype fp8_e4m3fn. The "
                        "model is cached across runs and takes part in ComfyUI's memory management.",
            inputs=[
                io.Combo.Input("model_name", options=model_options(),
                               tooltip="Transformer file (or diffusers folder, shown as 'name/') in "
                                       "models/diffusion_models, e.g. z_image_turbo_bf16.safetensors, or a .gguf "
                                       "in models/diffusion_models or models/unet (its weight_dtype is the compute "
                                       "dtype: bf16, fp16 or fp32)."),
                io.Combo.Input("weight_dtype", options=list(DTYPES), default="bf16",
                               tooltip="Precision the weights are held and run in. bf16 is the released precision; "
                                       "fp16 for GPUs without bf16; fp32 for reference/CPU runs; fp8_e4m3fn stores "
                                       "the transformer blocks' weights in fp8 (half the memory: sampling 6.3 GiB, "
                                       "training 9.3 GiB at 1024²; computed in bf16; "
                                       "a small loss of quality, see the README) and loads fp8 files as they are."),
                io.Combo.Input("offload", options=list(OFFLOAD_MODES), default="none",
                               tooltip="none: the whole model moves to the GPU for sampling. block: only the "
                                       "embedders stay on the GPU and each transformer block is streamed from RAM "
                                       "when it runs (slower, for GPUs with little VRAM: at 1024² sampling needs "
                                       "1.1 GiB instead of 11.9 and a LoRA training step 4.1 instead of 14.9; "
                                       "the weights then live in RAM: 12.3 GB in bf16, 6.2 GB in fp8)."),
                io.Combo.Input("variant", options=[AUTO, *VARIANTS], default=AUTO, optional=True,
                               tooltip="Which Z-Image this is (both have the same weights layout): auto = from the "
                                       "file name (z_image_bf16 / Z-Image = base, anything with 'turbo' = Turbo, "
                                       "other names = Turbo). The trainer's turbo check and validation grid use it."),
            ],
            outputs=[ZIMAGE_MODEL.Output("zimage_model", display_name="model",
                                         tooltip="The Z-Image transformer, for the LoRA stack, sampler or trainer.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    @override
    def fingerprint_inputs(cls, model_name, weight_dtype, offload, variant=AUTO):
        try:  # re-run (and reload) when the file changes on disk
            return (model_name, weight_dtype, offload, variant, _mtime(resolve(model_name)))
        except (OSError, FileNotFoundError):
            return (model_name, weight_dtype, offload, variant, None)

    @classmethod
    @override
    def validate_inputs(cls, model_name):
        # ComfyUI 0.3.75 does not check V3 combo values against their options; do it so a missing file is a
        # validation error on this input, before anything runs.
        if model_name not in model_options():
            return (f"Z-Image model '{model_name}' not found in the diffusion_models folder "
                    f"({', '.join(folder_paths.get_folder_paths(FOLDER))})")
        return True

    @classmethod
    @override
    def execute(cls, model_name, weight_dtype, offload, variant=AUTO) -> io.NodeOutput:
        with core_warnings() as warnings:
            chosen = detect_variant(model_name) if variant == AUTO else variant
            model = ZImageModel(load_base(model_name, weight_dtype, offload), variant=chosen)
        notes = [f"WARNING: {w}" for w in warnings]
        if chosen == "base":
            notes.append(f"{LABELS['base']} ({'from the file name' if variant == AUTO else 'chosen'}): not "
                         f"distilled; sample with preset base (50 steps, cfg 4) or add a distillation LoRA")
        if not notes:
            return io.NodeOutput(model)
        text = "\n".join(notes)
        if cls.hidden.unique_id is not None and PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, cls.hidden.unique_id)
        return io.NodeOutput(model, ui=ui.PreviewText(text))
