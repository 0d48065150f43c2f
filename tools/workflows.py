"""The shipped workflows (workflows/*.json, UI format as the frontend saves it), generated from short definitions.

Widget values in the UI format are positional, so they are laid out from the node definitions ComfyUI itself
reports (`/object_info`): regenerate after any change to a node's inputs, and the workflow tests fail when a
shipped file no longer matches the nodes. Usage (writes workflows/*.json and their .jpg thumbnails):

    .venv/bin/python tools/workflows.py            # starts a headless ComfyUI to read /object_info
"""

from __future__ import annotations

import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"

PROMPT = ("a red fox sitting in fresh snow at golden hour, detailed fur, shallow depth of field, photograph")
MODEL_FILE = "z_image_turbo_bf16.safetensors"  # Comfy-Org/z_image_turbo split_files/diffusion_models
BASE_MODEL_FILE = "z_image_bf16.safetensors"  # Z-Image base: Comfy-Org/z_image split_files/diffusion_models
TEXT_ENCODER_FILE = "qwen_3_4b.safetensors"  # split_files/text_encoders, CLIPLoader type lumina2
VAE_FILE = "ae.safetensors"  # the Flux VAE, split_files/vae
# The DistillPatch (DiffSynth-Studio/Z-Image-Turbo-DistillPatch) under the names users have it: Comfy-Org's repackaged
# file (split_files/loras, what most ComfyUI users download; the workflows' default) and DiffSynth's own.
DISTILLPATCH_FILES = ("z_image_turbo_distill_patch_lora_bf16.safetensors",
                      "z-image_turbo_distillpatch_comfyui.safetensors")
DISTILLPATCH_FILE = DISTILLPATCH_FILES[0]
ADAPTER_FILE = "zimage_turbo_training_adapter_v2.safetensors"  # ostris/zimage_turbo_training_adapter
SFT_LORA_FILE = "zimage_turbo_sft.safetensors"  # what train_sft writes
STACK_LORA_FILES = ("zimage_character_lora.safetensors", "zimage_style_lora.safetensors")  # two LoRAs to stack
STACK_FIRST_END = 0.75  # the first (character / shape) LoRA's end of steps in the stacking workflow: on the toy
# world the shape LoRA on steps 0-0.75 drew "purple bar" in 81 % of samples, the plain sum in 12 % (lora-stacking.md)
DATASET = "zimage_dataset"  # a folder of images + captions under ComfyUI's input folder
CONTROLNET_FILE = "Z-Image-Turbo-Fun-Controlnet-Union-2.1-2602-8steps.safetensors"  # alibaba-pai, in model_patches
CONTROL_IMAGE = "zimage_control_example.png"  # in ComfyUI's input folder: a canny / depth / pose picture
INPAINT_IMAGE = "zimage_inpaint_example.png"  # in ComfyUI's input folder: the image, its mask in the alpha channel
DEMO_WORKFLOWS = ("zimage_turbo_t2i", "train_sft")  # what tools/demo.py queues, in order

_WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


@dataclass
class Node:
    id: int
    type: str
    widgets: dict = field(default_factory=dict)  # input name -> value (others take the node's default)
    links: dict = field(default_factory=dict)  # input name -> (source node id, output slot)
    col: int = 0
    row: int = 0
    title: str | None = None


@dataclass
class Workflow:
    name: str
    nodes: list[Node]
    note: str = ""


def _is_widget(spec) -> bool:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (isinstance(kind, list) or kind in _WIDGET_TYPES) and not options.get("forceInput")


def _inputs(info: dict):
    """(name, spec, optional) in the order the frontend lays out widgets and sockets."""
    order = info.get("input_order", {})
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in order.get(section, list(specs)):
            yield name, specs[name], section == "optional"


