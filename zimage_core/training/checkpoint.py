"""Training checkpoints: LoRA tensors, optimizer state, step, loss history, RNG states and the config, in one
.safetensors file (never pickle), written atomically (a temporary file in the same folder, flushed and fsynced,
then renamed over the old one), so a crash or an interrupt never leaves a partial checkpoint.

File layout. Every tensor of the payload is a safetensors tensor named by its path in the payload, parts joined
by "/":

    lora/<module path>|down, lora/<module path>|up        the trainable LoRA factors (fp32 masters)
    optimizer/state/<param index>/exp_avg|exp_avg_sq|step  AdamW state
    rng/torch, rng/cuda/<device index>                      torch / CUDA generator states (uint8)
    rng/numpy/keys                                          numpy MT19937 key array (its uint32 bits stored as int32)

Everything else is JSON in the safetensors `__metadata__` (string values): "format" is the plain format tag, and
each other top-level payload key (step, losses, config, lora_alpha, optimizer, rng, ...) holds that entry as JSON,
in which a tensor is {"__tensor__": "<tensor name>"}, a tuple {"__tuple__": [...]} and a dict whose keys are not
all strings (the optimizer's per-parameter state) {"__items__": [[key, value], ...]}. So the optimizer's
param_groups (lr, betas, eps, weight_decay, ...), the python `random` state and the numpy RNG scalars are plain
JSON, and loading returns exactly the structure that was saved.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as _safetensors_bytes

FORMAT = "zimage_core.train_checkpoint/2"  # /1 was a torch.save pickle (NAME.ckpt.pt), which is never loaded
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
_TAGS = (_TENSOR, _TUPLE, _ITEMS)


def rng_states() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.uint32).view(np.int32).copy()),
                      "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_states(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().view(np.uint32)
    np.random.set_state((np_state["kind"], keys, np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def lora_state(lora) -> dict[str, torch.Tensor]:
    """The trainable tensors of a LoraWeights as a flat dict (`<module path>|down`, `<module path>|up`)."""
    out = {}
    for path, module in lora.modules.items():
        out[f"{path}|down"] = module.down.detach().cpu().clone()
        out[f"{path}|up"] = module.up.detach().cpu().clone()
    return out


@torch.no_grad()
def load_lora_state(lora, state: dict[str, torch.Tensor]):
    """Copy a `lora_state` dict into a LoraWeights of the same structure (in place, keeping dtype and device)."""
    expected = {f"{p}|{n}" for p in lora.modules for n in ("down", "up")}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise ValueError(f"checkpoint LoRA does not match the run's LoRA (missing {missing}, unexpected {extra})")
    for path, module in lora.modules.items():
        for name in ("down", "up"):
            target, value = getattr(module, name), state[f"{path}|{name}"]
            if target.shape != value.shape:
                raise ValueError(f"checkpoint LoRA {path}.{name} has shape {list(value.shape)}, the run's LoRA "
                                 f"{list(target.shape)} (different rank or model)")
            target.copy_(value)


# ---------------------------------------------------------------------------------------------- encoding
def _encode(value, name: str, tensors: dict[str, torch.Tensor], storages: set):
    """`value` as JSON-able data; its tensors go into `tensors` under `name` (the payload path joined by "/")."""
    if isinstance(value, torch.Tensor):
        if name in tensors:
            raise ValueError(f"checkpoint tensor name {name!r} occurs twice in the payload")
        tensor = value.detach().cpu().contiguous()
        if tensor.numel() and tensor.untyped_storage().data_ptr() in storages:
            tensor = tensor.clone()  # safetensors refuses tensors that share memory
        if tensor.numel():
            storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
        return {_TENSOR: name}
    if isinstance(value, np.ndarray):
        return _encode(torch.from_numpy(value), name, tensors, storages)
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, f"{name}/{i}", tensors, storages) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{name}/{i}", tensors, storages) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not any(k in _TAGS for k in value):
            return {k: _encode(v, f"{name}/{k}", tensors, storages) for k, v in value.items()}
        for k in value:
            if not (k is None or isinstance(k, (str, int, float, bool))):
                raise TypeError(f"checkpoint entry {name!r} has a key of type {type(k).__name__} ({k!r})")
        return {_ITEMS: [[k, _encode(v, f"{name}/{k}", tensors, storages)] for k, v in value.items()]}
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"checkpoint entry {name!r} has a value of type {type(value).__name__}, which is neither a "
                    "tensor nor JSON data")


def _decode(value, tensors: dict[str, torch.Tensor], path: Path):
    if isinstance(value, list):
        return [_decode(v, tensors, path) for v in value]
    if isinstance(value, dict):
        if len(value) == 1 and _TENSOR in value:
            name = value[_TENSOR]
            if name not in tensors:
                raise ValueError(f"{path} is not a readable training checkpoint: tensor {name!r} is missing")
            return tensors[name]
        if len(value) == 1 and _TUPLE in value:
            return tuple(_decode(v, tensors, path) for v in value[_TUPLE])
        if len(value) == 1 and _ITEMS in value:
            return {k: _decode(v, tensors, path) for k, v in value[_ITEMS]}
        return {k: _decode(v, tensors, path) for k, v in value.items()}
    return value


def _write(handle, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
    handle.write(_safetensors_bytes(tensors, metadata=metadata))


def save_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """Write `payload` (plus the format tag) to `path` atomically as one .safetensors file: tensors as tensors, the
    rest as JSON metadata (see the module docstring)."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    storages: set = set()
    metadata = {"format": FORMAT}
    for key, value in payload.items():
        if not isinstance(key, str) or key == "format" or "/" in key:
            raise ValueError(f"checkpoint payload key {key!r} is not allowed (a string without '/', not 'format')")
        metadata[key] = json.dumps(_encode(value, key, tensors, storages), allow_nan=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            _write(handle, tensors, metadata)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by `save_checkpoint` (with the safetensors library: nothing is unpickled). Returns
    the payload with its tensors on the CPU and a "format" entry."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training checkpoint {path} does not exist")
    with open(path, "rb") as handle:
        head = handle.read(8)
    # A safetensors file starts with its header length (u64, little endian: the top bytes are zero), so a first
    # byte of 0x80 alone is no pickle: a header of 128 + 256k bytes starts the same way.
    header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"
                                            and not 0 < header_len < 1 << 32):
        raise ValueError(f"{path} is a pickled PyTorch file (an older training checkpoint, NAME.ckpt.pt, or "
                         "torch.save output); pickles are never loaded because unpickling can run code. Start the "
                         "run again (checkpoints are now NAME.ckpt.safetensors).")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # noqa: BLE001  safetensors raises its own error types
        raise ValueError(f"{path} is not a readable training checkpoint: {exc}") from exc
    if metadata.get("format") != FORMAT:
        found = metadata.get("format")
        raise ValueError(f"{path} is not a zimage_core training checkpoint"
                         + (f" of this version (format {found!r}, expected {FORMAT!r})" if found else ""))
    payload: dict = {"format": FORMAT}
    for key, text in metadata.items():
        if key == "format":
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not a readable training checkpoint: entry {key!r} is not JSON ({exc})") \
                from exc
        payload[key] = _decode(data, tensors, path)
    return payload
