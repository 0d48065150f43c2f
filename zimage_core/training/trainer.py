"""The training loop behind the four "keep the Turbo" schemes (training-schemes.md).

1 sft          frozen base + a trainable LoRA, velocity loss with DiffSynth's bell weight.
2 differential as 1 with a preset LoRA applied frozen during training; previews, validation and export without it.
3 trajectory   the student (the SFT LoRA, trainable, cfg 1) learns to step between the states of the frozen SFT
               teacher's 50-step cfg-2 trajectory at its 8 sigmas.
4 distillpatch as 1; validation also previews the trained LoRA + a DistillPatch LoRA at 8 steps / cfg 1.

Any scheme may add output preservation (preservation.py): the LoRA's output for the captions with their trigger word
replaced by a class word is held to the frozen model's.

Every LoRA runs as a runtime branch of the LoRA engine (no merge), so the base weights are never written. The
trainable tensors are fp32 masters; the base computes in its own dtype (bf16 on GPU). Randomness (batch order,
noise, sigma) is derived from (seed, micro-batch index), so a resumed run and a run split over processes draw
exactly what an uninterrupted single-process run draws.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from ..lora import LoraWeights, apply_loras, load_lora, new_lora, save_lora
from ..sampling import TURBO, sample
from ..variants import LABELS, REFERENCE_RECIPE
from .adapters import check_lora_fits, count_parameters, frozen_copy, grow_lora
from .checkpoint import (lora_state, load_checkpoint, load_lora_state, restore_rng_states, rng_states,
                         save_checkpoint)
from .config import ConfigError, TrainConfig
from .data import DatasetCache, _mix
from .ema import LoraEma
from .losses import SigmaSampler, noised, per_sample_mse, sft_loss, student_step_weights, teacher_trajectory, \
    trajectory_grids, trajectory_loss
from .optimizers import build_optimizer
from .preservation import Preservation
from .report import grid_png, latent_preview, loss_curve_png, report_json
from .schedules import lr_factor
from .turbo_check import format_check, meaning, turbo_check

Progress = Callable[[int, int, float], None]  # (step, total steps, loss)
ShouldStop = Callable[[], bool]  # True (or raising) interrupts; a checkpoint is written first
Decode = Callable[[Tensor], "object"]  # latent [C, h, w] -> PIL image
_SAVE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class TrainingDiverged(RuntimeError):
    """The loss or a gradient became NaN/inf; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    lora: LoraWeights  # the trained LoRA (fp32, in memory)
    step: int
    losses: list[float]
    interrupted: bool = False
    lora_path: Path | None = None
    checkpoint_path: Path | None = None
    loss_curve_path: Path | None = None
    grid_path: Path | None = None
    ema: LoraWeights | None = None  # the EMA of the LoRA (ema_decay > 0)
    ema_path: Path | None = None  # NAME_ema.safetensors, next to lora_path
    validation_grids: list[Path] = field(default_factory=list)  # one per validation point of this call
    snapshot_paths: list[Path] = field(default_factory=list)  # intermediate LoRA files kept (save_every)
    report_path: Path | None = None  # <name>.report.json: steps, losses, turbo check
    turbo_check: dict[str, float] = field(default_factory=dict)  # score per candidate (turbo_check.py; higher keeps it)
    turbo_check_detail: dict[str, dict[str, float]] = field(default_factory=dict)  # score, match, sharpness
    turbo_check_meaning: str = ""  # the one line saying what the figure means, with the variant's reference recipe
    teacher_forwards: int = 0  # sample-forwards of the teacher (a cfg-2 step of one sample counts 2)
    preservation_forwards: int = 0  # sample-forwards of the frozen model for preservation targets (no grad)
    student_forwards: int = 0  # sample-forwards of the student with grad
    seconds: float = 0.0


def train(model, config: TrainConfig, data: DatasetCache, *, progress: Progress | None = None,
          should_stop: ShouldStop | None = None, decode: Decode | None = None,
          encode_text: Callable[[str], Tensor] | None = None, preset: LoraWeights | None = None,
          init_lora: LoraWeights | None = None, distill_patch: LoraWeights | None = None,
          log: Callable[[str], None] | None = print, write_outputs: bool = True) -> TrainResult:
    """Train a LoRA on `model` (a ZImageTransformer, left unchanged) from an encoded dataset cache.

    progress(step, total, loss) after every optimizer step; should_stop() before every step (return True or raise
    to interrupt: a checkpoint is written, then the result comes back with interrupted=True or the exception is
    re-raised). decode(latent) renders validation samples (a plain latent preview without it); encode_text
    encodes validation prompts missing from the cache. preset / init_lora / distill_patch override the files named
    in the config. Under torch.distributed every process calls this with the same config; gradients are averaged
    over processes and only rank 0 writes files. Runs with autograd on even when called from inference mode
    (ComfyUI); inference-mode weights of the model are replaced by normal copies (errata A4)."""
    with torch.inference_mode(False), torch.enable_grad():
        return _Run(model, config, data, progress, should_stop, decode, encode_text, preset, init_lora,
                    distill_patch, log, write_outputs).run()


