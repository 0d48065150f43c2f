"""How the LoRAs of a stack combine: a transform of their per-module factors / deltas before they are applied.

`apply_loras(..., combine=mode)` runs `combine_stack` on the loaded stack and applies what it returns with the usual
merge / branch machinery (apply.py), so every mode inherits its guarantees: checked before the first tensor is
touched, removal restores the base bit-exactly, fp8 / quantized bases get side branches.

Modes (measured on the toy world, docs/lora-stacking.md):

* "sum": today's behaviour, the stack is returned untouched (the same objects), so the result is bit-for-bit the
  plain sum.
* "shared_once": what several LoRAs write in common is counted once instead of once per LoRA: each of n LoRAs
  sharing a module has its `up` lose (n - 1) / n of its component in the span of the others' `up` columns (half,
  for two). n identical LoRAs give that LoRA once;
  two LoRAs writing orthogonal directions give the plain sum. (Two SFT LoRAs on Turbo share at least their
  de-distillation, which the sum doubles.) Low rank, like "orthogonal".
* "orthogonal": where two or more LoRAs of the combined set patch the same module, each LoRA's output directions
  (the columns of its `up`) are projected off the span of the other LoRAs' `up` columns, so no LoRA writes into the
  directions another one writes. Stays low rank (only `up` changes, same rank, same dtype): exact side branches on fp8
  / quantized bases, no extra memory beyond one new `up` per shared module.
* "orthogonal_in": the same on the input side: each LoRA's `down` rows are projected off the span of the others'
  `down` rows, so no LoRA reacts to what another one reads.
* "ties": TIES-merging (Yadav et al. 2023) of the strength-scaled full deltas of each shared module: keep each
  LoRA's largest `TIES_DENSITY` share of entries, elect a sign per entry from their sum, keep the entries that agree
  and divide by how many agree. The result is a full-size delta per LoRA and module (kind "diff"): one full fp32
  weight per LoRA and shared module (tens of GB for the real model) and seconds per module on a CPU, so it is a
  candidate measured on the toy world that the LoRA stack node does not offer.

A LoRA module that is not low-rank factors (LoKr, LoHa, a full ComfyUI diff) cannot be projected: under the
orthogonal modes that LoRA is left out of the combination and summed as it is, and a note names it. "ties" works on
full deltas, so it takes every kind. The entries listed in `keep_apart` (the DistillPatch slot) are never combined,
and neither are entries at strength 0."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .weights import LoraModule, LoraWeights

COMBINE_MODES = ("sum", "shared_once", "orthogonal", "orthogonal_in", "ties")
TIES_DENSITY = 0.2  # share of each delta's entries kept by TIES' trim step (the paper's default k = 20 %)


@dataclass
class Combined:
    """The stack to apply: (weights, strength) per entry, in the input's order, and notes per entry index."""

    stack: list[tuple[LoraWeights, float]]
    notes: dict[int, list[str]] = field(default_factory=dict)


def combine_stack(stack: list[tuple[LoraWeights, float]], mode: str = "sum",
                  keep_apart: Iterable[int] = ()) -> Combined:
    """Combine `stack` [(LoraWeights, strength)] with `mode` (see the module docstring); entries whose index is in
    `keep_apart`, or whose strength is 0, pass through untouched."""
    if mode not in COMBINE_MODES:
        raise ValueError(f"LoRA stack combine mode must be one of {COMBINE_MODES}, got {mode!r}")
    result = Combined(list(stack))
    if mode == "sum":
        return result
    kept = set(keep_apart)
    members = [i for i, (_, strength) in enumerate(stack) if i not in kept and strength != 0.0]
    if mode != "ties":
        members = _low_rank_only(stack, members, mode, result.notes)
    if len(members) < 2:
        return result
    combine_module = _TRANSFORMS[mode]
    new_modules: dict[int, dict[str, LoraModule]] = {i: {} for i in members}
    for path in _shared_paths(stack, members):
        group = [i for i in members if path in stack[i][0].modules]
        modules = [stack[i][0].modules[path] for i in group]
        if len({m.delta_shape() for m in modules}) > 1:
            continue  # LoRAs for different models: apply_loras' shape check names the culprit
        for i, module in zip(group, combine_module(modules, [stack[i][1] for i in group])):
            new_modules[i][path] = module
    for i in members:
        lora, strength = stack[i]
        changed = new_modules[i]
        if changed:
            modules = {path: changed.get(path, module) for path, module in lora.modules.items()}
            result.stack[i] = (replace(lora, modules=modules), strength)
            result.notes.setdefault(i, []).append(f"combined ({mode}) on {len(changed)} shared modules")
    return result


