"""The main job, end to end: a real ComfyUI with this pack runs the shipped workflows over HTTP on 127.0.0.1.

Without arguments it places an embedded tiny Z-Image model (generated deterministically: random weights of the real
architecture, a random Flux-architecture VAE and a DistillPatch-format LoRA, under the standard file names) in a
private models folder, swaps the Qwen3-4B text-encoder loader for the pack's demo text encoder (no real encoder fits
a tiny model), queues the text-to-image workflow and a short training workflow, and writes what they produce to an
output folder. The tiny model draws noise: it proves the machinery, not image quality. With `--models DIR` (a
ComfyUI models folder holding z_image_turbo_bf16.safetensors, qwen_3_4b.safetensors, ae.safetensors and the
DistillPatch) the same workflows run on the real files instead (a GPU is strongly advised).

    tools/demo.sh [--models ~/ComfyUI/models] [--out out/demo]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

import workflows as wf  # noqa: E402
from comfy_host import ComfyServer, make_base_dir, write_dataset, write_lora, write_random_flux_vae  # noqa: E402
from comfy_host import write_tiny_transformer  # noqa: E402

MODEL_FOLDERS = ("diffusion_models", "text_encoders", "vae", "loras")


def place_models(base: Path, real_models: Path | None) -> tuple[bool, int | None]:
    """Fill BASE/models. Returns (uses the real text encoder, caption width of the tiny model or None)."""
    models = base / "models"
    if real_models is not None:
        for folder in MODEL_FOLDERS:
            target = models / folder
            if target.is_dir() and not any(target.iterdir()):
                target.rmdir()
            if (real_models / folder).is_dir() and not target.exists():
                target.symlink_to((real_models / folder).resolve(), target_is_directory=True)
        return (models / "text_encoders" / wf.TEXT_ENCODER_FILE).is_file(), None
    from zimage_core.testing import tiny_model

    config = tiny_model(0).config
    write_tiny_transformer(models / "diffusion_models" / wf.MODEL_FILE, seed=0)
    write_random_flux_vae(models / "vae" / wf.VAE_FILE)
    write_lora(models / "loras" / wf.DISTILLPATCH_FILE, config, "diffsynth", seed=2)
    return False, config.cap_feat_dim


def run_workflow(server: ComfyServer, name: str, object_info: dict, swap_width: int | None, out: Path,
                 timeout: float) -> list[Path]:
    ui = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
    prompt = wf.to_api(ui, object_info)
    if swap_width is not None:
        prompt = wf.swap_text_encoder(prompt, swap_width)
    start = time.time()
    entry = server.wait(server.submit(prompt, client_id="zimage-demo"), timeout=timeout)
    if entry["status"]["status_str"] != "success":
        errors = [m for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
        raise RuntimeError(f"workflow {name} failed: {errors[-1][1].get('exception_message') if errors else entry}")
    titles = {str(n["id"]): (n.get("title") or n["type"]).lower().replace(" ", "_").replace(",", "")
              for n in ui["nodes"]}
    saved = []
    for node_id, node_out in entry["outputs"].items():
        for image in node_out.get("images", []):
            target = out / f"{name}__{titles.get(node_id, node_id)}__{image['filename']}"
            target.write_bytes(server.view(image))
            saved.append(target)
    print(f"  {name}: {len(saved)} image(s) in {time.time() - start:.1f} s")
    return saved


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, help="a ComfyUI models folder with the real Z-Image-Turbo files")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "demo", help="output folder (recreated)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per workflow")
    args = parser.parse_args(argv)

    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    base = make_base_dir(out / "comfyui")
    real_encoder, tiny_width = place_models(base, args.models.resolve() if args.models else None)
    write_dataset(base / "input" / wf.DATASET, n=4, size=64)
    if args.models is None:
        print("Embedded TINY model (random weights of the real architecture): the images are noise by design; they "
              "show the pack working inside ComfyUI, not image quality. Run `tools/demo.sh --models "
              "~/ComfyUI/models` for the real Z-Image-Turbo.")
    swap = None if real_encoder else (tiny_width or 2560)
    if swap is not None:
        print(f"No {wf.TEXT_ENCODER_FILE} in text_encoders: CLIPLoader is swapped for the demo text encoder "
              f"(hashed word vectors, width {swap}).")
    with ComfyServer(base) as server:
        print(f"ComfyUI 0.3.75 with the pack at {server.url} (log: {server.log_path})")
        object_info = server.get_json("/object_info")
        for name in wf.DEMO_WORKFLOWS:
            run_workflow(server, name, object_info, swap, out, args.timeout)
    run_toy_world(out / "toyworld")
    print(f"\nOutputs: {out}")


def run_toy_world(out: Path) -> None:
    """The miniature Z-Image world (a tiny model this project trained, with a toy VAE and word-vector captions):
    recognisable shapes, the blur of an ordinary LoRA at 8 steps / cfg 1 and its three cures, through zimage_core."""
    from toyworld import WEIGHTS

    if not (WEIGHTS / "turbo.safetensors").is_file():
        print("toy world: weights not built (python -m toyworld.build); skipped")
        return
    from toyworld import demo as toy_demo

    print("Toy world (core API; toy VAE and captions, not ComfyUI's): sample grid and metrics table")
    start = time.time()
    toy_demo.main([str(out)])
    print(f"  toy world: {out} in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
