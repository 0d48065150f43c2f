"""Trainer options (issue 12 item 3) on a tiny random model (CPU): each option has its effect, resume stays
bit-identical with all of them on, contradictory settings are ConfigErrors naming the field."""

import math
import sys

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from zimage_core.lora import load_lora, new_lora
from zimage_core.testing import tiny_model
from zimage_core.training import ConfigError, Encoders, TrainConfig, build_cache, train
from zimage_core.training import trainer as trainer_module
from zimage_core.training.checkpoint import load_checkpoint
from zimage_core.training.config import TARGET_PRESETS, expand_targets
from zimage_core.training.data import crop_resize
from zimage_core.training.optimizers import MissingOptimizerPackage
from zimage_core.training.schedules import lr_factor
from zimage_core.training.toy import make_toy_dataset, toy_encoders


def asymmetric_encoders() -> Encoders:
    """The toy encoders plus a left-to-right ramp: not mirror symmetric, like a real VAE (the toy one is)."""
    toy = toy_encoders()

    def encode_image(image):
        latent = toy.encode_image(image)
        return latent + torch.linspace(0, 1, latent.shape[-1])

    return Encoders(encode_image, toy.encode_text, "toy-ramp")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("options")
    folder = make_toy_dataset(tmp / "data", n=3, sizes=((64, 64),))
    return build_cache(folder, tmp / "cache", asymmetric_encoders(), prompts=["a red square"], flip=True)


@pytest.fixture(scope="module")
def model():
    return tiny_model(0)


def cfg(tmp_path, **kw):
    base = dict(rank=4, lr=1e-3, steps=4, output_dir=str(tmp_path / "out"), validate=False, checkpoint_every=0,
                log_every=0, base_model="tiny:0")
    base.update(kw)
    return TrainConfig(**base)


class Spy:
    """Records what the real trainer hands to the real loss and optimizer (both still run)."""

    def __init__(self, monkeypatch):
        self.x0, self.caps, self.lrs, self.optimizers = [], [], [], []
        real_loss, real_build = trainer_module.sft_loss, trainer_module.build_optimizer

        def sft_loss(model, x0, caps, *args, **kwargs):
            self.x0 += [x.clone() for x in x0]
            self.caps += [c.clone() for c in caps]
            return real_loss(model, x0, caps, *args, **kwargs)

        def build_optimizer(*args, **kwargs):
            opt = real_build(*args, **kwargs)
            step = opt.step

            def recording_step(*a, **k):
                self.lrs.append(opt.param_groups[0]["lr"])
                return step(*a, **k)

            opt.step = recording_step
            self.optimizers.append(opt)
            return opt

        monkeypatch.setattr(trainer_module, "sft_loss", sft_loss)
        monkeypatch.setattr(trainer_module, "build_optimizer", build_optimizer)


def same(a, b) -> bool:
    return all(torch.equal(m.down, b.modules[p].down) and torch.equal(m.up, b.modules[p].up)
               for p, m in a.modules.items())


# ------------------------------------------------------------------------------------------------ schedules
def test_lr_schedules_reach_the_optimizer(tmp_path, cache, model, monkeypatch):
    assert [lr_factor("diffsynth", s, 8) for s in range(7)] == [1 / 3] * 5 + [1.0, 1.0]
    assert [lr_factor("constant_with_warmup", s, 6, 3) for s in range(5)] == [1 / 3, 2 / 3, 1.0, 1.0, 1.0]
    assert [lr_factor("linear", s, 6, 2) for s in range(6)] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    cosine = [lr_factor("cosine", s, 10, 2) for s in range(10)]
    assert cosine[:3] == pytest.approx([0.5, 1.0, 1.0]) and cosine[6] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(cosine[2:], cosine[3:])) and cosine[-1] > 0
    for schedule, warmup in (("constant", 0), ("cosine", 2), ("linear", 1), ("constant_with_warmup", 2)):
        spy = Spy(monkeypatch)
        train(model, cfg(tmp_path, steps=5, lr=1e-3, lr_schedule=schedule, warmup_steps=warmup), cache, log=None,
              write_outputs=False)
        assert spy.lrs == pytest.approx([1e-3 * lr_factor(schedule, s, 5, warmup) for s in range(5)]), schedule
    assert spy.lrs[0] < spy.lrs[2]


