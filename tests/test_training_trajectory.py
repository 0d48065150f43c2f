"""Trajectory imitation (scheme 3) on a tiny random model: the student's own few-step cfg-1 rollout moves towards
the frozen SFT teacher's 50-step cfg-2 result, the teacher never changes or receives gradients, a higher-rank
student starts from the SFT LoRA, and resume is bit-identical with fresh teacher noise.

Thresholds come from trainer-feasibility.md §5 (4 fixed noises, rank 4, lr 3e-3, 100 steps)."""

import pytest
import torch

from zimage_core.lora import apply_loras, load_lora, new_lora, save_lora
from zimage_core.sampling import sample
from zimage_core.testing import tiny_model
from zimage_core.training import (TrainConfig, build_cache, grow_lora, teacher_trajectory, train, trajectory_grids,
                                  trajectory_pool_noise)
from zimage_core.training.toy import make_toy_dataset, toy_encoders

SHAPE = (16, 12, 12)  # 96 x 96 px images


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ti")
    folder = make_toy_dataset(tmp / "data", n=1, sizes=((96, 96),), captions=["a red square on dark noise"])
    cache = build_cache(folder, tmp / "cache", toy_encoders())
    model = tiny_model(0)
    sft = new_lora(model, rank=4, seed=1)  # a random "SFT" LoRA that changes the velocity substantially
    gen = torch.Generator().manual_seed(7)
    for m in sft.modules.values():
        m.down.copy_(torch.randn(m.down.shape, generator=gen) / m.down.shape[1] ** 0.5)
        m.up.copy_(torch.randn(m.up.shape, generator=gen) * 0.25)
    save_lora(sft, tmp / "sft.safetensors", metadata={"scheme": "sft"})
    return tmp, cache, model, load_lora(tmp / "sft.safetensors")


def ti_config(tmp, **kw):
    base = dict(scheme="trajectory", init_lora=str(tmp / "sft.safetensors"), rank=4, lr=3e-3, steps=100,
                trajectory_noises=4, output_dir=str(tmp / "out"), validate=False, checkpoint_every=0, log_every=0)
    base.update(kw)
    return TrainConfig(**base)


def measure(setup, student_steps, train_steps):
    tmp, cache, model, sft = setup
    pos, neg = cache.caption(0), cache.prompt_features("")
    _, grid, keep = trajectory_grids(50, student_steps)
    in_sample = torch.stack([trajectory_pool_noise(0, 0, k, SHAPE) for k in range(4)])
    held_out = torch.randn((8, *SHAPE), generator=torch.Generator().manual_seed(999))

    def teacher_end(noise):
        with apply_loras(model, [(sft, 1.0)], mode="runtime"):
            return teacher_trajectory(model, noise, [pos] * len(noise), [neg] * len(noise), grid, 2.0, keep)[-1]

    def distance(lora, noise, reference):
        with torch.no_grad(), apply_loras(model, [(lora, 1.0)], mode="runtime"):
            x = sample(model, noise, [pos], None, steps=student_steps, cfg=1.0)
        return float((x - reference).pow(2).mean().sqrt())

    ref_in, ref_out = teacher_end(in_sample), teacher_end(held_out)
    d0 = distance(sft, in_sample, ref_in), distance(sft, held_out, ref_out)
    result = train(model, ti_config(tmp, steps=train_steps, student_steps=student_steps,
                                    output_name=f"ti{student_steps}"), cache, log=None, write_outputs=False)
    d1 = distance(result.lora, in_sample, ref_in), distance(result.lora, held_out, ref_out)
    ratios = d0[0] / d1[0], d0[1] / d1[1]
    print(f"\n{student_steps}-step student after {train_steps} steps: in-sample {d0[0]:.4f} -> {d1[0]:.4f} "
          f"(x{ratios[0]:.2f}), held-out {d0[1]:.4f} -> {d1[1]:.4f} (x{ratios[1]:.2f}); "
          f"teacher sample-forwards {result.teacher_forwards}, student {result.student_forwards}")
    return ratios, result


def test_student_moves_towards_the_teacher(setup):
    (r_in, r_out), result = measure(setup, 8, 100)
    assert r_in >= 1.5
    assert r_out >= 1.1
    # 4 fixed noises, cached: each teacher trajectory (50 steps x pos+neg) is computed once
    assert result.teacher_forwards == 4 * 50 * 2
    assert result.student_forwards == 100 * 8


