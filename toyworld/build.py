"""Build the toy world's shipped weights, stage by stage (each stage writes its safetensors and is skipped when the
file exists; the teacher also checkpoints periodically and resumes):

    PYTHONPATH=. python -m toyworld.build [--work /tmp/toyworld-build] [--stages vae,teacher,...]

Stages (outputs in toyworld/weights/, in this order; intermediates in --work):
  vae                 vae.safetensors               the fixed linear VAE (mean and scale fit on the base shapes and the
                                                    first new shape, a cross; shipped before the bar replaced it)
  teacher             teacher.safetensors           flow matching from scratch, caption dropout for cfg (ComfyUI layout)
  turbo_cfg2          --work/turbo_cfg2             round 1: the teacher distilled to 8 steps / cfg 1 (chord imitation
                                                    of its 50-step cfg-2 trajectories, full fine-tune)
  generic_sft         generic_sft.safetensors       SFT of round-1 turbo on real base-prompt images (the patch's teacher)
  distill_patch       distill_patch.safetensors     trajectory imitation of generic_sft on generic data, shipped as the
                                                    correction (TI - SFT) at rank 16 in DiffSynth's key format
  turbo_cfg4          --work/turbo_cfg4             round 2: round 1 re-distilled from the teacher at cfg 4
  turbo               turbo.safetensors             round 3: round 2 distilled from its own 30-step cfg-2 trajectories
                                                    (diffusers layout); the DistillPatch is used on it unchanged
  adapter             training_adapter.safetensors  de-distilling LoRA: plain FM LoRA, low lr, on turbo's 8-step outputs
  sft / differential / trajectory                   scheme 1 / 2 / 3 LoRAs for the new shape "bar"
  trajectory4 / trajectory2                         scheme 3 for 4 and 2 student steps
  *_purple                                          the same for the new colour "purple"

Full fine-tunes (teacher, turbo) are this module's own loops (the project trainer is LoRA-only); every LoRA is
trained with the project trainer `zimage_core.training.train`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from zimage_core import ZImageConfig, ZImageTransformer, load_transformer, save_transformer
from zimage_core.scheduler import shift_sigmas
from zimage_core.testing import init_random_
from zimage_core.training.checkpoint import load_checkpoint, save_checkpoint

from . import WEIGHTS, world
from .vae import FACTOR, ToyVAE

MODEL_CONFIG = ZImageConfig(dim=128, n_layers=4, n_refiner_layers=1, n_heads=4, cap_feat_dim=world.CAP_DIM,
                            axes_dims=(8, 12, 12))


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def captions_for(prompts: list[str]) -> list[torch.Tensor]:
    return [world.encode_text(p) for p in prompts]


def load_model(name: str, dtype=torch.float32) -> ZImageTransformer:
    return load_transformer(WEIGHTS / f"{name}.safetensors", dtype=dtype)


# ---------------------------------------------------------------------------------------------- stage: vae
def stage_vae(args) -> None:
    g = torch.Generator().manual_seed(1)
    images = torch.cat([world.random_batch(2000, shapes=world.SHAPES, generator=g).images])
    vae = ToyVAE.fit(images, seed=0)
    err = (vae.decode(vae.encode(images)) - images).pow(2).mean().sqrt()
    log(f"vae: scale {vae.scale:.3f}, round-trip RMSE {err:.2e}")
    vae.save(WEIGHTS / "vae.safetensors")


# ---------------------------------------------------------------------------------------------- stage: teacher
def _lr(step: int, total: int, peak: float, warmup: int = 100, floor: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def stage_teacher(args) -> None:
    work = Path(args.work)
    ckpt_path = work / "teacher.ckpt.safetensors"
    vae = ToyVAE.load()
    model = init_random_(ZImageTransformer(MODEL_CONFIG), seed=0)
    with torch.no_grad():  # start from a zero velocity (as DiT-style inits do)
        model.final_layer.linear.weight.zero_()
        model.final_layer.linear.bias.zero_()
    model.train()
    ema = ZImageTransformer(MODEL_CONFIG)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.teacher_lr, weight_decay=0.01, betas=(0.9, 0.99))
    start, history = 0, []
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        start, history = state["step"], state["history"]
        log(f"teacher: resumed at step {start}")
    empty = world.encode_text("")
    total, bs = args.teacher_steps, args.teacher_batch
    t0, running = time.time(), []
    for step in range(start, total):
        g = torch.Generator().manual_seed(1000003 * 7 + step)
        batch = world.random_batch(bs, generator=g)
        x0 = vae.encode(batch.images)
        noise = torch.randn(x0.shape, generator=g)
        sigma = shift_sigmas(torch.rand(bs, generator=g), 3.0)
        drop = torch.rand(bs, generator=g) < args.caption_dropout
        caps = [empty if d else c for d, c in zip(drop.tolist(), captions_for(batch.prompts))]
        xt = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        loss = (model(xt, sigma, caps) - (noise - x0)).pow(2).mean()
        for group in opt.param_groups:
            group["lr"] = _lr(step, total, args.teacher_lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        running.append(loss.item())
        if (step + 1) % 50 == 0:
            history.append((step + 1, sum(running) / len(running)))
            log(f"teacher step {step + 1}/{total} loss {history[-1][1]:.4f} ({(time.time() - t0) / (step + 1 - start):.2f} s/step)")
            running = []
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == total:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "ema": ema.state_dict(),  # atomic
                                        "opt": opt.state_dict(), "step": step + 1, "history": history})
            save_transformer(ema.eval(), work / "teacher_partial.safetensors", dtype=torch.bfloat16)
            ema.requires_grad_(False)
    finish_teacher(args)


def finish_teacher(args) -> None:
    """Ship the (possibly partial) EMA teacher in bf16, ComfyUI single-file layout."""
    work = Path(args.work)
    state = load_checkpoint(work / "teacher.ckpt.safetensors")
    ema = ZImageTransformer(MODEL_CONFIG)
    ema.load_state_dict(state["ema"])
    save_transformer(ema.eval(), WEIGHTS / "teacher.safetensors", layout="comfyui", dtype=torch.bfloat16)
    (WEIGHTS / "teacher.json").write_text(json.dumps({"steps": state["step"], "planned_steps": args.teacher_steps,
                                                      "batch": args.teacher_batch, "loss_history": state["history"]}))
    log(f"teacher: shipped EMA at step {state['step']}")


# ---------------------------------------------------------------------------------------------- stage: turbo
@dataclass(frozen=True)
class TurboRound:
    """One round of the turbo's distillation: `init` (a model name in weights/ or work/) fine-tuned on the chord
    targets of `trajectories` trajectories of `teacher` (`teacher_steps` steps, cfg `cfg`) for `steps` steps of
    `batch` pairs."""
    init: str
    cfg: float
    trajectories: int
    steps: int
    batch: int
    lr: float
    teacher: str = "teacher"
    teacher_steps: int = 50
    seed: int = 2025


# Round 1 is the first shipped turbo (teacher cfg 2). Round 2 re-distils it from the teacher at cfg 4: at cfg 2 the
# teacher draws the prompted shape in 0.64 of base samples, at cfg 4 in 0.90 (30 steps, 96 samples), and a turbo
# copies whatever its teacher draws (round 1 at 8 steps / cfg 1: 0.65). Z-Image-Turbo's own distillation
# (Decoupled-DMD) likewise bakes a strong CFG into the student ("CFG augmentation"). Round 2 reached its teacher's
# ceiling (0.89 vs the teacher's 0.90 at cfg 4, 0.91 at cfg 5; a round from the teacher at cfg 5 gave 0.82), but
# round 2 itself at 30 steps / cfg 2 draws 0.95: round 3 distils round 2's own 30-step cfg-2 trajectories into its
# 8 steps (0.93 at 8 steps / cfg 1, seed 9, 96 samples).
TURBO_ROUNDS = {"turbo_cfg2": TurboRound("teacher", 2.0, 512, 400, 64, 2e-4, seed=2024),
                "turbo_cfg4": TurboRound("turbo_cfg2", 4.0, 256, 300, 32, 1e-4),
                "turbo": TurboRound("turbo_cfg4", 2.0, 256, 200, 32, 5e-5, teacher="turbo_cfg4", teacher_steps=30,
                                    seed=2026)}


def _model_file(args, name: str) -> Path:
    shipped = WEIGHTS / f"{name}.safetensors"
    return shipped if shipped.exists() else Path(args.work) / f"{name}.safetensors"


def stage_turbo(args, name: str = "turbo") -> None:
    """Distil the teacher (50 steps, the round's cfg, student sigmas inserted:
    zimage_core.training.losses.trajectory_grids) into an 8-step cfg-1 model: a full fine-tune of the round's init
    on chord targets between the teacher states at the 8 student sigmas, with DiffSynth's per-step weights (the
    trajectory-imitation loss of scheme 3, applied to all weights). Round 1 (turbo_cfg2) is kept in --work; round 2
    is the shipped turbo."""
    from zimage_core.training.losses import chord_targets, student_step_weights, teacher_trajectory, trajectory_grids

    spec = TURBO_ROUNDS[name]
    work = Path(args.work)
    teacher = load_transformer(_model_file(args, spec.teacher))
    student_sigmas, grid, keep = trajectory_grids(spec.teacher_steps, 8, 3.0)
    weights = student_step_weights(student_sigmas)
    traj_path = work / f"{name}_trajectories.safetensors"
    prompts = world.base_prompts()
    if traj_path.exists():
        data = load_checkpoint(traj_path)
    else:
        t = time.time()
        g = torch.Generator().manual_seed(spec.seed)
        all_prompts = [prompts[i % len(prompts)] for i in range(spec.trajectories)]
        noise = torch.randn((len(all_prompts), 16, 16, 16), generator=g)
        empty = world.encode_text("")
        states = []
        for i in range(0, len(all_prompts), 64):
            caps = captions_for(all_prompts[i:i + 64])
            states.append(teacher_trajectory(teacher, noise[i:i + 64], caps, [empty] * len(caps), grid, spec.cfg,
                                             keep))
            log(f"{name}: teacher trajectories {i + len(caps)}/{len(all_prompts)}")
        data = {"states": torch.cat(states, dim=1), "prompts": all_prompts}
        save_checkpoint(traj_path, data)
        log(f"{name}: {len(all_prompts)} trajectories in {time.time() - t:.0f} s")
    states, traj_prompts = data["states"], data["prompts"]  # [9, N, C, H, W]
    targets = chord_targets(states, student_sigmas)  # [8, N, C, H, W]
    caps_all = captions_for(traj_prompts)
    model = (teacher if spec.init == "teacher" else load_transformer(_model_file(args, spec.init)))
    model = model.float().train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0, betas=(0.9, 0.99))
    n_traj = states.shape[1]
    t = time.time()
    for step in range(spec.steps):
        g = torch.Generator().manual_seed(77 + step)
        j = torch.randint(n_traj, (spec.batch,), generator=g)
        k = torch.randint(8, (spec.batch,), generator=g)
        x = states[k, j]
        v = model(x, student_sigmas[k], [caps_all[i] for i in j.tolist()])
        mse = (v - targets[k, j]).pow(2).flatten(1).mean(1)
        loss = (mse * weights[k]).mean()
        for group in opt.param_groups:
            group["lr"] = _lr(step, spec.steps, spec.lr, warmup=20, floor=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 25 == 0:
            log(f"{name} step {step + 1}/{spec.steps} loss {loss.item():.4f} "
                f"({(time.time() - t) / (step + 1):.2f} s/step)")
    model.eval().requires_grad_(False)
    out = WEIGHTS / "turbo.safetensors" if name == "turbo" else work / f"{name}.safetensors"
    save_transformer(model, out, layout="diffusers", dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------- LoRA stages
def encoders():
    """The toy world's `zimage_core.training.Encoders` (image: toy VAE, factor 2; text: word vectors)."""
    from zimage_core.training import Encoders

    vae = ToyVAE.load()
    return Encoders(vae.encode_pil, world.encode_text, "toyworld-v2:vae2x16:words32", factor=FACTOR)


