"""The main job, end to end: a real ComfyUI with this pack runs Z-Image workflows over HTTP on 127.0.0.1.

Without arguments it runs the toy world (toyworld/: a 1.9 M-parameter Z-Image-architecture model this project
trained to draw coloured shapes, distilled to 8 steps / cfg 1, with a DistillPatch) inside ComfyUI. The pack's
loader loads the toy turbo model and the LoRA stack its DistillPatch from a private models folder; the demo nodes
stand in for Qwen3-4B (the toy world's word-vector captions) and the Flux VAE (its linear VAE). Four workflows of
the shipped workflows' shape are queued, and written to the output folder as UI-format JSON you can open in ComfyUI:

1. toyworld_t2i: text to image at 8 steps / cfg 1 with the DistillPatch in the stack, for base prompts and for
   "purple circle", a colour the model never saw.
2. toyworld_t2i_bar: the new shape "bar" with the toy world's shipped bar LoRA (scheme 1's SFT LoRA) in lora_1 and
   the DistillPatch: scheme 4, 8 steps / cfg 1.
3. toyworld_train_purple: the trainer node learns the new colour "purple" (scheme sft, DiffSynth's recipe as the toy
   world uses it: 5 epochs x 50 repeats of a three-image dataset, rank 16, lr 5e-4) and draws its loss curve,
   validation grid and turbo check.
4. toyworld_t2i_purple: the shipped t2i shape again with the new LoRA in lora_1 and the DistillPatch (scheme 4).

It prints what each picture shows (the toy world's classifier names each sample's colour and shape), the loss and
the turbo check, and writes every image plus a summary sheet. With `--models DIR` (a ComfyUI models folder holding
z_image_turbo_bf16.safetensors, qwen_3_4b.safetensors, ae.safetensors and a DistillPatch) it runs the shipped
workflows on the real files instead (a GPU is strongly advised).

    tools/demo.sh [--models ~/ComfyUI/models] [--out out/demo]
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

import workflows as wf  # noqa: E402
from comfy_host import ComfyServer, make_base_dir, write_dataset  # noqa: E402
from workflows import Node, Workflow  # noqa: E402

MODEL_FOLDERS = ("diffusion_models", "text_encoders", "vae", "loras")

# ------------------------------------------------------------------------------------------ the toy world's files
TOY_MODEL = "zimage_toyworld_turbo.safetensors"  # toyworld/weights/turbo.safetensors (bf16, diffusers layout)
TOY_DISTILLPATCH = "zimage_toyworld_distillpatch.safetensors"  # toyworld/weights/distill_patch (DiffSynth keys)
TOY_BAR_LORA = "zimage_toyworld_bar_sft.safetensors"  # toyworld/weights/lora_sft (the new shape "bar", scheme 1)
TOY_DATASET = "toyworld_purple"  # in ComfyUI's input folder: purple shapes with .txt captions
TOY_LORA = "zimage_toyworld_purple"  # what the trainer writes into models/loras
BASE_PROMPTS = ("red circle", "green square", "blue triangle", "yellow square", "purple circle")
PURPLE_PROMPTS = ("purple circle", "purple square", "purple triangle", "red circle")
BAR_PROMPTS = ("red bar", "green bar", "blue bar", "yellow square")
SAMPLES = 4  # images per prompt (one latent batch, KSampler's noise)
# a purple circle, square and triangle: from one purple circle the LoRA drew 3 of 12 purple prompts as prompted on
# the round-3 turbo (squares as circles, triangles in other colours), from these three 10 of 12 (53 s of training)
TRAIN_IMAGES = 3
TRAIN_STEPS = 5 * 50 * TRAIN_IMAGES  # DiffSynth's example: 5 epochs x 50 repeats, batch 1 (750 steps)
# validation: the three purple prompts (one line each), so the turbo check compares three samples, not one
# No output preservation here: from one "purple circle" it keeps "purple" to that caption (measured: "purple
# triangle" drawn red in 4 of 4, 3 of 12 purple prompts as prompted against 6 of 12 without it).
TRAIN_SETTINGS = {"scheme": "sft", "learning_rate": 5e-4, "rank": 16, "seed": 0,
                  "validation_prompt": "purple circle\npurple square\npurple triangle"}


def place_toy_world(base: Path, train_images: int = TRAIN_IMAGES) -> None:
    """The toy world's turbo model, bar LoRA and DistillPatch in BASE/models, its purple training set in
    BASE/input."""
    import torch
    from toyworld import WEIGHTS, build, world

    models = base / "models"
    for source, target in ((WEIGHTS / "turbo.safetensors", models / "diffusion_models" / TOY_MODEL),
                           (WEIGHTS / "distill_patch.safetensors", models / "loras" / TOY_DISTILLPATCH),
                           (WEIGHTS / "lora_sft.safetensors", models / "loras" / TOY_BAR_LORA)):
        if not source.is_file():
            raise FileNotFoundError(f"{source} is missing: the toy world ships in toyworld/weights "
                                    "(rebuild with python -m toyworld.build)")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    shapes = world.concept_prompts("purple")
    prompts = [shapes[i % len(shapes)] for i in range(train_images)]
    # the same renderings (seed 31) the toy world's own purple LoRAs were trained on (toyworld.build)
    build.write_dataset(base / "input" / TOY_DATASET, world.prompt_batch(prompts, torch.Generator().manual_seed(31)),
                        prompts)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _toy_inputs() -> list[Node]:
    """Loader, demo text encoder and VAE, the empty latent (8 px per cell in EmptySD3LatentImage's count: 128 ->
    the toy world's 16x16 latent, a 32x32 image)."""
    return [
        Node(3, "ZImageTurboModelLoader", {"model_name": TOY_MODEL, "weight_dtype": "fp32"}, col=0, row=1),
        Node(1, "ZImageTurboDemoTextEncoder", {}, {"model": (3, 0)}, col=0, row=0, title="Demo text encoder (toy)"),
        Node(5, "ZImageTurboDemoVAE", {}, col=0, row=3, title="Demo VAE (toy)"),
        Node(6, "EmptySD3LatentImage", {"width": 128, "height": 128, "batch_size": SAMPLES}, col=0, row=2),
    ]


def toy_t2i(name: str, prompts, lora: str | None = None) -> Workflow:
    """zimage_turbo_t2i's shape: loader -> LoRA stack (lora_1 + DistillPatch) -> one Turbo sampler per prompt."""
    nodes = _toy_inputs() + [
        Node(4, "ZImageTurboLoraStack", {"lora_1": lora or "None", "strength_1": 1.0, "distillpatch": TOY_DISTILLPATCH,
                                         "distillpatch_strength": 1.0}, {"model": (3, 0)}, col=1, row=1)]
    for i, prompt in enumerate(prompts):
        k = 10 + 4 * i
        nodes += [
            Node(k, "CLIPTextEncode", {"text": prompt}, {"clip": (1, 0)}, col=2, row=i, title=f"Prompt: {prompt}"),
            Node(k + 1, "ZImageTurboSampler", {"preset": "turbo", "seed": 42},
                 {"model": (4, 0), "positive": (k, 0), "latent_image": (6, 0)}, col=3, row=i),
            Node(k + 2, "VAEDecode", {}, {"samples": (k + 1, 0), "vae": (5, 0)}, col=4, row=i),
            Node(k + 3, "SaveImage", {"filename_prefix": f"{name}_{_slug(prompt)}"}, {"images": (k + 2, 0)},
                 col=5, row=i, title=prompt),
        ]
    lora_note = f" with {lora} in lora_1" if lora else ""
    return Workflow(name, nodes, note=f"Toy world (demo only): 8 steps / cfg 1{lora_note} and the DistillPatch.")


def toy_train(steps: int = TRAIN_STEPS) -> Workflow:
    """train_sft's shape: the trainer learns "purple" through the LoRA stack (whose DistillPatch joins only the
    validation grid), previews its loss curve and validation grid."""
    return Workflow("toyworld_train_purple", _toy_inputs() + [
        Node(4, "ZImageTurboLoraStack", {"distillpatch": TOY_DISTILLPATCH, "distillpatch_strength": 1.0},
             {"model": (3, 0)}, col=1, row=1),
        Node(11, "ZImageTurboTrainLora", {"dataset_folder": TOY_DATASET, "steps": steps, "output_name": TOY_LORA,
                                          **TRAIN_SETTINGS},
             {"model": (4, 0), "clip": (1, 0), "vae": (5, 0)}, col=2, row=0),
        Node(12, "PreviewImage", {}, {"images": (11, 2)}, col=3, row=0, title="Loss curve"),
        Node(13, "PreviewImage", {}, {"images": (11, 3)}, col=3, row=1, title="Validation grid"),
    ], note="Toy world (demo only): scheme sft on a purple circle, square and triangle, DiffSynth's 5 epochs x 50 "
            "repeats.")


def toy_workflows(steps: int = TRAIN_STEPS) -> list[Workflow]:
    return [toy_t2i("toyworld_t2i", BASE_PROMPTS), toy_t2i("toyworld_t2i_bar", BAR_PROMPTS, lora=TOY_BAR_LORA),
            toy_train(steps), toy_t2i("toyworld_t2i_purple", PURPLE_PROMPTS, lora=f"{TOY_LORA}.safetensors")]


# ------------------------------------------------------------------------------------------ reading the results
def classify_png(data: bytes) -> tuple[str, str]:
    """(colour, shape) the toy world's classifier reads in a 32x32 PNG."""
    import numpy as np
    import torch
    from PIL import Image
    from toyworld.metrics import classify

    with Image.open(io.BytesIO(data)) as im:
        pixels = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)
    return classify(pixels.permute(2, 0, 1)[None])[0]


