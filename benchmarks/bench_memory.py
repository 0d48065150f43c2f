"""Accelerator memory of Z-Image-Turbo at real size (dim 3840, 30 layers + 2 + 2 refiners), measured on a CPU.

Every run computes on the `meta` device under benchmarks/memtrack.py's live-tensor byte tracker (what
torch.cuda.max_memory_allocated would read; flash attention's O(S) memory; offloaded weights in host RAM), through
the pack's own code paths: `zimage_core.sample`, the trainer's `sft_loss` / `teacher_trajectory` /
`trajectory_loss` with a rank-32 LoRA on the trainer's default targets as runtime branches, fp32 LoRA masters and
AdamW. Each training figure is the peak of the second optimizer step (AdamW's moments then exist, as in every step
after the first). The same tracker measures diffusers' ZImageTransformer2DModel (+ peft LoRA, its gradient
checkpointing, layerwise fp8 casting and block-level group offload) on the same work.

1024² = 4096 image tokens, 512² = 1024, both with a 256-token caption; batch 1. The transformer only: the text
encoder and the VAE run before and after it (ComfyUI unloads them while the transformer works).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_memory.py [--sizes 1024 512] [--skip-diffusers] [--out r.json]
    ... --validate   the tracker on a small model: meta run == real CPU run (same bytes), and vs the process RSS
    ... --growth     checkpointed training memory per block (20 vs 30 layers) against one block's input
    ... --encoders   the headless encode step: Qwen3-4B (bf16) on a prompt, the Flux VAE encoder (fp32) on an image
    ... --quant      the quantized files users download (GGUF Q8_0 / Q4_K_M / Q3_K_S, comfy_quant nvfp4 / int8,
                     svdq-int4 r32; benchmarks/quant_formats.py) next to bf16 and fp8: resident bytes as stored
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DiffusersVelocity, RssPeak, run_worker  # noqa: E402
from memtrack import LiveBytes, flash_attention, host_homes  # noqa: E402
from quant_formats import FILE_GB, FILES, FORMAT_KEYS, linear_types, stored_shapes  # noqa: E402

from zimage_core import ZImageConfig, ZImageTransformer, sample  # noqa: E402
from zimage_core.lora import apply_loras, new_lora  # noqa: E402
from zimage_core.offload import enable_block_offload, is_offloaded  # noqa: E402
from zimage_core.quant import FORMATS, QuantizedLinear  # noqa: E402
from zimage_core.quant.linear import replace_module  # noqa: E402
from zimage_core.quant.fp8 import to_fp8_storage  # noqa: E402
from zimage_core.training.config import DEFAULT_TARGETS, TrainConfig  # noqa: E402
from zimage_core.training.losses import sft_loss, teacher_trajectory, trajectory_grids, trajectory_loss  # noqa: E402
from zimage_core.training.optimizers import build_optimizer  # noqa: E402

GIB = 2**30
CAPTION_TOKENS = 256
RANK = 32
PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]  # the trainer's DEFAULT_TARGETS, peft-style


# ---------------------------------------------------------------------------------------------- models
def ours(config: ZImageConfig, storage: str, offload: bool, device: str = "meta") -> ZImageTransformer:
    with torch.device(device):
        model = ZImageTransformer(config).to(torch.bfloat16)
    if storage == "fp8":
        to_fp8_storage(model)
    elif storage in FILES:
        quantized_meta(model, storage)
    if offload:
        if device == "meta":
            host_homes(model.blocks())
        enable_block_offload(model, device, "cpu")
    return model.eval()


def diffusers_model(config: ZImageConfig, storage: str, offload: bool):
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        ref = ZImageTransformer2DModel(**{k: v for k, v in config.to_diffusers().items() if not k.startswith("_")})
    ref = ref.to(torch.bfloat16)
    if storage == "fp8":
        ref.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    if offload:
        host_homes([ref])
        ref.enable_group_offload(onload_device=torch.device("meta"), offload_device=torch.device("cpu"),
                                 offload_type="block_level", num_blocks_per_group=1, use_stream=False)
    return ref.eval()


def quantized_meta(model: ZImageTransformer, file: str) -> list[str]:
    """Swap the Linears that `file` (benchmarks/quant_formats.py) quantizes for QuantizedLinears holding meta stored
    tensors of that type's shapes and dtypes (the resident bytes), computing through the pack's own QuantizedLinear
    autograd path and the format's own dequantizer (zimage_core.quant.FORMATS), whose temporaries are counted."""
    types = linear_types(model, file)
    for path, kind in types.items():
        old = model.get_submodule(path)
        shapes = stored_shapes(kind, old.out_features, old.in_features)
        fmt = FORMATS[FORMAT_KEYS[kind]]
        if set(fmt.stored_names) != set(shapes):
            raise ValueError(f"{fmt.name} stores {fmt.stored_names}, quant_formats models {tuple(shapes)}")
        stored = {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, dtype) in shapes.items()}
        bias = None if old.bias is None else old.bias.detach()
        replace_module(model, path, QuantizedLinear(old.in_features, old.out_features, fmt, stored, bias))
    return list(types)


