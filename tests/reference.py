"""Test-only bridges to the reference implementations (diffusers), fed the very same weights."""

from __future__ import annotations

import functools

import numpy as np
import torch


def diffusers_twin(model):
    """diffusers' ZImageTransformer2DModel holding exactly the weights of our model."""
    from diffusers import ZImageTransformer2DModel

    cfg = {k: v for k, v in model.config.to_diffusers().items() if not k.startswith("_")}
    ref = ZImageTransformer2DModel(**cfg).to(model.dtype)
    missing, unexpected = ref.load_state_dict(model.state_dict(), strict=True)
    assert not missing and not unexpected
    return ref.eval()


def diffusers_velocity(ref, latents, t, captions):
    """diffusers' raw output at model time t, negated into our velocity convention, as [B, C, H, W]."""
    out = ref([x[:, None] for x in latents], t, list(captions), return_dict=False)[0]
    return -torch.stack([o[:, 0] for o in out])


def diffusers_sample(ref, noise, positive, negative, steps, cfg):
    """ZImagePipeline's denoising loop (latents and prompt embeddings given; guidance_scale = cfg - 1)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=ref)
    pipe.set_progress_bar_config(disable=True)
    h, w = noise.shape[-2:]
    out = pipe(prompt_embeds=list(positive), negative_prompt_embeds=list(negative) if negative is not None else None,
               height=h * 8, width=w * 8, num_inference_steps=steps, guidance_scale=cfg - 1.0,
               latents=noise.clone(), output_type="latent", return_dict=False)[0]
    return out


def diffusers_sigmas(steps: int) -> torch.Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps).tolist())
    return scheduler.sigmas


def diffusers_inpaint(ref, image_latents, mask, positive, negative, steps, cfg, seed, strength=1.0):
    """ZImageInpaintPipeline's denoising loop on a latent image (its image processor is told the image is a
    16-channel latent, and a one-level 16-channel VAE keeps the mask at latent size, so no real VAE is involved).
    mask: [1, 1, H, W] at latent size, 1 = repaint. The noise is randn from a CPU generator seeded with `seed`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageInpaintPipeline
    from diffusers.image_processor import VaeImageProcessor

    channels = image_latents.shape[1]
    # only encodes the (unused) masked-image latents; one level keeps the pipeline's pixel size = latent size
    vae = AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=channels,
                        block_out_channels=(8,), norm_num_groups=4, layers_per_block=1,
                        scaling_factor=0.3611, shift_factor=0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImageInpaintPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=ref)
    pipe.image_processor = VaeImageProcessor(vae_scale_factor=2, vae_latent_channels=channels)
    pipe.set_progress_bar_config(disable=True)
    h, w = image_latents.shape[-2:]
    return pipe(image=image_latents.clone(), mask_image=mask.clone(), prompt_embeds=list(positive),
                negative_prompt_embeds=list(negative) if negative is not None else None, height=h, width=w,
                num_inference_steps=steps, strength=strength, guidance_scale=cfg - 1.0,
                generator=torch.Generator().manual_seed(seed), output_type="latent", return_dict=False)[0]


# ---------------------------------------------------------------------------------------------- ControlNet
def diffusers_controlnet_twin(net, ref):
    """diffusers' ZImageControlNetModel with exactly the weights of our ZImageControlNet, sharing `ref`'s modules."""
    from diffusers import ZImageControlNetModel

    cfg, n_layers = net.config, len(ref.layers)
    mode = {"plain": None, "shared": "control_layers", "own": "control_noise_refiner"}[cfg.refiner]
    cn = ZImageControlNetModel(
        control_layers_places=net.layer_places(n_layers), control_refiner_layers_places=list(range(cfg.n_refiner_layers)),
        control_in_dim=cfg.control_in_dim, add_control_noise_refiner=mode, dim=cfg.dim,
        n_refiner_layers=cfg.n_refiner_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads).to(net.dtype)
    missing, unexpected = cn.load_state_dict(net.state_dict(), strict=True)
    assert not missing and not unexpected
    return ZImageControlNetModel.from_transformer(cn, ref).eval()