def training_report(base: Path) -> dict:
    """The trainer's <name>.report.json (steps, losses, turbo check) from the ComfyUI output folder."""
    path = base / "output" / "zimage_training" / TOY_LORA / f"{TOY_LORA}.report.json"
    return json.loads(path.read_text())


def loss_fall(losses: list[float]) -> tuple[float, float]:
    """Mean loss of the first and the last tenth of the steps."""
    n = max(1, len(losses) // 10)
    return sum(losses[:n]) / n, sum(losses[-n:]) / n


def summary_sheet(rows: list[tuple[str, list[bytes]]], path: Path) -> Path:
    from PIL import Image
    from zimage_core.training.report import grid_png

    images = [(label, [Image.open(io.BytesIO(d)).convert("RGB") for d in pngs]) for label, pngs in rows]
    return grid_png(images, [f"sample {i + 1}" for i in range(SAMPLES)], path, cell=112)


# ------------------------------------------------------------------------------------------ running
def run_prompt(server: ComfyServer, name: str, prompt: dict, titles: dict, out: Path, timeout: float) -> dict:
    """Queue one API prompt, wait, save every output image as out/<workflow>__<node title>__<file>. Returns
    {node title: [png bytes]}."""
    start = time.time()
    entry = server.wait(server.submit(prompt, client_id="zimage-demo"), timeout=timeout)
    if entry["status"]["status_str"] != "success":
        errors = [m for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
        raise RuntimeError(f"workflow {name} failed: {errors[-1][1].get('exception_message') if errors else entry}")
    saved: dict[str, list[bytes]] = {}
    for node_id, node_out in entry["outputs"].items():
        title = titles.get(node_id, node_id)
        for image in node_out.get("images", []):
            data = server.view(image)
            (out / f"{name}__{_slug(title)}__{image['filename']}").write_bytes(data)
            saved.setdefault(title, []).append(data)
    print(f"  {name}: {sum(map(len, saved.values()))} image(s) in {time.time() - start:.1f} s")
    return saved


def _titles(ui: dict) -> dict:
    return {str(n["id"]): n.get("title") or n["type"] for n in ui["nodes"]}


def run_toy_world_in_comfyui(server: ComfyServer, out: Path, timeout: float, steps: int = TRAIN_STEPS) -> dict:
    from zimage_core.training.turbo_check import format_check

    object_info = server.get_json("/object_info")
    (out / "workflows").mkdir(exist_ok=True)
    results, sheet_rows, summary = {}, [], {"samples": {}}
    for workflow in toy_workflows(steps):
        ui = wf.build(workflow, object_info)
        (out / "workflows" / f"{workflow.name}.json").write_text(json.dumps(ui, indent=1) + "\n")
        results[workflow.name] = run_prompt(server, workflow.name, wf.to_api(ui, object_info), _titles(ui), out,
                                            timeout)
    for name, prompts, lora in (("toyworld_t2i", BASE_PROMPTS, "turbo + DistillPatch"),
                                ("toyworld_t2i_bar", BAR_PROMPTS, "+ shipped bar LoRA + DistillPatch"),
                                ("toyworld_t2i_purple", PURPLE_PROMPTS, "+ trained LoRA + DistillPatch")):
        for prompt in prompts:
            pngs = results[name][prompt]
            seen = [classify_png(p) for p in pngs]
            hits = sum(s == tuple(prompt.split()) for s in seen)
            summary["samples"][f"{name}: {prompt}"] = {"drawn": [" ".join(s) for s in seen], "as_prompted": hits}
            sheet_rows.append((f"{prompt} ({lora}): {hits}/{len(pngs)} as prompted", pngs))
            print(f"    {prompt:16s} {lora:30s} drawn as: {', '.join(' '.join(s) for s in seen)}")
    report = training_report(server.base_dir)
    first, last = loss_fall(report["losses"])
    summary.update(steps=report["steps"], loss_first_tenth=first, loss_last_tenth=last,
                   turbo_check=report["turbo_check"], turbo_check_detail=report.get("turbo_check_detail", {}),
                   turbo_check_meaning=report.get("turbo_check_meaning", ""))
    print(f"  training: {report['steps']} steps, mean loss {first:.4f} (first tenth) -> {last:.4f} (last tenth)")
    print(f"  {summary['turbo_check_meaning']}\n    " + format_check(summary["turbo_check_detail"]))
    work = server.base_dir / "output" / "zimage_training" / TOY_LORA
    scores = ", ".join(f"{k} {v:.2f}" for k, v in report["turbo_check"].items())
    sheet_rows.append((f"trainer: loss {first:.3f} -> {last:.3f}; turbo check (higher keeps the Turbo): {scores}",
                       [(work / f"{TOY_LORA}{suffix}").read_bytes() for suffix in (".loss.png", ".grid.png")]))
    summary_sheet(sheet_rows, out / "toyworld_comfyui_summary.png")
    (out / "toyworld_comfyui_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def place_real_models(base: Path, real_models: Path) -> bool:
    """Symlink the model folders of a ComfyUI install. Returns whether the real text encoder is there."""
    models = base / "models"
    for folder in MODEL_FOLDERS:
        target = models / folder
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        if (real_models / folder).is_dir() and not target.exists():
            target.symlink_to((real_models / folder).resolve(), target_is_directory=True)
    return (models / "text_encoders" / wf.TEXT_ENCODER_FILE).is_file()


def run_shipped_workflows(server: ComfyServer, real_encoder: bool, out: Path, timeout: float) -> None:
    object_info = server.get_json("/object_info")
    loras = wf.combo_options(object_info["ZImageTurboLoraStack"]["input"]["required"]["distillpatch"])
    for name in wf.DEMO_WORKFLOWS:
        ui = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
        prompt = wf.use_available_distillpatch(wf.to_api(ui, object_info), loras)
        if not real_encoder:
            prompt = wf.swap_text_encoder(prompt, 2560)
        run_prompt(server, name, prompt, _titles(ui), out, timeout)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, help="a ComfyUI models folder with the real Z-Image-Turbo files")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "demo", help="output folder (recreated)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per workflow")
    parser.add_argument("--train-steps", type=int, default=TRAIN_STEPS,
                        help=f"trainer steps in the toy world (default {TRAIN_STEPS}: DiffSynth's 5 epochs x 50 "
                             "repeats)")
    parser.add_argument("--core-toyworld", action="store_true",
                        help="also render the toy world's four-scheme grids and table through the core API")
    args = parser.parse_args(argv)

    started = time.time()
    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    base = make_base_dir(out / "comfyui")
    if args.models is None:
        place_toy_world(base)
        print("Toy world inside ComfyUI: the pack's loader, LoRA stack, Turbo sampler and trainer on the toy world's "
              "1.9 M-parameter turbo model (demo text encoder and VAE nodes stand in for Qwen3-4B and the Flux VAE; "
              "32x32 images). `tools/demo.sh --models ~/ComfyUI/models` runs the real Z-Image-Turbo.")
    else:
        real_encoder = place_real_models(base, args.models.resolve())
        write_dataset(base / "input" / wf.DATASET, n=4, size=64)
        if not real_encoder:
            print(f"No {wf.TEXT_ENCODER_FILE} in text_encoders: CLIPLoader is swapped for the demo text encoder.")
    with ComfyServer(base) as server:
        print(f"ComfyUI 0.3.75 with the pack at {server.url} (log: {server.log_path})")
        if args.models is None:
            run_toy_world_in_comfyui(server, out, args.timeout, args.train_steps)
        else:
            run_shipped_workflows(server, real_encoder, out, args.timeout)
    if args.core_toyworld:
        run_core_toy_world(out / "toyworld")
    print(f"\nOutputs ({time.time() - started:.0f} s): {out}")
    if args.models is None:
        print(f"  {out / 'toyworld_comfyui_summary.png'}: every sample, labelled with what the classifier sees\n"
              f"  {out}/toyworld_train_purple__loss_curve__*.png, *__validation_grid__*.png: the trainer's figures\n"
              f"  {out / 'workflows'}: the four workflows (open them in ComfyUI)")


def run_core_toy_world(out: Path) -> None:
    """The toy world's four-scheme comparison through zimage_core (grids and metrics table)."""
    from toyworld import demo as toy_demo

    print("Toy world through the core API: the four schemes' sample grids and metrics table")
    start = time.time()
    toy_demo.main([str(out)])
    print(f"  toy world: {out} in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