def ours_lora(model, device: str, seed: int = 0, dtype=torch.float32):
    """A rank-32 LoRA on the trainer's default targets, as the trainer makes it (fp32 masters)."""
    return new_lora(model, rank=RANK, alpha=RANK, targets=DEFAULT_TARGETS, seed=seed).to(dtype, device)


# ---------------------------------------------------------------------------------------------- work
def inputs(size: int, config: ZImageConfig, device: str = "meta", caption_tokens: int = CAPTION_TOKENS):
    lat = size // 8
    noise = torch.randn(1, config.in_channels, lat, lat, device=device)
    caption = torch.randn(caption_tokens, config.cap_feat_dim, device=device, dtype=torch.bfloat16)
    return noise, [caption]


def _tensors(module) -> list:
    return [*module.parameters(), *module.buffers()]


def _build(impl: str, config: ZImageConfig, storage: str, offload: bool, device: str):
    if impl == "ours":
        model = ours(config, storage, offload, device)
        return model, model
    model = diffusers_model(config, storage, offload)
    return model, DiffusersVelocity(model)


def _start(model, device: str, trainable=()) -> LiveBytes:
    """A tracker holding the model's resident tensors (offloaded block homes are host memory: not counted, which
    matters when a validation run offloads from the CPU to the CPU)."""
    tracker = LiveBytes(device)
    if is_offloaded(model):
        tracker.ignore(t for b in model.blocks() for t in _tensors(b))
    train_ids = {id(p) for p in trainable}
    tracker.adopt([t for t in _tensors(model) if id(t) not in train_ids], "weights")
    tracker.adopt(trainable, "trainable")
    return tracker


def sampling(impl: str, config: ZImageConfig, size: int, storage: str, offload: bool, device: str = "meta",
             watch=nullcontext, caption_tokens: int = CAPTION_TOKENS) -> dict:
    """8-step turbo sampling (cfg 1) of one image."""
    model, fn = _build(impl, config, storage, offload, device)
    tracker = _start(model, device)
    noise, caps = inputs(size, config, device, caption_tokens)
    tracker.adopt([noise, *caps], "work")
    tracker.reset_peak()
    with watch(), tracker, flash_attention(), torch.no_grad():
        sample(fn, noise, caps, steps=8, cfg=1.0)
    return tracker.summary()


def _train_peak(tracker: LiveBytes, params, step, watch=nullcontext) -> dict:
    """Two optimizer steps of `step()` (forward + backward); the figure is the second's peak: the first creates
    AdamW's moments, which every later step keeps beside the LoRA."""
    opt = build_optimizer("adamw", params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

    def one():
        opt.zero_grad(set_to_none=True)  # as the trainer: a step's grads live until its optimizer step
        step()
        opt.step()

    with tracker, flash_attention():
        one()
    tracker.relabel([s for state in opt.state.values() for s in state.values() if isinstance(s, torch.Tensor)],
                    "trainable")
    tracker.reset_peak()
    with watch(), tracker, flash_attention():
        one()
    return tracker.summary()


def _trainable(impl: str, model, device: str, host_inputs: bool = False) -> list:
    model.requires_grad_(False)  # the base is frozen, as the trainer and peft freeze it
    if impl == "ours":
        model.gradient_checkpointing = True
        model.checkpoint_inputs_on_host = host_inputs  # the trainer's checkpoint_inputs_on_host
        lora = ours_lora(model, device)
        params = list(lora.parameters())
        for p in params:
            p.requires_grad_(True)
        apply_loras(model, [(lora, 1.0)], mode="runtime")  # as the trainer: a runtime branch, fp32 master
        return params
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=PEFT_TARGETS, init_lora_weights=True))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # fp32 masters, as diffusers' training scripts do (cast_training_params)
    model.enable_gradient_checkpointing()
    model.train()
    return params


