"""The Fun ControlNet Union (every released layout) against diffusers' ZImageControlNetModel and its pipelines, on
tiny random weights in fp32; loading, layout detection and refusals."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import zimage_core as zc
from zimage_core.controlnet import ControlSchedule, control_residuals
from zimage_core.testing import tiny_controlnet, tiny_model

from reference import (RefinerHintsToTransformer, diffusers_controlnet_twin, diffusers_twin, tiny_vae,
                       vae_latent)

RELEASES = ["1.0", "2.0", "2.1", "2.1-lite"]
BASE = dict(n_layers=4, n_refiner_layers=2)  # room for control places [0, 2] (and [0] for the lite stand-in)


def _net(release, seed=1):
    base = tiny_model(**BASE).config
    return tiny_controlnet(release, seed=seed, base=base, n_control_layers=1 if release == "2.1-lite" else None)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0, **BASE)


@pytest.fixture(scope="module")
def ref(model):
    return diffusers_twin(model)


def _inputs(seed=0, h=8, w=8, cap_len=7, batch=1):
    gen = torch.Generator().manual_seed(seed)
    lat = torch.randn(batch, 16, h, w, generator=gen)
    caps = [torch.randn(cap_len + 5 * i, 48, generator=gen) for i in range(batch)]
    control = torch.randn(batch, 16, h, w, generator=gen)
    mask = (torch.rand(batch, 1, h, w, generator=gen) > 0.5).float()
    inpaint = torch.randn(batch, 16, h, w, generator=gen)
    return lat, caps, control, mask, inpaint


class _Recorder:
    """Wraps a BlockResiduals hook and keeps every residual it adds, per (stage, block)."""

    def __init__(self, hook):
        self.hook, self.seen = hook, {}

    def __call__(self, stage):
        add = self.hook(stage)
        if add is None:
            return None

        def record(i):
            r = add(i)
            if r is not None:
                self.seen[(stage.name, i)] = r
            return r
        return record


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("inpaint", [False, True])
def test_hints_and_velocity_equal_diffusers(model, ref, release, inpaint):
    net = _net(release)
    if inpaint and not net.config.inpaint:
        pytest.skip("1.0 has no inpaint mode")
    lat, caps, control, mask, masked = _inputs(seed=3, cap_len=37)
    ctl = zc.ControlInput(net, control, strength=0.8, mask=mask if inpaint else None,
                          inpaint_latent=masked if inpaint else None)
    sigma = torch.tensor([0.6])
    recorder = _Recorder(control_residuals(model, [ctl]))
    with torch.no_grad():
        ours = model(lat, sigma, caps, residuals=recorder)
        cn = diffusers_controlnet_twin(net, ref)
        hints = cn([lat[0][:, None]], 1.0 - sigma, caps, [ctl.context()[0][:, None]], conditioning_scale=0.8)
        assert sorted(hints) == net.layer_places(len(model.layers))
        for layer, hint in hints.items():  # every main-stage hint, the same numbers
            assert (recorder.seen[("layers", layer)][0] - hint[0]).abs().max() < 1e-4
        unadapted = -ref([lat[0][:, None]], 1.0 - sigma, caps, controlnet_block_samples=hints,
                         return_dict=False)[0][0][:, 0]
        adaptor = RefinerHintsToTransformer(cn, ref) if net.config.refiner != "plain" else None
        try:
            hints = cn([lat[0][:, None]], 1.0 - sigma, caps, [ctl.context()[0][:, None]], conditioning_scale=0.8)
            theirs = -ref([lat[0][:, None]], 1.0 - sigma, caps, controlnet_block_samples=hints,
                          return_dict=False)[0][0][:, 0]
        finally:
            if adaptor is not None:
                adaptor.remove()
    refiner_hinted = {i for stage, i in recorder.seen if stage == "noise_refiner"}
    assert refiner_hinted == (set() if net.config.refiner == "plain" else {0, 1})
    assert (ours[0] - theirs).abs().max() < 1e-4
    assert (ours - model(lat, sigma, caps)).abs().max() > 1e-2  # the control does act
    # diffusers 0.42.1 as shipped drops the 2.x refiner hints from the transformer (see zimage_core/controlnet.py)
    assert ((ours[0] - unadapted).abs().max() > 1e-2) == (net.config.refiner != "plain")


def test_no_control_costs_nothing_and_zero_strength_is_the_base(model):
    lat, caps, control, *_ = _inputs()
    base = model(lat, 0.5, caps)
    ctl = zc.ControlInput(_net("2.1"), control, strength=0.0)
    assert torch.equal(model(lat, 0.5, caps, residuals=None), base)
    assert (model(lat, 0.5, caps, residuals=control_residuals(model, [ctl])) - base).abs().max() < 1e-6


def test_several_controls_add_their_residuals(model):
    lat, caps, control, mask, masked = _inputs(seed=5, batch=2)
    a = zc.ControlInput(_net("2.1"), control, strength=0.7)
    b = zc.ControlInput(_net("1.0", seed=2), control.flip(-1), strength=0.5)
    ra, rb, both = (_Recorder(control_residuals(model, c)) for c in ([a], [b], [a, b]))
    with torch.no_grad():
        for r in (ra, rb, both):
            model(lat, 0.5, caps, residuals=r)
    for key, value in both.seen.items():
        parts = [r.seen[key] for r in (ra, rb) if key in r.seen]
        assert len(parts) >= 1
    # Each control sees the stream as it is: with both, the main-stage stream differs from each alone, but the
    # refiner-stage hints of `a` (computed from the untouched image tokens) are the same.
    assert torch.allclose(both.seen[("noise_refiner", 0)], ra.seen[("noise_refiner", 0)], atol=1e-6)


def _pipeline(net, model, ref, inpaint):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageControlNetInpaintPipeline, ZImageControlNetPipeline

    cls = ZImageControlNetInpaintPipeline if inpaint else ZImageControlNetPipeline
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = cls(scheduler=scheduler, vae=tiny_vae(), text_encoder=None, tokenizer=None, transformer=ref,
               controlnet=diffusers_controlnet_twin(net, ref))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.slow
@pytest.mark.parametrize("release,inpaint", [("1.0", False), ("2.1", False), ("2.0", True), ("2.1", True)])
def test_turbo_sampling_with_control_equals_diffusers_pipeline(model, ref, release, inpaint):
    net = _net(release)
    pipe = _pipeline(net, model, ref, inpaint)
    gen = torch.Generator().manual_seed(11)
    h = w = 64
    noise = torch.randn(1, 16, h // 8, w // 8, generator=gen)
    caps = [torch.randn(12, 48, generator=gen)]
    control_image = torch.rand(1, 3, h, w, generator=gen) * 2 - 1
    kwargs = dict(prompt_embeds=caps, height=h, width=w, num_inference_steps=8, guidance_scale=0.0,
                  control_image=control_image, controlnet_conditioning_scale=0.75, latents=noise.clone(),
                  output_type="latent", return_dict=False)
    ctl = dict(image_latent=vae_latent(pipe.vae, control_image), strength=0.75)
    if inpaint:
        image = torch.rand(1, 3, h, w, generator=gen) * 2 - 1
        mask = torch.zeros(1, 1, h, w)
        mask[..., 16:48, 8:40] = 1.0
        kwargs.update(image=image, mask_image=mask)
        ctl.update(mask=F.interpolate(mask, size=(h // 8, w // 8), mode="nearest"),
                   inpaint_latent=vae_latent(pipe.vae, image * (mask < 0.5)))
    adaptor = RefinerHintsToTransformer(pipe.controlnet, ref) if net.config.refiner != "plain" else None
    try:
        with torch.no_grad():
            theirs = pipe(**kwargs)[0]
    finally:
        if adaptor is not None:
            adaptor.remove()
    ours = zc.sample(model, noise, caps, steps=8, cfg=1.0, control=[zc.ControlInput(net, **ctl)])
    plain = zc.sample(model, noise, caps, steps=8, cfg=1.0)
    assert (ours - theirs).abs().max() < 1e-3
    assert (ours - plain).abs().max() > 1e-2


class _Calls(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.controlled = model, []
        self.config, self.x_pad_token = model.config, model.x_pad_token

    def forward(self, x, s, c, residuals=None):
        self.controlled.append(residuals is not None)
        return self.model(x, s, c, residuals=residuals)


@pytest.mark.parametrize("start,end,expected", [(0.0, 1.0, [True] * 8), (0.0, 0.5, [True] * 4 + [False] * 4),
                                                (0.25, 0.75, [False] * 2 + [True] * 4 + [False] * 2)])
def test_start_end_select_the_steps(model, start, end, expected):
    lat, caps, control, *_ = _inputs()
    calls = _Calls(model)
    zc.sample(calls, lat, caps, steps=8, control=[zc.ControlInput(_net("2.1"), control, start=start, end=end)])
    assert calls.controlled == expected


def test_cfg_batch_doubles_the_control(model):
    lat, caps, control, *_ = _inputs(batch=2)
    ctl = zc.ControlInput(_net("2.1"), control[:1])
    out = zc.sample(model, lat, caps, steps=2, cfg=2.0, control=[ctl])
    assert out.shape == lat.shape and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_load_detects_the_layout(tmp_path, model, release, prefix):
    net = _net(release)
    state = net.state_dict()
    if release == "2.0":  # the released 2.0 file carries an untrained control_noise_refiner (after_proj zero)
        twin = tiny_controlnet("2.1", base=model.config)
        state.update({k: (torch.zeros_like(v) if "after_proj" in k else v) for k, v in twin.state_dict().items()
                      if k.startswith("control_noise_refiner.")})
    path = tmp_path / "cn.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = zc.load_controlnet(path, dtype=torch.float32)
    assert loaded.config == net.config
    for name, tensor in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    assert release.split("-")[0] in loaded.config.describe()
    bf16 = zc.load_controlnet(path, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16


def test_released_layouts_at_real_size_are_inferred_from_headers(tmp_path):
    for release, places in [("1.0", [0, 5, 10, 15, 20, 25]), ("2.1", list(range(0, 30, 2))),
                            ("2.1-lite", [0, 10, 20])]:
        with torch.device("meta"):
            net = zc.ZImageControlNet(zc.ControlNetConfig.release(release))
        shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        from zimage_core.controlnet import config_from_shapes
        cfg = config_from_shapes(shapes, "x", lambda: True)
        assert cfg == net.config and net.layer_places(30) == places


@pytest.mark.parametrize("make,message", [
    (lambda m: {"layers.0.attention.to_q.lora_A.weight": torch.zeros(4, 96)}, "looks like a LoRA"),
    (lambda m: m.state_dict(), "looks like a Z-Image transformer"),
    (lambda m: {"controlnet_x_embedder.weight": torch.zeros(4, 4)}, "looks like a Flux ControlNet"),
])
def test_foreign_files_are_refused_by_name(tmp_path, model, make, message):
    path = tmp_path / "not_a_controlnet.safetensors"
    save_file({k: v.contiguous() for k, v in make(model).items()}, str(path))
    with pytest.raises(ValueError, match=message) as err:
        zc.load_controlnet(path)
    assert "not_a_controlnet.safetensors" in str(err.value)


def test_controlnet_file_given_as_a_transformer_is_refused(tmp_path):
    path = tmp_path / "cn.safetensors"
    save_file(_net("2.1").state_dict(), str(path))
    with pytest.raises(ValueError, match="looks like a Z-Image Fun ControlNet"):
        zc.load_transformer(path)


def test_truncated_layout_is_refused(tmp_path):
    state = _net("2.1").state_dict()
    state.pop("control_layers.1.after_proj.weight")
    path = tmp_path / "cut.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match="cut.safetensors does not match.*control_layers.1.after_proj"):
        zc.load_controlnet(path)


# ---------------------------------------------------------------------------------------------- bad input
def test_controlnet_of_another_model_size_is_refused(model):
    other = tiny_controlnet("2.1", base=zc.ZImageConfig.tiny(dim=192, n_heads=6, axes_dims=(8, 12, 12)))
    lat, caps, *_ = _inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="control 1 .*does not fit this Z-Image model: it has width 192"):
        zc.sample(model, lat, caps, steps=2, control=[zc.ControlInput(other, torch.zeros(1, 16, 8, 8))])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_control_of_another_size_names_both_sizes(model):
    lat, caps, *_ = _inputs()
    with pytest.raises(ValueError, match="its image is 128x64 px but the latent is 64x64 px"):
        zc.sample(model, lat, caps, steps=2, control=[zc.ControlInput(_net("2.1"), torch.zeros(1, 16, 8, 16))])


def test_mask_needs_an_inpaint_controlnet_and_a_matching_size():
    z = torch.zeros(1, 16, 8, 8)
    with pytest.raises(ValueError, match="has no inpaint mode"):
        zc.ControlInput(_net("1.0"), z, mask=torch.ones(1, 1, 8, 8), inpaint_latent=z)
    with pytest.raises(ValueError, match="differ in size: image_latent 64x64 px, mask 128x128 px"):
        zc.ControlInput(_net("2.1"), z, mask=torch.ones(1, 1, 16, 16), inpaint_latent=torch.zeros(1, 16, 16, 16))
    with pytest.raises(ValueError, match="needs both mask and inpaint_latent"):
        zc.ControlInput(_net("2.1"), z, mask=torch.ones(1, 1, 8, 8))
    with pytest.raises(ValueError, match="start/end"):
        zc.ControlInput(_net("2.1"), z, start=0.6, end=0.5)


def test_schedule_builds_contexts_once(model):
    lat, caps, control, mask, masked = _inputs()
    schedule = ControlSchedule(model, [zc.ControlInput(_net("2.1"), None, mask=mask, inpaint_latent=masked)],
                               lat.shape)
    ctx = schedule.contexts[0]
    assert ctx.shape == (1, 33, 8, 8) and torch.equal(ctx[:, :16], torch.zeros(1, 16, 8, 8))
    assert torch.equal(ctx[:, 16:17], 1 - mask) and torch.equal(ctx[:, 17:], masked)


@pytest.mark.parametrize("inpaint", [False, True])
def test_velocity_equals_diffsynth(model, inpaint):
    """DiffSynth's ZImageControlNet (2.1 layout; its mapping of control layers is hard-coded to the 15-layer file)."""
    from reference import diffsynth_turbo_velocity

    net = _net("2.1")
    lat, caps, control, mask, masked = _inputs(seed=4, cap_len=21)
    ctl = zc.ControlInput(net, control, strength=0.9, mask=mask if inpaint else None,
                          inpaint_latent=masked if inpaint else None)
    theirs = diffsynth_turbo_velocity(model, net, lat, 0.7, caps[0], ctl.context(), 0.9)
    with torch.no_grad():
        ours = model(lat, torch.tensor([0.7]), caps, residuals=control_residuals(model, [ctl]))
    assert (ours - theirs).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------- storage and offload