class _LoraStack:
    """Which LoRAs are applied to the model right now (runtime branches), swappable for teacher and validation."""

    def __init__(self, model):
        self.model, self.handle, self.current = model, None, []

    def set(self, loras: list[tuple[LoraWeights, float]]):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        if loras:
            self.handle = apply_loras(self.model, loras, mode="runtime")
        self.current = list(loras)

    @contextmanager
    def use(self, loras: list[tuple[LoraWeights, float]]):
        previous = self.current
        self.set(loras)
        try:
            yield
        finally:
            self.set(previous)


class _Run:
    def __init__(self, model, config, data, progress, should_stop, decode, encode_text, preset, init_lora,
                 distill_patch, log, write_outputs):
        self.model, self.data = model, data
        self.cfg = config.validate_settings()
        self.progress, self.should_stop, self.decode, self.encode_text = progress, should_stop, decode, encode_text
        self.log = log or (lambda message: None)
        self.distributed = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size() if self.distributed else 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.main = self.rank == 0
        self.write = write_outputs and self.main
        if self.cfg.batch_size % self.world:
            raise ConfigError(f"batch_size {self.cfg.batch_size} (the global batch) is not divisible by the "
                              f"{self.world} processes")
        self.local_batch = self.cfg.batch_size // self.world
        self.device = model.x_pad_token.device
        self.base_format = base_format(model)
        self.teacher_forwards = self.student_forwards = self.preservation_forwards = 0
        self.teacher_cache: dict[tuple[int, int], Tensor] = {}

        _own_inference_tensors(model)
        self.saved_checkpointing = (model.gradient_checkpointing, model.checkpoint_inputs_on_host)
        self.saved_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        model.requires_grad_(False)

        cfg = self.cfg
        self.preset = None
        if cfg.preset_lora or preset is not None:
            self.preset = frozen_copy(check_lora_fits(model, preset or load_lora(cfg.preset_lora), "preset LoRA"),
                                      device=self.device)
        self.distill_patch = None
        if cfg.distill_patch or distill_patch is not None:
            self.distill_patch = frozen_copy(check_lora_fits(
                model, distill_patch or load_lora(cfg.distill_patch), "DistillPatch LoRA"), device=self.device)
        if cfg.scheme == "distillpatch" and self.distill_patch is None:
            self.log("scheme 'distillpatch' without a distill_patch file: training is plain SFT and validation has no "
                     "'+ DistillPatch' preview")
        self.teacher = None
        if cfg.scheme == "trajectory":
            sft = check_lora_fits(model, init_lora or load_lora(cfg.init_lora), "SFT LoRA")
            self.teacher = frozen_copy(sft, device=self.device)
            self.lora = grow_lora(model, sft, cfg.rank, cfg.alpha, cfg.targets, seed=cfg.seed)
            self.student_sigmas, self.teacher_grid, self.teacher_keep = trajectory_grids(
                cfg.teacher_steps, cfg.student_steps, cfg.shift)
            self.step_weights = student_step_weights(self.student_sigmas)
        else:
            if init_lora is not None or cfg.init_lora:
                raise ConfigError("init_lora is only used by scheme 'trajectory'")
            self.lora = new_lora(model, rank=cfg.rank, alpha=cfg.alpha, targets=cfg.targets, seed=cfg.seed)
            self.sigma_sampler = SigmaSampler(cfg.shift, cfg.num_train_timesteps, cfg.loss_weighting)
        self.lora = self.lora.to(dtype=torch.float32, device=self.device)
        self.params = list(self.lora.parameters())
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = build_optimizer(cfg.optimizer, self.params, lr=cfg.lr, betas=tuple(cfg.adam_betas),
                                         eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        if cfg.optimizer == "prodigy" and cfg.lr < 0.1:
            self.log(f"optimizer prodigy estimates the step size itself and lr multiplies it: lr {cfg.lr} makes "
                     "its steps tiny (1.0 is the usual setting)")
        self.ema = LoraEma(self.lora, cfg.ema_decay) if cfg.ema_decay > 0 else None
        if cfg.scheme == "trajectory" and (cfg.flip_horizontal or cfg.caption_dropout_rate > 0):
            raise ConfigError("flip_horizontal and caption_dropout_rate apply to image training (sft, differential, "
                              "distillpatch); scheme 'trajectory' learns the teacher's trajectories of the captions "
                              "and uses no image latents")
        if cfg.flip_horizontal and not data.has_flips:
            raise ConfigError(f"flip_horizontal needs mirrored latents, which the cache {data.folder} lacks: build "
                              "it with flip on (build_cache(..., flip=True))")
        self.preservation, self.preserved, self.preservation_features = None, [], {}
        if cfg.preservation_weight > 0:
            self._set_up_preservation()
        self.validation: list[tuple[str, Tensor]] = []
        self.validation_grids: list[Path] = []
        self.stack = _LoraStack(model)
        self.step, self.losses = 0, []
        self.epoch_batches: dict[int, list[list[int]]] = {}
        self.batches_per_epoch: int | None = None
        self._checkpoint_step: int | None = None
        self.checkpoint_path = cfg.checkpoint_path if self.main else None

    # ------------------------------------------------------------------------------------------ stacks
    def frozen_loras(self):
        """The LoRAs of the model being trained other than the trained one (scheme 2's adapter)."""
        return [(self.preset, self.cfg.preset_strength)] if self.preset is not None else []

    def training_loras(self):
        return self.frozen_loras() + [(self.lora, 1.0)]

    def _set_up_preservation(self):
        """The class captions and their features, found before the first step (the cache, else the text encoder)."""
        cfg = self.cfg
        self.preservation = Preservation(cfg.preservation_trigger, cfg.preservation_classes)
        captions = [e.caption for e in self.data.entries]
        self.preserved = [self.preservation.applies(c) for c in captions]
        if not any(self.preserved):
            raise ConfigError(f"preservation_trigger {cfg.preservation_trigger!r} is in none of the {len(captions)} "
                              f"captions (e.g. {captions[0]!r}): name the word the captions use for the new concept")
        for prompt in self.preservation.all_captions(captions):
            features = self._prompt_features(prompt)
            if features is None:
                raise ConfigError(f"preservation caption {prompt!r} is not in the cache {self.data.folder} and no text "
                                  "encoder was given: encode the cache with the same preservation settings "
                                  "(python -m zimage_core encode --config ..., or build_cache(prompts=...))")
            self.preservation_features[prompt] = features
        skipped = len(captions) - sum(self.preserved)
        self.log(f"output preservation (weight {cfg.preservation_weight}): {cfg.preservation_trigger!r} -> "
                 f"{', '.join(cfg.preservation_classes)}{' and the empty prompt' if cfg.preservation_blank else ''} in "
                 f"{sum(self.preserved)} of {len(captions)} captions"
                 + (f" ({skipped} without the trigger are not preserved)" if skipped else ""))

    # ------------------------------------------------------------------------------------------ main
    def run(self) -> TrainResult:
        cfg, start = self.cfg, time.perf_counter()
        try:
            self._maybe_resume()
            if self.distributed:
                with torch.no_grad():
                    for p in self.params:
                        dist.broadcast(p.data, src=0)
            validation = self._validation_inputs() if (self.write and cfg.validate) else []
            self.validation = validation
            before = self._validate(validation, "before") if validation else {}
            self.log(f"training {count_parameters(self.lora):,} LoRA parameters ({cfg.scheme}, rank {cfg.rank}) "
                     f"for {cfg.steps} steps from step {self.step}, {len(self.data)} images, "
                     f"{self.world} process(es)")
            self.model.gradient_checkpointing = cfg.gradient_checkpointing
            self.model.checkpoint_inputs_on_host = cfg.checkpoint_inputs_on_host
            self.stack.set(self.training_loras())
            interrupted = self._loop()
            self.stack.set([])
            self.model.gradient_checkpointing, self.model.checkpoint_inputs_on_host = self.saved_checkpointing
            result = TrainResult(lora=self.lora, step=self.step, losses=list(self.losses), interrupted=interrupted,
                                 checkpoint_path=self.checkpoint_path, teacher_forwards=self.teacher_forwards,
                                 student_forwards=self.student_forwards,
                                 preservation_forwards=self.preservation_forwards,
                                 ema=self.ema.lora if self.ema is not None else None,
                                 validation_grids=list(self.validation_grids),
                                 snapshot_paths=self._snapshots(self.cfg.output_name) if self.write else [])
            if not interrupted and self.write:
                self._write_outputs(result, validation, before)
            result.seconds = time.perf_counter() - start
            return result
        finally:
            self.stack.set([])
            self.model.gradient_checkpointing, self.model.checkpoint_inputs_on_host = self.saved_checkpointing
            for p in self.params:
                p.requires_grad_(False)
            for name, p in self.model.named_parameters():
                p.requires_grad_(self.saved_requires_grad.get(name, False))

    def _loop(self) -> bool:
        cfg = self.cfg
        updating = False
        try:
            while self.step < cfg.steps:
                if self.should_stop is not None and self.should_stop():
                    self._checkpoint()
                    self.log(f"training interrupted at step {self.step}; checkpoint {self.checkpoint_path}")
                    return True
                loss = self._accumulate()
                updating = True
                self._update(loss)
                updating = False
                if self.progress is not None:
                    self.progress(self.step, cfg.steps, loss)
                if cfg.log_every and self.step % cfg.log_every == 0:
                    window = self.losses[-cfg.log_every:]
                    self.log(f"step {self.step}/{cfg.steps} loss {loss:.5f} (mean of last {len(window)}: "
                             f"{sum(window) / len(window):.5f})")
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self._checkpoint()
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps and self.write:
                    self._save_snapshot()
                if cfg.validation_every and self.step % cfg.validation_every == 0 and self.validation:
                    self._validate_progress()
        except TrainingDiverged:
            raise
        except BaseException:
            if not updating:  # interrupted between updates: the state is consistent, keep it
                self._checkpoint()
            raise
        self._checkpoint()
        return False

    # ------------------------------------------------------------------------------------------ one step
    def _batch(self, micro: int) -> list[int]:
        """The global batch (entry indices) of micro-batch `micro`; every epoch has the same number of batches."""
        if self.batches_per_epoch is None:
            self.batches_per_epoch = len(self.data.batches(0, self.cfg.batch_size, self.cfg.seed))
        epoch, position = divmod(micro, self.batches_per_epoch)
        if epoch not in self.epoch_batches:
            self.epoch_batches = {epoch: self.data.batches(epoch, self.cfg.batch_size, self.cfg.seed)}
        return self.epoch_batches[epoch][position]

    def _accumulate(self) -> float:
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for j in range(cfg.grad_accum):
            micro = self.step * cfg.grad_accum + j
            batch = self._batch(micro)
            lo = self.rank * self.local_batch
            gen = torch.Generator().manual_seed(_mix(cfg.seed, micro, 1))
            if cfg.scheme == "trajectory":
                loss = self._trajectory_micro(batch, lo, gen, micro)
            else:
                loss = self._sft_micro(batch, lo, gen, micro)
            total += loss
        total_t = torch.tensor([total], dtype=torch.float64)
        if self.distributed:
            self._all_reduce_grads()
            dist.all_reduce(total_t)
            total_t /= self.world
        return float(total_t)

    def _augmentations(self, micro: int, size: int, local: slice) -> tuple[list[bool], list[bool]]:
        """Which samples of the local batch use the mirrored image and which the empty caption. Drawn for the
        global batch from their own generators seeded by (seed, micro-batch), so they are the same on every process
        and after a resume, and switching one on changes neither the other's draws nor the noise and sigma."""
        cfg = self.cfg
        flips = drops = [False] * size
        if cfg.flip_horizontal:
            gen = torch.Generator().manual_seed(_mix(cfg.seed, micro, 4))
            flips = (torch.rand(size, generator=gen) < 0.5).tolist()
        if cfg.caption_dropout_rate > 0:
            gen = torch.Generator().manual_seed(_mix(cfg.seed, micro, 5))
            drops = (torch.rand(size, generator=gen) < cfg.caption_dropout_rate).tolist()
        return flips[local], drops[local]

    def _sft_micro(self, batch: list[int], lo: int, gen: torch.Generator, micro: int) -> float:
        cfg = self.cfg
        first = self.data.latent(batch[0])
        noise = torch.randn((len(batch), *first.shape), generator=gen)  # drawn for the global batch
        sigma, weight = self.sigma_sampler.draw(len(batch), gen)
        local = slice(lo, lo + self.local_batch)
        idx = batch[local]
        flips, drops = self._augmentations(micro, len(batch), local)
        x0 = torch.stack([self.data.latent(i, flipped=f) for i, f in zip(idx, flips)]).float().to(self.device)
        caps = [(self.data.prompt_features("") if d else self.data.caption(i)).to(self.device)
                for i, d in zip(idx, drops)]
        loss = sft_loss(self.model, x0, caps, noise[local].to(self.device), sigma[local], weight[local])
        (loss / cfg.grad_accum).backward()
        self.student_forwards += len(idx)
        loss = float(loss.detach())
        if self.preservation is not None:
            x_t = noised(x0, noise[local].to(self.device), sigma[local])
            loss += self._preserve(x_t, sigma[local], weight[local], idx, micro, len(batch), local)
        return loss / cfg.grad_accum

    def _preserve(self, x_t: Tensor, sigma: Tensor, weight: Tensor, idx: list[int], micro: int, size: int,
                  local: slice) -> float:
        """Back-propagate the preservation loss of the local samples whose caption has the trigger (the same noisy
        latents and sigmas as the task loss, the trigger replaced by a class drawn per sample from its own
        generator, so switching preservation on changes no other draw; with preservation_blank also the empty
        prompt) and return it, weighted."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(_mix(cfg.seed, micro, 6))
        draws = torch.randint(len(cfg.preservation_classes), (size,), generator=gen).tolist()[local]
        keep = [n for n, i in enumerate(idx) if self.preserved[i]]
        if not keep:
            return 0.0
        caps = [self.preservation_features[self.preservation.caption(self.data.entries[idx[n]].caption, draws[n])]
                .to(self.device) for n in keep]
        x, s, w = x_t[keep], sigma[keep].to(self.device), weight[keep].to(self.device, torch.float32)
        if cfg.preservation_blank:  # the empty prompt too, on the same latents: what classifier-free guidance subtracts
            empty = self.data.prompt_features("").to(self.device)
            x, s, w, caps = torch.cat([x, x]), torch.cat([s, s]), torch.cat([w, w]), caps + [empty] * len(keep)
        with self.stack.use(self.frozen_loras()), torch.no_grad():
            target = self.model(x, s, caps).float()
        mse = per_sample_mse(self.model(x, s, caps), target) * w
        loss = cfg.preservation_weight * mse.sum() / len(idx)  # a mean over the local batch, as the task loss
        (loss / cfg.grad_accum).backward()
        self.preservation_forwards += len(caps)
        self.student_forwards += len(caps)
        return float(loss.detach())

    def _trajectory_micro(self, batch: list[int], lo: int, gen: torch.Generator, micro: int) -> float:
        cfg = self.cfg
        channels = self.model.config.in_channels
        local = slice(lo, lo + self.local_batch)
        idx = batch[local]
        entry = self.data.entries[batch[0]]
        shape = (channels, entry.height // self.data.factor, entry.width // self.data.factor)
        if cfg.trajectory_noises:
            noise_ids = torch.randint(0, cfg.trajectory_noises, (len(batch),), generator=gen).tolist()[local]
        else:
            fresh = torch.randn((len(batch), *shape), generator=gen)[local]
        caps = [self.data.caption(i).to(self.device) for i in idx]
        negative = self.data.prompt_features("").to(self.device)
        states = []
        for n, i in enumerate(idx):
            if cfg.trajectory_noises:
                key = (i, noise_ids[n])
                if cfg.cache_teacher and key in self.teacher_cache:
                    states.append(self.teacher_cache[key])
                    continue
                noise = trajectory_pool_noise(cfg.seed, i, key[1], shape)
            else:
                key, noise = None, fresh[n]
            traj = self._teacher_states(noise[None].to(self.device), [caps[n]], [negative])
            if key is not None and cfg.cache_teacher:
                self.teacher_cache[key] = traj.cpu()  # host memory: 9 latents per (image, noise) at 8 steps
            states.append(traj)
        states = torch.cat(states, dim=1).to(self.device)  # [K + 1, B, C, h, w]
        loss = float(trajectory_loss(self.model, states, self.student_sigmas, caps, self.step_weights,
                                     chunk=cfg.student_chunk, backward_scale=1.0 / cfg.grad_accum))
        self.student_forwards += len(idx) * cfg.student_steps
        if self.preservation is not None:  # at one student step per sample, drawn from its own generator
            gen = torch.Generator().manual_seed(_mix(cfg.seed, micro, 7))
            k = torch.randint(cfg.student_steps, (len(batch),), generator=gen)[local]
            x_t = states[k.to(states.device), torch.arange(len(idx), device=states.device)]
            loss += self._preserve(x_t, self.student_sigmas[k], self.step_weights[k], idx, micro, len(batch), local)
        return loss / cfg.grad_accum

    def _teacher_states(self, noise: Tensor, positive: list, negative: list) -> Tensor:
        cfg = self.cfg
        with self.stack.use([(self.teacher, 1.0)]), torch.no_grad():
            states = teacher_trajectory(self.model, noise, positive, negative, self.teacher_grid, cfg.teacher_cfg,
                                        self.teacher_keep)
        self.teacher_forwards += noise.shape[0] * cfg.teacher_steps * (2 if cfg.teacher_cfg != 1.0 else 1)
        return states

    def _all_reduce_grads(self):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(self.params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def _update(self, loss: float):
        cfg = self.cfg
        grads = [p.grad for p in self.params if p.grad is not None]
        # one fused reduction instead of a check per tensor: a NaN/inf anywhere makes its norm non-finite
        finite = math.isfinite(loss) and (not grads or bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()))
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            where = (f"the last good checkpoint is {self.checkpoint_path} (step {self._checkpoint_step})"
                     if self._checkpoint_step is not None else "no checkpoint was written yet")
            raise TrainingDiverged(f"training diverged at step {self.step + 1}: loss {loss} (or a gradient) is not "
                                   f"finite. Lower lr (now {cfg.lr}) or check the data; {where}.")
        factor = lr_factor(cfg.lr_schedule, self.step, cfg.steps, cfg.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * factor
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.lora)
        self.step += 1
        self.losses.append(loss)

    # ------------------------------------------------------------------------------------------ checkpoints
    def _checkpoint(self):
        if self.main and self.cfg.checkpoint_every >= 0 and self.checkpoint_path is not None:
            save_checkpoint(self.checkpoint_path, {
                "step": self.step, "lora": lora_state(self.lora), "optimizer": self.optimizer.state_dict(),
                "losses": list(self.losses), "rng": rng_states(), "config": self.cfg.to_dict(),
                "lora_alpha": {p: m.alpha for p, m in self.lora.modules.items()}, "base_format": self.base_format,
                **({"ema": lora_state(self.ema.lora)} if self.ema is not None else {})})
            self._checkpoint_step = self.step
        if self.distributed:
            dist.barrier()

    def _maybe_resume(self):
        cfg = self.cfg
        if not cfg.resume:
            return
        path = cfg.checkpoint_path if cfg.resume == "auto" else Path(cfg.resume)
        if cfg.resume == "auto" and not path.is_file():
            old = path.with_name(path.name.replace(".ckpt.safetensors", ".ckpt.pt"))
            if old.is_file():
                self.log(f"{old.name} is an old pickle checkpoint, which is never loaded: starting from step 0")
            return
        state = load_checkpoint(path)
        saved = state["config"]
        for key in ("scheme", "rank", "alpha", "targets", "batch_size", "grad_accum", "seed", "init_lora", "optimizer",
                    "ema_decay"):
            now = self.cfg.to_dict()[key]
            if saved.get(key, TrainConfig.__dataclass_fields__[key].default) != now:  # older files: defaults
                raise ConfigError(f"cannot resume from {path}: it was trained with {key} = {saved.get(key)!r}, "
                                  f"this run has {now!r}")
        saved_format = state.get("base_format", self.base_format)  # older checkpoints: not recorded
        if saved_format != self.base_format:
            raise ConfigError(f"cannot resume from {path}: it was trained on a base stored as {saved_format}, this "
                              f"base is stored as {self.base_format} (load the same file with the same weight "
                              "storage, or start a new run)")
        load_lora_state(self.lora, state["lora"])
        if self.ema is not None:
            load_lora_state(self.ema.lora, state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.losses = int(state["step"]), list(state["losses"])
        restore_rng_states(state["rng"])
        self._checkpoint_step = self.step
        self.log(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------------------------------ validation
    def _validation_inputs(self) -> list[tuple[str, Tensor]]:
        prompts = list(self.cfg.validation_prompts) or [self.data.entries[0].caption]
        out = []
        for prompt in prompts:
            features = self.data.caption(0) if (prompt == self.data.entries[0].caption
                                                and not self.data.has_prompt(prompt)) else self._prompt_features(prompt)
            if features is not None:
                out.append((prompt, features))
            else:
                self.log(f"validation prompt {prompt!r} is not in the cache and no text encoder was given: skipped")
        return out

    def _prompt_features(self, prompt: str) -> Tensor | None:
        """[L, D] features of a prompt: from the cache, else from the text encoder; None when neither has it."""
        if self.data.has_prompt(prompt):
            return self.data.prompt_features(prompt)
        if self.encode_text is None:
            return None
        with torch.no_grad():
            features = self.encode_text(prompt)
        return (features[0] if features.ndim == 3 else features).detach().clone()

    def _validation_size(self) -> tuple[int, int]:
        cfg = self.cfg
        first = self.data.entries[0]
        factor = self.data.factor
        return (cfg.validation_width or first.width) // factor, (cfg.validation_height or first.height) // factor

    @torch.no_grad()
    def _samples(self, validation, loras, steps: int, cfg_scale: float) -> list[Tensor]:
        w, h = self._validation_size()
        negative = self.data.prompt_features("").to(self.device)
        out = []
        with self.stack.use(loras):
            for i, (_, features) in enumerate(validation):
                gen = torch.Generator().manual_seed(_mix(self.cfg.validation_seed, i, 3))
                noise = torch.randn((1, self.model.config.in_channels, h, w), generator=gen).to(self.device)
                out.append(sample(self.model, noise, [features.to(self.device)], [negative], steps=steps,
                                  cfg=cfg_scale, shift=self.cfg.shift)[0].cpu())
        return out

    def _validate(self, validation, when: str) -> dict:
        """Turbo (8 / cfg 1) and reference-recipe samples (Turbo: 30 / cfg 2; Z-Image base: its 50 / cfg 4) with the
        current LoRA, preset removed."""
        reference = REFERENCE_RECIPE[self.cfg.model_variant]
        loras = [] if (when == "before" and self.cfg.scheme != "trajectory") else [
            (self.teacher if when == "before" else self.lora, 1.0)]
        rows = {"turbo": self._samples(validation, loras, TURBO.steps, TURBO.cfg),
                "quality": self._samples(validation, loras, reference.steps, reference.cfg)}
        if when == "before" and self.cfg.scheme == "trajectory":
            rows["base_turbo"] = self._samples(validation, [], TURBO.steps, TURBO.cfg)
            rows["base_quality"] = self._samples(validation, [], reference.steps, reference.cfg)
        if when == "after" and self.distill_patch is not None:
            rows["patched"] = self._samples(validation, [(self.lora, 1.0), (self.distill_patch, 1.0)],
                                            TURBO.steps, TURBO.cfg)
        if when == "after" and self.ema is not None:
            rows["ema"] = self._samples(validation, [(self.ema.lora, 1.0)], TURBO.steps, TURBO.cfg)
        return rows

    # ------------------------------------------------------------------------------------------ files
    def _metadata(self, ema: bool = False) -> dict[str, str]:
        cfg = self.cfg
        metadata = {"scheme": cfg.scheme, "rank": str(cfg.rank), "alpha": str(cfg.lora_alpha),
                    "steps": str(self.step), "base_model": cfg.base_model,
                    "model_variant": cfg.model_variant, "preset_lora": str(cfg.preset_lora or ""),
                    "init_lora": str(cfg.init_lora or ""), "targets": ",".join(cfg.targets), "lr": str(cfg.lr),
                    "seed": str(cfg.seed), "loss_weighting": cfg.loss_weighting, "optimizer": cfg.optimizer,
                    "lr_schedule": cfg.lr_schedule, "trainer": "zimage_core.training",
                    "base_format": self.base_format}
        if cfg.scheme == "trajectory":
            metadata.update(teacher_steps=str(cfg.teacher_steps), teacher_cfg=str(cfg.teacher_cfg),
                            student_steps=str(cfg.student_steps))
        if cfg.preservation_weight > 0:
            metadata.update(preservation_weight=str(cfg.preservation_weight),
                            preservation_trigger=cfg.preservation_trigger,
                            preservation_classes=",".join(cfg.preservation_classes),
                            preservation_blank=str(cfg.preservation_blank).lower())
        if ema:
            metadata["ema_decay"] = str(cfg.ema_decay)
        return metadata

    def _save(self, lora: LoraWeights, path: Path, ema: bool = False) -> Path:
        save_lora(lora.to(dtype=_SAVE_DTYPES[self.cfg.save_dtype], device="cpu"), path, metadata=self._metadata(ema))
        return path

    def _snapshots(self, stem: str) -> list[Path]:
        """This run's intermediate LoRA files STEM.stepNNNNNN.safetensors, oldest first."""
        root = Path(self.cfg.output_dir)
        return sorted(p for p in root.glob(f"{stem}.step*.safetensors")
                      if p.name[len(stem) + 5:-len(".safetensors")].isdigit())

    def _save_snapshot(self):
        """NAME.stepNNNNNN.safetensors (and NAME_ema.stepNNNNNN.safetensors with EMA); only the newest keep_last
        of each are kept."""
        cfg = self.cfg
        files = [(cfg.output_name, self.lora, False)]
        if self.ema is not None:
            files.append((f"{cfg.output_name}_ema", self.ema.lora, True))
        for stem, lora, ema in files:
            self._save(lora, cfg.output_path(f"{'_ema' if ema else ''}.step{self.step:06d}.safetensors"), ema)
            if cfg.keep_last:
                for old in self._snapshots(stem)[:-cfg.keep_last]:
                    old.unlink()

    def _validate_progress(self):
        """The grid of validation point `step` (8 steps / cfg 1 with the current LoRA, its EMA and the DistillPatch
        preview when present) as NAME.stepNNNNNN.grid.png, and the loss curve so far."""
        cfg = self.cfg
        rows = [(f"step {self.step} 8 steps cfg 1", [(self.lora, 1.0)])]
        if self.ema is not None:
            rows.append((f"step {self.step} EMA 8 steps cfg 1", [(self.ema.lora, 1.0)]))
        if self.distill_patch is not None:
            rows.append((f"step {self.step} + DistillPatch", [(self.lora, 1.0), (self.distill_patch, 1.0)]))
        render = self.decode or latent_preview
        images = [(label, [render(x) for x in self._samples(self.validation, loras, TURBO.steps, TURBO.cfg)])
                  for label, loras in rows]
        self.validation_grids.append(grid_png(images, [p for p, _ in self.validation],
                                              cfg.output_path(f".step{self.step:06d}.grid.png")))
        loss_curve_png(self.losses, cfg.output_path(".loss.png"), title=f"{cfg.output_name}: {cfg.scheme} loss")

    def _write_outputs(self, result: TrainResult, validation, before: dict):
        cfg = self.cfg
        result.lora_path = self._save(self.lora, cfg.output_path(".safetensors"))
        if self.ema is not None:
            result.ema_path = self._save(self.ema.lora, cfg.output_path("_ema.safetensors"), ema=True)
        if self.losses:
            result.loss_curve_path = loss_curve_png(self.losses, cfg.output_path(".loss.png"),
                                                    title=f"{cfg.output_name}: {cfg.scheme} loss")
        if validation:
            after = self._validate(validation, "after")
            render = self.decode or latent_preview
            rows = []
            model_name, reference = LABELS[cfg.model_variant], REFERENCE_RECIPE[cfg.model_variant]
            fast, slow = f"{TURBO.steps} steps cfg {TURBO.cfg:g}", f"{reference.steps} steps cfg {reference.cfg:g}"
            if "base_turbo" in before:
                rows += [(f"{model_name}, no LoRA, {fast}", before["base_turbo"]),
                         (f"{model_name}, no LoRA, {slow}", before["base_quality"])]
            label = "SFT LoRA" if cfg.scheme == "trajectory" else f"{model_name}, before"
            rows += [(f"{label}, {fast}", before["turbo"]), (f"{label}, {slow}", before["quality"]),
                     (f"after, {fast}", after["turbo"]), (f"after, {slow}", after["quality"])]
            if "patched" in after:
                rows.append((f"after + DistillPatch, {fast}", after["patched"]))
            if "ema" in after:
                rows.append((f"after EMA, {fast}", after["ema"]))
            images = [(name, [render(x) for x in latents]) for name, latents in rows]
            result.grid_path = grid_png(images, [p for p, _ in validation], cfg.output_path(".grid.png"))
            result.turbo_check_detail = self._turbo_check(before, after)
            result.turbo_check = {name: v["score"] for name, v in result.turbo_check_detail.items()}
            result.turbo_check_meaning = meaning(reference.steps, reference.cfg)
            self.log(f"turbo check on {model_name} ({fast} against the LoRA's own {slow} samples; 'base' = without "
                     f"the trained LoRA): {format_check(result.turbo_check_detail)}. {result.turbo_check_meaning}")
        result.report_path = report_json(cfg.output_path(".report.json"), self.step, self.losses, result.turbo_check,
                                         result.turbo_check_detail, result.turbo_check_meaning)

    def _turbo_check(self, before: dict, after: dict) -> dict[str, dict[str, float]]:
        """Every 8-step / cfg-1 candidate against one full-quality reference: the trained LoRA's own reference-recipe
        samples (trajectory imitation: its SFT teacher's, what it imitates), preset removed."""
        trajectory = self.cfg.scheme == "trajectory"
        reference = before["quality"] if trajectory else after["quality"]
        candidates = {"base": before["base_turbo"] if trajectory else before["turbo"]}
        if trajectory:
            candidates["sft"] = before["turbo"]
        candidates["trained"] = after["turbo"]
        if "patched" in after:
            candidates["trained+distillpatch"] = after["patched"]
        return turbo_check(candidates, reference)


def base_format(model) -> str:
    """How the frozen base's weights are stored, for the LoRA's metadata and the resume check: the sorted formats of
    its quantized Linears (e.g. "gguf:Q4_K,gguf:Q5_K,gguf:Q6_K" for a Q4_K_M file, "comfy:nvfp4"), or, without any,
    the dtype of its weights ("bfloat16"). Quantized Linears name their format in `fmt`; one-byte float weights
    without it are fp8 storage ("float8_e4m3fn")."""
    formats, dtypes = set(), set()
    for module in model.modules():
        fmt, weight = getattr(module, "fmt", None), getattr(module, "weight", None)
        if isinstance(fmt, str):
            formats.add(fmt)
        elif isinstance(weight, Tensor) and weight.is_floating_point():
            (formats if weight.element_size() == 1 else dtypes).add(str(weight.dtype).removeprefix("torch."))
    return ",".join(sorted(formats or dtypes))


def trajectory_pool_noise(seed: int, entry: int, k: int, shape) -> Tensor:
    """Noise k of the fixed trajectory-imitation pool of dataset entry `entry` (trajectory_noises > 0)."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(_mix(seed, entry, k, 2)))


@torch.no_grad()
def _own_inference_tensors(model):
    """Replace inference-mode parameters and buffers (created under ComfyUI's torch.inference_mode) by normal
    copies: autograd cannot save inference tensors for backward (errata A4)."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_inference():
                module._parameters[name] = torch.nn.Parameter(param.clone(), requires_grad=False)
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_inference():
                module._buffers[name] = buf.clone()