# ------------------------------------------------------------------------------------------------ optimizers
@pytest.mark.parametrize("name,kind,state_keys", [
    ("adamw", torch.optim.AdamW, {"exp_avg", "exp_avg_sq", "step"}),
    ("adafactor", torch.optim.Adafactor, {"row_var", "col_var", "step"}),
    ("prodigy", None, {"p0", "s", "exp_avg", "exp_avg_sq"}),
])
def test_optimizers_train_and_checkpoint_their_state(tmp_path, cache, model, monkeypatch, name, kind, state_keys):
    if name == "prodigy":
        kind = pytest.importorskip("prodigyopt").Prodigy
    spy = Spy(monkeypatch)
    lr = 1.0 if name == "prodigy" else 1e-3
    result = train(model, cfg(tmp_path, steps=3, lr=lr, optimizer=name, output_name=name), cache, log=None,
                   write_outputs=False)
    assert type(spy.optimizers[0]) is kind and len(spy.lrs) == 3
    assert any(float(m.up.abs().max()) > 0 for m in result.lora.modules.values())
    state = load_checkpoint(tmp_path / "out" / f"{name}.ckpt.safetensors")
    assert set().union(*(s.keys() for s in state["optimizer"]["state"].values())) >= state_keys


def test_missing_optimizer_package_is_named_before_anything_runs(tmp_path, cache, model, monkeypatch):
    for module in ("prodigyopt", "bitsandbytes", "bitsandbytes.optim"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing raises ImportError
    for name, package in (("prodigy", "prodigyopt"), ("adamw8bit", "bitsandbytes")):
        with pytest.raises(MissingOptimizerPackage, match=rf"optimizer '{name}'.*pip install {package}"):
            train(model, cfg(tmp_path, optimizer=name, output_name=name), cache, log=None)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ augmentation
def test_caption_dropout_trains_on_the_empty_prompt_features(tmp_path, cache, model, monkeypatch):
    empty = cache.prompt_features("")
    captions = [cache.caption(i) for i in range(len(cache))]

    def dropped(caps):
        return [c.shape == empty.shape and torch.equal(c, empty) for c in caps]

    counts = {}
    for rate in (0.0, 0.5, 1.0):
        spy = Spy(monkeypatch)
        train(model, cfg(tmp_path, steps=16, caption_dropout_rate=rate), cache, log=None, write_outputs=False)
        flags = dropped(spy.caps)
        assert all(f or any(torch.equal(c, k) for k in captions if k.shape == c.shape)
                   for f, c in zip(flags, spy.caps))
        counts[rate] = sum(flags)
    assert counts[0.0] == 0 and counts[1.0] == 16 and 3 <= counts[0.5] <= 13, counts
    # the draws come from (seed, micro-batch): the same run draws the same samples
    spy = Spy(monkeypatch)
    train(model, cfg(tmp_path, steps=16, caption_dropout_rate=0.5), cache, log=None, write_outputs=False)
    assert sum(dropped(spy.caps)) == counts[0.5]


def test_flip_encodes_the_mirrored_image_and_trains_on_both(tmp_path, cache, model, monkeypatch):
    entry = cache.entries[0]
    with Image.open(entry.image) as im:
        mirrored = crop_resize(im, entry.width, entry.height).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    flipped = cache.latent(0, flipped=True)
    assert torch.equal(flipped, asymmetric_encoders().encode_image(mirrored))
    assert not torch.allclose(flipped, cache.latent(0).flip(-1), atol=1e-3)  # pixel space, not a latent flip
    spy = Spy(monkeypatch)
    train(model, cfg(tmp_path, steps=12, flip_horizontal=True), cache, log=None, write_outputs=False)
    kinds = [next(f for i in range(len(cache)) for f in (False, True) if torch.equal(x, cache.latent(i, f)))
             for x in spy.x0]
    assert 2 <= sum(kinds) <= 10, kinds
    # without flip every sample is the original image
    spy = Spy(monkeypatch)
    train(model, cfg(tmp_path, steps=4), cache, log=None, write_outputs=False)
    assert all(any(torch.equal(x, cache.latent(i)) for i in range(len(cache))) for x in spy.x0)


def test_flip_needs_a_cache_with_mirrored_latents(tmp_path, model):
    folder = make_toy_dataset(tmp_path / "data", n=1, sizes=((64, 64),))
    plain = build_cache(folder, tmp_path / "cache", toy_encoders())
    with pytest.raises(ConfigError, match="flip_horizontal.*flip"):
        train(model, cfg(tmp_path, flip_horizontal=True), plain, log=None)


# ------------------------------------------------------------------------------------------------ EMA, saves
def test_ema_is_the_average_of_the_trained_loras_and_is_saved_alongside(tmp_path, cache, model):
    d = 0.6
    p0 = new_lora(model, rank=4, seed=0)
    runs = [train(model, cfg(tmp_path, steps=k, output_name=f"k{k}"), cache, log=None, write_outputs=False).lora
            for k in (1, 2, 3)]
    result = train(model, cfg(tmp_path, steps=3, ema_decay=d, output_name="ema", save_dtype="fp32"), cache, log=None)
    assert same(result.lora, runs[-1])  # EMA never feeds back into training
    for path, m in result.ema.modules.items():
        for part in ("down", "up"):
            expected = d ** 3 * getattr(p0.modules[path], part)
            for k, lora in enumerate(runs, start=1):
                expected = expected + (1 - d) * d ** (3 - k) * getattr(lora.modules[path], part)
            torch.testing.assert_close(getattr(m, part), expected, rtol=1e-5, atol=1e-7)
    assert result.ema_path == tmp_path / "out" / "ema_ema.safetensors"
    loaded = load_lora(result.ema_path)
    assert same(loaded, result.ema)
    with safe_open(str(result.ema_path), "pt") as f:
        assert f.metadata()["ema_decay"] == str(d)


def test_save_every_keeps_the_last_k(tmp_path, cache, model):
    result = train(model, cfg(tmp_path, steps=7, save_every=2, keep_last=2, ema_decay=0.5, output_name="snap",
                              save_dtype="fp32"), cache, log=None)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("snap*.step*.safetensors")) == [
        "snap.step000004.safetensors", "snap.step000006.safetensors", "snap_ema.step000004.safetensors",
        "snap_ema.step000006.safetensors"]
    assert result.snapshot_paths == [out / "snap.step000004.safetensors", out / "snap.step000006.safetensors"]
    four = train(model, cfg(tmp_path, steps=4, output_name="four"), cache, log=None, write_outputs=False).lora
    assert same(load_lora(out / "snap.step000004.safetensors"), four)
    with safe_open(str(out / "snap.step000006.safetensors"), "pt") as f:
        assert f.metadata()["steps"] == "6"


