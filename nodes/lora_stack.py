"""ZImageTurboLoraStack: LoRAs from models/loras plus a dedicated DistillPatch slot on a ZIMAGE_MODEL."""

from __future__ import annotations

from typing_extensions import override

import folder_paths
from comfy_api.latest import io, ui
from server import PromptServer

from ..zimage_core.scheduler import StepRange
from .lora_cache import load_cached, summarize
from .metadata import search_aliases
from .types import ROLE_DISTILLPATCH, ROLE_LORA, ZIMAGE_MODEL, LoraSpec, ZImageModel

NONE = "None"
SLOTS = 3
# The combine modes the node offers (docs/lora-stacking.md). zimage_core also has orthogonal_in and ties, measured as
# candidates: neither did better, and ties builds a full-size delta per LoRA and layer (tens of GB at real size).
COMBINE_OPTIONS = ("sum", "shared_once", "orthogonal")


def lora_options() -> list[str]:
    return [NONE] + folder_paths.get_filename_list("loras")


def default_distillpatch(options: list[str]) -> str:
    """The DistillPatch file users usually have (e.g. z-image_turbo_distillpatch_comfyui.safetensors), if present."""
    return next((o for o in options if "distillpatch" in o.lower().replace("_", "").replace("-", "")), NONE)


def check_lora_choices(**choices) -> bool | str:
    """validate_inputs helper: every chosen LoRA (not None) must exist in the loras folder."""
    options = set(lora_options())
    missing = [f"{slot} '{name}'" for slot, name in choices.items() if name not in options]
    if missing:
        return (f"LoRA not found in the loras folder ({', '.join(folder_paths.get_folder_paths('loras'))}): "
                + ", ".join(missing))
    return True


def spec_for(name: str, strength: float, role: str, start: float = 0.0, end: float = 1.0) -> LoraSpec:
    try:
        path = folder_paths.get_full_path_or_raise("loras", name)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"LoRA '{name}' not found in the loras folder "
                                f"({', '.join(folder_paths.get_folder_paths('loras'))})") from e
    return LoraSpec.from_file(path, name, strength, role, start, end)


