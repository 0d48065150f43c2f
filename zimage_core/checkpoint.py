"""Load Z-Image transformers from every checkpoint layout users have, and save them.

Layouts: diffusers / DiffSynth names (split to_q/to_k/to_v, `all_x_embedder.2-1`, ...) as single files or sharded
folders, and ComfyUI's single file (fused `attention.qkv`, `attention.out`, `q_norm`, `x_embedder`, ...), each with
or without a `model.diffusion_model.` / `diffusion_model.` prefix; bf16/fp16/fp32 storage and fp8 (e4m3fn, with or
without ComfyUI's per-tensor `scale_weight`), which is up-cast. The config is read from `config.json` when there is
one, else inferred from the tensor shapes. Tensors stream from disk into the parameters one at a time.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ZImageConfig
from .safetensors_io import SafetensorsFile
from .transformer import ZImageTransformer

log = logging.getLogger("zimage_core")

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
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
_LOOKALIKES = [  # (key fragment, what the file probably is)
    ("lora_A", "a LoRA (load it with the LoRA stack, not as a model)"),
    ("lora_down", "a LoRA (load it with the LoRA stack, not as a model)"),
    ("double_blocks.", "a Flux transformer"),
    ("input_blocks.", "a Stable Diffusion / SDXL UNet checkpoint"),
    ("joint_blocks.", "a Stable Diffusion 3 transformer"),
    ("decoder.conv_in", "a VAE"),
    ("self_attn.q_proj", "a text encoder (e.g. Qwen3)"),
    ("layers.0.adaLN_modulation.1.", "a Lumina 2 transformer (Z-Image has adaLN_modulation.0 without SiLU)"),
    ("siglip_embedder.", "a Z-Image Omni/Edit transformer (only text-to-image Z-Image is supported)"),
]
_REQUIRED = ("cap_embedder.1.weight", "t_embedder.mlp.0.weight", "layers.0.adaLN_modulation.0.weight")


@dataclass(frozen=True)
class _Source:
    file: SafetensorsFile
    key: str
    rows: slice | None = None  # a q/k/v block of a fused qkv weight
    scale_key: str | None = None  # ComfyUI scaled-fp8 per-tensor scale


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
        stored = src.file.tensors[src.key].dtype
        if stored in _FP8:
            value = src.file.read(src.key, src.rows).float()
            if src.scale_key is not None:
                value = value * src.file.read(src.scale_key).float()
            with torch.no_grad():
                out.copy_(value)
        else:
            src.file.read_into(src.key, out, src.rows)


# ---------------------------------------------------------------------------------------------- discovery
def _checkpoint_files(path: Path) -> tuple[list[Path], dict | None]:
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


def _describe_foreign(keys: list[str]) -> str:
    for fragment, what in _LOOKALIKES:
        if any(fragment in k for k in keys):
            return f"; it looks like {what}"
    return ""


def _to_diffusers_name(key: str) -> str:
    for pattern, repl in _COMFY_RENAMES:
        key = pattern.sub(repl, key)
    return key


def _map_sources(files: list[SafetensorsFile], label: str) -> tuple[dict[str, _Source], dict[str, tuple], str]:
    """Map every stored tensor to the diffusers parameter name(s) it provides."""
    entries = [(f, k) for f in files for k in f.keys()]
    keys = [k for _, k in entries]
    prefix = _strip_prefix(keys)
    names = {k: k[len(prefix):] for k in keys}
    stripped = set(names.values())
    missing = [k for k in _REQUIRED if k not in stripped]
    if missing:
        raise ValueError(
            f"{label} is not a Z-Image transformer: missing {missing}{_describe_foreign(keys)} "
            f"(first keys: {sorted(keys)[:4]})")
    comfy = any(n.endswith("attention.qkv.weight") or n.startswith("x_embedder.") for n in stripped)
    sources: dict[str, _Source] = {}
    shapes: dict[str, tuple] = {}
    for file, key in entries:
        name = names[key]
        if _IGNORED.match(name) or name.endswith(".scale_weight"):
            continue
        scale = key[: -len("weight")] + "scale_weight" if key.endswith(".weight") else None
        scale = scale if scale in file.tensors else None
        shape = file.tensors[key].shape
        if name.endswith("attention.qkv.weight"):
            dim = shape[0] // 3
            for i, proj in enumerate(("to_q", "to_k", "to_v")):
                target = name.replace("attention.qkv.weight", f"attention.{proj}.weight")
                sources[target] = _Source(file, key, slice(i * dim, (i + 1) * dim), scale)
                shapes[target] = (dim, *shape[1:])
            continue
        target = _to_diffusers_name(name) if comfy else name
        sources[target] = _Source(file, key, None, scale)
        shapes[target] = shape
    return sources, shapes, ("comfyui" if comfy else "diffusers") + (f" (prefix {prefix!r})" if prefix else "")


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
    files, config_json = _checkpoint_files(Path(path))
    _, shapes, layout = _map_sources([SafetensorsFile(f) for f in files], str(path))
    config = ZImageConfig.from_diffusers(config_json) if config_json else config_from_shapes(shapes)
    return config, layout


def load_transformer(path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                     device: str | torch.device = "cpu") -> ZImageTransformer:
    """Load a Z-Image transformer from a `.safetensors` file or a diffusers folder, in `dtype` on `device`.

    The model is built on the meta device and every parameter is filled straight from disk, so peak memory stays
    near one copy of the weights in `dtype`. Raises FileNotFoundError / ValueError naming the file and the culprit.
    """
    path = Path(path)
    files, config_json = _checkpoint_files(path)
    st_files = [SafetensorsFile(f) for f in files]
    sources, shapes, layout = _map_sources(st_files, str(path))
    config = ZImageConfig.from_diffusers(config_json) if config_json else config_from_shapes(shapes)
    with torch.device("meta"):
        model = ZImageTransformer(config)
    _check_against_model(model, shapes, str(path))

    stored = {st.tensors[s.key].dtype for s in sources.values() for st in [s.file]}
    if stored & set(_FP8):
        log.warning("%s stores fp8 weights: they are up-cast to %s, but fp8 storage visibly degrades "
                    "Z-Image-Turbo (use the bf16 file when you can)", path, dtype)
    model = model.to(dtype=dtype).to_empty(device=device)
    source = WeightSource(sources, dtype, layout, files)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            source.read_into(name, tensor.data)
    model.weight_source = source
    log.info("loaded %s (%s layout, %s parameters, %s)", path, layout, parameter_count(model.num_parameters()), dtype)
    return model.eval().requires_grad_(False)


def parameter_count(n: int) -> str:
    """A parameter count for logs, with three significant digits: 6.15 B, 1.94 M, 12.3 K, 950."""
    rounded = float(f"{n:.3g}")  # first, so that 999 999 reads "1 M", not "1e+03 K"
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if rounded >= scale:
            return f"{rounded / scale:.3g} {unit}"
    return str(n)


def comfyui_state_dict(model: ZImageTransformer) -> dict[str, torch.Tensor]:
    """The model's weights in ComfyUI's single-file naming (fused qkv, `out`, `q_norm`, `x_embedder`, ...)."""
    out = {}
    state = model.state_dict()
    for name, tensor in state.items():
        if ".attention.to_k." in name or ".attention.to_v." in name:
            continue
        if ".attention.to_q." in name:
            stem = name.split(".attention.to_q.")[0] + ".attention."
            out[stem + "qkv.weight"] = torch.cat([state[stem + f"to_{p}.weight"] for p in "qkv"])
            continue
        renamed = (name.replace("all_x_embedder.2-1.", "x_embedder.").replace("all_final_layer.2-1.", "final_layer.")
                   .replace(".attention.to_out.0.", ".attention.out.").replace(".attention.norm_q.", ".attention.q_norm.")
                   .replace(".attention.norm_k.", ".attention.k_norm."))
        out[renamed] = tensor
    return out


def save_transformer(model: ZImageTransformer, path: str | os.PathLike, layout: str = "diffusers",
                     prefix: str = "", dtype: torch.dtype | None = None) -> Path:
    """Write the model as one `.safetensors` file in `layout` "diffusers" or "comfyui" (optionally with a key
    prefix such as "model.diffusion_model."), atomically: a temporary file renamed into place."""
    from safetensors.torch import save_file

    if layout not in ("diffusers", "comfyui"):
        raise ValueError(f"layout must be 'diffusers' or 'comfyui', got {layout!r}")
    state = comfyui_state_dict(model) if layout == "comfyui" else model.state_dict()
    state = {prefix + k: (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"zimage_config": json.dumps(model.config.to_diffusers())})
    os.replace(tmp, path)
    return path