class RefinerHintsToTransformer:
    """Test-side adaptor: diffusers 0.42.1 adds a 2.x ControlNet's refiner-stage hints only inside its own copy of
    the noise refiner; VideoX-Fun / DiffSynth / ComfyUI add them to the transformer's noise refiner too. This captures
    them (the stacked output of the last refiner-stage block, times the scale) during the controlnet call and adds
    them after the transformer's noise_refiner blocks, so diffusers' loop runs the original model."""

    def __init__(self, cn, ref):
        self.cn, self.ref, self.hints, self.inside = cn, ref, None, False
        blocks = cn.control_noise_refiner if cn.add_control_noise_refiner == "control_noise_refiner" \
            else cn.control_layers
        self.handles = [blocks[-1].register_forward_hook(self._capture)]
        self.handles += [layer.register_forward_hook(self._add(i)) for i, layer in enumerate(ref.noise_refiner)]
        self.handles.append(cn.register_forward_pre_hook(self._enter, with_kwargs=True))
        self.handles.append(cn.register_forward_hook(self._leave))

    def _enter(self, module, args, kwargs):
        self.inside, self.hints, self.scale = True, None, kwargs.get("conditioning_scale", 1.0)

    def _leave(self, module, args, out):
        self.inside = False

    def _capture(self, module, args, out):
        if self.inside and self.hints is None:  # the first call of the last block is the refiner stage
            self.hints = torch.unbind(out)[:-1]

    def _add(self, i):
        def hook(module, args, out):
            if not self.inside and self.hints is not None and i < self.cn.config.n_refiner_layers \
                    and i in self.cn.control_refiner_layers_places:
                return out + self.hints[i] * self.scale
            return out
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def tiny_vae(seed: int = 0):
    """A random diffusers AutoencoderKL shaped like the Flux VAE (16 latent channels, 8x, Flux shift/scale)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=8,
                         block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, shift_factor=0.1159,
                         scaling_factor=0.3611).eval()


def vae_latent(vae, image):
    """Model-space latent of a [-1, 1] image, as the diffusers pipelines encode it (argmax, shift, scale)."""
    with torch.no_grad():
        z = vae.encode(image).latent_dist.mode()
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


@functools.lru_cache(maxsize=1)
def diffsynth_modules():
    """DiffSynth-Studio's Z-Image DiT, ControlNet and turbo model function (pip `diffsynth`, installed --no-deps).
    Its package `__init__`s import its whole stack (torchvision, modelscope, ...); the three modules need only torch
    and einops, so the packages are registered bare and just these modules are imported."""
    import importlib.machinery
    import importlib.util
    import sys
    import types
    from pathlib import Path

    spec = importlib.util.find_spec("diffsynth")
    if spec is None:  # a pinned requirement and the only independent check of the 2.1 refiner hints: fail, not skip
        raise RuntimeError("diffsynth is not installed: it is a test requirement (tools/requirements-nodeps.txt)")
    root = Path(spec.origin).parent
    for name, folder in (("diffsynth", root), ("diffsynth.core", root / "core"), ("diffsynth.models", root / "models"),
                         ("diffsynth.pipelines", root / "pipelines")):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [str(folder)]
            # a spec like a real package's, so importlib.util.find_spec (e.g. test_training_losses) still works after
            module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
            module.__spec__.submodule_search_locations = [str(folder)]
            sys.modules[name] = module
    import importlib
    dit = importlib.import_module("diffsynth.models.z_image_dit")
    controlnet = importlib.import_module("diffsynth.models.z_image_controlnet")
    return dit, controlnet


def diffsynth_turbo_velocity(model, net, latents, sigma, caption, context, scale):
    """DiffSynth's `model_fn_z_image_turbo` (batch 1) on our weights, in our velocity convention. Its timestep
    embedder hard-casts its input to bf16; the test gives its fp32 MLP the fp32 features instead (nothing else
    changes). Its ZImageControlNet builds blocks at the released width whatever `dim` says; the test rebuilds its
    block lists with DiffSynth's own block class at the tiny width."""
    import ast
    import inspect
    from pathlib import Path

    dit_mod, cn_mod = diffsynth_modules()
    cfg, ncfg = model.config, net.config
    dit = dit_mod.ZImageDiT(in_channels=cfg.in_channels, dim=cfg.dim, n_layers=cfg.n_layers,
                            n_refiner_layers=cfg.n_refiner_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads,
                            cap_feat_dim=cfg.cap_feat_dim, axes_dims=list(cfg.axes_dims))
    dit.load_state_dict(model.state_dict(), strict=True)
    emb = dit.t_embedder
    emb.forward = lambda t: emb.mlp(emb.timestep_embedding(t, emb.frequency_embedding_size))
    with torch.device("meta"):
        cn = cn_mod.ZImageControlNet(control_layers_places=tuple(net.layer_places(cfg.n_layers)),
                                     control_in_dim=ncfg.control_in_dim, dim=ncfg.dim)
    block = cn_mod.ZImageControlTransformerBlock
    cn.control_layers = torch.nn.ModuleList(block(i, ncfg.dim, ncfg.n_heads, ncfg.n_heads, block_id=i)
                                            for i in net.layer_places(cfg.n_layers))
    cn.control_noise_refiner = torch.nn.ModuleList(block(1000 + j, ncfg.dim, ncfg.n_heads, ncfg.n_heads, block_id=j)
                                                   for j in range(ncfg.n_refiner_layers))
    cn.control_all_x_embedder = torch.nn.ModuleDict({"2-1": torch.nn.Linear(4 * ncfg.control_in_dim, ncfg.dim)})
    cn.load_state_dict(net.state_dict(), strict=True)

    # model_fn_z_image_turbo lives in diffsynth/pipelines/z_image.py, whose imports pull in the whole pipeline
    # stack; compile just that function from the installed file, with the names it uses.
    source = Path(inspect.getfile(dit_mod)).parents[1] / "pipelines" / "z_image.py"
    tree = ast.parse(source.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "model_fn_z_image_turbo")
    from einops import rearrange
    scope = {"torch": torch, "rearrange": rearrange, "ZImageDiT": dit_mod.ZImageDiT,
             "ZImageControlNet": cn_mod.ZImageControlNet, "gradient_checkpoint_forward":
             cn_mod.gradient_checkpoint_forward}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(source), "exec"), scope)
    with torch.no_grad():
        return scope["model_fn_z_image_turbo"](
            dit, cn, latents=latents, timestep=torch.tensor([sigma * 1000.0]), prompt_embeds=caption,
            control_context=context[:, :, None], control_scale=scale)
