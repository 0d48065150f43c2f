"""Command line: `python -m zimage_core <command> ...`.

Each command is a (configure, run) pair in COMMANDS; add a command by adding an entry."""

from __future__ import annotations

import argparse
import sys


def _convert_lora_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="a Z-Image LoRA .safetensors from any supported trainer")
    parser.add_argument("output", help="where to write it in this pack's export format")
    parser.add_argument("--lenient", action="store_true",
                        help="drop keys that map to no Z-Image module instead of refusing the file")


def _convert_lora(args: argparse.Namespace) -> int:
    from .lora import load_lora, save_lora

    lora = load_lora(args.input)
    if lora.unmatched and not args.lenient:
        print(f"error: {args.input} (detected format: {lora.format}): {len(lora.unmatched)} key(s) map to no "
              f"Z-Image module, first: {lora.unmatched[:5]}; rerun with --lenient to drop them", file=sys.stderr)
        return 2
    save_lora(lora, args.output, metadata={"converted_from": lora.format})
    print(f"{args.input} [{lora.format}]: {len(lora)} modules, rank {lora.rank} -> {args.output}")
    if lora.unmatched:
        print(f"dropped {len(lora.unmatched)} unmatched key(s), first: {lora.unmatched[:5]}")
    if lora.redundant:
        print(f"skipped {len(lora.redundant)} duplicate key(s) (copies of other keys in the file)")
    return 0


def _encode_args(parser: argparse.ArgumentParser) -> None:
    from .encoders.cli import configure
    configure(parser)


def _encode(args: argparse.Namespace) -> int:
    from .encoders.cli import run
    return run(args)


def _train_args(parser: argparse.ArgumentParser) -> None:
    from .training.cli import configure
    configure(parser)


def _train(args: argparse.Namespace) -> int:
    from .training.cli import run
    return run(args)


COMMANDS = {
    "convert-lora": ("convert any supported Z-Image LoRA to the export format", _convert_lora_args, _convert_lora),
    "encode": ("encode an image folder into the trainer's dataset cache with the real Qwen3-4B and Flux VAE "
               "(needs transformers and diffusers)", _encode_args, _encode),
    "train": ("train a LoRA headless from an encoded dataset cache (torchrun for data parallel)", _train_args, _train),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zimage_core")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, configure, _) in COMMANDS.items():
        configure(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
    except ValueError as err:  # LoraError and file errors: one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
