"""ZImageTurboTrainLora (experimental): trains a LoRA with zimage_core.training inside ComfyUI.

The node only binds ComfyUI to the core trainer: the VAE and text encoder become the trainer's encoder callbacks,
ComfyUI's progress bar / Cancel become its progress and should_stop callbacks, and the files go to ComfyUI's folders:
the encoded dataset, checkpoint, loss curve and validation grid under output/zimage_training/<name>/, the finished
LoRA into models/loras/<name>.safetensors (the name is checked to stay inside that folder).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from typing_extensions import override

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io
from server import PromptServer

from ..zimage_core.training import Encoders, TrainConfig, build_cache, train
from ..zimage_core.training.config import DEFAULT_TARGETS, LR_SCHEDULES, TARGET_PRESETS
from ..zimage_core.training.optimizers import OPTIMIZERS, require_optimizer
from .lora_stack import NONE, check_lora_choices, lora_options, spec_for
from .metadata import search_aliases
from .types import ROLE_DISTILLPATCH, ROLE_TRAINED, ZIMAGE_MODEL, LoraSpec, ZImageModel, log

SCHEMES = {"sft": "sft", "differential": "differential", "distill": "trajectory"}
SCHEME_LORA = {"differential": "preset_lora", "distill": "sft_lora"}  # the LoRA input each scheme reads
SCHEME_LORA_ROLE = {"differential": "the frozen training adapter", "distill": "the SFT LoRA to make 8-step capable"}
TARGETS_CUSTOM = "custom (targets)"
WORK_SUBDIR = "zimage_training"
_NAME_OK = re.compile(r"[^A-Za-z0-9._-]+")


def safe_output_name(name: str) -> str:
    """The LoRA file stem: path parts are refused (the file must stay in the loras folder), other characters that
    are unsafe in file names become '_'."""
    stem = name.strip()
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    if not stem or "/" in stem or "\\" in stem or ".." in stem or os.sep in stem or stem.startswith("."):
        raise ValueError(f"output_name '{name}' must be a plain file name (no folders, no '..'): the LoRA is written "
                         f"into the loras folder and nowhere else")
    return _NAME_OK.sub("_", stem)


def check_overwrite(path: Path) -> None:
    """Only a LoRA this trainer wrote (the same run, resumed or repeated) may be replaced."""
    if not path.exists():
        return
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            ours = (f.metadata() or {}).get("trainer") == "zimage_core.training"
    except Exception:  # noqa: BLE001  not a readable safetensors file: certainly not ours
        ours = False
    if not ours:
        raise ValueError(f"models/loras/{path.name} already exists and was not written by this trainer; choose "
                         f"another output_name")


def dataset_roots() -> list[Path]:
    """The folders the node reads datasets from: ComfyUI's input folder, and the `datasets` model folders where the
    host registers them (newer ComfyUI)."""
    roots = [Path(folder_paths.get_input_directory())]
    if "datasets" in folder_paths.folder_names_and_paths:
        roots += [Path(p) for p in folder_paths.get_folder_paths("datasets")]
    return roots


def dataset_path(folder: str) -> Path:
    """The dataset folder `folder` names, relative to ComfyUI's input folder (or a registered datasets folder). Like
    ComfyUI's own dataset nodes, the node reads nothing else: anyone who can queue a prompt on a shared server could
    otherwise read any folder of the machine. Absolute paths and '..' escapes are refused, naming where to put the
    dataset; a folder (or symlink) the machine's owner placed there is fine. The headless CLI takes any path."""
    roots = dataset_roots()
    where = " or ".join(f"'{r}'" for r in roots)
    name = (folder or "").strip()
    if not name:
        raise ValueError(f"dataset_folder is empty: put the images and captions in a folder inside ComfyUI's input "
                         f"folder ({where}) and give that folder's name")
    if Path(name).is_absolute() or name.startswith("~") or name[1:3] in (":\\", ":/") or name.startswith("\\"):
        raise ValueError(f"dataset_folder '{folder}' is an absolute path, but the trainer node reads datasets only "
                         f"from ComfyUI's input folder ({where}): move, copy or symlink the dataset folder there and "
                         f"give its name, e.g. 'my_dataset' (the headless `python -m zimage_core train` takes any "
                         f"path)")
    for root in roots:
        path = Path(os.path.normpath(root / name))
        if path != root and not path.is_relative_to(root):
            raise ValueError(f"dataset_folder '{folder}' leaves ComfyUI's input folder ({where}); give the name of a "
                             f"folder inside it")
        if path.is_dir():
            return path
    return Path(os.path.normpath(roots[0] / name))


