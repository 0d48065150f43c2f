"""Applying a stack of LoRAs to a model, and taking it off again bit-exactly.

merge: each delta is added to its weight in fp32 (one rounding to the model dtype at the end), in the same order of
operations as diffusers + peft, so fp32 results match them bit for bit. Restoring re-reads the patched tensors from
the model's memory-mapped checkpoint (`model.weight_source`, set by `load_transformer`), so no second copy of the
weights is held; a model built in memory instead gets CPU backups of just the tensors a LoRA touches.

runtime: each targeted nn.Linear adds strength * scale * (x @ down.T) @ up.T, computed from the LoraWeights tensors
themselves (cast to x's dtype and device at call time), so gradients reach them: this is what training uses. The
branches live in the Linear's `lora_branches` tuple, read by one forward hook (`run_branches`) the Linear keeps while
it has branches; the factor is a 0-d tensor, not a Python number. So a compiled block (zimage_core.compile) sees
them: dynamo guards the tuple (a new or removed LoRA recompiles once per block variant) and takes the tensors as
graph inputs (another strength or LoRA of the same shape recompiles nothing). `pin_branch_hooks` keeps the hook on
for good, which a compiled model needs (dynamo does not guard the hook dicts). Full-size deltas (ComfyUI .diff/.diff_b, LoKr, LoHa) have no cheap side branch and are merged in both
modes; the handle restores them the same way.

Quantized weights (zimage_core.quant: fp8 storage, GGUF, ...): a QuantizedLinear is never merged into, whatever the
mode, since the sum would be re-quantized. Its LoRAs run as the runtime branches above, and full-size deltas as a
branch x @ delta.T whose delta is rebuilt in the compute dtype at call time (one layer at a time, like the
dequantized weight itself). Removing them only removes hooks: the stored bits are never touched.

Everything is checked (every key matched, every shape right) before the first tensor is touched."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quant import is_quantized, weight_shape
from ..scheduler import StepRange
from .combine import combine_stack
from .io import load_lora
from .schedule import LoraSchedule
from .weights import LoraError, LoraModule, LoraWeights

MODES = ("merge", "runtime")


@dataclass
class LoraReport:
    """What one LoRA of a stack did: modules patched, file keys that mapped to nothing, keys skipped because they have
    no effect (copies, unused modules), and text-encoder keys left to the text encoder."""

    name: str
    format: str
    strength: float
    matched: int
    unmatched: list[str] = field(default_factory=list)
    redundant: list[str] = field(default_factory=list)
    text_encoder: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the stack's combine mode did to this LoRA

    def __str__(self) -> str:
        text = f"{self.name} [{self.format}] x{self.strength:g}: {self.matched} modules"
        if self.unmatched:
            text += f", {len(self.unmatched)} keys NOT applied (first: {self.unmatched[:3]})"
        if self.redundant:
            text += f", {len(self.redundant)} keys without effect skipped"
        if self.text_encoder:
            text += f", {len(self.text_encoder)} text-encoder keys NOT applied (first: {self.text_encoder[:3]})"
        return "; ".join([text, *self.notes])


@dataclass
class _Patch:
    """One delta on one parameter: `part` is 'weight' or 'bias'."""

    param: str
    module: LoraModule
    strength: float
    part: str

    def delta(self, device) -> Tensor:
        if self.part == "weight":
            return self.module.weight_delta(self.strength, device)
        diff_b = self.module.diff_b.detach().to(device=device, dtype=torch.float32)
        return diff_b * self.strength if self.strength != 1.0 else diff_b


class _MergeState:
    """Per model: the handles whose deltas are merged, in order, and how to get each patched tensor's original."""

    def __init__(self, model: nn.Module):
        self.source = getattr(model, "weight_source", None)
        self.backups: dict[str, Tensor | None] = {}  # None: re-read from `source`
        self.handles: list[LoraHandle] = []

    def remember(self, name: str, param: Tensor) -> None:
        if name in self.backups:
            return
        src = self.source
        if src is not None and name in src and tuple(src.shape(name)) == tuple(param.shape) \
                and getattr(src, "dtype", param.dtype) == param.dtype:
            self.backups[name] = None
        else:
            self.backups[name] = param.detach().to("cpu", copy=True)

    def restore(self, name: str, param: Tensor) -> None:
        backup = self.backups[name]
        if backup is not None:
            param.copy_(backup)
        elif param.device.type == "cpu" and param.is_contiguous() and hasattr(self.source, "read_into"):
            self.source.read_into(name, param)
        else:
            param.copy_(self.source.read(name))