def decode_preview(latent):
    from .vae import to_pil
    return to_pil(ToyVAE.load().decode(latent[None].float())[0])


def write_dataset(folder: Path, images: torch.Tensor, prompts: list[str], stem: str = "") -> Path:
    """PNG + sidecar caption per image (the trainer's kohya / ai-toolkit layout), 32x32 px."""
    from .vae import to_pil
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        to_pil(image).save(folder / f"{stem}{i:04d}.png")
        (folder / f"{stem}{i:04d}.txt").write_text(prompt, encoding="utf-8")
    return folder


def concept_dataset(work: Path, concept: str = world.NEW_SHAPE, n_images: int | None = None) -> Path:
    """The new concept's training set: n_images // len(prompts) real renderings of each of the concept's prompts
    (16 bars, 9 purple shapes). With output preservation 8 bars left the bar under-learned (SFT + DistillPatch drew
    it in 0.71 of samples, 16 bars: 0.85); 18 purple shapes did not help purple (SFT at 30 steps / cfg 2: 0.67)."""
    n_images = n_images or (16 if concept == world.NEW_SHAPE else 9)
    folder = work / f"data_concept_{concept}_{n_images}"
    if not folder.exists():
        base = world.concept_prompts(concept)
        prompts = [p for p in base for _ in range(n_images // len(base))]
        write_dataset(folder, world.prompt_batch(prompts, generator=torch.Generator().manual_seed(31)), prompts)
    return folder


# DiffSynth's example trains 5 epochs x 50 repeats; with output preservation both concepts are under-learned at 5.
# SFT at 8 steps / cfg 1, at 30 steps / cfg 2, base prompts kept (48 samples each): purple (round-2 turbo) 5 epochs
# 0.56 / 0.65 / 0.79 (squares drawn small and round), 10 epochs 0.65 / 0.83 / 0.83, 15 epochs 0.56 / 0.81 / 0.77;
# bar (round-3 turbo) 5 epochs 0.75 / 0.77 / 0.92, 10 epochs 0.88 / 0.94 / 0.88.
EPOCHS = 10


def seed_steps(dataset: Path, batch: int = 1) -> int:
    """EPOCHS x 50 repeats of the dataset (8000 steps for 16 bars, 4500 for 9 purple shapes)."""
    return EPOCHS * 50 * len(list(dataset.glob("*.png"))) // batch


def generic_dataset(work: Path, n_per_prompt: int = 4) -> Path:
    folder = work / "data_generic"
    if not folder.exists():
        prompts = [p for p in world.base_prompts() for _ in range(n_per_prompt)]
        write_dataset(folder, world.prompt_batch(prompts, generator=torch.Generator().manual_seed(32)), prompts)
    return folder


def train_lora(args, name: str, dataset: Path, model=None, **settings):
    """Train one LoRA with the project trainer (zimage_core.training.train) and ship it as weights/<name>."""
    import shutil
    from zimage_core.training import TrainConfig, build_cache, train

    work = Path(args.work)
    model = model if model is not None else load_model("turbo")
    repeats = settings.pop("repeats", 1)
    cache = build_cache(dataset, work / f"cache_{dataset.name}", encoders(), repeats=repeats,
                        prompts=world.concept_prompts() + world.base_prompts())
    config = TrainConfig(base_model="toyworld turbo", output_dir=str(work / name), output_name=name,
                         repeats=repeats, gradient_checkpointing=False, checkpoint_every=0, log_every=100,
                         save_dtype="bf16", resume="auto", **settings)
    t = time.time()
    result = train(model, config, cache, decode=decode_preview, encode_text=world.encode_text, log=log)
    log(f"{name}: {result.step} steps in {time.time() - t:.0f} s, loss first/last 50: "
        f"{sum(result.losses[:50]) / 50:.4f} / {sum(result.losses[-50:]) / 50:.4f}, turbo check {result.turbo_check}")
    shutil.copy(result.lora_path, WEIGHTS / f"{name}.safetensors")
    record_time(name, time.time() - t)
    return result


def record_time(name: str, seconds: float) -> None:
    """Wall seconds of a stage / LoRA in weights/timings.json (one torch thread, on a shared 2-core machine)."""
    import fcntl

    path = WEIGHTS / "timings.json"
    import tempfile

    with open(Path(tempfile.gettempdir()) / "toyworld-timings.lock", "w") as lock:  # stages may run in parallel
        fcntl.flock(lock, fcntl.LOCK_EX)
        timing = json.loads(path.read_text()) if path.exists() else {}
        timing[name] = round(seconds, 1)
        path.write_text(json.dumps(timing, indent=1))


def user_settings(args, concept: str = world.NEW_SHAPE) -> dict:
    """DiffSynth's recipe as the toy world scales it (rank 16, lr 5e-4, batch 1, DiffSynth's warm-up, bell weight),
    plus output preservation: the concept word replaced by the words it must not take over (the base shapes for the
    new shape, the base colours for the new colour). Without it every LoRA drew its concept for every prompt (base
    prompts kept in 0.08-0.23 of samples with the LoRA applied)."""
    classes = world.BASE_SHAPES if concept == world.NEW_SHAPE else world.COLOUR_NAMES
    return dict(rank=args.lora_rank, lr=args.lora_lr, batch_size=1, lr_schedule="diffsynth",
                validation_prompts=world.concept_prompts(concept), preservation_weight=args.preservation_weight,
                preservation_trigger=concept, preservation_classes=classes)


def _suffix(concept: str) -> str:
    return "" if concept == world.NEW_SHAPE else f"_{concept}"


def stage_sft(args, concept: str = world.NEW_SHAPE) -> None:
    data = concept_dataset(Path(args.work), concept)
    train_lora(args, f"lora_sft{_suffix(concept)}", data, scheme="sft", steps=seed_steps(data), repeats=50,
               **user_settings(args, concept))


def stage_adapter(args) -> None:
    """The de-distilling training adapter, made as ostris made the real one: an ordinary flow-matching LoRA trained
    at a low lr on the turbo model's own 8-step / cfg-1 outputs (base prompts)."""
    from .evaluate import decode, generate
    work = Path(args.work)
    folder = work / "data_turbo_outputs"
    if not folder.exists():
        turbo = load_model("turbo")
        prompts = [p for _ in range(args.adapter_images // 12) for p in world.base_prompts()]
        images = decode(generate(turbo, prompts, 8, 1.0, seed=4242))
        write_dataset(folder, images, prompts)
    train_lora(args, "training_adapter", folder, scheme="sft", rank=args.adapter_rank, lr=args.adapter_lr,
               steps=args.adapter_steps, batch_size=4, validation_prompts=world.base_prompts()[:4])


def stage_differential(args, concept: str = world.NEW_SHAPE) -> None:
    data = concept_dataset(Path(args.work), concept)
    train_lora(args, f"lora_differential{_suffix(concept)}", data, scheme="differential",
               steps=seed_steps(data), repeats=50, preset_lora=str(WEIGHTS / "training_adapter.safetensors"),
               **user_settings(args, concept))


# Trajectory imitation's (steps x batch 4, noises per image) by student steps, measured on purple (48 samples at the
# student's steps / cfg 1): for 8 steps 100 x 4 from 4 noises drew 0.79, 300 from 4 0.81, 300 from 8 0.83 (on 2 x 192
# fresh samples 100 from 4 0.76 / 0.70, 300 from 8 0.77 / 0.75; bar 0.92 at both on the 48); for 4 and 2 steps 300
# from 8 drew less than 100 from 4 (0.73 / 0.65 against 0.81 / 0.71).
TI_RECIPE = {8: (300, 8), 4: (100, 4), 2: (100, 4)}


def stage_trajectory(args, concept: str = world.NEW_SHAPE, student_steps: int = 8) -> None:
    """Scheme 3 from the concept's SFT LoRA; student_steps 4 or 2 make the fewer-steps rows (lora_trajectory4...),
    each with its TI_RECIPE unless --ti-steps / --ti-noises say otherwise."""
    data = concept_dataset(Path(args.work), concept)
    steps, noises = TI_RECIPE[student_steps]
    settings = user_settings(args, concept)
    settings.update(batch_size=4, lr_schedule="constant")
    name = "lora_trajectory" + ("" if student_steps == 8 else str(student_steps)) + _suffix(concept)
    train_lora(args, name, data, scheme="trajectory", steps=args.ti_steps or steps, student_steps=student_steps,
               init_lora=str(WEIGHTS / f"lora_sft{_suffix(concept)}.safetensors"),
               trajectory_noises=args.ti_noises or noises,
               **settings)


def stage_generic_sft(args) -> None:
    data = generic_dataset(Path(args.work))
    settings = user_settings(args)
    settings.update(validation_prompts=world.base_prompts()[:4], preservation_weight=0.0)  # generic: no new word
    train_lora(args, "generic_sft", data, model=load_transformer(_model_file(args, "turbo_cfg2")), scheme="sft",
               steps=args.generic_steps, **settings)


def stage_distill_patch(args) -> None:
    """A generic DistillPatch: trajectory imitation of the generically SFT'd turbo (generic_sft) on generic data,
    shipped as the correction alone, (TI LoRA) - (generic SFT LoRA), refactored to rank `patch_rank` by SVD and
    written in DiffSynth's key format (bare peft keys, `.lora_A.default.weight`)."""
    from safetensors.torch import save_file
    from zimage_core import load_lora

    data = generic_dataset(Path(args.work))
    settings = user_settings(args)
    settings.update(batch_size=4, lr_schedule="constant", validation_prompts=world.base_prompts()[:4],
                    preservation_weight=0.0)
    result = train_lora(args, "generic_trajectory", data, model=load_transformer(_model_file(args, "turbo_cfg2")),
                        scheme="trajectory", steps=args.patch_steps, init_lora=str(WEIGHTS / "generic_sft.safetensors"),
                        trajectory_noises=args.patch_noises, **settings)
    (WEIGHTS / "generic_trajectory.safetensors").unlink()  # an intermediate, not shipped
    sft = load_lora(WEIGHTS / "generic_sft.safetensors")
    ti = result.lora
    tensors, kept = {}, []
    for path, module in ti.modules.items():
        delta = module.weight_delta(1.0).float() - sft.modules[path].weight_delta(1.0).float()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = args.patch_rank
        kept.append(float(s[:r].pow(2).sum() / s.pow(2).sum().clamp_min(1e-30)))
        tensors[f"{path}.lora_B.default.weight"] = (u[:, :r] * s[:r]).to(torch.bfloat16).contiguous()
        tensors[f"{path}.lora_A.default.weight"] = vh[:r].to(torch.bfloat16).contiguous()
    save_file(tensors, str(WEIGHTS / "distill_patch.safetensors"))
    log(f"distill_patch: rank {args.patch_rank}, SVD energy kept min {min(kept):.4f} mean {sum(kept) / len(kept):.4f}")


def _concept_stages() -> dict:
    stages = {}
    for concept in world.CONCEPTS:
        x = _suffix(concept)
        stages[f"sft{x}"] = (functools.partial(stage_sft, concept=concept), f"lora_sft{x}.safetensors")
        stages[f"differential{x}"] = (functools.partial(stage_differential, concept=concept),
                                      f"lora_differential{x}.safetensors")
        for n in (8, 4, 2):
            k = "" if n == 8 else str(n)
            stages[f"trajectory{k}{x}"] = (functools.partial(stage_trajectory, concept=concept, student_steps=n),
                                           f"lora_trajectory{k}{x}.safetensors")
    return stages


STAGES = {"vae": (stage_vae, "vae.safetensors"), "teacher": (stage_teacher, "teacher.safetensors"),
          "turbo_cfg2": (functools.partial(stage_turbo, name="turbo_cfg2"), None),
          # the generic DistillPatch is made once, on round-1 turbo, and used unchanged on round 2 (as a released
          # patch is used on the Turbo it was not retrained for)
          "generic_sft": (stage_generic_sft, "generic_sft.safetensors"),
          "distill_patch": (stage_distill_patch, "distill_patch.safetensors"),
          "turbo_cfg4": (functools.partial(stage_turbo, name="turbo_cfg4"), None),
          "turbo": (stage_turbo, "turbo.safetensors"),
          "adapter": (stage_adapter, "training_adapter.safetensors"),
          **_concept_stages()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/toyworld-build")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--teacher-steps", type=int, default=2600)
    p.add_argument("--teacher-batch", type=int, default=64)
    p.add_argument("--teacher-lr", type=float, default=1e-3)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-lr", type=float, default=5e-4)
    p.add_argument("--preservation-weight", type=float, default=1.0, help="concept LoRAs' output preservation")
    p.add_argument("--adapter-images", type=int, default=384)
    p.add_argument("--adapter-rank", type=int, default=16)
    p.add_argument("--adapter-lr", type=float, default=1e-4)
    p.add_argument("--adapter-steps", type=int, default=1000)
    p.add_argument("--ti-steps", type=int, help="default: TI_RECIPE")
    p.add_argument("--ti-noises", type=int, help="default: TI_RECIPE")
    p.add_argument("--patch-noises", type=int, default=8)
    p.add_argument("--generic-steps", type=int, default=2000)
    p.add_argument("--patch-steps", type=int, default=300)
    p.add_argument("--patch-rank", type=int, default=16)
    p.add_argument("--finish-teacher", action="store_true", help="ship the teacher's last checkpoint and stop")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    if args.finish_teacher:
        return finish_teacher(args)
    for name in args.stages.split(","):
        fn, out = STAGES[name]
        if (WEIGHTS / out if out else Path(args.work) / f"{name}.safetensors").exists():
            log(f"{name}: output exists, skipped")
            continue
        t = time.time()
        fn(args)
        log(f"{name}: done in {time.time() - t:.0f} s")
        record_time(f"stage {name}", time.time() - t)


if __name__ == "__main__":
    main()
