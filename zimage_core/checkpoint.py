"""Load Z-Image transformers from every checkpoint layout users have, and save them.

Layouts: diffusers / DiffSynth names (split to_q/to_k/to_v, `all_x_embedder.2-1`, ...) as single files or sharded
folders, and ComfyUI's single file (fused `attention.qkv`, `attention.out`, `q_norm`, `x_embedder`, ...), each with
or without a `model.diffusion_model.` / `diffusion_model.` prefix; bf16/fp16/fp32 storage and fp8 (e4m3fn or e5m2,
plain, with ComfyUI's per-tensor `scale_weight` or with this pack's per-channel `weight_scale`). fp8 tensors are
up-cast to the compute dtype, or, with `weight_storage="fp8_e4m3fn"`, kept as they are in fp8 storage
(zimage_core.quant.fp8), where a bf16 file is quantised on the way in. The config is read from `config.json` when
there is one, else inferred from the tensor shapes. Tensors stream from disk into the parameters one at a time.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ZImageConfig
from .quant import FAMILIES, READERS, QuantizedFile, QuantizedLinear, detect_family, install_quantized
from .quant.fp8 import FP8_DTYPES, SCALE_NAME, STORABLE_FP8, WEIGHT_STORAGE, Fp8Linear, check_fp8_support, \
    quantize_fp8, use_fp8_structure
from .safetensors_io import SafetensorsFile, describe_lookalike
from .transformer import ZImageTransformer

log = logging.getLogger("zimage_core")

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
_FP8 = STORABLE_FP8
_SCALE_SUFFIXES = (".scale_weight", "." + SCALE_NAME)  # ComfyUI's per-tensor scale, this pack's per-channel scale
_COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# ComfyUI-only keys that carry nothing this model needs: the unused top-level RMSNorm and fp8 bookkeeping.
_IGNORED = re.compile(r"^(norm_final\.weight|scaled_fp8|.*\.scale_input|.*\.comfy_quant)$")

# ComfyUI name -> diffusers name (prefix/suffix renames; fused qkv is split separately)
_COMFY_RENAMES = [
    (re.compile(r"^x_embedder\."), "all_x_embedder.2-1."),
    (re.compile(r"^final_layer\."), "all_final_layer.2-1."),
    (re.compile(r"\.attention\.out\."), ".attention.to_out.0."),
    (re.compile(r"\.attention\.q_norm\."), ".attention.norm_q."),
    (re.compile(r"\.attention\.k_norm\."), ".attention.norm_k."),
]
LOOKALIKES = [  # (key fragment, what the file probably is)
    ("lora_A", "a LoRA (load it with the LoRA stack, not as a model)"),
    ("lora_down", "a LoRA (load it with the LoRA stack, not as a model)"),
    ("double_blocks.", "a Flux transformer"),
    ("input_blocks.", "a Stable Diffusion / SDXL UNet checkpoint"),
    ("joint_blocks.", "a Stable Diffusion 3 transformer"),
    ("decoder.conv_in", "a VAE"),
    ("self_attn.q_proj", "a text encoder (e.g. Qwen3)"),
    ("layers.0.adaLN_modulation.1.", "a Lumina 2 transformer (Z-Image has adaLN_modulation.0 without SiLU)"),
    ("siglip_embedder.", "a Z-Image Omni/Edit transformer (only text-to-image Z-Image is supported)"),
    ("control_all_x_embedder.", "a Z-Image Fun ControlNet (load it with the ControlNet loader, not as a model)"),
]
_REQUIRED = ("cap_embedder.1.weight", "t_embedder.mlp.0.weight", "layers.0.adaLN_modulation.0.weight")


@dataclass(frozen=True)
class _Source:
    file: SafetensorsFile
    key: str
    rows: slice | None = None  # a q/k/v block of a fused qkv weight
    scale_key: str | None = None  # fp8 scale: per tensor (ComfyUI `scale_weight`) or per output row (`weight_scale`)

    @property
    def dtype(self) -> torch.dtype:
        return self.file.tensors[self.key].dtype

    def scale(self) -> torch.Tensor:
        """The fp8 scale as fp32, [] (per tensor) or [rows, 1] (per output channel, sliced like the weight)."""
        if self.scale_key is None:
            return torch.ones(())
        value = self.file.read(self.scale_key).float()
        if value.numel() == 1:
            return value.reshape(())
        value = value.reshape(-1, 1)
        return value[self.rows] if self.rows is not None else value


class WeightSource:
    """Where each parameter of a loaded model lives on disk. `read(name)` re-reads one parameter in the model dtype,
    bit-identical to what was loaded: the LoRA engine restores patched weights from it instead of keeping copies."""

    def __init__(self, sources: dict[str, _Source], dtype: torch.dtype, layout: str, files: list[Path]):
        self._sources = sources
        self.dtype = dtype
        self.layout = layout
        self.files = files

    def __contains__(self, name: str) -> bool:
        return name in self._sources

    def read(self, name: str) -> torch.Tensor:
        out = torch.empty(self.shape(name), dtype=self.dtype)
        self.read_into(name, out)
        return out

    def shape(self, name: str) -> tuple[int, ...]:
        src = self._sources[name]
        shape = list(src.file.tensors[src.key].shape)
        if src.rows is not None:
            shape[0] = src.rows.stop - src.rows.start
        return tuple(shape)

    def read_into(self, name: str, out: torch.Tensor) -> None:
        src = self._sources[name]
        if src.dtype in _FP8:
            with torch.no_grad():
                out.copy_(src.file.read(src.key, src.rows).float() * src.scale())
        else:
            src.file.read_into(src.key, out, src.rows)

    def read_fp8_into(self, name: str, linear: Fp8Linear) -> None:
        """Fill an Fp8Linear's weight and scale: fp8 bits of its own variant are copied as stored (with their scale),
        anything else (bf16/fp16/fp32, another fp8 variant) is read as fp32 and quantised, one tensor at a time."""
        src = self._sources[name]
        with torch.no_grad():
            if src.dtype == linear.weight.dtype:
                src.file.read_into(src.key, linear.weight.data, src.rows)
                linear.weight_scale.copy_(src.scale().expand_as(linear.weight_scale))
            else:
                weight = torch.empty(linear.weight.shape, dtype=torch.float32)
                self.read_into(name, weight)
                fp8, scale = quantize_fp8(weight, linear.weight.dtype)
                linear.weight.copy_(fp8)
                linear.weight_scale.copy_(scale)


# ---------------------------------------------------------------------------------------------- discovery
def checkpoint_files(path: Path) -> tuple[list[Path], dict | None]:
    if path.is_file():
        return [path], None  # a single file carries no config: it is inferred from the shapes
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    folder = path / "transformer" if (path / "transformer").is_dir() else path
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else None
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        weight_map = json.loads(index[0].read_text()).get("weight_map", {})
        files = sorted({folder / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index[0]} lists shards that are missing: {missing}")
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no .safetensors files")
    return files, config


def _strip_prefix(keys: list[str]) -> str:
    for prefix in PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def _to_diffusers_name(key: str) -> str:
    for pattern, repl in _COMFY_RENAMES:
        key = pattern.sub(repl, key)
    return key


def map_sources(files: list[SafetensorsFile], label: str, required=_REQUIRED, what: str = "a Z-Image transformer",
                 lookalikes=LOOKALIKES) -> tuple[dict[str, _Source], dict[str, tuple], str]:
    """Map every stored tensor to the diffusers parameter name(s) it provides; a file without the `required` keys
    is refused as not being `what`, with a guess at what it is instead."""
    entries = [(f, k) for f in files for k in f.keys()]
    keys = [k for _, k in entries]
    prefix = _strip_prefix(keys)
    names = {k: k[len(prefix):] for k in keys}
    stripped = set(names.values())
    missing = [k for k in required if k not in stripped]
    if missing:
        raise ValueError(
            f"{label} is not {what}: missing {missing}{describe_lookalike(keys, lookalikes)} "
            f"(first keys: {sorted(keys)[:4]})")
    comfy = is_comfy_layout(stripped)
    sources: dict[str, _Source] = {}
    shapes: dict[str, tuple] = {}
    for file, key in entries:
        name = names[key]
        if _IGNORED.match(name) or name.endswith(_SCALE_SUFFIXES):
            continue
        scale = _scale_key(file, key, label)
        for target, rows, shape in model_targets(name, file.tensors[key].shape, comfy):
            sources[target] = _Source(file, key, rows, scale)
            shapes[target] = shape
    return sources, shapes, ("comfyui" if comfy else "diffusers") + (f" (prefix {prefix!r})" if prefix else "")


def is_comfy_layout(names) -> bool:
    return any(n.endswith("attention.qkv.weight") or n.startswith("x_embedder.") for n in names)


def model_targets(name: str, shape: tuple, comfy: bool) -> list[tuple[str, slice | None, tuple]]:
    """The model parameter(s) one stored tensor (prefix stripped) provides: (diffusers name, rows of the stored
    tensor or None for all, shape). A fused qkv weight gives to_q / to_k / to_v, a third of its rows each."""
    if name.endswith("attention.qkv.weight"):
        dim = shape[0] // 3
        return [(name.replace("attention.qkv.weight", f"attention.{proj}.weight"), slice(i * dim, (i + 1) * dim),
                 (dim, *shape[1:])) for i, proj in enumerate(("to_q", "to_k", "to_v"))]
    return [(_to_diffusers_name(name) if comfy else name, None, tuple(shape))]


def _scale_key(file: SafetensorsFile, key: str, label: str) -> str | None:
    """The scale tensor of an fp8 weight, checked from the header: a file that scales some fp8 weights (ComfyUI's
    "scaled fp8") must scale all of them, with a scalar or one value per output row."""
    info = file.tensors[key]
    stem = key[: -len("weight")] if key.endswith(".weight") else None
    found = [stem[:-1] + suffix for suffix in _SCALE_SUFFIXES if stem is not None and stem[:-1] + suffix in file.tensors]
    if info.dtype not in _FP8:
        if found:
            raise ValueError(f"{label}: {found[0]} scales {key}, which is stored as {info.dtype}, not fp8")
        return None
    if not found:
        scaled = any(k.endswith(("scaled_fp8", *_SCALE_SUFFIXES)) for k in file.tensors)
        if scaled:
            raise ValueError(f"{label} ({file.path.name}) is a scaled fp8 file but the fp8 tensor {key} has no "
                             f"scale ({stem}scale_weight or {stem}{SCALE_NAME}): the file is incomplete")
        return None
    scale = file.tensors[found[0]]
    n = torch.Size(scale.shape).numel()
    if n != 1 and (len(info.shape) != 2 or n != info.shape[0] or scale.shape not in ((n,), (n, 1))):
        raise ValueError(f"{label}: scale {found[0]} has shape {list(scale.shape)}, but {key} of shape "
                         f"{list(info.shape)} needs a scalar or one value per output row ([{info.shape[0]}, 1])")
    return found[0]


def config_from_shapes(shapes: dict[str, tuple]) -> ZImageConfig:
    """Infer the whole config from diffusers-named parameter shapes (the released Turbo: dim 3840, 30 layers...)."""
    def count(prefix):
        return len({int(m.group(1)) for k in shapes if (m := re.match(rf"^{prefix}\.(\d+)\.", k))})

    dim, cap_feat_dim = shapes["cap_embedder.1.weight"]
    head_dim = shapes["layers.0.attention.norm_q.weight"][0] if "layers.0.attention.norm_q.weight" in shapes \
        else 128
    patch_dim = shapes["all_x_embedder.2-1.weight"][1] if "all_x_embedder.2-1.weight" in shapes else 64
    in_channels = 16
    patch = int(round((patch_dim / in_channels) ** 0.5))
    if patch * patch * in_channels != patch_dim:
        raise ValueError(f"patch embedding input width {patch_dim} is not p*p*16 (a 16-channel Flux-VAE latent)")
    ffn = shapes["layers.0.feed_forward.w1.weight"][0]
    return ZImageConfig(
        dim=dim, n_layers=count("layers"), n_refiner_layers=count("noise_refiner"), n_heads=dim // head_dim,
        in_channels=in_channels, patch_size=patch, cap_feat_dim=cap_feat_dim,
        axes_dims=ZImageConfig.rope_axes_for(head_dim),
        ffn_hidden_dim=None if ffn == int(dim / 3 * 8) else ffn,
    )


def _check_against_model(model: ZImageTransformer, shapes: dict[str, tuple], label: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [(k, list(shapes[k]), list(expected[k])) for k in expected if k in shapes and shapes[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors, e.g. {missing[:5]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors, e.g. {unexpected[:5]}")
    if wrong:
        problems.append("wrong shapes: " + ", ".join(f"{k} is {a}, the model needs {b}" for k, a, b in wrong[:5]))
    if problems:
        raise ValueError(f"{label} does not match a Z-Image transformer of config {model.config}: "
                         + "; ".join(problems))


# ---------------------------------------------------------------------------------------------- public API
def inspect_checkpoint(path: str | os.PathLike) -> tuple[ZImageConfig, str]:
    """(config, layout description) of a checkpoint, reading only headers."""
    files, config_json = checkpoint_files(Path(path))
    family = detect_family(path)
    if family != "safetensors":
        qfile = _read_quantized_file(Path(path), family)
        return config_from_shapes(_quantized_shapes(qfile)), qfile.layout
    _, shapes, layout = map_sources([SafetensorsFile(f) for f in files], str(path))
    config = ZImageConfig.from_diffusers(config_json) if config_json else config_from_shapes(shapes)
    return config, layout


def fill_from_source(model: torch.nn.Module, source: WeightSource, dtype: torch.dtype, device,
                     fp8_dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, set[str]]:
    """Materialise a meta-device `model` in `dtype` on `device` (with fp8 storage for the block Linears when
    `fp8_dtype` is given) and stream every tensor into it from `source`; returns it and its fp8 module paths."""
    model = model.to(dtype=dtype)  # before the fp8 swap: .to(dtype) would cast fp8 tensors too
    fp8_paths = set(use_fp8_structure(model, fp8_dtype)) if fp8_dtype is not None else set()
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            module_path, _, leaf = name.rpartition(".")
            if module_path in fp8_paths:
                if leaf == "weight":
                    source.read_fp8_into(name, model.get_submodule(module_path))
                elif leaf == "bias":
                    source.read_into(name, tensor.data)
                continue  # weight_scale is filled with its weight
            source.read_into(name, tensor.data)
    model.weight_source = source
    return model, fp8_paths


def load_transformer(path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                     device: str | torch.device = "cpu", weight_storage: str = "same") -> ZImageTransformer:
    """Load a Z-Image transformer from a `.safetensors` file, a diffusers folder or a quantized file (GGUF: told
    from the file itself, see zimage_core.quant), computing in `dtype` on `device`. A quantized file's block Linears
    keep the file's bytes (QuantizedLinear) and are dequantized one layer at a time when they run.

    weight_storage "same" holds every weight in `dtype` (fp8 files are up-cast); "fp8_e4m3fn" holds the blocks'
    attention and SwiGLU Linears in fp8 (zimage_core.quant.fp8): fp8 e4m3fn tensors load as stored with their
    scales, anything else is quantised per output channel as it is read. The model is built on the meta device and
    every parameter is filled straight from disk, so peak memory stays near one copy of the weights as stored.
    Raises FileNotFoundError / ValueError naming the file (or option) and the culprit, before allocating anything.
    """
    if weight_storage not in WEIGHT_STORAGE:
        raise ValueError(f"weight_storage must be one of {WEIGHT_STORAGE}, got {weight_storage!r}")
    if dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"dtype is the compute dtype and must be one of {_COMPUTE_DTYPES}, got {dtype} (for fp8 "
                         f"storage pass weight_storage='fp8_e4m3fn')")
    fp8_dtype = FP8_DTYPES.get(weight_storage)
    if fp8_dtype is not None:
        check_fp8_support(device, fp8_dtype, option=f"weight_storage={weight_storage!r}")
    path = Path(path)
    files, config_json = checkpoint_files(path)
    family = detect_family(path)
    if family != "safetensors":
        return _load_quantized_file(path, family, dtype, device, weight_storage)
    st_files = [SafetensorsFile(f) for f in files]
    sources, shapes, layout = map_sources(st_files, str(path))
    config = ZImageConfig.from_diffusers(config_json) if config_json else config_from_shapes(shapes)
    with torch.device("meta"):
        model = ZImageTransformer(config)
    _check_against_model(model, shapes, str(path))

    stored = {s.dtype for s in sources.values()}
    if stored & set(_FP8) and fp8_dtype is None:
        log.warning("%s stores fp8 weights: they are up-cast to %s, but fp8 storage visibly degrades "
                    "Z-Image-Turbo (use the bf16 file when you can)", path, dtype)
    source = WeightSource(sources, dtype, layout, files)
    model, fp8_paths = fill_from_source(model, source, dtype, device, fp8_dtype)
    storage = f", {weight_storage} storage for {len(fp8_paths)} Linears" if fp8_paths else ""
    log.info("loaded %s (%s layout, %s parameters, %s%s)", path, layout, parameter_count(model.num_parameters()),
             dtype, storage)
    return model.eval().requires_grad_(False)


def _read_quantized_file(path: Path, family: str) -> QuantizedFile:
    reader = READERS.get(family)
    if reader is None:
        raise ValueError(f"{path} is {FAMILIES[family]}, which this version of the pack cannot load")
    return reader(path)


def _quantized_shapes(qfile: QuantizedFile) -> dict[str, tuple]:
    return {**{f"{p}.weight": tuple(w.shape) for p, w in qfile.quantized.items()},
            **{name: tuple(shape) for name, (shape, _) in qfile.plain.items()}}


def _fit_unit_dims(qfile: QuantizedFile, model: torch.nn.Module) -> None:
    """Give plain tensors that differ from the model's only by dimensions of size 1 the model's shape: ggml drops
    trailing unit dimensions, so stable-diffusion.cpp's GGUFs store the [1, dim] pad tokens as [dim]."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for name, (shape, read) in list(qfile.plain.items()):
        want = expected.get(name)
        if want is not None and want != shape and [d for d in want if d != 1] == [d for d in shape if d != 1]:
            qfile.plain[name] = (want, lambda read=read, want=want: read().reshape(want))


