"""Apply + remove a stack of two rank-32 LoRAs on real-width Z-Image blocks (dim 3840, bf16): this engine's merge
and runtime modes next to ComfyUI 0.3.75's ModelPatcher + comfy.lora doing the same (LoraLoaderModelOnly's path).

Each case runs in its own process; peak memory is the rise of the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs) over its RSS once the model and LoRA files are loaded, i.e. what patching adds.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_lora.py [--layers 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CASES = ("ours-merge", "ours-runtime", "comfy-patcher")


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def prepare(workdir: Path, layers: int) -> None:
    """A bf16 checkpoint of `layers` full-width blocks (ComfyUI layout, as the released single file) and two rank-32
    LoRAs in the export format (the only layout all three loaders read)."""
    from zimage_core.checkpoint import save_transformer
    from zimage_core.config import ZImageConfig
    from zimage_core.lora import new_lora, save_lora
    from zimage_core.testing import init_random_
    from zimage_core.transformer import ZImageTransformer

    model = init_random_(ZImageTransformer(ZImageConfig(n_layers=layers, n_refiner_layers=0)), seed=0)
    save_transformer(model, workdir / "model.safetensors", layout="comfyui", dtype=torch.bfloat16)
    for seed in (1, 2):
        lora = new_lora(model, rank=32, seed=seed, dtype=torch.bfloat16)
        for m in lora.modules.values():
            m.up.normal_(0, 0.01)
        save_lora(lora, workdir / f"lora{seed}.safetensors")


def run_case(case: str, workdir: Path, repeat: int) -> dict:
    torch.set_num_threads(1)
    from zimage_core.checkpoint import load_transformer

    model = load_transformer(workdir / "model.safetensors", dtype=torch.bfloat16)
    loras = [str(workdir / "lora1.safetensors"), str(workdir / "lora2.safetensors")]
    if case == "comfy-patcher":
        sys.path.insert(0, str(ROOT / "tests"))
        from safetensors.torch import load_file
        from test_lora_formats import comfy, comfy_model

        c = comfy()
        cm = comfy_model(model)
        del model
        key_map = c.lora.model_lora_keys_unet(cm, {})
        patch_sets = [c.lora.load_lora(load_file(p), key_map, log_missing=True) for p in loras]

        def once():
            patcher = c.model_patcher.ModelPatcher(cm, load_device=torch.device("cpu"),
                                                   offload_device=torch.device("cpu"))
            for patches, strength in zip(patch_sets, (1.0, 0.8)):
                patcher.add_patches(patches, strength)
            t0 = time.perf_counter()
            patcher.patch_model()
            t1 = time.perf_counter()
            patcher.unpatch_model()
            return t1 - t0, time.perf_counter() - t1
    else:
        from zimage_core.lora import apply_loras, load_lora

        stack = [(load_lora(loras[0]), 1.0), (load_lora(loras[1]), 0.8)]
        mode = case.split("-")[1]

        def once():
            t0 = time.perf_counter()
            handle = apply_loras(model, stack, mode=mode)
            t1 = time.perf_counter()
            handle.remove()
            return t1 - t0, time.perf_counter() - t1
    base = rss_mb("VmRSS")
    reset_peak()
    times = [once() for _ in range(repeat)]
    peak = rss_mb("VmHWM") - base
    apply_s, remove_s = min(t[0] for t in times), min(t[1] for t in times)
    return {"case": case, "apply_s": round(apply_s, 3), "remove_s": round(remove_s, 3),
            "total_s": round(apply_s + remove_s, 3), "peak_extra_mb": round(peak, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--case", choices=CASES)
    parser.add_argument("--workdir")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, Path(args.workdir), args.repeat)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.set_num_threads(1)
        prepare(Path(tmp), args.layers)
        weights_mb = Path(tmp, "model.safetensors").stat().st_size / 2**20
        print(f"{args.layers} blocks at dim 3840, bf16 checkpoint {weights_mb:.0f} MB; two rank-32 LoRAs (strengths 1.0, "
              f"0.8) on q,k,v,out,w1,w2,w3; best of {args.repeat}")
        print(f"{'case':15} {'apply s':>8} {'remove s':>9} {'total s':>8} {'peak extra MB':>14}")
        for case in CASES:
            out = subprocess.run([sys.executable, __file__, "--case", case, "--workdir", tmp, "--repeat",
                                  str(args.repeat)], capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                print(f"{case}: failed\n{out.stderr[-2000:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{case:15} {r['apply_s']:8.3f} {r['remove_s']:9.3f} {r['total_s']:8.3f} {r['peak_extra_mb']:14.1f}")


if __name__ == "__main__":
    main()
