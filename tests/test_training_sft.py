"""SFT, differential and DistillPatch-preview training on a tiny random model (CPU): identity at step 0, only LoRA
tensors change, the loss falls, the preset is frozen and removed, outputs, callbacks, checkpoints, NaN, bad input."""

import ast
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from zimage_core.lora import apply_loras, load_lora, new_lora, save_lora
from zimage_core.sampling import sample
from zimage_core.testing import tiny_model
from zimage_core.training import (ConfigError, LoraMismatch, TrainConfig, TrainingDiverged, build_cache, sft_loss,
                                  train)
from zimage_core.training import checkpoint as checkpoint_module
from zimage_core.training import trainer as trainer_module
from zimage_core.training.checkpoint import load_checkpoint, save_checkpoint
from zimage_core.training.toy import make_toy_dataset, toy_encoders
from zimage_core.training.turbo_check import match
from zimage_core.training.turbo_check import sharpness as turbo_sharpness

KEY = re.compile(r"^diffusion_model\.(layers|noise_refiner|context_refiner)\.\d+\."
                 r"(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.w[123])\.lora_[AB]\.weight$")


@pytest.fixture
def cache(tmp_path):
    folder = make_toy_dataset(tmp_path / "data", n=2, sizes=((64, 64),))
    return build_cache(folder, tmp_path / "cache", toy_encoders(), prompts=["a red square", "a blue square"])


def cfg(tmp_path, **kw):
    base = dict(rank=4, lr=1e-3, steps=4, output_dir=str(tmp_path / "out"), validate=False, checkpoint_every=0,
                log_every=0, base_model="tiny:0")
    base.update(kw)
    return TrainConfig(**base)