class ZImageTurboLoraStack(io.ComfyNode):
    @classmethod
    @override
    def define_schema(cls) -> io.Schema:
        options = lora_options()
        inputs = [ZIMAGE_MODEL.Input("model", tooltip="Z-Image model, from the loader or another LoRA stack (its "
                                                      "LoRAs are kept: chain stacks to use any number of LoRAs).")]
        for i in range(1, SLOTS + 1):
            inputs += [
                io.Combo.Input(f"lora_{i}", options=options, default=NONE,
                               tooltip=f"LoRA {i} from models/loras (any trainer format zimage_core detects); "
                                       f"None = empty slot."),
                io.Float.Input(f"strength_{i}", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip=f"Strength of LoRA {i}; 0 skips it."),
            ]
        inputs += [
            io.Combo.Input("distillpatch", options=options, default=default_distillpatch(options),
                           tooltip="DistillPatch LoRA (restores 8-step Turbo sharpness on top of SFT LoRAs), from "
                                   "models/loras; None = off."),
            io.Float.Input("distillpatch_strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                           tooltip="Strength of the DistillPatch (1.0 is what it was trained for)."),
            ZIMAGE_MODEL.Input("loras_from", optional=True,
                               tooltip="Optional: another model wire whose LoRAs (not its DistillPatch) are applied "
                                       "here too, e.g. the trainer's output, to sample a LoRA trained on Z-Image "
                                       "base on Turbo with the DistillPatch."),
            io.Boolean.Input("strict", default=False, optional=True,
                             tooltip="On: refuse a LoRA that also carries text-encoder keys. Off: apply its "
                                     "transformer part and list the text-encoder keys in the report (apply those "
                                     "with ComfyUI's LoraLoader on the CLIP). Keys that fit no part of Z-Image are "
                                     "refused either way."),
            io.Combo.Input("combine", options=list(COMBINE_OPTIONS), default="sum", optional=True,
                           tooltip="How the LoRAs of the stack (this node's and the incoming ones) combine; the "
                                   "DistillPatch is never combined. sum: plain sum (classic). shared_once: what "
                                   "several LoRAs change in common (e.g. the blur every SFT LoRA brings) counts "
                                   "once instead of once per LoRA. orthogonal: where LoRAs patch the same layer, "
                                   "each one's output directions are made orthogonal to the others', so they stop "
                                   "writing over each other; it kept other prompts best in our tests, at some cost "
                                   "to the combined prompt. The last LoRA stack node of a chain decides. A LoKr / "
                                   "LoHa LoRA is added as a plain sum, and the report says so."),
        ]
        for i in range(1, SLOTS + 1):  # appended last, so workflows saved before keep their widget values
            inputs += [
                io.Float.Input(f"start_{i}", default=0.0, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip=f"LoRA {i} acts from this share of the sampling steps (0 = the first step). "
                                       f"Giving stacked LoRAs their own steps keeps them from overwriting each "
                                       f"other: e.g. a shape or character LoRA on 0-0.75 and a colour or style LoRA "
                                       f"on every step (toy world: 81 % drawn as prompted, plain sum 12 %; "
                                       f"docs/lora-stacking.md). Step i of n is on when start <= i/n and "
                                       f"(i+1)/n <= end. Z-Image Turbo Sampler only."),
                io.Float.Input(f"end_{i}", default=1.0, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip=f"LoRA {i} acts up to this share of the sampling steps (1 = the last step). "
                                       f"0 / 1 = every step, as a plain LoRA."),
            ]
        return io.Schema(
            node_id="ZImageTurboLoraStack",
            display_name="Z-Image Turbo LoRA Stack",
            category="ZImageTurbo",
            **search_aliases("lora", "lora loader", "lora stack", "distillpatch", "distill patch"),
            description="Applies up to three LoRAs and a DistillPatch to a Z-Image model (chain nodes for more). "
                        "The node shows what each LoRA matched: detected format, modules patched, keys left. A LoRA "
                        "whose keys do not match this model is an error naming the file, never a silent no-op. "
                        "Switching LoRAs between runs restores the base weights exactly.",
            inputs=inputs,
            outputs=[ZIMAGE_MODEL.Output("zimage_model", display_name="model",
                                         tooltip="The model with this stack (and the incoming one) applied.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    @override
    def validate_inputs(cls, lora_1, lora_2, lora_3, distillpatch):
        return check_lora_choices(lora_1=lora_1, lora_2=lora_2, lora_3=lora_3, distillpatch=distillpatch)

    @classmethod
    @override
    def execute(cls, model: ZImageModel, lora_1, strength_1, lora_2, strength_2, lora_3, strength_3,
                distillpatch, distillpatch_strength, loras_from: ZImageModel | None = None,
                strict=False, combine="sum", start_1=0.0, end_1=1.0, start_2=0.0, end_2=1.0, start_3=0.0,
                end_3=1.0) -> io.NodeOutput:
        # LoRAs of another wire (not its DistillPatch, nor what this wire already carries)
        specs = [s for s in loras_from.loras if s.role != ROLE_DISTILLPATCH and s not in model.loras] \
            if loras_from is not None else []
        slots = ((lora_1, strength_1, start_1, end_1), (lora_2, strength_2, start_2, end_2),
                 (lora_3, strength_3, start_3, end_3))
        for i, (name, strength, start, end) in enumerate(slots, 1):
            if name != NONE and strength != 0:
                try:
                    StepRange(start, end)
                except ValueError as e:
                    raise ValueError(f"lora_{i} '{name}': start_{i} {start:g} / end_{i} {end:g}: {e} (shares of "
                                     f"the sampling steps)") from None
                specs.append(spec_for(name, strength, ROLE_LORA, start, end))
        if distillpatch != NONE and distillpatch_strength != 0:
            if any(s.role == ROLE_DISTILLPATCH for s in model.loras):
                raise ValueError(f"the incoming model already has a DistillPatch; '{distillpatch}' would apply it "
                                 f"twice: set distillpatch to None on one of the chained LoRA stacks")
            specs.append(spec_for(distillpatch, distillpatch_strength, ROLE_DISTILLPATCH))
        if strict:
            for spec in specs:
                te_keys = load_cached(spec).text_encoder
                if te_keys:
                    raise ValueError(f"LoRA '{spec.name}' also trains the text encoder ({len(te_keys)} keys, first: "
                                     f"{te_keys[:3]}), which this node cannot apply; strict is on, so it is refused. "
                                     f"Turn strict off to apply its transformer part alone")
        out = model.with_loras(*specs, combine=combine)
        reports = out.activate()
        lines = [summarize(spec, report) for spec, report in zip(out.loras, reports)] or ["no LoRA applied"]
        if combine != "sum" and out.loras:
            lines.insert(0, f"combine: {combine} (DistillPatch kept apart)")
        text = "\n".join(lines)
        if cls.hidden.unique_id is not None and PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, cls.hidden.unique_id)
        return io.NodeOutput(out, ui=ui.PreviewText(text))
