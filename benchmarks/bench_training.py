"""LoRA training step of zimage_core's trainer vs diffusers + peft (DiffSynth's Z-Image LoRA step is the same
computation: peft LoRA on to_q,to_k,to_v,to_out.0,w1,w2,w3, velocity MSE with the bell weight, AdamW), plus the
cost of a trajectory-imitation step with and without the cached teacher trajectory, and the memory the EMA and
the Prodigy optimizer add to the default SFT step (same worker, one option changed).

CPU, fp32, no gradient checkpointing on either side, batch 1, rank 16. Each measurement runs in its own fresh
process (alternating order, so load drift hits both): time = median step time after 3 warm-up steps; memory = peak
RSS above the level after building the model and the data, during LoRA + optimiser set-up and the training steps
(after one throw-away AdamW step in both processes, so one-time library loading is not counted), with a fixed
glibc mmap threshold (MALLOC_MMAP_THRESHOLD_=131072) so that RSS follows live memory.
Ours is timed through the real `train()` loop (data read from the safetensors cache, sigma/noise draws, NaN checks);
its memory peak is taken at the last step's progress callback, before the final checkpoint write (the reference
writes none). The reference gets its inputs prebuilt in memory.
The "compiled" row trains the same model after zimage_core.compile.enable_compile (inductor): its first step includes
the compile, later steps are the steady state.
Usage: .venv/bin/python benchmarks/bench_training.py [--configs tiny,mid] [--steps 12] [--threads 2] [--only-compiled]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RssPeak, median, run_worker  # noqa: E402

from zimage_core import ZImageConfig, ZImageTransformer  # noqa: E402
from zimage_core.testing import init_random_  # noqa: E402

CONFIGS = {
    # name: (model config, image side in px, caption words)
    "tiny": (ZImageConfig.tiny(), 96, 8),
    "mid": (ZImageConfig(dim=384, n_layers=4, n_refiner_layers=1, n_heads=6, cap_feat_dim=256,
                         axes_dims=(16, 24, 24)), 256, 40),
}
RANK = 16
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")


def dataset(config_name: str, folder: Path):
    from zimage_core.training import build_cache
    from zimage_core.training.toy import make_toy_dataset, toy_encoders

    cfg, side, words = CONFIGS[config_name]
    caption = " ".join(f"word{i}" for i in range(words - 1))
    make_toy_dataset(folder / "data", n=1, sizes=((side, side),), captions=[caption])
    return build_cache(folder / "data", folder / "cache", toy_encoders(cap_dim=cfg.cap_feat_dim))


def _warm_torch():
    """Run one tiny backward and AdamW step first, so one-time library loading (AdamW's first step pulls in
    torch._dynamo, ~65 MiB of code) is not counted as training memory on either side."""
    p = torch.zeros(4, requires_grad=True)
    (p * 2).sum().backward()
    torch.optim.AdamW([p]).step()


def worker_ours(config_name: str, steps: int, scheme: str) -> dict:
    from zimage_core.lora import new_lora, save_lora
    from zimage_core.training import TrainConfig, train

    cfg = CONFIGS[config_name][0]
    model = init_random_(ZImageTransformer(cfg), seed=0).eval()
    tmp = Path(tempfile.mkdtemp())
    cache = dataset(config_name, tmp)
    extra = {"ema": dict(ema_decay=0.99), "prodigy": dict(optimizer="prodigy", lr=1.0)}.get(scheme, {})
    if scheme == "compiled":  # zimage_core.compile's per-block compile (inductor) of the model the trainer trains
        from zimage_core.compile import enable_compile
        enable_compile(model)
    if scheme.startswith("ti"):
        save_lora(new_lora(model, rank=RANK, seed=1), tmp / "sft.safetensors")
        extra = dict(scheme="trajectory", init_lora=str(tmp / "sft.safetensors"),
                     trajectory_noises=1 if scheme == "ti-cached" else 0)
    stamps = []
    _warm_torch()
    config = TrainConfig(**{**dict(rank=RANK, lr=1e-4, steps=steps, output_dir=str(tmp / "out"), validate=False,
                                   checkpoint_every=0, log_every=0, gradient_checkpointing=False), **extra})
    peaks = []

    def progress(step, total, loss):
        stamps.append(time.perf_counter())
        peaks.append(peak.peak)  # the peak so far: set-up and steps, not the final checkpoint write

    with RssPeak() as peak:
        stamps.append(time.perf_counter())
        result = train(model, config, cache, log=None, write_outputs=False, progress=progress)
    times = [b - a for a, b in zip(stamps[3:], stamps[4:])]
    return {"step_s": median(times), "first_step_s": stamps[1] - stamps[0],
            "peak_mib": (peaks[-1] - peak.start) / 2**20,
            "lora_mib": sum(t.numel() * t.element_size() for t in result.lora.parameters()) / 2**20,
            "teacher_forwards_per_step": result.teacher_forwards / steps,
            "student_forwards_per_step": result.student_forwards / steps}


def worker_reference(config_name: str, steps: int) -> dict:
    from diffusers import ZImageTransformer2DModel
    from peft import LoraConfig, inject_adapter_in_model

    from zimage_core.training.losses import SigmaSampler

    cfg = CONFIGS[config_name][0]
    tmp = Path(tempfile.mkdtemp())
    cache = dataset(config_name, tmp)
    ours = init_random_(ZImageTransformer(cfg), seed=0)
    model = ZImageTransformer2DModel(**{k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")})
    model.load_state_dict(ours.state_dict())
    del ours
    model.requires_grad_(False)
    sampler = SigmaSampler()
    gen = torch.Generator().manual_seed(0)
    x0, caption = cache.latent(0).float(), cache.caption(0).float()

    def step():
        noise = torch.randn(x0.shape, generator=gen)
        sigma, weight = sampler.draw(1, gen)
        x_t = (1 - sigma) * x0 + sigma * noise
        out = model([x_t[:, None]], 1.0 - sigma, [caption], return_dict=False)[0][0][:, 0]
        loss = torch.nn.functional.mse_loss(-out, noise - x0) * weight[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    times = []
    _warm_torch()
    with RssPeak() as peak:  # like ours: LoRA set-up, optimiser and the steps
        model = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=list(TARGETS)), model)
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return {"step_s": median(times[3:]), "first_step_s": times[0], "peak_mib": peak.delta_mib}


def worker(which: str, config_name: str, steps: int, threads: int):
    torch.set_num_threads(threads)
    if which == "diffusers+peft":
        out = worker_reference(config_name, steps)
    else:
        out = worker_ours(config_name, steps, which)
    print(json.dumps({"which": which, "config": config_name, **out}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default="tiny,mid")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--ti-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs="?")
    parser.add_argument("--only-compiled", action="store_true", help="only the compiled-step row (and its eager twin)")
    args, rest = parser.parse_known_args()
    if args.worker:
        return worker(args.worker, rest[0], int(rest[1]), int(rest[2]))
    script = Path(__file__)
    if args.only_compiled:
        return compiled_rows(script, args)
    # A fixed glibc mmap threshold in both workers: freed activations go back to the OS, so RSS follows live memory
    # instead of the allocator's history (with the default dynamic threshold the same step measured 10-40 MiB apart).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    for name in args.configs.split(","):
        cfg, side, words = CONFIGS[name]
        results = {}
        for which in ("zimage_core", "diffusers+peft", "diffusers+peft", "zimage_core"):  # ABBA order
            r = run_worker(script, which, name, str(args.steps), str(args.threads))
            prev = results.setdefault(which, [])
            prev.append(r)
        ours = {k: median([r[k] for r in results["zimage_core"]]) for k in ("step_s", "peak_mib")}
        ref = {k: median([r[k] for r in results["diffusers+peft"]]) for k in ("step_s", "peak_mib")}
        print(f"[{name}] dim {cfg.dim}, {cfg.n_layers}+2x{cfg.n_refiner_layers} blocks, {side}x{side} px "
              f"({(side // 16) ** 2} image tokens), {words}-token caption, rank {RANK}, fp32 CPU, {args.threads} threads")
        print(f"  SFT step time   zimage_core {ours['step_s'] * 1e3:8.1f} ms   diffusers+peft {ref['step_s'] * 1e3:8.1f} ms"
              f"   ratio {ours['step_s'] / ref['step_s']:.3f}")
        print(f"  SFT step memory zimage_core {ours['peak_mib']:8.1f} MiB  diffusers+peft {ref['peak_mib']:8.1f} MiB"
              f"  ratio {ours['peak_mib'] / max(ref['peak_mib'], 1e-9):.3f}")
        lora_mib = results["zimage_core"][0]["lora_mib"]
        for option in ("ema", "prodigy"):
            runs = [run_worker(script, option, name, str(args.steps), str(args.threads)) for _ in range(2)]
            extra = {k: median([r[k] for r in runs]) for k in ("step_s", "peak_mib")}
            overhead = extra["peak_mib"] - ours["peak_mib"]
            print(f"  {option:8s} step memory {extra['peak_mib']:8.1f} MiB: +{overhead:.1f} MiB over the default "
                  f"(LoRA tensors {lora_mib:.1f} MiB fp32); step time {extra['step_s'] * 1e3:.1f} ms "
                  f"({extra['step_s'] / ours['step_s']:.3f}x the default)")
        if name == "tiny":
            fresh = run_worker(script, "ti-fresh", name, str(args.ti_steps + 4), str(args.threads))
            cached = run_worker(script, "ti-cached", name, str(args.ti_steps + 4), str(args.threads))
            print(f"  trajectory imitation (teacher 50 steps cfg 2, 8 student steps): fresh noise "
                  f"{fresh['step_s'] * 1e3:.0f} ms/step with {fresh['teacher_forwards_per_step']:.0f} teacher + "
                  f"{fresh['student_forwards_per_step']:.0f} student sample-forwards; cached trajectory "
                  f"{cached['step_s'] * 1e3:.0f} ms/step with {cached['teacher_forwards_per_step']:.1f} teacher "
                  f"forwards/step amortised (first step {cached['first_step_s'] * 1e3:.0f} ms): "
                  f"{fresh['step_s'] / cached['step_s']:.1f}x faster")


def compiled_rows(script: Path, args) -> None:
    """SFT step of a compiled model vs the same step eager (fresh processes, ABBA)."""
    for name in args.configs.split(","):
        runs = {w: [] for w in ("zimage_core", "compiled")}
        for which in ("zimage_core", "compiled", "compiled", "zimage_core"):
            runs[which].append(run_worker(script, which, name, str(args.steps), str(args.threads)))
        eager, comp = (median([r["step_s"] for r in runs[w]]) for w in ("zimage_core", "compiled"))
        first = median([r["first_step_s"] for r in runs["compiled"]])
        print(f"[{name}] SFT step eager {eager * 1e3:8.1f} ms   compiled (inductor, per block) {comp * 1e3:8.1f} ms   "
              f"speed-up {eager / comp:.3f}x   compiled first step (incl. compile) {first:.1f} s")


if __name__ == "__main__":
    main()