def random_lora(model, rank=4, seed=5, scale=0.25):
    lora = new_lora(model, rank=rank, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    for m in lora.modules.values():
        m.up.copy_(torch.randn(m.up.shape, generator=gen) * scale)
    return lora


def digest(model):
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def test_fresh_lora_is_bit_identical_and_training_changes_only_lora(tmp_path, cache):
    model = tiny_model(0)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    caps = [cache.caption(0), cache.caption(1)]
    with torch.no_grad():
        base = model(x, torch.tensor([0.3, 0.8]), caps)
        lora = new_lora(model, rank=32)  # the defaults: rank 32, alpha = rank, 7 targets in every block
        assert len(lora.modules) == 7 * (2 + 2 * 1)
        with apply_loras(model, [(lora, 1.0)], mode="runtime"):
            assert torch.equal(model(x, torch.tensor([0.3, 0.8]), caps), base)

    before = digest(model)
    flags = [p.requires_grad for p in model.parameters()]
    result = train(model, cfg(tmp_path), cache, log=None, write_outputs=False)
    assert digest(model) == before
    assert all(p.grad is None for p in model.parameters())  # no gradient ever reached a base weight
    assert [p.requires_grad for p in model.parameters()] == flags  # and the model's flags are restored
    assert all(not t.requires_grad for t in result.lora.parameters())
    assert any(float(m.up.abs().max()) > 0 for m in result.lora.modules.values())
    assert result.step == 4 and len(result.losses) == 4
    with torch.no_grad():  # the model is back to the base
        assert torch.equal(model(x, torch.tensor([0.3, 0.8]), caps), base)


def test_fixed_batch_loss_halves_at_raised_lr(cache):
    model = tiny_model(0).requires_grad_(False)
    lora = new_lora(model, rank=4)
    params = list(lora.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 16, 8, 8, generator=gen), torch.randn(1, 16, 8, 8, generator=gen)
    caps, sigma = [cache.caption(0)], torch.tensor([0.6])
    losses = []
    with apply_loras(model, [(lora, 1.0)], mode="runtime"):
        for _ in range(60):
            opt.zero_grad()
            loss = sft_loss(model, x0, caps, noise, sigma)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    ratio = min(losses) / losses[0]
    print(f"fixed-batch loss {losses[0]:.3f} -> {min(losses):.3f} (ratio {ratio:.3f}) in 60 steps")
    assert ratio <= 0.5


def test_training_loop_lowers_the_held_out_loss(tmp_path):
    folder = make_toy_dataset(tmp_path / "data", n=1, sizes=((64, 64),))
    cache = build_cache(folder, tmp_path / "cache", toy_encoders())
    model = tiny_model(0)
    gen = torch.Generator().manual_seed(11)
    x0 = cache.latent(0)[None].expand(16, -1, -1, -1)
    noise = torch.randn(16, 16, 8, 8, generator=gen)
    sigma = torch.rand(16, generator=gen) * 0.9 + 0.05
    caps = [cache.caption(0)] * 16

    def held_out(lora=None):
        with torch.no_grad():
            if lora is None:
                return float(sft_loss(model, x0, caps, noise, sigma))
            with apply_loras(model, [(lora, 1.0)], mode="runtime"):
                return float(sft_loss(model, x0, caps, noise, sigma))

    start = held_out()
    result = train(model, cfg(tmp_path, lr=3e-3, steps=120), cache, log=None, write_outputs=False)
    end = held_out(result.lora)
    first, last = sum(result.losses[:20]) / 20, sum(result.losses[-20:]) / 20
    print(f"held-out velocity MSE {start:.3f} -> {end:.3f} (ratio {end / start:.3f}); "
          f"train loss mean of first/last 20: {first:.3f} / {last:.3f}")
    assert end <= 0.75 * start
    assert last < first


def test_differential_preset_is_frozen_removed_and_not_exported(tmp_path, cache):
    model = tiny_model(0)
    preset = random_lora(model, rank=4, seed=5)
    save_lora(preset, tmp_path / "preset.safetensors")
    original = {k: v.clone() for k, v in
                ((f"{p}.{n}", getattr(m, n)) for p, m in load_lora(tmp_path / "preset.safetensors").modules.items()
                 for n in ("down", "up"))}
    before = digest(model)
    config = cfg(tmp_path, scheme="differential", preset_lora=str(tmp_path / "preset.safetensors"), steps=5,
                 validate=True, validation_prompts=["a red square"], output_name="diff")
    result = train(model, config, cache, log=None)
    assert digest(model) == before
    reloaded = load_lora(tmp_path / "preset.safetensors")
    for p, m in reloaded.modules.items():
        assert torch.equal(m.down, original[f"{p}.down"]) and torch.equal(m.up, original[f"{p}.up"])
    # export: L only, as many tensors as a plain SFT LoRA, preset recorded in the metadata
    with safe_open(str(result.lora_path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert len(keys) == 2 * len(new_lora(model, rank=4).modules) and all(KEY.match(k) for k in keys)
    assert meta["scheme"] == "differential" and meta["preset_lora"].endswith("preset.safetensors")
    # validation ran with the preset removed: the turbo check's reference is the LoRA alone at 30 steps / cfg 2
    features, neg = cache.prompt_features("a red square"), cache.prompt_features("")
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(trainer_module._mix(0, 0, 3)))

    def samples(loras, steps, cfg_scale):
        with torch.no_grad(), apply_loras(model, loras, mode="runtime"):
            return sample(model, noise, [features], [neg], steps=steps, cfg=cfg_scale)

    reference = samples([(result.lora, 1.0)], 30, 2.0)
    fast = samples([(result.lora, 1.0)], 8, 1.0)
    assert result.turbo_check_detail["trained"]["match"] == pytest.approx(match(fast, reference), rel=1e-4)
    assert result.turbo_check_detail["base"]["sharpness"] == pytest.approx(
        turbo_sharpness(samples([], 8, 1.0), reference), rel=1e-4)
    with_preset = samples([(preset, 1.0), (result.lora, 1.0)], 30, 2.0)
    assert result.turbo_check_detail["trained"]["match"] != pytest.approx(match(fast, with_preset), rel=1e-3)


def test_linear_toy_differential_learns_target_minus_preset():
    """W_base + P + L trained to W*: then W_base + L ~ W* - P (training-schemes §10 check 17)."""
    torch.manual_seed(0)

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q = torch.nn.Linear(16, 16, bias=False)

    toy = Toy().requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    w_star = torch.randn(16, 16, generator=gen) / 4
    preset = new_lora(toy, rank=16, targets=("to_q",), seed=2)
    preset.modules["to_q"].up.copy_(torch.randn(16, 16, generator=gen) / 8)
    lora = new_lora(toy, rank=16, targets=("to_q",), seed=3)
    params = list(lora.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    with apply_loras(toy, [(preset, 1.0), (lora, 1.0)], mode="runtime"):
        for _ in range(600):
            x = torch.randn(64, 16, generator=gen)
            loss = (toy.to_q(x) - x @ w_star.T).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    learned = toy.to_q.weight + lora.modules["to_q"].weight_delta()
    target = w_star - preset.modules["to_q"].weight_delta()
    rel = float((learned - target).norm() / target.norm())
    print(f"linear toy: |W_base + L - (W* - P)| / |W* - P| = {rel:.4f}")
    assert rel < 0.05
    assert not any(t.requires_grad for t in preset.parameters())


def test_outputs_callbacks_and_distillpatch_preview(tmp_path, cache, capsys):
    model = tiny_model(0)
    patch = random_lora(model, rank=4, seed=9, scale=0.1)
    save_lora(patch, tmp_path / "patch.safetensors")
    calls = []
    config = cfg(tmp_path, scheme="distillpatch", distill_patch=str(tmp_path / "patch.safetensors"), steps=3,
                 validate=True, validation_prompts=["a red square", "a blue square"], output_name="run1",
                 save_dtype="fp32")
    result = train(model, config, cache, progress=lambda s, t, l: calls.append((s, t, l)))
    assert [c[:2] for c in calls] == [(1, 3), (2, 3), (3, 3)] and all(isinstance(c[2], float) for c in calls)
    out = tmp_path / "out"
    assert result.lora_path == out / "run1.safetensors" and result.grid_path == out / "run1.grid.png"
    assert result.loss_curve_path == out / "run1.loss.png" and result.checkpoint_path == out / "run1.ckpt.safetensors"
    grid = Image.open(result.grid_path)
    assert grid.width > 2 * 150 and grid.height > 5 * 150  # 2 prompts, 5 rows (before/after x 2 + patched)
    Image.open(result.loss_curve_path).verify()
    with safe_open(str(result.lora_path), "pt") as f:
        meta = f.metadata()
        assert all(KEY.match(k) for k in f.keys())
    assert meta["scheme"] == "distillpatch" and meta["rank"] == "4" and meta["steps"] == "3"
    assert meta["base_model"] == "tiny:0" and meta["preset_lora"] == ""
    loaded = load_lora(result.lora_path)
    for path, m in loaded.modules.items():
        assert torch.equal(m.up, result.lora.modules[path].up) and torch.equal(m.down, result.lora.modules[path].down)
    assert set(result.turbo_check) == {"base", "trained", "trained+distillpatch"}
    printed = capsys.readouterr().out
    assert "turbo check" in printed and "base" in printed and "trained" in printed
    assert not list(out.glob("*.tmp*")) and not list(out.glob(".*tmp*"))


def test_interrupt_checkpoint_and_bit_identical_resume(tmp_path, cache):
    model = tiny_model(0)
    full = train(model, cfg(tmp_path, steps=6, output_name="full", lr=3e-3, checkpoint_every=2), cache, log=None,
                 write_outputs=False)

    seen = []
    stop_after = 3
    part = train(model, cfg(tmp_path, steps=6, output_name="split", lr=3e-3, checkpoint_every=2), cache, log=None,
                 write_outputs=False, progress=lambda s, t, l: seen.append(s),
                 should_stop=lambda: len(seen) >= stop_after)
    assert part.interrupted and part.step == 3 and part.lora_path is None
    state = load_checkpoint(tmp_path / "out" / "split.ckpt.safetensors")
    assert state["step"] == 3 and set(state) >= {"lora", "optimizer", "rng", "config", "losses"}
    assert state["config"]["rank"] == 4

    resumed = train(model, cfg(tmp_path, steps=6, output_name="split", lr=3e-3, checkpoint_every=2, resume="auto"),
                    cache, log=None, write_outputs=False)
    assert resumed.step == 6 and resumed.losses == full.losses
    for path, m in full.lora.modules.items():
        assert torch.equal(m.down, resumed.lora.modules[path].down)
        assert torch.equal(m.up, resumed.lora.modules[path].up)
    # resuming with another rank is refused
    with pytest.raises(ConfigError, match="rank"):
        train(model, cfg(tmp_path, steps=8, rank=8, output_name="split", resume="auto"), cache, log=None,
              write_outputs=False)


def test_interrupt_by_exception_writes_a_checkpoint(tmp_path, cache):
    class Cancelled(Exception):
        pass

    seen = []

    def stop():
        if len(seen) >= 2:
            raise Cancelled()
        return False

    with pytest.raises(Cancelled):
        train(tiny_model(0), cfg(tmp_path, steps=5, output_name="cancel"), cache, log=None, write_outputs=False,
              progress=lambda s, t, l: seen.append(s), should_stop=stop)
    assert load_checkpoint(tmp_path / "out" / "cancel.ckpt.safetensors")["step"] == 2


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.ckpt.safetensors"
    save_checkpoint(path, {"step": 1, "x": torch.ones(3)})

    def failing_write(handle, *a, **k):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "_write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2, "x": torch.zeros(3)})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.ckpt.safetensors"]


def test_checkpoint_is_a_safetensors_file_and_nothing_is_unpickled(tmp_path, cache):
    train(tiny_model(0), cfg(tmp_path, steps=2, output_name="st"), cache, log=None, write_outputs=False)
    path = tmp_path / "out" / "st.ckpt.safetensors"
    with safe_open(str(path), "pt") as f:  # a plain safetensors file: tensors + string metadata
        meta, names = f.metadata(), set(f.keys())
    assert meta["format"] == checkpoint_module.FORMAT and all(isinstance(v, str) for v in meta.values())
    assert json.loads(meta["step"]) == 2 and len(json.loads(meta["losses"])) == 2
    assert json.loads(meta["config"])["rank"] == 4
    assert json.loads(meta["optimizer"])["param_groups"][0]["lr"] == 1e-3
    lora = {n for n in names if n.startswith("lora/")}
    assert lora and all(n.endswith(("|down", "|up")) for n in lora)
    assert {n.rsplit("/", 1)[1] for n in names if n.startswith("optimizer/state/")} == {"exp_avg", "exp_avg_sq",
                                                                                         "step"}
    assert {"rng/torch", "rng/numpy/keys"} <= names
    assert names == lora | {n for n in names if n.startswith(("optimizer/state/", "rng/"))}
    # an old pickle checkpoint (torch.save) is refused without being unpickled
    old = tmp_path / "old.ckpt.pt"
    torch.save({"format": "zimage_core.train_checkpoint/1"}, old)
    with pytest.raises(ValueError, match="pickle"):
        load_checkpoint(old)
    # nothing the project ships or runs unpickles (or writes pickles): no torch.load / torch.save, no pickle imports
    root = Path(__file__).resolve().parents[1]
    shipped = [root / d for d in ("zimage_core", "nodes", "toyworld", "tools", "benchmarks")] + [root / "__init__.py"]
    for file in sorted(f for d in shipped for f in ([d] if d.is_file() else d.rglob("*.py"))):
        source = file.read_text(encoding="utf-8")
        assert "torch.load" not in source, file
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                assert (node.value.id, node.attr) not in {("torch", "load"), ("torch", "save")}, f"{file}:{node.lineno}"
                assert node.value.id not in {"pickle", "cPickle", "dill"}, f"{file}:{node.lineno}"
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(m.split(".")[0] in {"pickle", "_pickle", "cPickle", "dill"} for m in modules), file


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, cache, monkeypatch):
    real, count = trainer_module.sft_loss, [0]

    def poisoned(*args, **kwargs):
        count[0] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if count[0] == 4 else loss

    monkeypatch.setattr(trainer_module, "sft_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"step 4.*not finite.*last good checkpoint.*step 2"):
        train(tiny_model(0), cfg(tmp_path, steps=6, checkpoint_every=2, output_name="nan"), cache, log=None)
    state = load_checkpoint(tmp_path / "out" / "nan.ckpt.safetensors")
    assert state["step"] == 2 and all(torch.isfinite(t).all() for t in state["lora"].values())
    assert not (tmp_path / "out" / "nan.safetensors").exists()


def test_trains_when_called_from_inference_mode(tmp_path):
    """ComfyUI runs nodes under torch.inference_mode: weights and cached inputs are inference tensors (errata A4)."""
    folder = make_toy_dataset(tmp_path / "data", n=1, sizes=((64, 64),))
    with torch.inference_mode():
        model = tiny_model(0)
        cache = build_cache(folder, tmp_path / "cache", toy_encoders())
        assert model.x_pad_token.is_inference()
        result = train(model, cfg(tmp_path, steps=2), cache, log=None, write_outputs=False)
    assert result.step == 2 and any(float(m.up.abs().max()) > 0 for m in result.lora.modules.values())


def test_lora_for_another_model_is_refused(tmp_path, cache):
    other = tiny_model(0, dim=64, n_heads=2)
    save_lora(new_lora(other, rank=4), tmp_path / "other.safetensors")
    model = tiny_model(0)
    with pytest.raises((LoraMismatch, ValueError), match="another model|shape"):
        train(model, cfg(tmp_path, scheme="differential", preset_lora=str(tmp_path / "other.safetensors")), cache,
              log=None)
    with pytest.raises((LoraMismatch, ValueError), match="another model|shape"):
        train(model, cfg(tmp_path, scheme="trajectory", init_lora=str(tmp_path / "other.safetensors")), cache,
              log=None)
    with pytest.raises(ConfigError, match="rank"):
        train(model, cfg(tmp_path, rank=0), cache, log=None)
    with pytest.raises(ConfigError, match="output_name"):
        train(model, cfg(tmp_path, output_name="../outside"), cache, log=None)
    assert not (tmp_path / "outside.safetensors").exists()