def test_fewer_student_steps_gain_more(setup):
    (r8_in, r8_out), _ = measure(setup, 8, 60)
    (r4_in, r4_out), _ = measure(setup, 4, 60)
    (r2_in, r2_out), _ = measure(setup, 2, 60)
    assert r4_out > r8_out and r2_out > r8_out
    assert r4_in > r8_in and r2_in > r8_in
    assert r4_out >= 1.3 and r2_out >= 1.4


def test_teacher_is_frozen_and_starts_equal_to_the_student(setup, monkeypatch):
    tmp, cache, model, sft = setup
    from zimage_core.training import trainer as trainer_module
    captured = {}
    real = trainer_module._Run._teacher_states

    def spy(self, noise, positive, negative):
        captured.setdefault("teacher", self.teacher)
        captured.setdefault("student0", {p: (m.down.detach().clone(), m.up.detach().clone())
                                         for p, m in self.lora.modules.items()})
        captured.setdefault("teacher0", {p: (m.down.clone(), m.up.clone()) for p, m in self.teacher.modules.items()})
        return real(self, noise, positive, negative)

    monkeypatch.setattr(trainer_module._Run, "_teacher_states", spy)
    result = train(model, ti_config(tmp, steps=5, trajectory_noises=0, teacher_steps=10, student_steps=4,
                                    output_name="frozen"), cache, log=None, write_outputs=False)
    teacher = captured["teacher"]
    for path, m in teacher.modules.items():
        assert not m.down.requires_grad and not m.up.requires_grad and m.up.grad is None and m.down.grad is None
        assert torch.equal(m.down, captured["teacher0"][path][0]) and torch.equal(m.up, captured["teacher0"][path][1])
        # snapshot taken after the SFT LoRA was loaded: teacher == student at step 0 (same rank)
        assert torch.equal(m.down, captured["student0"][path][0]) and torch.equal(m.up, captured["student0"][path][1])
        assert torch.equal(m.up.float(), sft.modules[path].up.float())
    assert any(not torch.equal(result.lora.modules[p].up, teacher.modules[p].up) for p in teacher.modules)
    assert result.teacher_forwards == 5 * 10 * 2  # fresh noise: a new 10-step cfg-2 teacher run every step


def test_higher_rank_student_starts_from_the_sft_lora(setup):
    tmp, cache, model, sft = setup
    grown = grow_lora(model, sft, rank=8, targets=("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"), seed=3)
    assert grown.rank == 8 and set(grown.modules) == set(sft.modules)
    for path, m in grown.modules.items():
        assert torch.equal(m.down[:4], sft.modules[path].down) and torch.equal(m.up[:, :4], sft.modules[path].up)
        assert float(m.up[:, 4:].abs().max()) == 0.0 and float(m.down[4:].abs().min()) >= 0.0
        assert float(m.down[4:].abs().max()) > 0  # fresh components: random down, zero up (not a saddle)
        assert m.scale == sft.modules[path].scale == 1.0
    x = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with apply_loras(model, [(sft, 1.0)], mode="runtime"):
            a = model(x, torch.tensor([0.7]), [cache.caption(0)])
        with apply_loras(model, [(grown, 1.0)], mode="runtime"):
            b = model(x, torch.tensor([0.7]), [cache.caption(0)])
    assert torch.allclose(a, b, atol=1e-6)
    # the trainer uses it: a rank-8 student from the rank-4 SFT LoRA trains
    result = train(model, ti_config(tmp, rank=8, steps=2, output_name="grow"), cache, log=None, write_outputs=False)
    assert result.lora.rank == 8
    assert any(float(m.up[:, 4:].abs().max()) > 0 for m in result.lora.modules.values())
    with pytest.raises(ValueError, match="below the rank"):
        grow_lora(model, sft, rank=2)


def test_trajectory_resume_is_bit_identical(setup):
    tmp, cache, model, _ = setup
    small = dict(trajectory_noises=0, teacher_steps=10, student_steps=4, steps=4, checkpoint_every=1)
    full = train(model, ti_config(tmp, output_name="tfull", **small), cache, log=None, write_outputs=False)
    seen = []
    part = train(model, ti_config(tmp, output_name="tsplit", **small), cache, log=None, write_outputs=False,
                 progress=lambda s, t, l: seen.append(s), should_stop=lambda: len(seen) >= 2)
    assert part.interrupted and part.step == 2
    rest = train(model, ti_config(tmp, output_name="tsplit", resume="auto", **small), cache, log=None,
                 write_outputs=False)
    assert rest.losses == full.losses
    for path, m in full.lora.modules.items():
        assert torch.equal(m.up, rest.lora.modules[path].up) and torch.equal(m.down, rest.lora.modules[path].down)
