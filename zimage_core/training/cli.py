"""The headless trainer: `python -m zimage_core train --config FILE.toml`.

It reads an encoded dataset cache (built by `python -m zimage_core encode`, the ComfyUI training node or
`build_cache`), so no VAE or text encoder is loaded. Under `torchrun --nproc_per_node N` (and torchrun's multi-node
rendezvous) it trains data-parallel (gradients averaged over processes; NCCL on GPUs, gloo on CPU): the global
batch_size of the config is split evenly over the processes.

Two command-line options trade speed for accelerator memory (both are how the base is held, not what is trained, so
they are not TrainConfig settings: in ComfyUI the same choices are the model loader's weight_dtype and offload):
`--weight-storage fp8_e4m3fn` (zimage_core.quant.fp8) and `--offload block` (zimage_core.offload). Under torchrun
every process loads its own base the same way.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

import torch

from ..offload import OFFLOAD_MODES
from ..quant.fp8 import WEIGHT_STORAGE
from .turbo_check import format_check

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICES = ("auto", "cpu", "cuda")
# The figures quoted in --help: one rank-32 SFT step at 1024² at real size, accelerator memory
# (benchmarks/bench_memory.py, measured on the meta device under a live-storage tracker).
WEIGHT_STORAGE_HELP = (
    "how the frozen base's block weights are held. same: in --dtype. fp8_e4m3fn: the attention and SwiGLU Linear "
    "weights of every block (98%% of the weights) in float8 with a scale per output channel, each cast to --dtype "
    "only while its layer runs (the LoRA and everything else stay as without). Saves about half the weight memory: a "
    "rank-32 SFT step at 1024² needs 9.3 GiB instead of 14.9 GiB in bf16 (measured by benchmarks/bench_memory.py). "
    "Costs: the base is the fp8-rounded one (the trained LoRA differs slightly from a bf16-base run) and one cast per "
    "Linear per forward and backward. Needs a torch build and device that cast float8 (checked before training). "
    "Default: %(default)s")
OFFLOAD_HELP = (
    "none: the whole model on --device. block: the transformer blocks stay in host RAM (pinned) and each is copied "
    "to the GPU just before it runs, the next one on a side stream while the current one computes; offloaded blocks "
    "always run gradient-checkpointed. A rank-32 SFT step at 1024² needs 4.1 GiB in bf16, 3.8 GiB with "
    "--weight-storage fp8_e4m3fn (measured by benchmarks/bench_memory.py; 14.9 GiB / 9.3 GiB without offload). "
    "Costs: host RAM for the blocks (their weight size, about 12 GB in bf16; each torchrun process holds its own) and "
    "two host-to-GPU copies of every block per step (forward and the backward recompute), slower wherever the copy "
    "cannot hide behind the compute. The trained LoRA is the same as without (bit-exact on CPU, where the same code "
    "runs synchronously and saves nothing). Default: %(default)s")

HOST_INPUTS_HELP = (
    "keep each gradient-checkpointed block's input in host RAM between forward and backward (as musubi-tuner's "
    "gradient_checkpointing_cpu_offload; sets the config's checkpoint_inputs_on_host = true). A rank-32 SFT step at "
    "1024² needs 0.7 GiB less accelerator memory (of the 1.1 GiB the 34 block inputs take; measured by "
    "benchmarks/bench_memory.py --quant): with fp8 + --offload block 3.06 GiB instead of 3.78. Costs copies of each "
    "block input's size per step (to the host and back, and its gradient). Same losses and LoRA (bit-exact).")


SCHEME_HELP = {
    "sft": "plain LoRA (flow matching); sample it at 30 steps / cfg 2, or at 8 steps with the DistillPatch",
    "differential": "train through a frozen preset LoRA (the turbo training adapter, preset_lora), export without "
                    "it: an 8-step LoRA",
    "trajectory": "trajectory imitation: start from an SFT LoRA (init_lora) and make it follow its own 50-step "
                  "cfg-2 samples in 8 steps at cfg 1",
    "distillpatch": "sft, validated together with the DistillPatch (distill_patch), the pair used at 8 steps",
}
EXAMPLES = ("configs/train_sft.toml", "configs/train_differential.toml", "configs/train_distill.toml")


def help_epilog() -> str:
    """The schemes, the config's tables and their settings, and the shipped configs (train --help)."""
    from .config import SECTIONS

    def block(head: str, text: str) -> list[str]:
        return textwrap.wrap(text, width=110, initial_indent=f"  {head:<14}", subsequent_indent=" " * 16)

    lines = ["schemes (scheme = ...):"]
    for name, text in SCHEME_HELP.items():
        lines += block(name, text)
    lines += ["", "config file (TOML; relative paths are relative to the file; defaults and meaning of every setting: "
                  "zimage_core/training/config.py):"]
    for table, (text, names) in SECTIONS.items():
        lines += block(f"[{table}]" if table else "(top level)", f"{text}: {', '.join(names)}")
    lines += ["", *textwrap.wrap(
        "shipped configs (commented, valid examples to copy): " + ", ".join(EXAMPLES), width=112), ""]
    lines += textwrap.wrap(
        "the cache: python -m zimage_core encode --config FILE --model Z-Image-Turbo (or ComfyUI's single files, see "
        "encode --help), or the ComfyUI training node's output/zimage_training/<name>/cache.", width=112)
    lines += textwrap.wrap(
        "data parallel: torchrun --nproc_per_node N -m zimage_core train --config FILE (batch_size is the global "
        "batch); several machines through torchrun's --nnodes and --rdzv-endpoint. No FSDP / model sharding: every "
        "process holds the whole model.", width=112)
    return "\n".join(lines)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = help_epilog()
    parser.add_argument("--config", required=True, help="training config (TOML), e.g. configs/train_sft.toml")
    parser.add_argument("--steps", type=int, help="override the config's steps")
    parser.add_argument("--resume", help="'auto' or a checkpoint path (overrides the config)")
    parser.add_argument("--device", default="auto", choices=DEVICES, help="auto: cuda if available")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="compute dtype of the frozen base (auto: bf16 on GPU, fp32 on CPU); LoRA stays fp32")
    parser.add_argument("--weight-storage", default="same", choices=WEIGHT_STORAGE, help=WEIGHT_STORAGE_HELP)
    parser.add_argument("--offload", default="none", choices=OFFLOAD_MODES, help=OFFLOAD_HELP)
    parser.add_argument("--checkpoint-inputs-on-host", action="store_true", help=HOST_INPUTS_HELP)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def resolve_device_dtype(device: str, dtype: str, local_rank: int = 0) -> tuple[torch.device, torch.dtype]:
    """--device / --dtype: auto is this process's GPU (cuda:LOCAL_RANK) when there is one, in bf16; else CPU, fp32."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    chosen = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    return chosen, DTYPES[dtype] if dtype != "auto" else (torch.bfloat16 if use_cuda else torch.float32)


def check_weight_storage(weight_storage: str, device: torch.device) -> None:
    """Refuse fp8 storage before anything loads when this build cannot cast float8 on the compute device (the error
    names the option); "same" needs nothing."""
    from ..quant.fp8 import FP8_DTYPES, check_fp8_support

    if weight_storage != "same":
        check_fp8_support(device, FP8_DTYPES[weight_storage], option=f"--weight-storage {weight_storage}")


def load_base_model(name: str, dtype: torch.dtype, device, weight_storage: str = "same", offload: str = "none"):
    """The frozen base: `tiny:SEED` builds the random tiny model (tests and demos), anything else is a checkpoint
    path. With block offload it is loaded to the CPU and only then offloaded: the whole model never sits on the
    compute device, which could not hold it (that is why one offloads). Whether fp8 casts on the compute device
    is checked by `run` before anything loads (check_weight_storage)."""
    from ..offload import enable_block_offload

    if offload not in OFFLOAD_MODES:
        raise ValueError(f"--offload must be one of {', '.join(OFFLOAD_MODES)}, got {offload!r}")
    load_device = "cpu" if offload == "block" else device
    if name.startswith("tiny:"):
        from ..quant.fp8 import FP8_DTYPES, to_fp8_storage
        from ..testing import tiny_model
        model = tiny_model(int(name.split(":", 1)[1] or 0), dtype=dtype).requires_grad_(False)
        if weight_storage != "same":
            to_fp8_storage(model, FP8_DTYPES[weight_storage])  # in place, on the CPU
        model = model.to(load_device)
    elif not name:
        raise ValueError("the config has no base_model (a Z-Image-Turbo checkpoint path)")
    else:
        from ..checkpoint import load_transformer
        model = load_transformer(name, dtype=dtype, device=load_device, weight_storage=weight_storage)
    if offload == "block":
        enable_block_offload(model, device, "cpu")
    return model


def describe_base(model, dtype: torch.dtype) -> str:
    """One log line: how the base is held (compute dtype, fp8 / quantized storage, block offload)."""
    from ..offload import is_offloaded
    from ..quant import is_quantized
    from ..quant.fp8 import FP8_DTYPES, Fp8Linear

    names = {dtype: name for name, dtype in FP8_DTYPES.items()}
    quantized = [m for m in model.modules() if is_quantized(m)]
    formats = sorted({names.get(m.weight.dtype, m.fmt) if isinstance(m, Fp8Linear) else m.fmt for m in quantized})
    storage = (f"{', '.join(formats)} weight storage on for {len(quantized)} block Linears" if quantized
               else "weights stored in the compute dtype")
    if is_offloaded(model):
        home = next(model.blocks()[0].parameters()).device
        place = f"block offload on: {len(model.blocks())} blocks in {home} RAM, streamed to {model.device}"
    else:
        place = f"whole model on {model.x_pad_token.device}"
    return f"base: {str(dtype).removeprefix('torch.')} compute, {storage}, {place}"


def load_config(path: str, steps: int | None = None, resume: str | None = None, host_inputs: bool = False):
    """The run's TrainConfig: the TOML file with the command line's overrides, validated for a headless run."""
    from .config import TrainConfig

    config = TrainConfig.from_toml(path)
    if steps is not None:
        config.steps = steps
    if resume is not None:
        config.resume = resume
    if host_inputs:
        config.checkpoint_inputs_on_host = True
    config.validate_settings()
    if not config.cache_dir:
        raise ValueError(f"{path}: the headless trainer needs cache_dir (an encoded dataset cache with manifest.json, "
                         "built by python -m zimage_core encode)")
    return config


def check_cache_fits(cache, model_config, model_name: str) -> None:
    """Refuse, before training starts, a cache encoded for another model (a text encoder or VAE of another width)."""
    widths = {"caption features": (cache.caption(0).shape[-1], model_config.cap_feat_dim),
              "latent channels": (cache.latent(0).shape[0], model_config.in_channels)}
    for what, (got, wanted) in widths.items():
        if got != wanted:
            raise ValueError(f"the cache {cache.folder} holds {got} {what} but {model_name} reads {wanted}: encode "
                             "the dataset with this model's text encoder and VAE (Qwen3-4B and the Flux VAE for "
                             "Z-Image-Turbo)")


def run(args: argparse.Namespace) -> int:
    from .data import DatasetCache
    from .trainer import train

    config = load_config(args.config, steps=args.steps, resume=args.resume,
                         host_inputs=args.checkpoint_inputs_on_host)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device, dtype = resolve_device_dtype(args.device, args.dtype, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(device)
    check_weight_storage(args.weight_storage, device)  # before any process group or weights: an early, clear error
    distributed = world > 1
    if distributed:
        import torch.distributed as dist
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank = int(os.environ.get("RANK", "0"))
    try:
        model = load_base_model(config.base_model, dtype, device, args.weight_storage, args.offload)
        cache = DatasetCache.load(config.cache_dir)
        check_cache_fits(cache, model.config, config.base_model)
        bar = None
        if rank == 0 and not args.quiet:
            from tqdm import tqdm
            bar = tqdm(total=config.steps, desc=f"train {config.scheme}", unit="step")

        def progress(step, total, loss):
            if bar is not None:
                bar.n = step
                bar.set_postfix(loss=f"{loss:.4f}")
                bar.refresh()

        log = (lambda message: (bar.write(message) if bar is not None else print(message))) if rank == 0 else None
        if log is not None:
            log(describe_base(model, dtype))
        try:
            result = train(model, config, cache, progress=progress, log=log)
        except KeyboardInterrupt:
            if rank == 0:
                print(f"interrupted; checkpoint kept at {config.checkpoint_path} (resume with --resume auto)",
                      file=sys.stderr)
            return 130
        finally:
            if bar is not None:
                bar.close()
        if rank == 0:
            print(f"trained {result.step} steps in {result.seconds:.1f} s; LoRA {result.lora_path}")
            if result.turbo_check_detail:
                print(f"{result.turbo_check_meaning}\n  {format_check(result.turbo_check_detail)}")
        return 0
    finally:
        if distributed:
            import torch.distributed as dist
            dist.destroy_process_group()