def _frontend_extras(name: str, spec) -> list:
    """The values of the widgets the frontend adds after an input's own widget (saved in widgets_values, never sent
    to the API): "control after generate" after seeds (when the node asks for one, and after every INT input named
    seed / noise_seed), and the upload button of image combos (LoadImage)."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options.get("control_after_generate") or (spec[0] == "INT" and name in ("seed", "noise_seed")):
        return ["fixed"]
    if options.get("image_upload"):
        return ["image"]
    return []


def combo_options(spec) -> list:
    """The choices of a combo input in /object_info (V1: a list as the type; V3: "COMBO" with "options")."""
    kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    return list(kind) if isinstance(kind, list) else list(options.get("options") or [])


def _default(spec):
    kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if "default" in options:
        return options["default"]
    if isinstance(kind, list) or kind == "COMBO":
        return (combo_options(spec) or [None])[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(kind)


def build(workflow: Workflow, object_info: dict) -> dict:
    """The UI-format JSON of `workflow`, widgets ordered as the node definitions in `object_info` say."""
    links, ui_nodes = [], []
    outgoing: dict[tuple[int, int], list[int]] = {}
    by_id = {n.id: n for n in workflow.nodes}
    for node in workflow.nodes:
        for name, (src, slot) in node.links.items():
            link_id = len(links) + 1
            links.append([link_id, src, slot, node.id, name])
            outgoing.setdefault((src, slot), []).append(link_id)
    for order, node in enumerate(workflow.nodes):
        info = object_info[node.type]
        unknown = set(node.widgets) | set(node.links)
        inputs, widgets = [], []
        for name, spec, optional in _inputs(info):
            unknown.discard(name)
            if _is_widget(spec) and name not in node.links:
                widgets.append(node.widgets.get(name, _default(spec)))
                widgets.extend(_frontend_extras(name, spec))
            elif not _is_widget(spec):
                link = next((l for l in links if l[3] == node.id and l[4] == name), None)
                if link is None and not optional:
                    raise ValueError(f"{workflow.name}: node {node.id} ({node.type}) input {name!r} is not connected")
                if link is not None:
                    inputs.append({"name": name, "type": spec[0] if isinstance(spec[0], str) else "COMBO",
                                   "link": link[0]})
        if unknown:
            raise ValueError(f"{workflow.name}: node {node.id} ({node.type}) has no inputs {sorted(unknown)}")
        outputs = [{"name": out_name, "type": out_type, "links": outgoing.get((node.id, slot), []),
                    "slot_index": slot}
                   for slot, (out_type, out_name) in enumerate(zip(info["output"], info["output_name"]))]
        entry = {"id": node.id, "type": node.type, "pos": [0, 0],  # placed below, once every size is known
                 "size": [360, 120 + 26 * len(widgets)], "flags": {}, "order": order, "mode": 0,
                 "inputs": inputs, "outputs": outputs,
                 "properties": {"Node name for S&R": node.type}, "widgets_values": widgets}
        if node.title:
            entry["title"] = node.title
        ui_nodes.append(entry)
    _place(ui_nodes, workflow.nodes)
    ui_links = []
    for link_id, src, slot, dst, name in links:
        dst_inputs = next(n for n in ui_nodes if n["id"] == dst)["inputs"]
        dst_slot = next(i for i, inp in enumerate(dst_inputs) if inp["name"] == name)
        ui_links.append([link_id, src, slot, dst, dst_slot, object_info[by_id[src].type]["output"][slot]])
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"zimage-turbo/{workflow.name}")), "revision": 0, "last_node_id": max(by_id), "last_link_id": len(links),
            "nodes": ui_nodes, "links": ui_links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.75, "offset": [70, 40]}, "zimage_turbo_note": workflow.note}, "version": 0.4}


def _place(entries: list[dict], nodes: list[Node]) -> None:
    """Put each node in its grid cell (col, row), pushed down where the node above it in the same column is taller
    than a cell (the trainer, the samplers), so that no node hides another."""
    columns: dict[int, list[tuple[int, dict]]] = {}
    for entry, node in zip(entries, nodes):
        columns.setdefault(node.col, []).append((node.row, entry))
    for col, cells in columns.items():
        free_from = 0
        for row, entry in sorted(cells, key=lambda cell: cell[0]):
            y = max(60 + 330 * row, free_from)
            entry["pos"] = [40 + 400 * col, y]
            free_from = y + entry["size"][1] + 60  # the title bar sits above pos: leave room for it


# ------------------------------------------------------------------------------------------------ definitions
def _text_to_image() -> list[Node]:
    return [
        Node(1, "CLIPLoader", {"clip_name": TEXT_ENCODER_FILE, "type": "lumina2"}, col=0, row=0),
        Node(2, "CLIPTextEncode", {"text": PROMPT}, {"clip": (1, 0)}, col=1, row=0, title="Prompt"),
        Node(3, "ZImageTurboModelLoader", {"model_name": MODEL_FILE}, col=0, row=1),
        Node(5, "VAELoader", {"vae_name": VAE_FILE}, col=0, row=3),
        Node(6, "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, col=0, row=2),
    ]


def definitions() -> list[Workflow]:
    t2i = Workflow("zimage_turbo_t2i", _text_to_image() + [
        Node(4, "ZImageTurboLoraStack", {"distillpatch": DISTILLPATCH_FILE, "distillpatch_strength": 1.0},
             {"model": (3, 0)}, col=1, row=1),
        Node(7, "ZImageTurboSampler", {"preset": "turbo", "seed": 42}, {"model": (4, 0), "positive": (2, 0),
                                                                         "latent_image": (6, 0)}, col=2, row=0),
        Node(8, "VAEDecode", {}, {"samples": (7, 0), "vae": (5, 0)}, col=3, row=0),
        Node(9, "SaveImage", {"filename_prefix": "zimage_turbo"}, {"images": (8, 0)}, col=4, row=0),
    ], note="Everyday Z-Image-Turbo: 8 steps, cfg 1. Put your LoRA in lora_1: with the DistillPatch on it stays "
            "sharp at 8 steps (scheme 4). Set distillpatch to None for plain Turbo.")
    quality = Workflow("zimage_turbo_quality_30step", _text_to_image() + [
        Node(4, "ZImageTurboLoraStack", {"lora_1": SFT_LORA_FILE, "strength_1": 1.0, "distillpatch": "None"},
             {"model": (3, 0)}, col=1, row=1),
        Node(10, "CLIPTextEncode", {"text": ""}, {"clip": (1, 0)}, col=1, row=2, title="Negative (empty)"),
        Node(7, "ZImageTurboSampler", {"preset": "quality", "steps": 30, "cfg": 2.0, "seed": 42},
             {"model": (4, 0), "positive": (2, 0), "negative": (10, 0), "latent_image": (6, 0)}, col=2, row=0),
        Node(8, "VAEDecode", {}, {"samples": (7, 0), "vae": (5, 0)}, col=3, row=0),
        Node(9, "SaveImage", {"filename_prefix": "zimage_quality"}, {"images": (8, 0)}, col=4, row=0),
    ], note="Scheme 1: an ordinary (SFT) LoRA without DistillPatch, sampled at 30 steps / cfg 2 with an empty "
            "negative prompt.")
    return [t2i, quality, _stacking(), _controlnet(), _inpaint(), _training("sft"), _training("differential"),
            _training("distill"), _train_base()]


def _stacking() -> Workflow:
    nodes = _text_to_image()
    nodes[-1].widgets["batch_size"] = 4  # four seeds side by side: what seed variety changes
    return Workflow("zimage_turbo_lora_stack_variety", nodes + [
        Node(4, "ZImageTurboLoraStack", {"lora_1": STACK_LORA_FILES[0], "strength_1": 1.0,
                                         "lora_2": STACK_LORA_FILES[1], "strength_2": 1.0,
                                         "distillpatch": DISTILLPATCH_FILE, "distillpatch_strength": 1.0,
                                         "end_1": STACK_FIRST_END}, {"model": (3, 0)}, col=1, row=1),
        Node(7, "ZImageTurboSampler", {"preset": "turbo", "seed": 42, "variety": 0.375,
                                       "variety_steps": 2, "variety_mode": "shift"},
             {"model": (4, 0), "positive": (2, 0), "latent_image": (6, 0)}, col=2, row=0),
        Node(8, "VAEDecode", {}, {"samples": (7, 0), "vae": (5, 0)}, col=3, row=0),
        Node(9, "SaveImage", {"filename_prefix": "zimage_stack"}, {"images": (8, 0)}, col=4, row=0),
    ], note=f"Two LoRAs stacked at full strength with the DistillPatch; the character LoRA acts on steps "
            f"0-{STACK_FIRST_END:g} only (LoRA stack end_1), so the style LoRA paints the last steps alone instead of "
            f"the two overwriting each other; and seed variety on in the sampler (variety_mode shift, "
            f"variety 0.375 over variety_steps 2: the half-formed latent is moved by up to 3/8 of the picture per step) "
            f"so the four seeds of the batch differ more. See docs/lora-stacking.md for what was measured.")



def _controlnet() -> Workflow:
    """Text-to-image guided by a Fun ControlNet Union 2.1 control image (8 steps, cfg 1, alibaba-pai's strength)."""
    return Workflow("zimage_turbo_controlnet", _text_to_image() + [
        Node(4, "ZImageTurboLoraStack", {"distillpatch": DISTILLPATCH_FILE, "distillpatch_strength": 1.0},
             {"model": (3, 0)}, col=1, row=1),
        Node(30, "ZImageTurboControlNetLoader", {"controlnet_name": CONTROLNET_FILE}, col=1, row=2),
        Node(31, "LoadImage", {"image": CONTROL_IMAGE}, col=1, row=3, title="Control image (canny / depth / pose)"),
        Node(32, "ZImageTurboApplyControlNet", {"strength": 0.9, "start": 0.0, "end": 1.0},
             {"controlnet": (30, 0), "vae": (5, 0), "image": (31, 0)}, col=2, row=2),
        Node(7, "ZImageTurboSampler", {"preset": "turbo", "seed": 42},
             {"model": (4, 0), "positive": (2, 0), "latent_image": (6, 0), "control": (32, 0)}, col=2, row=0),
        Node(8, "VAEDecode", {}, {"samples": (7, 0), "vae": (5, 0)}, col=3, row=0),
        Node(9, "SaveImage", {"filename_prefix": "zimage_controlnet"}, {"images": (8, 0)}, col=4, row=0),
    ], note="Fun ControlNet Union 2.1 (models/model_patches): the control image (a canny, HED, depth, pose or MLSD "
            "picture; any size, it is fitted to the latent) guides an 8-step / cfg-1 Turbo image. alibaba-pai use "
            "strength 0.9 for 2.1; lower it, or end the control earlier, to give the prompt more freedom. Chain "
            "another Apply ControlNet into its control input for a second condition.")


def _inpaint() -> Workflow:
    """Inpainting, two variants side by side on one image and mask: the plain noise mask (any Z-Image model, no
    ControlNet; top row) and the Fun ControlNet 2.1 inpaint mode (mask + masked image into the ControlNet; row 2)."""
    nodes = _text_to_image()[:3] + [
        Node(5, "VAELoader", {"vae_name": VAE_FILE}, col=0, row=2),
        Node(20, "LoadImage", {"image": INPAINT_IMAGE}, col=0, row=3, title="Image (paint the mask in MaskEditor)"),
        Node(21, "VAEEncode", {}, {"pixels": (20, 0), "vae": (5, 0)}, col=1, row=3),
        Node(22, "SetLatentNoiseMask", {}, {"samples": (21, 0), "mask": (20, 1)}, col=1, row=2,
             title="Noise mask: repaint only inside the mask"),
        Node(7, "ZImageTurboSampler", {"preset": "turbo", "seed": 42, "denoise": 1.0},
             {"model": (3, 0), "positive": (2, 0), "latent_image": (22, 0)}, col=2, row=0,
             title="Inpaint, 8 steps cfg 1"),
        Node(8, "VAEDecode", {}, {"samples": (7, 0), "vae": (5, 0)}, col=3, row=0),
        Node(9, "SaveImage", {"filename_prefix": "zimage_inpaint"}, {"images": (8, 0)}, col=4, row=0),
        Node(40, "ZImageTurboControlNetLoader", {"controlnet_name": CONTROLNET_FILE}, col=1, row=1),
        Node(41, "ZImageTurboApplyControlNet", {"strength": 0.9, "start": 0.0, "end": 1.0},
             {"controlnet": (40, 0), "vae": (5, 0), "inpaint_image": (20, 0), "mask": (20, 1)}, col=2, row=1,
             title="ControlNet inpaint mode (add a control image too, if you like)"),
        Node(42, "ZImageTurboSampler", {"preset": "turbo", "seed": 42, "denoise": 1.0},
             {"model": (3, 0), "positive": (2, 0), "latent_image": (21, 0), "control": (41, 0)}, col=3, row=1,
             title="ControlNet inpaint, 8 steps cfg 1"),
        Node(43, "VAEDecode", {}, {"samples": (42, 0), "vae": (5, 0)}, col=4, row=1),
        Node(44, "SaveImage", {"filename_prefix": "zimage_inpaint_controlnet"}, {"images": (43, 0)}, col=4, row=2),
    ]
    return Workflow("zimage_turbo_inpaint", nodes,
                    note="Inpainting: open the image in LoadImage's MaskEditor (right click) and paint what to "
                         "replace. Top: without ControlNet, SetLatentNoiseMask keeps everything outside the mask and "
                         "the Turbo sampler repaints inside it at 8 steps / cfg 1 exactly as KSampler inpaints; lower "
                         "denoise to keep more of what is under the mask. Second row: the Fun ControlNet 2.1 inpaint "
                         "mode (models/model_patches) redraws the whole picture from noise, guided by the masked "
                         "image, as alibaba-pai's pipeline does. Describe the whole picture in the prompt.")


def _train_base() -> Workflow:
    """Train on Z-Image base (sft), sample the LoRA on Turbo with the DistillPatch at 8 steps / cfg 1."""
    nodes = [n for n in _text_to_image() if n.id != 3] + [
        Node(3, "ZImageTurboModelLoader", {"model_name": BASE_MODEL_FILE, "variant": "auto"}, col=0, row=1,
             title="Z-Image base"),
        Node(11, "ZImageTurboTrainLora", {"dataset_folder": DATASET, "scheme": "sft", "learning_rate": 1e-4,
                                          "rank": 32, "seed": 0, "validation_prompt": PROMPT, "steps": 250,
                                          "output_name": "zimage_base_lora"},
             {"model": (3, 0), "clip": (1, 0), "vae": (5, 0)}, col=1, row=1),
        Node(12, "PreviewImage", {}, {"images": (11, 2)}, col=2, row=2, title="Loss curve"),
        Node(13, "PreviewImage", {}, {"images": (11, 3)}, col=3, row=2, title="Validation grid (on base)"),
        Node(20, "ZImageTurboModelLoader", {"model_name": MODEL_FILE}, col=0, row=2, title="Z-Image-Turbo"),
        Node(21, "ZImageTurboLoraStack", {"distillpatch": DISTILLPATCH_FILE, "distillpatch_strength": 1.0},
             {"model": (20, 0), "loras_from": (11, 0)}, col=1, row=2, title="Base LoRA + DistillPatch on Turbo"),
        Node(7, "ZImageTurboSampler", {"preset": "turbo", "seed": 42},
             {"model": (20, 0), "positive": (2, 0), "latent_image": (6, 0)}, col=2, row=0,
             title="Turbo, no LoRA, 8 steps cfg 1"),
        Node(8, "VAEDecode", {}, {"samples": (7, 0), "vae": (5, 0)}, col=3, row=0),
        Node(9, "SaveImage", {"filename_prefix": "zimage_turbo"}, {"images": (8, 0)}, col=4, row=0),
        Node(14, "ZImageTurboSampler", {"preset": "turbo", "seed": 42},
             {"model": (21, 0), "positive": (2, 0), "latent_image": (6, 0)}, col=2, row=1,
             title="Base LoRA on Turbo + DistillPatch, 8 steps cfg 1"),
        Node(15, "VAEDecode", {}, {"samples": (14, 0), "vae": (5, 0)}, col=3, row=1),
        Node(16, "SaveImage", {"filename_prefix": "zimage_base_lora_on_turbo"}, {"images": (15, 0)}, col=4, row=1),
    ]
    return Workflow("train_base_sample_turbo", nodes,
                    note="Train an ordinary (SFT) LoRA on Z-Image base (z_image_bf16.safetensors, recognised by the "
                         "loader), then use it on Z-Image-Turbo with the DistillPatch at 8 steps / cfg 1: the LoRA "
                         "stack's loras_from takes the trained LoRA from the trainer's model output. The validation "
                         "grid shows the LoRA on base at 8 steps / cfg 1 and at the base recipe (50 steps, cfg 4).")


_TRAINING = {  # scheme -> (workflow name, trainer widgets, note)
    "sft": ("train_sft", {"output_name": SFT_LORA_FILE[:-12], "steps": 250},
            "Scheme 1/4 training: an ordinary LoRA (5 epochs x 50 repeats of a one-image dataset, as DiffSynth's "
            "example). Sample it at 30 steps / cfg 2 (zimage_turbo_quality_30step) or with the DistillPatch at "
            "8 steps / cfg 1 (zimage_turbo_t2i); the 8-step sample here shows the blur plain SFT causes."),
    "differential": ("train_differential", {"preset_lora": ADAPTER_FILE, "output_name": "zimage_turbo_differential",
                                            "steps": 250},
                     "Scheme 2: train through the frozen turbo training adapter; the exported LoRA is used alone "
                     "at 8 steps / cfg 1."),
    "distill": ("train_distill", {"sft_lora": SFT_LORA_FILE, "output_name": "zimage_turbo_distilled", "steps": 20},
                "Scheme 3: trajectory imitation. The SFT LoRA (from train_sft) learns to reach its own 50-step / "
                "cfg-2 result in 8 steps at cfg 1 (DiffSynth's recipe validates after 20 steps)."),
}


def _training(scheme: str) -> Workflow:
    name, trainer_widgets, note = _TRAINING[scheme]
    nodes = _text_to_image() + [
        Node(11, "ZImageTurboTrainLora", {"dataset_folder": DATASET, "scheme": scheme, "learning_rate": 1e-4,
                                          "rank": 32, "seed": 0, "validation_prompt": PROMPT, **trainer_widgets},
             {"model": (3, 0), "clip": (1, 0), "vae": (5, 0)}, col=1, row=1),
        Node(12, "PreviewImage", {}, {"images": (11, 2)}, col=2, row=2, title="Loss curve"),
        Node(13, "PreviewImage", {}, {"images": (11, 3)}, col=3, row=2, title="Validation grid"),
        Node(7, "ZImageTurboSampler", {"preset": "turbo", "seed": 42},
             {"model": (3, 0), "positive": (2, 0), "latent_image": (6, 0)}, col=2, row=0, title="Base, 8 steps cfg 1"),
        Node(8, "VAEDecode", {}, {"samples": (7, 0), "vae": (5, 0)}, col=3, row=0),
        Node(9, "SaveImage", {"filename_prefix": "zimage_base"}, {"images": (8, 0)}, col=4, row=0),
        Node(14, "ZImageTurboSampler", {"preset": "turbo", "seed": 42},
             {"model": (11, 0), "positive": (2, 0), "latent_image": (6, 0)}, col=2, row=1,
             title="Trained LoRA, 8 steps cfg 1"),
        Node(15, "VAEDecode", {}, {"samples": (14, 0), "vae": (5, 0)}, col=3, row=1),
        Node(16, "SaveImage", {"filename_prefix": f"zimage_{scheme}"}, {"images": (15, 0)}, col=4, row=1),
    ]
    return Workflow(name, nodes, note=note)


def object_info_from_server() -> dict:
    sys.path.insert(0, str(ROOT / "tools"))
    import tempfile

    from comfy_host import ComfyServer, make_base_dir

    base = make_base_dir(tempfile.mkdtemp(prefix="zimage-workflows-"))
    with ComfyServer(base) as server:
        return server.get_json("/object_info")


def main():
    info = object_info_from_server()
    WORKFLOWS.mkdir(exist_ok=True)
    for workflow in definitions():
        path = WORKFLOWS / f"{workflow.name}.json"
        path.write_text(json.dumps(build(workflow, info), indent=1) + "\n")
        print("wrote", path)


if __name__ == "__main__":
    main()


def use_available_distillpatch(prompt: dict, loras) -> dict:
    """An API prompt whose DistillPatch names another known name of the DistillPatch when the default is not among
    `loras` (the loras folder's files) and another is, so the workflows run with either download."""
    have = [name for name in DISTILLPATCH_FILES if name in set(loras)]
    swapped = json.loads(json.dumps(prompt))
    for node in swapped.values():
        if node["inputs"].get("distillpatch") in DISTILLPATCH_FILES and node["inputs"]["distillpatch"] not in have \
                and have:
            node["inputs"]["distillpatch"] = have[0]
    return swapped


def swap_text_encoder(prompt: dict, model_width: int) -> dict:
    """An API prompt whose CLIPLoader nodes are replaced by the demo text encoder (hashed word vectors of the
    tiny model's caption width): for running workflows on the embedded tiny model, which no real Qwen3-4B fits.
    Everything else, CLIPTextEncode included, stays as shipped."""
    swapped = json.loads(json.dumps(prompt))
    for node in swapped.values():
        if node["class_type"] == "CLIPLoader":
            node["class_type"] = "ZImageTurboDemoTextEncoder"
            node["inputs"] = {"width": model_width}
    return swapped


def to_api(workflow: dict, object_info: dict) -> dict:
    """UI -> API format offline, for the flat graphs this pack ships (no subgraphs, reroutes or bypassed nodes):
    widget values are read back with the same layout rules `build` writes them with. The workflow tests check that
    the result equals the frontend's own `app.graphToPrompt()`."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) != 0:
            raise ValueError(f"node {node['id']} ({node['type']}) is muted or bypassed; only flat graphs convert")
        info = object_info[node["type"]]
        values = iter(node.get("widgets_values") or [])
        inputs = {}
        for name, spec, _optional in _inputs(info):
            if _is_widget(spec):
                inputs[name] = next(values)
                for _ in _frontend_extras(name, spec):
                    next(values)  # frontend-only widgets
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                link = links[socket["link"]]
                inputs[socket["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