def _low_rank_only(stack, members: list[int], mode: str, notes: dict[int, list[str]]) -> list[int]:
    """The members whose every module is plain LoRA factors; the others are summed as they are, with a note."""
    usable = []
    for i in members:
        lora = stack[i][0]
        other = sorted({m.kind for m in lora.modules.values() if m.kind != "lora"})
        if other:
            notes.setdefault(i, []).append(
                f"{lora.name}: its {'/'.join(other)} modules are not low-rank factors, which the '{mode}' mode "
                f"cannot project; this LoRA is added as a plain sum")
        else:
            usable.append(i)
    return usable


def _shared_paths(stack, members: list[int]) -> list[str]:
    counts: dict[str, int] = {}
    for i in members:
        for path in stack[i][0].modules:
            counts[path] = counts.get(path, 0) + 1
    return [path for path, n in counts.items() if n > 1]


def _project_off(t: Tensor, others: list[Tensor], dim: int, share: float = 1.0) -> Tensor:
    """`t` minus `share` times its projection on the span of the others' columns (dim=1) or rows (dim=0), in fp32,
    returned in t's dtype (share 1: projected off that span)."""
    basis = torch.cat([o.detach().float() for o in others], dim=dim)
    if dim == 0:
        basis = basis.T
    q, r = torch.linalg.qr(basis)
    rank = int((r.diagonal().abs() > 1e-6 * r.diagonal().abs().max().clamp_min(1e-30)).sum())
    q = q[:, :rank]  # drop directions that are numerically dependent (e.g. two identical LoRAs)
    x = t.detach().float()
    x = x - share * (q @ (q.T @ x)) if dim == 1 else x - share * ((x @ q) @ q.T)
    return x.to(t.dtype)


def _orthogonal_out(modules: list[LoraModule], strengths: list[float], share: float = 1.0) -> list[LoraModule]:
    return [replace(m, up=_project_off(m.up, [o.up for j, o in enumerate(modules) if j != i], dim=1, share=share))
            for i, m in enumerate(modules)]


def _shared_once(modules: list[LoraModule], strengths: list[float]) -> list[LoraModule]:
    return _orthogonal_out(modules, strengths, share=1.0 - 1.0 / len(modules))


def _orthogonal_in(modules: list[LoraModule], strengths: list[float]) -> list[LoraModule]:
    return [replace(m, down=_project_off(m.down, [o.down for j, o in enumerate(modules) if j != i], dim=0))
            for i, m in enumerate(modules)]


def _ties(modules: list[LoraModule], strengths: list[float]) -> list[LoraModule]:
    """Per LoRA, its share of the TIES merge of the group, as a full fp32 delta per unit of its strength (the entry
    keeps its strength, so its modules that no other LoRA shares stay low rank)."""
    deltas = [m.weight_delta(s) for m, s in zip(modules, strengths)]
    trimmed = []
    for d in deltas:
        if d is None:
            trimmed.append(None)
            continue
        k = max(1, int(round(TIES_DENSITY * d.numel())))
        threshold = d.abs().flatten().kthvalue(d.numel() - k + 1).values
        trimmed.append(torch.where(d.abs() >= threshold, d, torch.zeros_like(d)))
    present = [t for t in trimmed if t is not None]
    sign = torch.sign(sum(present))
    agree = [None if t is None else (torch.sign(t) == sign) & (t != 0) for t in trimmed]
    count = sum(a.float() for a in agree if a is not None).clamp_min(1.0)
    out = []
    for m, s, t, a in zip(modules, strengths, trimmed, agree):
        diff = None if t is None else torch.where(a, t, torch.zeros_like(t)) / (count * s)
        out.append(LoraModule(kind="diff", diff=diff, diff_b=m.diff_b, keys=m.keys))
    return out


_TRANSFORMS = {"shared_once": _shared_once, "orthogonal": _orthogonal_out, "orthogonal_in": _orthogonal_in, "ties": _ties}