def _tensor_id(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        flat = t.detach().float().flatten()
        h.update(str(tuple(t.shape)).encode())
        h.update(flat[:4096].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def comfy_encoders(clip, vae, latent_format) -> Encoders:
    """The trainer's encoders from ComfyUI's CLIP and VAE: images to model-space latents (Flux process_in, as
    ComfyUI's samplers do) at the VAE's own spatial factor, text to [L, D] features with padding removed."""

    def encode_image(image: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]
        return latent_format.process_in(vae.encode(pixels))[0].float().cpu()

    def encode_text(text: str) -> torch.Tensor:
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        features, extra = cond[0][0][0], cond[0][1]
        mask = extra.get("attention_mask") if isinstance(extra, dict) else None
        if mask is not None and mask.shape[-1] == features.shape[0]:
            features = features[mask[0].bool().to(features.device)]
        return features.float().cpu()

    vae_id = getattr(vae, "encoder_id", None)  # the demo encoders name themselves
    if vae_id is None:
        vae_id = _tensor_id(list(vae.first_stage_model.state_dict().values())[:2])
    clip_id = getattr(clip, "encoder_id", None)
    if clip_id is None:
        clip_id = _tensor_id(list(clip.cond_stage_model.state_dict().values())[:2])
    return Encoders(encode_image, encode_text, f"comfyui:vae={vae_id}:clip={clip_id}",
                    factor=vae.spacial_compression_encode())


def to_image_tensor(path) -> torch.Tensor:
    """A PNG as ComfyUI IMAGE [1, H, W, 3] in 0..1 (a blank square when there is no file)."""
    if path is None or not Path(path).is_file():
        return torch.zeros(1, 64, 64, 3)
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)[None]


def image_batch(paths) -> torch.Tensor:
    """PNGs of one size as one IMAGE batch [N, H, W, 3] (a blank square when there are none)."""
    images = [to_image_tensor(p) for p in paths]
    if not images:
        return to_image_tensor(None)
    return torch.cat([im for im in images if im.shape == images[-1].shape])


class ZImageTurboTrainLora(io.ComfyNode):
    @classmethod
    @override
    def define_schema(cls) -> io.Schema:
        options = lora_options()
        return io.Schema(
            node_id="ZImageTurboTrainLora",
            display_name="Z-Image Turbo Train LoRA (experimental)",
            category="ZImageTurbo",
            **search_aliases("lora trainer", "train lora", "training", "finetune", "distill"),
            is_experimental=True,
            description="EXPERIMENTAL. Trains a LoRA on the model (with its LoRA stack) from a folder of images with "
                        ".txt captions or metadata.csv, with a scheme that keeps the 8-step Turbo: sft (use the "
                        "result with the DistillPatch), differential (train through a frozen preset LoRA, export "
                        "without it) or distill (make an SFT LoRA 8-step capable by trajectory imitation). A "
                        "DistillPatch in the incoming stack is used for validation only. Cancel saves a checkpoint; "
                        "queueing the same output name again resumes it. The LoRA goes to models/loras.",
            inputs=[
                ZIMAGE_MODEL.Input("model", tooltip="Base model with its LoRA stack: user LoRAs are trained through "
                                                    "(merged), a DistillPatch is only used in the validation grid."),
                io.Clip.Input("clip", tooltip="Text encoder for the captions and the validation prompt (Qwen3-4B "
                                              "from CLIPLoader for the released model)."),
                io.Vae.Input("vae", tooltip="The Flux VAE (ae.safetensors): encodes the images, decodes the "
                                            "validation grid."),
                io.String.Input("dataset_folder", default="",
                                tooltip="Folder of images with same-name .txt captions (or a metadata.csv with "
                                        "image,prompt columns), inside ComfyUI's input folder: give its name, e.g. "
                                        "my_dataset (absolute paths and '..' are refused)."),
                io.Combo.Input("scheme", options=list(SCHEMES), default="sft",
                               tooltip="sft: plain LoRA, use it with the DistillPatch at 8 steps. differential: "
                                       "train with the preset LoRA applied (frozen) and export without it. "
                                       "distill: trajectory imitation that turns the SFT LoRA into an 8-step LoRA."),
                io.Combo.Input("preset_lora", options=options, default=NONE,
                               tooltip="Scheme differential: the frozen training adapter LoRA (from models/loras)."),
                io.Combo.Input("sft_lora", options=options, default=NONE,
                               tooltip="Scheme distill: the SFT LoRA to distil (teacher and starting point)."),
                io.Int.Input("steps", default=250, min=1, max=100000, tooltip="Optimizer steps."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=10.0, step=1e-5, round=1e-7,
                               tooltip="Learning rate (1e-4 is DiffSynth's Z-Image recipe for AdamW); for the "
                                       "prodigy optimizer a multiplier of its own estimate: use 1.0."),
                io.Int.Input("rank", default=32, min=1, max=512, tooltip="LoRA rank (alpha = rank)."),
                io.String.Input("targets", default=",".join(DEFAULT_TARGETS),
                                tooltip="Comma-separated module names to train in every block: to_q, to_k, to_v, "
                                        "to_out.0 (attention), w1, w2, w3 (feed-forward)."),
                io.Int.Input("max_pixels", default=1024 * 1024, min=256, max=4096 * 4096, step=256,
                             tooltip="Training images are resized to at most this many pixels (aspect kept, sides "
                                     "multiples of 16)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the LoRA init, batch order, noise and timesteps."),
                io.String.Input("validation_prompt", default="", multiline=True,
                                tooltip="Prompt(s) of the validation grid and the turbo check (before/after, 8 steps "
                                        "and 30 steps), one per line; empty = the first caption. More prompts make "
                                        "the turbo check steadier."),
                io.String.Input("output_name", default="zimage_turbo_lora",
                                tooltip="File name of the LoRA in models/loras (no folders). The same name again "
                                        "resumes its checkpoint."),
                # Appended after the original inputs (saved workflows keep their widget order); optional, so API
                # prompts saved before they existed run with these defaults, which are the earlier behaviour.
                io.Int.Input("batch_size", default=1, min=1, max=64, optional=True,
                             tooltip="Images per optimizer step (a batch holds one aspect-ratio bucket)."),
                io.Int.Input("grad_accum", default=1, min=1, max=256, optional=True,
                             tooltip="Gradient accumulation: micro-batches per optimizer step (effective batch = "
                                     "batch_size x grad_accum)."),
                io.Float.Input("alpha", default=0.0, min=0.0, max=1024.0, step=1.0, optional=True,
                               tooltip="LoRA alpha (scale = alpha / rank); 0 = alpha equal to rank (scale 1)."),
                io.Combo.Input("target_preset", options=[TARGETS_CUSTOM, *TARGET_PRESETS], default=TARGETS_CUSTOM,
                               optional=True,
                               tooltip="Modules to train in every block: custom = the targets input; attention = "
                                       "to_q/k/v/out; attention_ffn = + w1/w2/w3 (the default targets); all_linear "
                                       "= + adaLN_modulation."),
                io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="adamw", optional=True,
                               tooltip="adamw (default), adafactor (torch's, less memory), prodigy (needs pip "
                                       "package prodigyopt; learning_rate 1.0), adamw8bit (needs bitsandbytes)."),
                io.Combo.Input("lr_schedule", options=list(LR_SCHEDULES), default="constant", optional=True,
                               tooltip="constant; constant_with_warmup, cosine, linear (with warmup_steps of linear "
                                       "warm-up); diffsynth = the first 5 steps at lr/3."),
                io.Int.Input("warmup_steps", default=0, min=0, max=100000, optional=True,
                             tooltip="Linear warm-up steps of constant_with_warmup / cosine / linear."),
                io.Float.Input("caption_dropout_rate", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Share of samples trained with the empty caption (ai-toolkit's option; "
                                       "0.05 is common): keeps the LoRA working without the exact caption."),
                io.Boolean.Input("flip_horizontal", default=False, optional=True,
                                 tooltip="Train half the samples on the mirrored image (encoded once, cached). Off "
                                         "for text, logos or asymmetric subjects."),
                io.Float.Input("ema_decay", default=0.0, min=0.0, max=0.9999, step=0.001, round=0.0001,
                               optional=True,
                               tooltip="0 = off. Else an EMA of the LoRA weights (e.g. 0.99), saved next to the LoRA "
                                       "as <output_name>_ema.safetensors in models/loras."),
                io.Int.Input("validation_every", default=0, min=0, max=100000, optional=True,
                             tooltip="0 = grid only before/after. N: also an 8-step grid and the loss curve every "
                                     "N steps (validation_steps output, and the work folder)."),
                io.Int.Input("save_every", default=0, min=0, max=100000, optional=True,
                             tooltip="0 = only the final LoRA. N: also <output_name>.stepNNNNNN.safetensors every "
                                     "N steps in output/zimage_training/<output_name>/."),
                io.Int.Input("keep_last", default=0, min=0, max=1000, optional=True,
                             tooltip="With save_every: keep only the newest K intermediate LoRA files (0 = all)."),
                io.Boolean.Input("checkpoint_inputs_on_host", default=False, optional=True,
                                 tooltip="Keep each checkpointed block's input in system RAM between the forward and "
                                         "backward pass: about 0.7 GiB less GPU memory at 1024² (a rank-32 step), a "
                                         "few extra copies per block per step, the same LoRA (bit-exact)."),
                io.Float.Input("preservation_weight", default=0.0, min=0.0, max=100.0, step=0.1, optional=True,
                               tooltip="0 = off. Output preservation (ai-toolkit's Differential Output "
                                       "Preservation): the LoRA is also trained to leave the model's output "
                                       "unchanged for each caption with preservation_trigger replaced by one of "
                                       "preservation_classes, so the other words keep drawing what they drew. 1.0 "
                                       "is usual; each step costs about twice as much."),
                io.String.Input("preservation_trigger", default="", optional=True,
                                tooltip="With preservation_weight > 0: the word of your captions that names the "
                                        "new concept (e.g. 'ohwx', 'bar'); captions without it are not preserved."),
                io.String.Input("preservation_classes", default="", optional=True,
                                tooltip="With preservation_weight > 0: comma-separated words the trigger is "
                                        "replaced by (one drawn per sample), e.g. 'man, woman' or 'red, green, "
                                        "blue': what must stay as it was."),
                io.Boolean.Input("preservation_blank", default=False, optional=True,
                                 tooltip="With preservation_weight > 0: also keep the model's output for the empty "
                                         "prompt (ai-toolkit's Blank Prompt Preservation), which cfg > 1 subtracts; "
                                         "one more sample per preserved sample."),
            ],
            outputs=[
                ZIMAGE_MODEL.Output("zimage_model", display_name="model",
                                    tooltip="The input model with the trained LoRA added to its stack."),
                io.String.Output("lora_name", display_name="lora_name",
                                 tooltip="File name of the trained LoRA in models/loras."),
                io.Image.Output("loss_curve", display_name="loss_curve", tooltip="Training loss per step."),
                io.Image.Output("validation_grid", display_name="validation_grid",
                                tooltip="Validation samples before and after training, at 8 steps/cfg 1 and 30 "
                                        "steps/cfg 2 (and with the DistillPatch when the stack has one)."),
                io.Image.Output("validation_steps", display_name="validation_steps",
                                tooltip="One 8-step grid per validation point (validation_every), as an image "
                                        "batch; a blank image without periodic validation."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    @override
    def fingerprint_inputs(cls, dataset_folder, **kwargs):
        try:
            path = dataset_path(dataset_folder)  # re-run when the dataset changes
        except ValueError as e:  # refused by validate_inputs / execute, with this message
            return str(e)
        if not path.is_dir():
            return str(path)
        stats = [(e.name, e.stat().st_mtime, e.stat().st_size) for e in sorted(os.scandir(path), key=lambda e: e.name)]
        return hashlib.sha256(repr(stats).encode()).hexdigest()

    @classmethod
    @override
    def validate_inputs(cls, output_name, scheme, preset_lora, sft_lora, dataset_folder):
        # Every input named here skips ComfyUI's own checks; after 0.3.75 those check each combo value against its
        # options, which would refuse a saved workflow whose *unused* preset_lora / sft_lora names a deleted file.
        # So scheme and both LoRA choices are checked here, each LoRA only when the scheme uses it.
        try:
            safe_output_name(output_name)
            if dataset_folder is not None:  # None: linked from another node, checked at run time
                dataset_path(dataset_folder)
        except ValueError as e:
            return str(e)
        if scheme is None:  # linked from another node: its value is known only at run time
            return True
        if scheme not in SCHEMES:
            return f"scheme '{scheme}' is not one of {', '.join(SCHEMES)}"
        used = SCHEME_LORA.get(scheme)
        if used is None:
            return True
        input_name, value = used, {"preset_lora": preset_lora, "sft_lora": sft_lora}[used]
        if value == NONE:
            return f"scheme {scheme} needs a {input_name} ({SCHEME_LORA_ROLE[scheme]})"
        return True if value is None else check_lora_choices(**{input_name: value})

    @classmethod
    @override
    def execute(cls, model: ZImageModel, clip, vae, dataset_folder, scheme, preset_lora, sft_lora, steps,
                learning_rate, rank, targets, max_pixels, seed, validation_prompt, output_name, batch_size=1,
                grad_accum=1, alpha=0.0, target_preset=TARGETS_CUSTOM, optimizer="adamw", lr_schedule="constant",
                warmup_steps=0, caption_dropout_rate=0.0, flip_horizontal=False, ema_decay=0.0, validation_every=0,
                save_every=0, keep_last=0, checkpoint_inputs_on_host=False, preservation_weight=0.0,
                preservation_trigger="", preservation_classes="", preservation_blank=False) -> io.NodeOutput:
        if clip is None or vae is None:
            raise ValueError("the trainer needs a text encoder (clip) and the Flux VAE (vae)")
        name = safe_output_name(output_name)
        data_dir = dataset_path(dataset_folder)
        if not data_dir.is_dir():
            raise ValueError(f"dataset folder '{dataset_folder}' not found (looked for {data_dir}; datasets go in "
                             f"ComfyUI's input folder)")
        core_scheme = SCHEMES[scheme]
        if scheme == "differential" and preset_lora == NONE:
            raise ValueError("scheme differential needs a preset_lora (the frozen training adapter)")
        if scheme == "distill" and sft_lora == NONE:
            raise ValueError("scheme distill needs an sft_lora (the SFT LoRA to make 8-step capable)")
        loras_dir = Path(folder_paths.get_folder_paths("loras")[0])
        final = (loras_dir / f"{name}.safetensors").resolve()
        if final.parent != loras_dir.resolve():
            raise ValueError(f"output_name '{output_name}' would leave the loras folder")
        final_ema = final.with_name(f"{name}_ema.safetensors")
        check_overwrite(final)
        if ema_decay > 0:
            check_overwrite(final_ema)
        target_list = (target_preset,) if target_preset != TARGETS_CUSTOM else tuple(
            t.strip() for t in targets.split(",") if t.strip())
        work = Path(folder_paths.get_output_directory()) / WORK_SUBDIR / name
        prompts = [line.strip() for line in validation_prompt.splitlines() if line.strip()]

        # Training base: the incoming stack without its DistillPatch (which only joins the validation grid).
        model.refuse_step_ranges("The trainer (it trains over the incoming stack at every step)")
        patches = [s for s in model.loras if s.role == ROLE_DISTILLPATCH]
        base = replace(model, loras=tuple(s for s in model.loras if s.role != ROLE_DISTILLPATCH))
        node_id = cls.hidden.unique_id

        # The whole config is checked (and an optional optimizer package looked up) before anything is encoded.
        preset = spec_for(preset_lora, 1.0, "preset").path if scheme == "differential" else None
        init = spec_for(sft_lora, 1.0, "sft").path if scheme == "distill" else None
        config = TrainConfig(scheme=core_scheme, base_model=model.base.name, model_variant=model.variant,
                             rank=rank, alpha=alpha or None,
                             targets=target_list, preset_lora=preset, init_lora=init,
                             distill_patch=patches[-1].path if patches else None, dataset_dir=str(data_dir),
                             cache_dir=str(work / "cache"), max_pixels=max_pixels, steps=steps, batch_size=batch_size,
                             grad_accum=grad_accum, lr=learning_rate, lr_schedule=lr_schedule,
                             warmup_steps=warmup_steps, optimizer=optimizer, ema_decay=ema_decay,
                             caption_dropout_rate=caption_dropout_rate, flip_horizontal=bool(flip_horizontal),
                             seed=seed % 2**63, output_dir=str(work), output_name=name, resume="auto",
                             validation_prompts=prompts, validation_seed=seed % 2**63,
                             validation_every=validation_every, save_every=save_every, keep_last=keep_last,
                             checkpoint_inputs_on_host=bool(checkpoint_inputs_on_host),
                             preservation_weight=preservation_weight, preservation_trigger=preservation_trigger,
                             preservation_classes=preservation_classes, preservation_blank=bool(preservation_blank),
                             checkpoint_every=max(50, steps // 10), log_every=max(1, steps // 20)).validate_settings()
        require_optimizer(optimizer)

        def say(text: str):
            log.info("ZImageTurbo trainer: %s", text)
            if node_id is not None and PromptServer.instance is not None:
                PromptServer.instance.send_progress_text(text, node_id)

        encoders = comfy_encoders(clip, vae, model.patcher.model.latent_format)
        encode_bar = comfy.utils.ProgressBar(1)
        data = build_cache(data_dir, work / "cache", encoders, max_pixels=max_pixels, prompts=prompts,
                           progress=lambda i, n: encode_bar.update_absolute(i, n), flip=config.flip_horizontal)

        patcher = model.patcher
        comfy.model_management.load_models_gpu([patcher], memory_required=1e20, force_full_load=True)
        base.activate()
        bar = comfy.utils.ProgressBar(steps)

        def progress(step, total, loss):
            bar.update_absolute(step, total)
            say(f"step {step}/{total}  loss {loss:.5f}")

        def should_stop():
            comfy.model_management.throw_exception_if_processing_interrupted()  # raises: checkpoint, then Cancel
            return False

        def decode(latent: torch.Tensor) -> Image.Image:
            with torch.inference_mode():  # the VAE's weights are inference tensors; no autograd here
                raw = patcher.model.latent_format.process_out(latent[None].float())
                image = vae.decode(raw)[0]
            return Image.fromarray((image.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8))

        result = train(base.transformer, config, data, progress=progress, should_stop=should_stop, decode=decode,
                       encode_text=encoders.encode_text, log=say)
        if result.lora_path is None:
            raise RuntimeError(f"training of '{name}' ended at step {result.step} without writing a LoRA")

        loras_dir.mkdir(parents=True, exist_ok=True)
        os.replace(result.lora_path, final)
        if result.ema_path is not None:
            os.replace(result.ema_path, final_ema)
        say(f"saved {final.name} after {result.step} steps; loss {result.losses[-1]:.5f}" if result.losses
            else f"saved {final.name}")

        trained = LoraSpec.from_file(str(final), final.name, 1.0, ROLE_TRAINED)
        return io.NodeOutput(model.with_loras(trained), final.name, to_image_tensor(result.loss_curve_path),
                             to_image_tensor(result.grid_path), image_batch(result.validation_grids))
