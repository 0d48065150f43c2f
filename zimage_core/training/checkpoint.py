"""Training checkpoints: LoRA tensors, optimizer state, step, loss history, RNG states and the config, written
atomically (a temporary file in the same folder, flushed, then renamed over the old one), so a crash or an
interrupt never leaves a partial checkpoint."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

FORMAT = "zimage_core.train_checkpoint/1"


def rng_states() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    np_state = np.random.get_state()
    state["numpy"] = (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:])
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_states(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def save_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """Write `payload` (plus a format tag) to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save({"format": FORMAT, **payload}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable training checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a zimage_core training checkpoint")
    return payload