@pytest.mark.slow
def test_periodic_validation_writes_a_grid_per_point_and_the_loss_curve(tmp_path, cache, model):
    result = train(model, cfg(tmp_path, steps=4, validate=True, validation_every=2, ema_decay=0.5,
                              validation_prompts=["a red square"], output_name="val"), cache, log=None)
    out = tmp_path / "out"
    assert result.validation_grids == [out / "val.step000002.grid.png", out / "val.step000004.grid.png"]
    sizes = {Image.open(p).size for p in result.validation_grids}
    assert len(sizes) == 1 and next(iter(sizes))[1] > 2 * 150  # 2 rows: the LoRA and its EMA
    assert (out / "val.loss.png").is_file() and result.grid_path == out / "val.grid.png"


# ------------------------------------------------------------------------------------------------ targets
def test_target_presets(tmp_path, cache, model):
    assert expand_targets(["attention"]) == ("to_q", "to_k", "to_v", "to_out.0")
    assert expand_targets("attention_ffn") == TARGET_PRESETS["attention_ffn"] == TrainConfig().targets
    assert expand_targets(["attention", "w1", "to_q"]) == ("to_q", "to_k", "to_v", "to_out.0", "w1")
    counts = {name: len(new_lora(model, rank=2, targets=expand_targets([name]))) for name in TARGET_PRESETS}
    blocks = len(model.layers) + len(model.noise_refiner) + len(model.context_refiner)
    assert counts == {"attention": 4 * blocks, "attention_ffn": 7 * blocks,
                      "all_linear": 7 * blocks + len(model.layers) + len(model.noise_refiner)}
    result = train(model, cfg(tmp_path, steps=2, targets=["all_linear"], output_name="all"), cache, log=None)
    loaded = load_lora(result.lora_path)
    assert len(loaded) == counts["all_linear"] and "layers.0.adaLN_modulation.0" in loaded.modules
    assert not loaded.unmatched


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "prodigy"])
def test_resume_is_bit_identical_with_every_option(tmp_path, cache, model, optimizer):
    if optimizer == "prodigy":
        pytest.importorskip("prodigyopt")
    options = dict(steps=6, lr=1.0 if optimizer == "prodigy" else 3e-3, optimizer=optimizer, lr_schedule="cosine",
                   warmup_steps=2, caption_dropout_rate=0.4, flip_horizontal=True, ema_decay=0.7, batch_size=2,
                   grad_accum=2, alpha=2.0, targets=["all_linear"], checkpoint_every=2)
    full = train(model, cfg(tmp_path, output_name="full", **options), cache, log=None, write_outputs=False)
    seen = []
    part = train(model, cfg(tmp_path, output_name="split", **options), cache, log=None, write_outputs=False,
                 progress=lambda s, t, l: seen.append(s), should_stop=lambda: len(seen) >= 3)
    assert part.interrupted and part.step == 3
    state = load_checkpoint(tmp_path / "out" / "split.ckpt.safetensors")
    assert set(state["ema"]) == set(state["lora"])
    resumed = train(model, cfg(tmp_path, output_name="split", resume="auto", **options), cache, log=None,
                    write_outputs=False)
    assert resumed.step == 6 and resumed.losses == full.losses
    assert same(resumed.lora, full.lora) and same(resumed.ema, full.ema)
    other = "adafactor" if optimizer != "adafactor" else "adamw"
    with pytest.raises(ConfigError, match="optimizer"):
        train(model, cfg(tmp_path, output_name="split", resume="auto", **{**options, "optimizer": other}), cache,
              log=None, write_outputs=False)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("settings,field", [
    (dict(ema_decay=1.0), "ema_decay"),
    (dict(ema_decay=-0.1), "ema_decay"),
    (dict(lr_schedule="cosine", warmup_steps=10, steps=10), "warmup_steps"),
    (dict(lr_schedule="constant", warmup_steps=2), "warmup_steps"),
    (dict(lr_schedule="constant_with_warmup"), "warmup_steps"),
    (dict(lr_schedule="exponential"), "lr_schedule"),
    (dict(optimizer="lion"), "optimizer"),
    (dict(caption_dropout_rate=1.5), "caption_dropout_rate"),
    (dict(caption_dropout_rate=-0.01), "caption_dropout_rate"),
    (dict(caption_dropout_rate=math.nan), "caption_dropout_rate"),
    (dict(keep_last=3), "keep_last"),
    (dict(validation_every=5, validate=False), "validation_every"),
    (dict(save_every=-1), "save_every"),
    (dict(flip_horizontal="yes"), "flip_horizontal"),
])
def test_contradictory_settings_are_config_errors_naming_the_field(tmp_path, settings, field):
    with pytest.raises(ConfigError, match=field):
        cfg(tmp_path, **settings).validate_settings()


