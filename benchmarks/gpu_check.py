"""One-command GPU check: zimage_core vs diffusers' ZImageTransformer2DModel on the same GPU, same random weights.

Prepared for a session that is lent one large NVIDIA GPU (an H200) for a few minutes with nothing to download. The
model is the real Z-Image-Turbo shape (`ZImageConfig()`: dim 3840, 30 layers + 2 + 2 refiner blocks), bf16, with
random weights following `zimage_core.testing.init_random_`'s rules (drawn on the GPU from a fixed seed: a CPU
generator would spend minutes on 6 B numbers). Both sides get the very same tensors.

Next to each measured peak of ours stands what benchmarks/bench_memory.py's meta-device tracker predicts for the same
work: a GPU run thus checks the simulation behind the README's memory table at real size.

1. parity: relative RMS ||v_diffusers - v_ours|| / ||v_ours|| of one bf16 forward (1024 px = a 128x128 latent,
   16 channels, a 256-token caption, sigma 0.6).
2. 8-step 1024 px turbo sampling (`zimage_core.sampling.TURBO`: 8 steps, cfg 1, Euler, shift 3): wall time
   (cuda synchronize around the call, after a one-step warm-up call at the same shapes), peak VRAM during the timed
   call (`max_memory_allocated` after `reset_peak_memory_stats`), the weights resident on the device before the
   warm-up (`memory_allocated`; the table's "(weights)") and everything resident just before the timed call
   (JSON `resident_gib`). Modes:
   ours bf16 / fp8 (`to_fp8_storage`) / bf16 + block offload (`enable_block_offload(model, device)`) /
   fp8 + offload; diffusers bf16 / fp8 (`enable_layerwise_casting(float8_e4m3fn, compute bf16)`) / block offload
   (`enable_group_offload(block_level, num_blocks_per_group=1, use_stream=True)`) / fp8 + block offload (both).
   Both sides run the same denoising loop, `zimage_core.sample`, which calls diffusers' model through a velocity
   adaptor (t = 1 - sigma, output negated): 8 plain model calls of the same Euler loop, so the times compare the
   transformers, not two loops (ZImagePipeline's loop gives the same latents; tests/test_sampling.py checks that).
   Each final latent is also compared to ours bf16 (relative RMS).
3. one rank-32 LoRA SFT training step at 1024 px with gradient checkpointing (time after a warm-up step, peak
   VRAM, loss). Ours through the trainer's building blocks (`new_lora` on the trainer's default targets,
   `apply_loras(..., mode="runtime")`, fp32 LoRA tensors, `sft_loss` with a sigma and bell weight from
   `SigmaSampler`, backward, `build_optimizer("adamw")` step) in the four modes, on the model of that mode's
   sampling run ("(weights)" is then the model plus the LoRA tensors; resident_gib adds the AdamW state).
   diffusers + peft on a fresh model: `add_adapter(LoraConfig(r=32, lora_alpha=32, target_modules=<the same
   Linears>))` first, then layerwise casting / group offload (the order diffusers documents),
   `enable_gradient_checkpointing()`, fp32 LoRA tensors, AdamW with the trainer's settings, weighted MSE on the
   velocity. Its forward runs under `torch.autocast(bf16)`, as diffusers' LoRA training scripts run it (fp32 LoRA
   tensors, bf16 compute; ours casts the LoRA tensors to the compute dtype in its runtime branch: the same
   arithmetic); without it, layerwise casting (which turns off peft's input casting) feeds bf16 activations to
   fp32 LoRA Linears and fails. The LoRA `up` matrices start at zero on both sides, so the warm-up step's loss is
   the base model's on both.

A reference (diffusers) mode that fails prints "n/a: <reason>" and the run goes on; a failing mode of ours is
reported the same way, and the script then exits 1. Each model is freed before the next is built. ComfyUI is not
installed on the GPU machine: the report's comfy line only says whether `import comfy` works.

Sized for under 8 minutes on an H200 (an estimate, not yet measured): a real-size forward at 4352 tokens is about
60 TFLOP (~0.15 s), an offloaded one streams 12 GB (bf16) or 6 GB (fp8) from pinned host memory, and the
13 model builds draw their weights on the GPU in well under a second each (the offload modes then move them to
pinned host memory, a few seconds each).

    PYTHONPATH=. .venv/bin/python benchmarks/gpu_check.py [--out results.json] [--parts parity,sample,train]
        [--skip-diffusers] [--device cuda]
    PYTHONPATH=. .venv/bin/python benchmarks/gpu_check.py --tiny     # the same code path on CPU, tiny model

--tiny: `ZImageConfig.tiny()`, a 16x16 latent, a 32-token caption, 1 CPU thread (seconds); memory reads "n/a"
off CUDA. `--tiny --device cuda` is a seconds-long smoke run of the CUDA path before the real one. --parts and
--modes rerun a subset. Never downloads anything; progress goes to stderr with elapsed times.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DiffusersVelocity  # noqa: E402
from zimage_core import ZImageConfig, ZImageTransformer, apply_loras, new_lora, sample  # noqa: E402
from zimage_core.offload import enable_block_offload  # noqa: E402
from zimage_core.quant.fp8 import check_fp8_support, to_fp8_storage  # noqa: E402
from zimage_core.sampling import TURBO  # noqa: E402
from zimage_core.testing import init_random_  # noqa: E402
from zimage_core.training.config import TrainConfig  # noqa: E402
from zimage_core.training.losses import SigmaSampler, sft_loss  # noqa: E402
from zimage_core.training.optimizers import build_optimizer  # noqa: E402

MODES = ("bf16", "fp8", "bf16+offload", "fp8+offload")
PARTS = ("parity", "sample", "train")
DTYPE = torch.bfloat16
FP8 = torch.float8_e4m3fn
SEED = 0
LORA_RANK = LORA_ALPHA = 32
PARITY_SIGMA = 0.6
NA = "n/a"
START = time.perf_counter()


@dataclass(frozen=True)
class Setup:
    config: ZImageConfig
    latent_hw: int
    caption_len: int
    device: torch.device

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", file=sys.stderr, flush=True)


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------- memory and time
def sync(setup: Setup) -> None:
    if setup.cuda:
        torch.cuda.synchronize(setup.device)


def free_memory(setup: Setup) -> None:
    gc.collect()  # offload / LoRA hooks hold reference cycles to their model
    if setup.cuda:
        torch.cuda.empty_cache()


def allocated_gib(setup: Setup):
    return torch.cuda.memory_allocated(setup.device) / 2**30 if setup.cuda else NA


def timed(setup: Setup, fn) -> dict:
    """Run fn once; wall time between two synchronisations, peak and resident allocated memory (GiB)."""
    sync(setup)
    resident = allocated_gib(setup)
    if setup.cuda:
        torch.cuda.reset_peak_memory_stats(setup.device)
    start = time.perf_counter()
    value = fn()
    sync(setup)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(setup.device) / 2**30 if setup.cuda else NA
    return {"seconds": seconds, "peak_gib": peak, "resident_gib": resident, "value": value}


# ---------------------------------------------------------------------------------------------- weights and models
@torch.no_grad()
def init_weights_(model: torch.nn.Module, seed: int = SEED) -> torch.nn.Module:
    """`init_random_`'s rules (Linear N(0, 1/fan_in), biases 0.1 N(0, 1), norms 1 + 0.1 N(0, 1), pad tokens
    N(0, 1), name order); on the CPU it is `init_random_` itself, elsewhere the numbers come from a generator on the
    model's device (same distribution, other numbers), so no 6 B-number CPU draw and no host-to-device copy."""
    device = next(model.parameters()).device
    if device.type == "cpu":
        return init_random_(model, seed)
    return init_on_device_(model, seed)