def sft_step(impl: str, config: ZImageConfig, size: int, storage: str, offload: bool, device: str = "meta",
             watch=nullcontext, caption_tokens: int = CAPTION_TOKENS, host_inputs: bool = False) -> dict:
    """One rank-32 LoRA SFT step with gradient checkpointing: velocity loss, backward, AdamW. host_inputs: the
    checkpointed block inputs wait in host RAM (zimage_core.host_checkpoint)."""
    model, fn = _build(impl, config, storage, offload, device)
    params = _trainable(impl, model, device, host_inputs)
    tracker = _start(model, device, params)
    noise, caps = inputs(size, config, device, caption_tokens)
    x0 = torch.randn_like(noise)
    tracker.adopt([noise, x0, *caps], "work")
    sigma, weight = torch.tensor([0.6]), torch.tensor([1.0])
    return _train_peak(tracker, params, lambda: sft_loss(fn, x0, caps, noise, sigma, weight).backward(), watch)


def trajectory_step(config: ZImageConfig, size: int, storage: str, offload: bool, chunk: int) -> dict:
    """The trainer's trajectory-imitation micro-step: the frozen teacher (the SFT LoRA as a runtime branch) runs its
    50-step cfg-2 trajectory without grad, then the student LoRA learns its 8 steps (`chunk` steps per forward and
    backward, 0 = all 8 in one batched forward: the trainer's student_chunk)."""
    cfg = TrainConfig(scheme="trajectory", student_chunk=chunk)
    model = ours(config, storage, offload).requires_grad_(False)
    model.gradient_checkpointing = True
    student = ours_lora(model, "meta")
    params = list(student.parameters())
    for p in params:
        p.requires_grad_(True)
    teacher = ours_lora(model, "meta", seed=1)  # frozen; fp32 (an SFT LoRA saved in bf16 takes half)
    tracker = _start(model, "meta", params)
    tracker.adopt(list(teacher.parameters()), "trainable")
    noise, caps = inputs(size, config)
    negative = torch.zeros_like(caps[0])
    tracker.adopt([noise, *caps, negative], "work")
    student_sigmas, grid, keep = trajectory_grids(cfg.teacher_steps, cfg.student_steps, cfg.shift)

    def step():
        handle = apply_loras(model, [(teacher, 1.0)], mode="runtime")  # the trainer's LoRA stack swaps them
        with torch.no_grad():
            states = teacher_trajectory(model, noise, caps, [negative], grid, cfg.teacher_cfg, keep)
        handle.remove()
        handle = apply_loras(model, [(student, 1.0)], mode="runtime")
        trajectory_loss(model, states, student_sigmas, caps, chunk=chunk, backward_scale=1.0)
        handle.remove()

    return _train_peak(tracker, params, step)


# ---------------------------------------------------------------------------------------------- encoders
# Qwen3-4B (config.json of Z-Image-Turbo's text_encoder/, also ComfyUI's Qwen3_4BConfig) and the Flux VAE
# (ae.safetensors / vae/config.json): the models the headless `encode` step loads (zimage_core.encoders).
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, use_quant_conv=False,
                use_post_quant_conv=False)


def _qwen3():
    import transformers

    with torch.device("meta"):
        return transformers.Qwen3Model(transformers.Qwen3Config(**QWEN3_4B)).to(torch.bfloat16).eval()


def _flux_vae():
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL(**FLUX_VAE).eval()