_STATE_ATTR = "_zimage_lora_merge_state"  # kept on the model itself, so a dropped model is freed with its stacks


def _merge_state(model: nn.Module, create: bool = False) -> _MergeState | None:
    state = model.__dict__.get(_STATE_ATTR)
    if state is None and create:
        state = model.__dict__[_STATE_ATTR] = _MergeState(model)
    return state


def _merge_into(param: Tensor, patches: list[_Patch]) -> None:
    """param += delta for each patch, accumulated in fp32 and rounded once (in place for fp32 weights, as peft)."""
    acc = param if param.dtype == torch.float32 else param.float()
    for patch in patches:
        acc.add_(patch.delta(param.device))
    if acc is not param:
        param.copy_(acc)


class LoraHandle:
    """The result of `apply_loras`: `.reports` per LoRA, `.remove()` (idempotent) restores the model exactly.
    Also a context manager that removes on exit."""

    def __init__(self, model: nn.Module, mode: str, reports: list[LoraReport]):
        self.model = model
        self.mode = mode
        self.reports = reports
        self._patches: list[_Patch] = []
        self._linears: list[nn.Linear] = []  # Linears carrying branches of this handle
        self.schedule = LoraSchedule()  # the entries with a step range (schedule.py); empty = every LoRA on always
        self._removed = False

    def _merge(self, patches: list[_Patch]) -> None:
        if not patches:
            return
        state = _merge_state(self.model, create=True)
        state.handles.append(self)
        self._patches = patches
        for name, group in _by_param(patches).items():
            param = self.model.get_parameter(name)
            with torch.no_grad():
                state.remember(name, param)
                _merge_into(param, group)

    def _add_branches(self, branches: dict[nn.Linear, list]) -> None:
        for linear, items in branches.items():
            add_branches(linear, [replace(b, owner=self) for b in items])
            self._linears.append(linear)

    def remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        for linear in self._linears:
            drop_branches(linear, self)
        self._linears.clear()
        state = _merge_state(self.model)
        if state is None or self not in state.handles:
            return
        state.handles.remove(self)
        with torch.no_grad():
            for name in _by_param(self._patches):
                param = self.model.get_parameter(name)
                state.restore(name, param)
                others = [p for h in state.handles for p in h._patches if p.param == name]
                if others:  # re-apply the stacks still on: same arithmetic, so the same bits as before
                    _merge_into(param, others)
                else:
                    del state.backups[name]
        if not state.handles:
            del self.model.__dict__[_STATE_ATTR]

    def __enter__(self) -> "LoraHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        lines = "; ".join(str(r) for r in self.reports)
        return f"<LoraHandle {self.mode}{' (removed)' if self._removed else ''}: {lines}>"


def _by_param(patches: list[_Patch]) -> dict[str, list[_Patch]]:
    groups: dict[str, list[_Patch]] = {}
    for patch in patches:
        groups.setdefault(patch.param, []).append(patch)
    return groups


BRANCHES = "lora_branches"  # attribute of a Linear: the tuple of its runtime branches, in application order
_HOOK = "_lora_branch_hook"  # attribute of a Linear: the handle of its `run_branches` hook
_PINNED = "_lora_branch_hook_pinned"


@dataclass(frozen=True, eq=False)
class Branch:
    """One runtime side branch on a Linear: low rank (down, up) times `factor`, or a full-size delta rebuilt at
    call time (`full`: LoKr / LoHa / diff on an fp8 base) times `factor`. factor: 0-d fp32 tensor (strength *
    alpha / rank for low rank, strength for full deltas), so a compiled graph takes it as an input."""

    factor: Tensor
    down: Tensor | None = None
    up: Tensor | None = None
    full: LoraModule | None = None
    owner: object = None  # the LoraHandle that added it

    def __call__(self, x: Tensor) -> Tensor:
        if self.full is not None:
            return F.linear(x, self.full.weight_delta(1.0, x.device).to(x.dtype)) * self.factor.to(x.device)
        h = F.linear(x, self.down.to(device=x.device, dtype=x.dtype))
        return self.factor.to(x.device) * F.linear(h, self.up.to(device=x.device, dtype=x.dtype))


