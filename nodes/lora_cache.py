"""Bridge to zimage_core's LoRA engine: a small module-level cache of parsed LoRA files (by path and mtime) and the
call that merges a stack. No LoRA logic lives here; formats, key matching and restore are the engine's."""

from __future__ import annotations

from collections import OrderedDict

from ..zimage_core import lora as lora_engine
from .lora_spec import ROLE_DISTILLPATCH, LoraSpec

_MAX_CACHED = 6
_NAMED_KEYS = 5  # text-encoder keys listed by name in the node's report
_cache: OrderedDict[tuple[str, float], object] = OrderedDict()


def load_cached(spec: LoraSpec):
    """The engine's parsed `LoraWeights` for a file; parsed once per (path, mtime)."""
    key = (spec.path, spec.mtime)
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    weights = lora_engine.load_lora(spec.path)
    _cache[key] = weights
    while len(_cache) > _MAX_CACHED:
        _cache.popitem(last=False)
    return weights


def apply_stack(transformer, specs: tuple[LoraSpec, ...], combine: str = "sum"):
    """Merge `specs` into `transformer`, combined with `combine` (the DistillPatch kept apart; a LoRA with a step range
    as side branches that `handle.schedule` switches per step); returns (handle, reports). Unmatched keys raise the
    engine's LoraError (naming file, format and keys); a LoRA that patches nothing is an error too, never a silent
    no-op. Text-encoder keys are left out and named in the reports (the stack node refuses them first when its `strict`
    is on)."""
    handle = lora_engine.apply_loras(transformer, [(load_cached(s), s.strength) for s in specs],
                                     mode="merge", strict=True, skip_text_encoder=True, combine=combine,
                                     keep_apart={i for i, s in enumerate(specs) if s.role == ROLE_DISTILLPATCH},
                                     step_ranges={i: s.step_range for i, s in enumerate(specs) if s.ranged})
    for spec, report in zip(specs, handle.reports):
        if report.matched == 0:
            handle.remove()
            raise lora_engine.LoraError(f"LoRA '{spec.name}' ({report.format}) matched no module of this Z-Image "
                                        f"model: it is probably for another model")
    return handle, list(handle.reports)


def summarize(spec: LoraSpec, report) -> str:
    """One UI line per LoRA: detected format, modules patched, keys left unmatched, keys skipped (no effect), and the
    text-encoder keys not applied, by name."""
    role = " [DistillPatch]" if spec.role == ROLE_DISTILLPATCH else ""
    steps = f" on steps {spec.start:g}-{spec.end:g} of the sampling" if spec.ranged else ""
    text = (f"{spec.name}{role} @ {spec.strength:g}{steps}: format {report.format}, {report.matched} modules "
            f"patched, {len(report.unmatched)} keys left")
    if report.redundant:
        text += f", {len(report.redundant)} keys without effect skipped"
    if report.text_encoder:
        names = ", ".join(report.text_encoder[:_NAMED_KEYS]) + (", ..." if len(report.text_encoder) > _NAMED_KEYS
                                                                else "")
        text += (f"\n  text encoder NOT applied by this node ({len(report.text_encoder)} keys: {names}); use "
                 f"ComfyUI's LoraLoader on the CLIP for those")
    for note in report.notes:
        text += f"\n  {note}"
    return text