def _encode_text(model, tokens: int) -> None:
    """As `PromptEncoder` calls Qwen3 (all hidden states returned, the second to last kept), without the all-ones
    attention mask it passes: transformers drops that for the causal SDPA kernel anyway, after reading its values,
    which a meta tensor does not have."""
    ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
    model(input_ids=ids, output_hidden_states=True).hidden_states[-2][0].float()


def _encode_image(vae, size: int) -> None:
    """As `FluxVaeEncoder` calls the VAE: the posterior's mode of one image in fp32."""
    vae.encode(torch.empty(1, 3, size, size, device="meta")).latent_dist.mode()


def encode_memory(text_tokens: int = 0, image_size: int = 0, turns: bool = False) -> dict:
    """The headless encode step: a caption of `text_tokens` through the text encoder, then an image of `image_size`
    through the VAE. turns=False: both models resident together; turns=True: as zimage_core.encoders.load_encoders
    runs them, in turn (the text encoder leaves the device for host RAM before the VAE joins it)."""
    models = ([_qwen3()] if text_tokens else []) + ([_flux_vae()] if image_size else [])
    vae = models[-1] if image_size else None
    if turns and vae is not None and text_tokens:
        host_homes([vae])  # waits in host RAM
    tracker = LiveBytes("meta")
    for model in models:
        tracker.adopt(_tensors(model), "weights")  # the VAE's decoder is loaded too, though it never runs
    tracker.reset_peak()
    with tracker, flash_attention(), torch.no_grad():
        if text_tokens:
            _encode_text(models[0], text_tokens)
        if turns and vae is not None and text_tokens:
            host_homes([models[0]])
            vae.to("meta")
        if image_size:
            _encode_image(vae, image_size)
    return tracker.summary()


def encoders(sizes) -> dict:
    out = {"text encoder, 512 tokens": encode_memory(text_tokens=512),
           "text encoder, 128 tokens": encode_memory(text_tokens=128)}
    for size in sizes:
        out[f"VAE encode, {size}²"] = encode_memory(image_size=size)
        out[f"both resident, 512 tokens + {size}²"] = encode_memory(512, size)
        out[f"in turn (the pack), 512 tokens + {size}²"] = encode_memory(512, size, turns=True)
    for name, r in out.items():
        print(f"{name:<28} {r['peak_gib']:.2f} GiB (weights {r['weights_gib']:.2f}, "
              f"activations {r['activations_gib']:.2f})")
    return out


# ---------------------------------------------------------------------------------------------- tracker checks
VALIDATION = ZImageConfig(dim=512, n_layers=4, n_refiner_layers=1, n_heads=4, cap_feat_dim=256)