def run_branches(module: nn.Module, args, output: Tensor) -> Tensor:
    """The forward hook of a Linear with runtime branches: output + each branch of `module.lora_branches`."""
    x = args[0]
    for branch in getattr(module, BRANCHES):
        output = output + branch(x)
    return output


def _ensure_hook(linear: nn.Linear) -> None:
    if _HOOK not in linear.__dict__:
        linear.__dict__.setdefault(BRANCHES, ())
        linear.__dict__[_HOOK] = linear.register_forward_hook(run_branches)


def add_branches(linear: nn.Linear, branches: list[Branch]) -> None:
    _ensure_hook(linear)
    linear.__dict__[BRANCHES] = linear.__dict__[BRANCHES] + tuple(branches)


def drop_branches(linear: nn.Linear, owner) -> None:
    """Remove `owner`'s branches; a Linear left with none loses its hook unless pinned (its output is then exactly
    the base Linear's again)."""
    left = tuple(b for b in linear.__dict__.get(BRANCHES, ()) if b.owner is not owner)
    linear.__dict__[BRANCHES] = left
    if not left and not linear.__dict__.get(_PINNED) and _HOOK in linear.__dict__:
        linear.__dict__.pop(_HOOK).remove()
        del linear.__dict__[BRANCHES]


def pin_branch_hooks(modules: Iterable[nn.Module]) -> None:
    """Give every Linear among `modules` (and their children) the branch hook for good, with or without branches,
    so adding a LoRA later changes only the guarded `lora_branches` tuple, never the hooks (zimage_core.compile)."""
    for module in modules:
        for linear in module.modules():
            if isinstance(linear, nn.Linear):
                _ensure_hook(linear)
                linear.__dict__[_PINNED] = True


def _low_rank_branch(down: Tensor, up: Tensor, factor: float) -> Branch:
    return Branch(torch.tensor(factor, dtype=torch.float32), down=down, up=up)


def _full_delta_branch(module: LoraModule, strength: float) -> Branch:
    return Branch(torch.tensor(strength, dtype=torch.float32), full=module)


def _as_lora(item) -> LoraWeights:
    if isinstance(item, LoraWeights):
        return item
    if isinstance(item, (str, os.PathLike)):
        return load_lora(item)
    raise TypeError(f"apply_loras: expected a LoraWeights or a path, got {type(item).__name__}")


