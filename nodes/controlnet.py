"""alibaba-pai's Z-Image Fun ControlNet Union for the Turbo sampler: a loader and an Apply node (chainable).

ZImageTurboControlNetLoader lists the .safetensors files of ComfyUI's `model_patches` folder (where Comfy-Org ships
the Fun ControlNets) and `controlnet`. ZImageTurboApplyControlNet adds one control to a ZIMAGE_CONTROL chain (see
types.py); the sampler encodes its images with the given VAE at the latent's size and runs zimage_core's control.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from typing_extensions import override

import comfy.latent_formats
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..zimage_core import ControlInput, load_controlnet
from .loader import DTYPES
from .metadata import search_aliases
from .model_cache import KeepLastCache
from .types import ZIMAGE_CONTROL, ZIMAGE_CONTROLNET, ControlSpec, LoadedControlNet

log = logging.getLogger("ZImageTurbo")

FOLDERS = ("model_patches", "controlnet")
if "model_patches" not in folder_paths.folder_names_and_paths:  # hosts older than Comfy-Org's model_patches folder
    folder_paths.add_model_folder_path("model_patches", os.path.join(folder_paths.models_dir, "model_patches"))

_cache: KeepLastCache[LoadedControlNet] = KeepLastCache()  # (path, mtime, weight_dtype) -> LoadedControlNet


def controlnet_options() -> list[str]:
    """.safetensors files of model_patches, then controlnet (a name in both is listed once: model_patches wins)."""
    names: list[str] = []
    for folder in FOLDERS:
        names += [n for n in folder_paths.get_filename_list(folder)
                  if n.lower().endswith(".safetensors") and n not in names]
    return names


def resolve(name: str) -> str:
    for folder in FOLDERS:  # get_full_path refuses names that escape the folder
        path = folder_paths.get_full_path(folder, name)
        if path is not None and name.lower().endswith(".safetensors"):
            return path
    places = [p for folder in FOLDERS for p in folder_paths.get_folder_paths(folder)]
    raise FileNotFoundError(f"ControlNet '{name}' not found in the model_patches or controlnet folders "
                            f"({', '.join(places)})")


def load(name: str, weight_dtype: str) -> LoadedControlNet:
    path = resolve(name)
    key = (path, os.path.getmtime(path), weight_dtype)

    def load_new() -> LoadedControlNet:
        with torch.inference_mode(False):
            dtype, storage = DTYPES[weight_dtype]
            try:
                net = load_controlnet(path, dtype=dtype, device="cpu", weight_storage=storage)
            except ValueError as e:
                raise ValueError(f"controlnet_name '{name}' cannot be loaded as a Z-Image Fun ControlNet: {e}") from e
        return LoadedControlNet.create(net, name, dtype)

    return _cache.get_or_load(key, load_new)


class ZImageTurboControlNetLoader(io.ComfyNode):
    @classmethod
    @override
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZImageTurboControlNetLoader",
            display_name="Z-Image Turbo ControlNet Loader",
            category="ZImageTurbo",
            **search_aliases("controlnet loader", "fun controlnet", "union controlnet"),
            description="Loads alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union (1.0, 2.0, 2.1, 2.1 lite, Tile) from "
                        "models/model_patches or models/controlnet; the layout is detected from the file.",
            inputs=[
                io.Combo.Input("controlnet_name", options=controlnet_options(),
                               tooltip="Fun ControlNet file in models/model_patches (or models/controlnet), e.g. "
                                       "Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors."),
                io.Combo.Input("weight_dtype", options=list(DTYPES), default="bf16",
                               tooltip="Precision of the ControlNet weights, the same as the model loader's "
                                       "(fp8_e4m3fn: its blocks stored in fp8, computed in bf16)."),
            ],
            outputs=[ZIMAGE_CONTROLNET.Output("controlnet", display_name="controlnet",
                                              tooltip="The ControlNet, for Z-Image Turbo Apply ControlNet.")],
        )

    @classmethod
    @override
    def fingerprint_inputs(cls, controlnet_name, weight_dtype):
        try:
            return (controlnet_name, weight_dtype, os.path.getmtime(resolve(controlnet_name)))
        except (OSError, FileNotFoundError):
            return (controlnet_name, weight_dtype, None)

    @classmethod
    @override
    def validate_inputs(cls, controlnet_name):
        if controlnet_name not in controlnet_options():
            places = [p for folder in FOLDERS for p in folder_paths.get_folder_paths(folder)]
            return f"ControlNet '{controlnet_name}' not found in the model_patches or controlnet folders " \
                   f"({', '.join(places)})"
        return True

    @classmethod
    @override
    def execute(cls, controlnet_name, weight_dtype) -> io.NodeOutput:
        return io.NodeOutput(load(controlnet_name, weight_dtype))


def _size(tensor: torch.Tensor) -> str:
    return f"{tensor.shape[-2]}x{tensor.shape[-3]}" if tensor.ndim == 4 else f"{tensor.shape[-1]}x{tensor.shape[-2]}"


class ZImageTurboApplyControlNet(io.ComfyNode):
    @classmethod
    @override
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZImageTurboApplyControlNet",
            display_name="Z-Image Turbo Apply ControlNet",
            category="ZImageTurbo",
            **search_aliases("apply controlnet", "controlnet", "inpaint", "canny", "depth", "pose"),
            description="Adds a Fun ControlNet control (a control image such as canny, depth or pose; with a mask "
                        "and inpaint image, the 2.x inpaint mode) for the Z-Image Turbo Sampler's control input. "
                        "Chain several. Images are encoded with the VAE at the sampler's latent size (resized if "
                        "they differ).",
            inputs=[
                ZIMAGE_CONTROLNET.Input("controlnet", tooltip="From Z-Image Turbo ControlNet Loader."),
                io.Vae.Input("vae", tooltip="The Flux VAE (ae.safetensors) that encodes the images."),
                io.Float.Input("strength", default=0.75, min=-10.0, max=10.0, step=0.01,
                               tooltip="Multiplies the ControlNet's hints (alibaba-pai suggest 0.65-1.0)."),
                io.Float.Input("start", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="First share of the sampling steps the control acts on (0 = from the first "
                                       "step)."),
                io.Float.Input("end", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of the steps after which the control stops (1 = until the last)."),
                io.Image.Input("image", optional=True,
                               tooltip="Control image (canny / HED / depth / pose / MLSD / tile ...); optional in "
                                       "inpaint mode."),
                io.Image.Input("inpaint_image", optional=True,
                               tooltip="Inpaint mode (2.x ControlNets): the picture to repaint; needs the mask."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Inpaint mode (2.x ControlNets): 1 = repaint, 0 = keep; the size of "
                                      "inpaint_image."),
                ZIMAGE_CONTROL.Input("control", optional=True,
                                     tooltip="Controls of another Apply ControlNet node to add this one to."),
            ],
            outputs=[ZIMAGE_CONTROL.Output("zimage_control", display_name="control",
                                           tooltip="The control chain, for the sampler's control input.")],
        )

    @classmethod
    @override
    def execute(cls, controlnet: LoadedControlNet, vae, strength, start, end, image=None, inpaint_image=None,
                mask=None, control=()) -> io.NodeOutput:
        cfg = controlnet.net.config
        if not start < end:
            raise ValueError(f"start ({start}) must be below end ({end})")
        if (mask is None) != (inpaint_image is None):
            raise ValueError("inpaint mode needs both inputs: mask and inpaint_image" if mask is None
                             else "mask needs inpaint_image (the picture to repaint)")
        if mask is not None:
            if not cfg.inpaint:
                raise ValueError(f"mask: ControlNet '{controlnet.name}' is a {cfg.describe()}, which has no inpaint "
                                 f"mode; use a 2.x Fun ControlNet (control_in_dim 33) or disconnect the mask")
            mask = mask if mask.ndim == 3 else mask[None]
            if mask.shape[-2:] != inpaint_image.shape[1:3]:
                raise ValueError(f"mask is {_size(mask)} px but inpaint_image is {_size(inpaint_image)} px: "
                                 f"they must be the same size")
        elif image is None:
            raise ValueError("connect a control image (image), or inpaint_image and mask for inpaint mode")
        spec = ControlSpec(controlnet, vae, image, float(strength), float(start), float(end), inpaint_image, mask)
        return io.NodeOutput((*(control or ()), spec))


# ---------------------------------------------------------------------------------------------- used by the sampler
def _to_size(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """IMAGE [B, H, W, C] -> RGB at (width, height), resized ('area', center crop) like ComfyUI's Fun ControlNet."""
    image = image[..., :3]
    if image.shape[1:3] == (height, width):
        return image
    log.info("ZImageTurbo: control image %s resized to the latent's %dx%d px", _size(image), width, height)
    return comfy.utils.common_upscale(image.movedim(-1, 1), width, height, "area", "center").movedim(1, -1)