def _load_quantized_file(path: Path, family: str, dtype: torch.dtype, device, weight_storage: str):
    """A quantized file (GGUF, ...): its quantized Linears become QuantizedLinears holding the file's tensors as
    stored, everything else is read in `dtype`. The family's reader checks the whole file before this builds
    anything, and the shapes are checked against the model before any tensor is read."""
    if weight_storage != "same":
        raise ValueError(f"weight_storage={weight_storage!r} re-quantizes bf16/fp16/fp32 files; {path} is "
                         f"{FAMILIES[family]} and already quantized: load it with weight_storage 'same'")
    qfile = _read_quantized_file(path, family)
    config = config_from_shapes(_quantized_shapes(qfile))
    with torch.device("meta"):
        model = ZImageTransformer(config)
    _fit_unit_dims(qfile, model)
    shapes = _quantized_shapes(qfile)
    _check_against_model(model, shapes, str(path))
    model = model.to(dtype=dtype)
    paths = set(install_quantized(model, qfile.quantized, device))
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            path_, _, leaf = name.rpartition(".")
            if path_ not in paths or leaf not in model.get_submodule(path_).stored_names:  # biases are plain
                tensor.data.copy_(qfile.plain[name][1]())
    formats = sorted({w.format.name for w in qfile.quantized.values()})
    log.info("loaded %s (%s, %s parameters, %d quantized Linears: %s; the rest in %s)", path, qfile.layout,
             parameter_count(sum(math.prod(shape) for shape in shapes.values())), len(paths), ", ".join(formats), dtype)
    return model.eval().requires_grad_(False)