def validate_worker(device: str, offload: bool) -> dict:
    """An 8-step sample and an SFT step of a small model (head_dim 128 as the real one) at 512², computed for real
    on the CPU or shapes-only on meta. The CPU run also reads the process RSS during the measured work: its rise
    over the level at the start is the work's memory as the OS sees it."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    out = {}
    for name, fn in (("sample", sampling), ("sft", sft_step)):
        if name == "sample" and device == "cpu":
            fn("ours", VALIDATION, 512, "bf16", offload, device)  # first use of the CPU kernels (the SFT step
        gc.collect()                                               # warms up in its own first optimizer step)
        rss = RssPeak()
        out[name] = fn("ours", VALIDATION, 512, "bf16", offload, device, watch=lambda: rss)
        out[name]["rss_rise_gib"] = rss.delta_mib / 1024
    return out


def growth(impl: str, size: int = 1024) -> dict:
    """Checkpointed SFT memory per block: (peak at 30 layers - peak at 20 layers) / 10, without the weights, against
    the bytes of one block's input [1, S, dim] in bf16 (what a checkpoint keeps per block)."""
    peaks = {}
    for n in (20, 30):
        r = sft_step(impl, ZImageConfig(n_layers=n), size, "bf16", False)
        peaks[n] = r["peak_gib"] - r["weights_gib"] - r["trainable_gib"]
    tokens = (size // 16) ** 2 + CAPTION_TOKENS
    return {"per_block_gib": (peaks[30] - peaks[20]) / 10, "block_input_gib": tokens * ZImageConfig().dim * 2 / GIB}


# ---------------------------------------------------------------------------------------------- the table
MODES = {"bf16": ("bf16", False), "fp8": ("fp8", False), "bf16 + offload": ("bf16", True),
         "fp8 + offload": ("fp8", True)}


def _safe(fn, *args) -> dict | str:
    try:
        return fn(*args)
    except Exception as err:  # a reference mode that cannot run here (diffusers' group offload needs a device
        return f"n/a: {type(err).__name__}: {str(err).splitlines()[0][:120]}"  # module with streams: no meta)


def run_all(sizes, with_diffusers: bool, log=print) -> list[dict]:
    config, rows = ZImageConfig(), []
    for work, fn in (("8-step sampling", sampling), ("SFT step, rank 32", sft_step)):
        for mode, (storage, offload) in MODES.items():
            for size in sizes:
                row = {"work": work, "mode": mode, "size": size,
                       "ours": _safe(fn, "ours", config, size, storage, offload)}
                if with_diffusers:
                    row["diffusers"] = _safe(fn, "diffusers", config, size, storage, offload)
                rows.append(row)
                log(_line(row))
    for mode in ("bf16", "fp8", "fp8 + offload"):  # each row runs 2 x 100 teacher forwards: the smallest and largest
        storage, offload = MODES[mode]
        for chunk in (1, 0) if mode == "fp8 + offload" else (1,):
            for size in sizes:
                row = {"work": f"trajectory step (student_chunk {chunk})", "mode": mode, "size": size,
                       "ours": _safe(trajectory_step, config, size, storage, offload, chunk)}
                rows.append(row)
                log(_line(row))
    return rows


def _gib(result) -> str:
    return f"{result['peak_gib']:.2f}" if isinstance(result, dict) else "n/a"


def _line(row) -> str:
    ours_, ref = row["ours"], row.get("diffusers")
    text = f"{row['work']:<36} {row['mode']:<15} {row['size']}²  ours {_gib(ours_)} GiB"
    if isinstance(ours_, dict):
        text += (f" (weights {ours_['weights_gib']:.2f}, LoRA + AdamW {ours_['trainable_gib']:.2f}, "
                 f"activations {ours_['activations_gib']:.2f})")
    else:
        text += f" [{ours_}]"
    if ref is not None:
        text += f"  diffusers {_gib(ref)} GiB"
        if isinstance(ref, dict) and isinstance(ours_, dict):
            text += f"  ratio {ours_['peak_gib'] / ref['peak_gib']:.2f}x"
        elif isinstance(ref, str):
            text += f" [{ref}]"
    return text


def markdown(rows, sizes) -> str:
    head = "| work | mode | " + " | ".join(f"{s}² ours | diffusers | ratio" for s in sizes) + " |"
    lines = [head, "|" + "---|" * (2 + 3 * len(sizes))]
    keyed = {(r["work"], r["mode"], r["size"]): r for r in rows}
    for work, mode in dict.fromkeys((r["work"], r["mode"]) for r in rows):
        cells = []
        for s in sizes:
            r = keyed[(work, mode, s)]
            o, d = r["ours"], r.get("diffusers")
            ratio = (f"{o['peak_gib'] / d['peak_gib']:.2f}x" if isinstance(o, dict) and isinstance(d, dict) else "-")
            cells += [_gib(o), _gib(d) if d is not None else "-", ratio]
        lines.append(f"| {work} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- quantized files
QUANT_STORAGES = ("bf16", "fp8", *FILES)


def run_quant(sizes, storages=QUANT_STORAGES, log=print) -> list[dict]:
    """8-step sampling and a rank-32 SFT step (plain, and with the checkpointed block inputs in host RAM) per stored
    format, offload none / block; the first size for every format before the next size (each line is logged as it
    is measured: a real-size run takes a minute or more here)."""
    config = ZImageConfig()
    rows = {(s, o): {"storage": s, "offload": "block" if o else "none"} for s in storages for o in (False, True)}
    works = {"sample": lambda s, o, size: sampling("ours", config, size, s, o),
             "sft": lambda s, o, size: sft_step("ours", config, size, s, o),
             "sft host": lambda s, o, size: sft_step("ours", config, size, s, o, host_inputs=True)}
    for size in sizes:
        for (storage, offload), row in rows.items():
            for work, fn in works.items():
                row[f"{work} {size}"] = result = _safe(fn, storage, offload, size)
                log(f"{storage:<14} offload {row['offload']:<6} {work:<9} {size}²  {_gib(result)} GiB"
                    + (f" (weights {result['weights_gib']:.3f})" if isinstance(result, dict) else ""))
    return list(rows.values())


def quant_markdown(rows, sizes) -> str:
    cols = [f"{w} {s}" for w in ("sample", "sft", "sft host") for s in sizes]
    names = {"sample": "8-step sampling", "sft": "SFT step", "sft host": "SFT step, inputs in host RAM"}
    head = ["file", "offload", "resident weights GiB (file GiB)",
            *[f"{names[c.rsplit(' ', 1)[0]]} {c.rsplit(' ', 1)[1]}²" for c in cols]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        first = r[f"sample {sizes[0]}"]
        resident = f"{first['weights_gib']:.2f}" if isinstance(first, dict) else "n/a"
        if r["storage"] in FILE_GB and r["offload"] == "none":
            resident += f" ({FILE_GB[r['storage']] * 1e9 / GIB:.2f})"
        lines.append("| " + " | ".join([r["storage"], r["offload"], resident, *[_gib(r[c]) for c in cols]]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 512])
    parser.add_argument("--skip-diffusers", action="store_true")
    parser.add_argument("--validate", action="store_true")
    parser.add_argument("--growth", action="store_true")
    parser.add_argument("--encoders", action="store_true", help="Qwen3-4B and Flux-VAE encode memory (headless)")
    parser.add_argument("--quant", action="store_true", help="the quantized files (benchmarks/quant_formats.py) next "
                                                             "to bf16 and fp8, with the host-RAM block inputs")
    parser.add_argument("--storages", nargs="+", choices=QUANT_STORAGES, help="--quant: only these")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", nargs=2, metavar=("DEVICE", "OFFLOAD"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(validate_worker(args.worker[0], args.worker[1] == "block")))
        return
    torch.set_num_threads(1)
    report: dict = {}
    if args.validate:
        report["validation"] = validation()
    if args.growth:
        report["growth"] = {impl: growth(impl) for impl in ("ours", "diffusers")}
        for impl, g in report["growth"].items():
            print(f"checkpointed SFT, {impl}: {g['per_block_gib'] * 1024:.1f} MiB per block "
                  f"(one block's bf16 input: {g['block_input_gib'] * 1024:.1f} MiB)")
    if args.encoders:
        report["encoders"] = encoders(args.sizes)
    if args.quant:
        report["quant"] = run_quant(args.sizes, args.storages or QUANT_STORAGES,
                                    log=lambda line: print(line, flush=True))
        print()
        print(quant_markdown(report["quant"], args.sizes))
    if not (args.validate or args.growth or args.encoders or args.quant):
        rows = run_all(args.sizes, not args.skip_diffusers)
        report["rows"] = rows
        print()
        print(markdown(rows, args.sizes))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


def validation() -> dict:
    """The meta run must count exactly the bytes of the real CPU run; the CPU run's RSS shows what the tracker
    cannot see (allocator and kernel workspace)."""
    out = {}
    for offload in ("none", "block"):
        real = run_worker(Path(__file__), "cpu", offload)
        meta = run_worker(Path(__file__), "meta", offload)
        out[offload] = {"cpu": real, "meta": meta}
        for work in ("sample", "sft"):
            r, m = real[work], meta[work]
            print(f"validation, offload {offload}, {work}: peak meta {m['peak_gib'] * 2**30:.0f} B, real CPU "
                  f"{r['peak_gib'] * 2**30:.0f} B; rise during the work: tracked {r['rise_gib'] * 1024:.1f} MiB, "
                  f"RSS {r['rss_rise_gib'] * 1024:.1f} MiB")
    return out


if __name__ == "__main__":
    main()