@torch.no_grad()
def init_on_device_(model: torch.nn.Module, seed: int = SEED) -> torch.nn.Module:
    """`init_random_`'s distributions drawn by a generator on the model's own device."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        value = torch.randn(param.shape, generator=gen, device=device, dtype=torch.float32)
        if param.ndim >= 2:
            value /= param.shape[1] ** 0.5
        elif name.endswith("bias"):
            value *= 0.1
        elif "pad_token" not in name:
            value = value.mul_(0.1).add_(1.0)
        param.copy_(value)
        del value
    return model


def build_ours(setup: Setup) -> ZImageTransformer:
    """The random bf16 model built straight on the device (meta, then empty device tensors, then filled)."""
    with torch.device("meta"):
        model = ZImageTransformer(setup.config)
    model = model.to(DTYPE).to_empty(device=setup.device)
    init_weights_(model)
    return model.eval().requires_grad_(False)


def diffusers_from(model: ZImageTransformer):
    """diffusers' ZImageTransformer2DModel holding our model's very tensors (assign: no copy)."""
    from diffusers import ZImageTransformer2DModel

    cfg = {k: v for k, v in model.config.to_diffusers().items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = ZImageTransformer2DModel(**cfg)
    ref.load_state_dict(model.state_dict(), strict=True, assign=True)
    return ref.eval().requires_grad_(False)


def build_diffusers(setup: Setup):
    ours = build_ours(setup)
    ref = diffusers_from(ours)
    del ours  # ref holds the tensors
    return ref


def ours_in_mode(setup: Setup, mode: str) -> ZImageTransformer:
    model = build_ours(setup)
    if mode.startswith("fp8"):
        to_fp8_storage(model)
    if mode.endswith("offload"):
        enable_block_offload(model, setup.device)
    return model


def diffusers_in_mode(setup: Setup, mode: str, lora_targets=None):
    """diffusers in `mode`; with lora_targets, the peft adapter is added first (then casting, then offload)."""
    ref = build_diffusers(setup)
    if lora_targets is not None:
        from peft import LoraConfig

        ref.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=list(lora_targets)))
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()  # fp32 LoRA tensors, as our trainer keeps them
                p.requires_grad_(True)
    if mode.startswith("fp8"):
        ref.enable_layerwise_casting(storage_dtype=FP8, compute_dtype=DTYPE)
    if mode.endswith("offload"):
        ref.to("cpu")  # group offload expects the model on the offload device
        free_memory(setup)
        ref.enable_group_offload(onload_device=setup.device, offload_device=torch.device("cpu"),
                                 offload_type="block_level", num_blocks_per_group=1, use_stream=setup.cuda)
    return ref


def lora_params(ref) -> list:
    return [p for n, p in ref.named_parameters() if "lora_" in n]


# ---------------------------------------------------------------------------------------------- inputs
def make_inputs(setup: Setup) -> dict:
    cfg = setup.config
    gen = torch.Generator().manual_seed(SEED + 1)
    hw = setup.latent_hw
    noise = torch.randn(1, cfg.in_channels, hw, hw, generator=gen)
    caption = torch.randn(setup.caption_len, cfg.cap_feat_dim, generator=gen)
    x0 = torch.randn(1, cfg.in_channels, hw, hw, generator=gen)  # the "image" latent of the training step
    train_noise = torch.randn(1, cfg.in_channels, hw, hw, generator=gen)
    sigma, weight = SigmaSampler(TrainConfig().shift).draw(1, gen)
    dev = setup.device
    return {"noise": noise.to(dev), "captions": [caption.to(dev)], "x0": x0.to(dev),
            "train_noise": train_noise.to(dev), "sigma": sigma, "weight": weight}


# ---------------------------------------------------------------------------------------------- measurements
def measure_sample(setup: Setup, velocity, inputs: dict) -> dict:
    weights = allocated_gib(setup)
    with torch.no_grad():
        sample(velocity, inputs["noise"], inputs["captions"], steps=1, cfg=TURBO.cfg)  # warm-up, same shapes
        run = timed(setup, lambda: sample(velocity, inputs["noise"], inputs["captions"], steps=TURBO.steps,
                                          cfg=TURBO.cfg))
    run["latent"] = run.pop("value").float().cpu()
    run["weights_gib"] = weights
    return run


def measure_train(setup: Setup, loss_fn, params: list, inputs: dict) -> dict:
    """A warm-up step, then the timed step; loss_fn() returns the scalar loss of one forward."""
    weights = allocated_gib(setup)  # the model and the LoRA tensors
    defaults = TrainConfig()
    optimizer = build_optimizer("adamw", params, lr=defaults.lr, betas=tuple(defaults.adam_betas),
                                eps=defaults.adam_eps, weight_decay=defaults.weight_decay)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    first_loss = step()
    run = timed(setup, step)
    run["loss"] = run.pop("value")
    run["first_loss"] = first_loss
    run["weights_gib"] = weights
    return run


def train_ours(setup: Setup, model: ZImageTransformer, inputs: dict) -> dict:
    targets = TrainConfig().targets
    lora = new_lora(model, rank=LORA_RANK, alpha=LORA_ALPHA, targets=targets, seed=SEED)
    lora = lora.to(dtype=torch.float32, device=setup.device)
    params = list(lora.parameters())
    for p in params:
        p.requires_grad_(True)
    handle = apply_loras(model, [(lora, 1.0)], mode="runtime")
    model.gradient_checkpointing = True
    try:
        return measure_train(setup, lambda: sft_loss(model, inputs["x0"], inputs["captions"], inputs["train_noise"],
                                                     inputs["sigma"], inputs["weight"]), params, inputs)
    finally:
        handle.remove()
        model.gradient_checkpointing = False


def train_diffusers(setup: Setup, mode: str, inputs: dict) -> dict:
    ref = diffusers_in_mode(setup, mode, lora_targets=TrainConfig().targets)
    ref.enable_gradient_checkpointing()
    velocity = DiffusersVelocity(ref, DTYPE)
    x0, noise, sigma = inputs["x0"], inputs["train_noise"], inputs["sigma"]
    weight = inputs["weight"].to(setup.device)

    def loss_fn():
        s = sigma.to(setup.device).view(-1, 1, 1, 1)
        x_t = (1.0 - s) * x0 + s * noise
        with torch.autocast(setup.device.type, dtype=DTYPE):
            v = velocity(x_t, sigma, inputs["captions"]).float()
        return torch.nn.functional.mse_loss(v, noise - x0) * weight[0]

    return measure_train(setup, loss_fn, lora_params(ref), inputs)


def attempt(results: dict, key: str, label: str, fn, errors: list | None = None) -> dict | None:
    """Run one measurement; a failure is recorded as 'n/a: reason' (and, for ours, in `errors`)."""
    log(f"{label} ...")
    try:
        out = fn()
    except Exception as err:  # a reference mode that cannot run must not stop the others
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        log(f"{label}: n/a: {reason}")
        traceback.print_exc(file=sys.stderr)
        if errors is not None:
            errors.append(f"{label}: {reason}")
        results[key] = f"{NA}: {reason}"
        return None
    results[key] = out
    log(f"{label}: {out.get('seconds', 0.0):.3f} s" + (f", peak {out['peak_gib']:.2f} GiB"
                                                       if isinstance(out.get("peak_gib"), float) else ""))
    return out


def run_parity(setup: Setup, inputs: dict) -> dict:
    model = build_ours(setup)
    ref = diffusers_from(model)
    sigma = torch.tensor([PARITY_SIGMA])
    with torch.no_grad():
        ours = model(inputs["noise"], sigma, inputs["captions"]).float()
        theirs = DiffusersVelocity(ref, DTYPE)(inputs["noise"], sigma, inputs["captions"]).float()
    return {"dtype": "bf16", "sigma": PARITY_SIGMA, "rel_rms": rel_rms(theirs, ours),
            "max_abs": float((theirs - ours).abs().max()), "ours_rms": float(ours.pow(2).mean().sqrt())}


def run_ours(setup: Setup, mode: str, parts: set, inputs: dict, results: dict, errors: list) -> None:
    try:
        model = ours_in_mode(setup, mode)
    except Exception as err:
        for part in ("sample", "train"):
            if part in parts:
                results[part]["ours"][mode] = f"{NA}: {type(err).__name__}: {err}"[:300]
        errors.append(f"ours {mode}: {type(err).__name__}: {err}")
        traceback.print_exc(file=sys.stderr)
        return
    if "sample" in parts:
        attempt(results["sample"]["ours"], mode, f"sample ours {mode}",
                lambda: measure_sample(setup, model, inputs), errors)
    if "train" in parts:
        attempt(results["train"]["ours"], mode, f"train ours {mode}", lambda: train_ours(setup, model, inputs),
                errors)
    del model
    free_memory(setup)
    for part in parts & {"sample", "train"}:
        if isinstance(results[part]["ours"].get(mode), dict):
            results[part]["ours"][mode]["predicted_gib"] = predicted_peak(setup, part, mode)


def run_diffusers(setup: Setup, mode: str, parts: set, inputs: dict, results: dict) -> None:
    def sample_mode():
        ref = diffusers_in_mode(setup, mode)
        return measure_sample(setup, DiffusersVelocity(ref, DTYPE), inputs)

    if "sample" in parts:
        attempt(results["sample"]["diffusers"], mode, f"sample diffusers {mode}", sample_mode)
        free_memory(setup)
    if "train" in parts:
        attempt(results["train"]["diffusers"], mode, f"train diffusers {mode}",
                lambda: train_diffusers(setup, mode, inputs))
        free_memory(setup)


def predicted_peak(setup: Setup, part: str, mode: str) -> float | str:
    """What benchmarks/bench_memory.py's meta-device tracker predicts for ours on this very work (GiB): printed next
    to the measured peak, so a GPU run checks the simulation behind the README's memory table at real size."""
    import bench_memory

    measure = bench_memory.sampling if part == "sample" else bench_memory.sft_step
    try:
        return measure("ours", setup.config, setup.latent_hw * 8, mode.split("+")[0], mode.endswith("offload"),
                       caption_tokens=setup.caption_len)["peak_gib"]
    except Exception as err:
        return f"{NA}: {type(err).__name__}: {err}"[:200]


