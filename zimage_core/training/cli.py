"""The headless trainer: `python -m zimage_core train --config FILE.toml`.

It reads an encoded dataset cache (built by `python -m zimage_core encode`, the ComfyUI training node or
`build_cache`), so no VAE or text encoder is loaded. Under `torchrun --nproc_per_node N` (and torchrun's multi-node
rendezvous) it trains data-parallel (gradients averaged over processes; NCCL on GPUs, gloo on CPU): the global
batch_size of the config is split evenly over the processes.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICES = ("auto", "cpu", "cuda")


SCHEME_HELP = {
    "sft": "plain LoRA (flow matching); sample it at 30 steps / cfg 2, or at 8 steps with the DistillPatch",
    "differential": "train through a frozen preset LoRA (the turbo training adapter, preset_lora), export without "
                    "it: an 8-step LoRA",
    "trajectory": "trajectory imitation: start from an SFT LoRA (init_lora) and make it follow its own 50-step "
                  "cfg-2 samples in 8 steps at cfg 1",
    "distillpatch": "sft, validated together with the DistillPatch (distill_patch), the pair used at 8 steps",
}
EXAMPLES = ("examples/train_sft.toml", "examples/train_differential.toml", "examples/train_distill.toml")


def help_epilog() -> str:
    """The schemes, the config's tables and their settings, and the shipped examples (train --help)."""
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
        "examples (commented, valid configs to copy): " + ", ".join(EXAMPLES), width=112), ""]
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
    parser.add_argument("--config", required=True, help="training config (TOML), e.g. examples/train_sft.toml")
    parser.add_argument("--steps", type=int, help="override the config's steps")
    parser.add_argument("--resume", help="'auto' or a checkpoint path (overrides the config)")
    parser.add_argument("--device", default="auto", choices=DEVICES, help="auto: cuda if available")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="compute dtype of the frozen base (auto: bf16 on GPU, fp32 on CPU); LoRA stays fp32")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def resolve_device_dtype(device: str, dtype: str, local_rank: int = 0) -> tuple[torch.device, torch.dtype]:
    """--device / --dtype: auto is this process's GPU (cuda:LOCAL_RANK) when there is one, in bf16; else CPU, fp32."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    chosen = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    return chosen, DTYPES[dtype] if dtype != "auto" else (torch.bfloat16 if use_cuda else torch.float32)


def load_base_model(name: str, dtype: torch.dtype, device):
    """`tiny:SEED` builds the random tiny model (tests and demos); anything else is a checkpoint path."""
    if name.startswith("tiny:"):
        from ..testing import tiny_model
        return tiny_model(int(name.split(":", 1)[1] or 0), dtype=dtype).to(device)
    if not name:
        raise ValueError("the config has no base_model (a Z-Image-Turbo checkpoint path)")
    from ..checkpoint import load_transformer
    return load_transformer(name, dtype=dtype, device=device)


def load_config(path: str, steps: int | None = None, resume: str | None = None):
    """The run's TrainConfig: the TOML file with the command line's overrides, validated for a headless run."""
    from .config import TrainConfig

    config = TrainConfig.from_toml(path)
    if steps is not None:
        config.steps = steps
    if resume is not None:
        config.resume = resume
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

    config = load_config(args.config, steps=args.steps, resume=args.resume)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device, dtype = resolve_device_dtype(args.device, args.dtype, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(device)
    distributed = world > 1
    if distributed:
        import torch.distributed as dist
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank = int(os.environ.get("RANK", "0"))
    try:
        model = load_base_model(config.base_model, dtype, device)
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
            if result.turbo_check:
                print("turbo check: " + ", ".join(f"{k} {v:.4f}" for k, v in result.turbo_check.items()))
        return 0
    finally:
        if distributed:
            import torch.distributed as dist
            dist.destroy_process_group()