def apply_loras(model: nn.Module, loras: Iterable, mode: str = "merge", strict: bool = True,
                skip_text_encoder: bool = False, combine: str = "sum", keep_apart: Iterable[int] = (),
                step_ranges: dict[int, StepRange] | None = None) -> LoraHandle:
    """Apply `[(lora_or_path, strength), ...]` to `model` and return a handle whose `.remove()` undoes it exactly.

    strict=True (default) refuses a LoRA with any key that maps to no module of the model, or with a text-encoder
    part, naming the file, the detected format and the first such keys; strict=False applies the rest and reports
    them in `handle.reports`. skip_text_encoder=True leaves text-encoder keys out (reported by name) while strict
    still refuses unknown keys. A shape mismatch is always an error. On any error nothing is applied.

    combine: how the stack's LoRAs combine (`combine.COMBINE_MODES`; "sum" = plain sum), computed on the factors
    before anything is applied; the stack indices in `keep_apart` (the DistillPatch) are never combined. A mode other
    than "sum" computes new (detached) factors: it is for sampling, not for training through the stack.

    step_ranges: {stack index: StepRange} for entries that act on part of the sampling steps only (schedule.py). They
    become runtime branches in either mode, collected in `handle.schedule`, which `sample(..., lora_steps=)` switches
    per step; a LoRA with bias deltas cannot be switched and is refused by name."""
    if mode not in MODES:
        raise ValueError(f"apply_loras: mode must be one of {MODES}, got {mode!r}")
    stack = [(_as_lora(item), float(strength))
             for item, strength in ((i, 1.0) if not isinstance(i, tuple) else i for i in loras)]
    combined = combine_stack(stack, combine, keep_apart)
    step_ranges = {i: r for i, r in (step_ranges or {}).items() if not r.full}
    modules = dict(model.named_modules())
    reports, patches = [], []
    branches: dict[nn.Linear, list] = {}
    schedule = LoraSchedule()
    for index, (lora, strength) in enumerate(combined.stack):
        unmatched = list(lora.unmatched)
        matched = []
        for path, lmod in lora.modules.items():
            target = modules.get(_model_path(path, model))
            if target is None:
                unmatched.extend(lmod.keys)
            else:
                _check_shapes(lora, path, lmod, target)
                matched.append((path, lmod, target))
        if unmatched and strict:
            raise LoraError(
                f"{lora.name} (detected format: {lora.format}): {len(unmatched)} key(s) map to no module of this "
                f"model, first: {unmatched[:5]}. Nothing was applied. If this LoRA is meant for this model, pass "
                f"strict=False to apply its other {len(matched)} modules anyway.")
        if lora.text_encoder and strict and not skip_text_encoder:
            raise LoraError(
                f"{lora.name} (detected format: {lora.format}) also trains the text encoder: {len(lora.text_encoder)} "
                f"key(s), first: {lora.text_encoder[:5]}, which this transformer LoRA engine cannot apply. Nothing "
                f"was applied. Pass skip_text_encoder=True (the LoRA stack node: strict off) to apply its "
                f"{len(matched)} transformer modules and leave the text-encoder part out.")
        reports.append(LoraReport(lora.name, lora.format, strength, len(matched), unmatched, list(lora.redundant),
                                  list(lora.text_encoder), combined.notes.get(index, [])))
        if strength == 0.0:
            continue
        ranged = index in step_ranges
        own: list[Branch] = []
        for path, lmod, target in matched:
            name = _model_path(path, model)
            changes_weight = lmod.kind != "diff" or lmod.diff is not None
            if ranged and (lmod.diff_b is not None or not isinstance(target, nn.Linear)):
                raise LoraError(f"{lora.name} (detected format: {lora.format}): its module {path} "
                                f"{'has a bias delta' if lmod.diff_b is not None else 'is not a Linear'}, which "
                                f"cannot be switched per step, so it cannot have a step range ({step_ranges[index]}). "
                                f"Nothing was applied. Use the full range 0-1 for this LoRA.")
            if lmod.kind == "lora" and isinstance(target, nn.Linear) and (
                    mode == "runtime" or ranged or is_quantized(target)):
                own.append(_low_rank_branch(lmod.down, lmod.up, strength * lmod.scale))
                branches.setdefault(target, []).append(own[-1])
            elif changes_weight and (ranged or is_quantized(target)):
                own.append(_full_delta_branch(lmod, strength))
                branches.setdefault(target, []).append(own[-1])
            elif changes_weight:
                patches.append(_Patch(f"{name}.weight", lmod, strength, "weight"))
            if lmod.diff_b is not None:
                patches.append(_Patch(f"{name}.bias", lmod, strength, "bias"))
        if ranged:
            schedule.add(lora.name, step_ranges[index], [b.factor for b in own])
    handle = LoraHandle(model, mode, reports)
    handle.schedule = schedule
    try:
        handle._merge(patches)
        handle._add_branches(branches)
    except BaseException:
        handle.remove()
        raise
    return handle


def _model_path(path: str, model: nn.Module) -> str:
    """LoRA paths say `2-1` for the patch embedder / final layer key; a model with another patch size names it so."""
    patch = getattr(getattr(model, "config", None), "patch_size", 2)
    return path.replace(".2-1", f".{patch}-1") if patch != 2 else path


def _check_shapes(lora: LoraWeights, path: str, lmod: LoraModule, target: nn.Module) -> None:
    keys = f" (keys {list(lmod.keys[:2])})" if lmod.keys else ""
    where = f"{lora.name} (format {lora.format}), module {path}{keys}"
    shape = weight_shape(target)  # a quantized Linear's logical [out, in], not its stored bytes' shape
    expected = lmod.delta_shape()
    if expected is not None:
        if shape is None:
            raise LoraError(f"{where}: the model's module {path} has no weight to patch")
        if tuple(shape) != tuple(expected):
            raise LoraError(f"{where}: the LoRA changes a weight of shape {list(expected)} but the model's weight is "
                            f"{list(shape)}; is this LoRA for another model?")
    if lmod.diff_b is not None:
        bias = getattr(target, "bias", None)
        if not isinstance(bias, Tensor) or tuple(bias.shape) != tuple(lmod.diff_b.shape):
            have = "no bias" if not isinstance(bias, Tensor) else f"a bias of shape {list(bias.shape)}"
            raise LoraError(f"{where}: the LoRA changes a bias of shape {list(lmod.diff_b.shape)} but the model's "
                            f"module has {have}")