def test_trajectory_refuses_image_augmentations(tmp_path, cache, model):
    from zimage_core.lora import save_lora
    save_lora(new_lora(model, rank=4, seed=1), tmp_path / "sft.safetensors")
    for option in (dict(flip_horizontal=True), dict(caption_dropout_rate=0.1)):
        with pytest.raises(ConfigError, match=next(iter(option))):
            train(model, cfg(tmp_path, scheme="trajectory", init_lora=str(tmp_path / "sft.safetensors"), **option),
                  cache, log=None)


def test_toml_takes_the_new_fields(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text('[lora]\nrank = 8\nalpha = 4\ntargets = ["attention"]\n'
                    '[optimization]\noptimizer = "adafactor"\nlr_schedule = "cosine"\nwarmup_steps = 10\n'
                    'ema_decay = 0.99\nbatch_size = 2\ngrad_accum = 4\n'
                    '[data]\ncaption_dropout_rate = 0.05\nflip_horizontal = true\n'
                    '[outputs]\nsave_every = 50\nkeep_last = 3\nvalidation_every = 100\n', encoding="utf-8")
    config = TrainConfig.from_toml(path)
    assert config.targets == TARGET_PRESETS["attention"] and config.lora_alpha == 4.0
    assert (config.optimizer, config.lr_schedule, config.warmup_steps, config.ema_decay) == ("adafactor", "cosine",
                                                                                             10, 0.99)
    assert (config.caption_dropout_rate, config.flip_horizontal, config.save_every, config.keep_last,
            config.validation_every, config.batch_size, config.grad_accum) == (0.05, True, 50, 3, 100, 2, 4)
    path.write_text('[optimization]\noptimizer = "sgd"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig.from_toml(path)