def test_fp8_storage_and_block_offload_as_the_transformer(tmp_path, model):
    from zimage_core.offload import disable_block_offload, enable_block_offload
    from zimage_core.quant.fp8 import has_fp8_storage, to_fp8_storage

    path = tmp_path / "cn.safetensors"
    save_file(_net("2.1").state_dict(), str(path))
    lat, caps, control, *_ = _inputs(seed=6)

    def velocity(net):
        with torch.no_grad():
            return model(lat, 0.6, caps, residuals=control_residuals(model, [zc.ControlInput(net, control)]))

    full = zc.load_controlnet(path, dtype=torch.float32)
    reference = velocity(full)
    fp8 = zc.load_controlnet(path, dtype=torch.float32, weight_storage="fp8_e4m3fn")
    assert has_fp8_storage(fp8) and not has_fp8_storage(full)
    stored = sum(p.numel() * p.element_size() for p in fp8.parameters())
    assert stored < 0.6 * sum(p.numel() * p.element_size() for p in full.parameters())
    quantised = velocity(fp8)
    assert torch.equal(quantised, velocity(to_fp8_storage(zc.load_controlnet(path, dtype=torch.float32))))
    assert 0 < (quantised - reference).abs().max() < 0.1 * reference.abs().max()
    enable_block_offload(full, "cpu")
    try:
        assert torch.equal(velocity(full), reference)
    finally:
        disable_block_offload(full)
    with pytest.raises(ValueError, match="weight_storage must be one of"):
        zc.load_controlnet(path, weight_storage="int4")