def fp8_available(setup: Setup) -> str | None:
    try:
        check_fp8_support(setup.device, FP8)
    except ValueError as err:
        return str(err)
    return None


def comfy_status() -> str:
    try:
        import comfy  # noqa: F401
    except Exception:
        return "ComfyUI host not present"
    return "ComfyUI importable, but no comfy column is implemented"


# ---------------------------------------------------------------------------------------------- report
def _cell(value, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else NA


def _side(entry) -> tuple[str, str, float | None]:
    if not isinstance(entry, dict):
        return (str(entry) if entry is not None else "not run"), "", None
    peak = f"{_cell(entry['peak_gib'], '{:.2f}')} ({_cell(entry['weights_gib'], '{:.2f}')})"
    return f"{entry['seconds']:.3f}", peak, entry["seconds"]


def table(title: str, part: dict, extra=None) -> list[str]:
    head = "| mode | ours time s | ours peak GiB (weights) | ours predicted GiB (bench_memory) | diffusers time s " \
           "| diffusers peak GiB (weights) | ratio (ours / diffusers time) |"
    lines = [f"### {title}", "", head + (f" {extra[0]} |" if extra else ""),
             "|---" * (7 + (1 if extra else 0)) + "|"]
    for mode in MODES:
        ours = part["ours"].get(mode)
        ours_t, ours_m, ours_s = _side(ours)
        predicted = _cell(ours.get("predicted_gib"), "{:.3g}") if isinstance(ours, dict) else NA
        ref_t, ref_m, ref_s = _side(part["diffusers"].get(mode))
        ratio = f"{ours_s / ref_s:.2f}x" if ours_s and ref_s else NA
        row = f"| {mode} | {ours_t} | {ours_m} | {predicted} | {ref_t} | {ref_m} | {ratio} |"
        if extra:
            row += f" {extra[1](mode)} |"
        lines.append(row)
    return lines + [""]


def add_comparisons(results: dict) -> None:
    """Each sampled latent against ours bf16 (relative RMS); dropped latents before JSON."""
    samples = results.get("sample")
    if not samples:
        return
    base = samples["ours"].get("bf16")
    base = base.get("latent") if isinstance(base, dict) else None
    for side in ("ours", "diffusers"):
        for entry in samples[side].values():
            if isinstance(entry, dict):
                latent = entry.pop("latent")
                entry["rel_rms_vs_ours_bf16"] = rel_rms(latent, base) if base is not None else NA
                entry["finite"] = bool(torch.isfinite(latent).all())


def _both_sides(part: dict, mode: str, cell) -> str:
    """'ours / diffusers' of one figure of a mode's two entries (n/a where a side did not run)."""
    return " / ".join(cell(e) if isinstance(e, dict) else NA for e in (part[side].get(mode) for side in
                                                                       ("ours", "diffusers")))


def report(results: dict) -> str:
    lines = [f"## gpu_check: {results['setup']['description']}", ""]
    parity = results.get("parity")
    if parity is not None:
        value = f"{parity['rel_rms']:.3e} (max |diff| {parity['max_abs']:.3e})" if isinstance(parity, dict) \
            else parity
        lines += [f"bf16 forward parity, rel RMS diffusers vs ours: {value}", ""]
    if "sample" in results:
        s = results["sample"]
        lines += table(f"{TURBO.steps}-step sampling, cfg {TURBO.cfg:g}", s,
                       ("latent rel RMS vs ours bf16 (ours / diffusers)",
                        lambda mode: _both_sides(s, mode, lambda e: _cell(e.get("rel_rms_vs_ours_bf16"), "{:.2e}"))))
    if "train" in results:
        t = results["train"]
        lines += table(f"LoRA rank {LORA_RANK} SFT step, gradient checkpointing", t,
                       ("warm-up step loss (ours / diffusers)",
                        lambda mode: _both_sides(t, mode, lambda e: f"{e['first_loss']:.4f}")))
    lines.append(f"comfy: {results['comfy']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny config, small latent, CPU, 1 thread")
    parser.add_argument("--skip-diffusers", action="store_true")
    parser.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    parts = {p for p in args.parts.split(",") if p}
    modes = [m for m in MODES if m in args.modes.split(",")]
    if parts - set(PARTS) or not modes:
        parser.error(f"--parts must be a subset of {PARTS}, --modes of {MODES}")
    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    if args.tiny:
        torch.set_num_threads(1)
        setup = Setup(ZImageConfig.tiny(), latent_hw=16, caption_len=32, device=device)
    else:
        setup = Setup(ZImageConfig(), latent_hw=128, caption_len=256, device=device)
    cfg = setup.config
    gpu = torch.cuda.get_device_name(device) if setup.cuda else "CPU"
    description = (f"{'tiny' if args.tiny else 'real'} config (dim {cfg.dim}, {cfg.n_layers} layers + "
                   f"{cfg.n_refiner_layers}+{cfg.n_refiner_layers} refiners), {setup.latent_hw * 8} px latent "
                   f"{setup.latent_hw}x{setup.latent_hw}, {setup.caption_len}-token caption, bf16, {gpu}, "
                   f"torch {torch.__version__}")
    results: dict = {"setup": {"description": description, "tiny": args.tiny, "device": str(device), "gpu": gpu,
                               "dim": cfg.dim, "n_layers": cfg.n_layers, "latent_hw": setup.latent_hw,
                               "caption_len": setup.caption_len, "steps": TURBO.steps, "lora_rank": LORA_RANK},
                     "comfy": comfy_status()}
    try:
        import diffusers
        results["setup"]["diffusers"] = diffusers.__version__
    except ImportError as err:
        args.skip_diffusers = True
        results["setup"]["diffusers"] = f"{NA}: {err}"
    log(description)
    errors: list[str] = []
    inputs = make_inputs(setup)
    for part in ("sample", "train"):
        if part in parts:
            results[part] = {"ours": {}, "diffusers": {}}

    no_fp8 = fp8_available(setup)
    if "parity" in parts:
        if args.skip_diffusers:
            results["parity"] = f"{NA}: --skip-diffusers"
        else:
            attempt(results, "parity", "parity", lambda: run_parity(setup, inputs))
            free_memory(setup)
    for mode in modes:
        if mode.startswith("fp8") and no_fp8:
            for part in ("sample", "train"):
                if part in parts:
                    results[part]["ours"][mode] = results[part]["diffusers"][mode] = f"{NA}: {no_fp8}"
            continue
        if parts & {"sample", "train"}:
            run_ours(setup, mode, parts, inputs, results, errors)
            if not args.skip_diffusers:
                run_diffusers(setup, mode, parts, inputs, results)
            else:
                for part in ("sample", "train"):
                    if part in parts:
                        results[part]["diffusers"][mode] = f"{NA}: --skip-diffusers"

    add_comparisons(results)
    results["errors"] = errors
    results["total_seconds"] = time.perf_counter() - START
    print(report(results), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str))
        log(f"wrote {args.out}")
    if errors:
        log("failed: " + "; ".join(errors))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