def _encode(vae, image: torch.Tensor) -> torch.Tensor:
    """Model-space latent of an IMAGE (ComfyUI's VAE encode, then the Flux latent format's process_in)."""
    return comfy.latent_formats.Flux().process_in(vae.encode(image).float())


def control_inputs(chain, latent_shape) -> list[ControlInput]:
    """The zimage_core controls of a ZIMAGE_CONTROL chain, with every image encoded at the latent's size."""
    height, width = latent_shape[-2] * 8, latent_shape[-1] * 8
    out = []
    for spec in chain:
        image = None if spec.image is None else _encode(spec.vae, _to_size(spec.image, width, height))
        mask = inpaint = None
        if spec.mask is not None:
            m = (spec.mask.float() >= 0.5).float()[:, None]  # binarised like diffusers' mask processor
            m_px = F.interpolate(m, size=(height, width), mode="nearest")
            picture = _to_size(spec.inpaint_image, width, height)
            grey = picture * (1.0 - m_px.movedim(1, -1)) + 0.5 * m_px.movedim(1, -1)  # masked area -> grey
            inpaint = _encode(spec.vae, grey)
            mask = F.interpolate(m_px, size=latent_shape[-2:], mode="nearest").to(inpaint.device)
        out.append(ControlInput(spec.controlnet.net, image, spec.strength, spec.start, spec.end, mask, inpaint))
    return out