def parameter_count(n: int) -> str:
    """A parameter count for logs, with three significant digits: 6.15 B, 1.94 M, 12.3 K, 950."""
    rounded = float(f"{n:.3g}")  # first, so that 999 999 reads "1 M", not "1e+03 K"
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if rounded >= scale:
            return f"{rounded / scale:.3g} {unit}"
    return str(n)


def _storage_state_dict(model: ZImageTransformer, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """model.state_dict(), with fp8 weights (and their scales) as stored, or every quantized weight dequantised when
    `dtype` is given."""
    state = model.state_dict()
    for path, module in model.named_modules():
        if not isinstance(module, QuantizedLinear) or (dtype is None and isinstance(module, Fp8Linear)):
            continue
        if dtype is None:  # only fp8 storage has a safetensors form this loader reads back
            raise ValueError(f"{path} holds a {module.fmt} weight, which cannot be saved as stored: pass a dtype "
                             f"to save the model dequantized")
        for name in module.stored_names:
            del state[f"{path}.{name}"]
        state[f"{path}.weight"] = module.dequantized(torch.float32)
    return state


def comfyui_state_dict(model: ZImageTransformer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's weights in ComfyUI's single-file naming (fused qkv, `out`, `q_norm`, `x_embedder`, ...)."""
    out = {}
    state = _storage_state_dict(model, dtype)
    for name, tensor in state.items():
        if ".attention.to_k." in name or ".attention.to_v." in name:
            continue
        if ".attention.to_q." in name:
            stem, leaf = name.split(".attention.to_q.")
            stem += ".attention."
            out[stem + "qkv." + leaf] = torch.cat([state[stem + f"to_{p}.{leaf}"] for p in "qkv"])
            continue
        renamed = (name.replace("all_x_embedder.2-1.", "x_embedder.").replace("all_final_layer.2-1.", "final_layer.")
                   .replace(".attention.to_out.0.", ".attention.out.").replace(".attention.norm_q.", ".attention.q_norm.")
                   .replace(".attention.norm_k.", ".attention.k_norm."))
        out[renamed] = tensor
    return out


def save_transformer(model: ZImageTransformer, path: str | os.PathLike, layout: str = "diffusers",
                     prefix: str = "", dtype: torch.dtype | None = None) -> Path:
    """Write the model as one `.safetensors` file in `layout` "diffusers" or "comfyui" (optionally with a key
    prefix such as "model.diffusion_model."), atomically: a temporary file renamed into place. fp8 storage is
    written as stored (fp8 weights + per-channel `weight_scale`, which `load_transformer` reads back bit for bit)
    unless `dtype` is given, which writes every weight dequantised in `dtype`."""
    from safetensors.torch import save_file

    if layout not in ("diffusers", "comfyui"):
        raise ValueError(f"layout must be 'diffusers' or 'comfyui', got {layout!r}")
    state = comfyui_state_dict(model, dtype) if layout == "comfyui" else _storage_state_dict(model, dtype)
    state = {prefix + k: (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"zimage_config": json.dumps(model.config.to_diffusers())})
    os.replace(tmp, path)
    return path
