"""Every producer's LoRA layout loads, and merges to the same bits as the reference loaders.

Each fixture file is written here from one random "truth" (a rank-4 LoRA over attention, feed-forward and adaLN
Linears of every block of the tiny model), in the producer's key spelling and alpha convention. References:
diffusers 0.42.1 `ZImageLoraLoaderMixin.lora_state_dict` + `load_lora_adapter` + peft merge (`fuse_lora`), and
ComfyUI 0.3.75 `comfy.lora.model_lora_keys_unet` / `load_lora` + `ModelPatcher.patch_model` on ComfyUI's own
Lumina2/NextDiT model of the tiny config (fused qkv), i.e. exactly what LoraLoaderModelOnly does.

All alpha/rank factors used with ComfyUI are powers of two: ComfyUI computes (alpha/r) * (up @ down) while diffusers
folds the factor into down and up (`split_scale`), and those two agree bit for bit only for power-of-two factors.
Our merge follows diffusers' order, so the musubi fixture (alpha 3, rank 4, factor 0.75) is bit-exact against
diffusers and is not compared with ComfyUI (whose key map refuses musubi names anyway)."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_host import find_comfyui, stub_dir
from zimage_core.checkpoint import comfyui_state_dict
from zimage_core.lora import LoraError, apply_loras, load_lora
from zimage_core.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]
RANK = 4
WRAPPERS = re.compile(r"^(base_model\.model\.)?(transformer\.)?")  # the producers' wrappers around diffusers' names
SUBS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
        "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0")


# ------------------------------------------------------------------------------------------------ fixtures
def truth(model, seed=1, subs=SUBS, rank=RANK):
    """{module path: (down, up)} over every block's `subs` (context refiners have no adaLN)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for path, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and any(path.endswith(s) for s in subs) and "." in path:
            down = torch.randn(rank, mod.in_features, generator=gen) * 0.2
            up = torch.randn(mod.out_features, rank, generator=gen) * 0.2
            out[path] = (down, up)
    return out


def kohya(path):
    return path.replace(".", "_")


def comfy_name(path):
    return path.replace("attention.to_out.0", "attention.out")


def fused_qkv(t, path_fmt, alpha=None, block_diag=True):
    """ComfyUI-layout fused qkv entries from split q/k/v truth: down = cat, up = block-diagonal (musubi's converter,
    alpha x 3) or, for ComfyUI's trainer, one generic fused LoRA of rank RANK built from q's down."""
    sd = {}
    blocks = sorted({p.rsplit(".attention.", 1)[0] for p in t if p.endswith("attention.to_q")})
    for blk in blocks:
        downs = [t[f"{blk}.attention.to_{p}"][0] for p in "qkv"]
        ups = [t[f"{blk}.attention.to_{p}"][1] for p in "qkv"]
        down, up = (torch.cat(downs), torch.block_diag(*ups)) if block_diag else (downs[0], torch.cat(ups))
        sd[path_fmt(blk, "down")], sd[path_fmt(blk, "up")] = down.contiguous(), up.contiguous()
        if alpha is not None:
            sd[path_fmt(blk, "alpha")] = torch.tensor(alpha * (3 if block_diag else 1))
    return sd


def write(tmp_path, name, sd, metadata=None):
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def ab(t, fmt, extra=None):
    """lora_A/lora_B entries for every module of `t`, keys spelled by `fmt(path)`, plus `extra(path, down, up)`."""
    sd = {}
    for p, (d, u) in t.items():
        sd.update({f"{fmt(p)}.lora_A.weight": d, f"{fmt(p)}.lora_B.weight": u})
        if extra is not None:
            sd.update(extra(p, d, u))
    return sd


def comfy_module_names(model):
    """Our parameter name -> ComfyUI's module stem, for the full-size (diff / diff_b) keys of ComfyUI's layouts."""
    out = {}
    for name in dict(model.named_parameters()):
        if name.startswith("t_embedder."):  # see comfy_model: its width differs at tiny size
            continue
        stem = comfy_name(name.rsplit(".", 1)[0]).replace("all_x_embedder.2-1", "x_embedder") \
            .replace("all_final_layer.2-1", "final_layer").replace("norm_q", "q_norm").replace("norm_k", "k_norm")
        out[name] = stem
    return out


def make_fixture(kind, model, tmp_path):
    """(file, expected format name, references to compare with)."""
    t = truth(model)
    if kind == "videox-fun":  # VideoX-Fun LoRANetwork / Z-Image-Fun-Lora-Distill: the root's empty name -> `__`
        sd = {}
        for p, (d, u) in t.items():
            sd.update({f"lora_unet__{kohya(p)}.lora_down.weight": d, f"lora_unet__{kohya(p)}.lora_up.weight": u,
                       f"lora_unet__{kohya(p)}.alpha": torch.tensor(2.0)})
        return write(tmp_path, kind, sd), "videox-fun", ("videox-fun-merge", "diffusers-single-underscore")
    if kind == "videox-fun-peft":  # VideoX-Fun --use_peft_lora: get_peft_model_state_dict, unprefixed, alpha = rank
        return write(tmp_path, kind, ab(t, str)), "peft", ("diffusers-equivalent",)
    if kind == "onetrainer-original":  # ORIGINAL: denoiser prefix dropped, lora_A/lora_B, .alpha kept
        sd = ab(t, str, lambda p, d, u: {f"{p}.alpha": torch.tensor(8.0)})
        return write(tmp_path, kind, sd), "peft", ("diffusers-equivalent",)
    if kind == "onetrainer-comfy":  # COMFY: diffusion_model. + lora_A/lora_B + .alpha
        sd = ab(t, lambda p: f"diffusion_model.{p}", lambda p, d, u: {f"diffusion_model.{p}.alpha": torch.tensor(8.0)})
        return write(tmp_path, kind, sd), "ai-toolkit", ("diffusers", "comfy")
    if kind == "onetrainer-legacy":  # LEGACY / INTERNAL: the canonical dict, transformer. + lora_down/lora_up + .alpha
        sd = {}
        for p, (d, u) in t.items():
            sd.update({f"transformer.{p}.lora_down.weight": d, f"transformer.{p}.lora_up.weight": u,
                       f"transformer.{p}.alpha": torch.tensor(2.0)})
        # diffusers' converter keeps `transformer.` and then prefixes it again, so it cannot load this file itself
        return write(tmp_path, kind, sd), "diffusers", ("diffusers-equivalent",)
    if kind == "onetrainer-diffusers":  # DIFFUSERS: alpha/rank (here 2) folded into lora_B, no .alpha
        sd = {}
        for p, (d, u) in t.items():
            sd.update({f"transformer.{p}.lora_A.weight": d, f"transformer.{p}.lora_B.weight": u * 2.0})
        return write(tmp_path, kind, sd), "diffusers", ("diffusers",)
    if kind == "peft-wrapped":  # PeftModel.save_pretrained around the transformer: base_model.model. + adapter name
        sd = {}
        for p, (d, u) in t.items():
            sd.update({f"base_model.model.{p}.lora_A.default.weight": d,
                       f"base_model.model.{p}.lora_B.default.weight": u})
        return write(tmp_path, kind, sd), "peft", ("diffusers-equivalent",)
    if kind == "peft-wrapped-pipeline":  # peft around a module that holds the transformer as `.transformer`
        sd = ab(t, lambda p: f"base_model.model.transformer.{p}")
        return write(tmp_path, kind, sd), "peft", ("diffusers-equivalent",)
    if kind == "diffusion-pipe":  # ComfyUI's NextDiT trained with peft: fused qkv, lora_A/B, alpha in adapter_config
        sd = fused_qkv(t, lambda b, r: f"diffusion_model.{b}.attention.qkv.lora_{'A' if r == 'down' else 'B'}.weight",
                       block_diag=False)
        for p, (d, u) in t.items():
            if not p.endswith(("to_q", "to_k", "to_v")):
                sd.update({f"diffusion_model.{comfy_name(p)}.lora_A.weight": d,
                           f"diffusion_model.{comfy_name(p)}.lora_B.weight": u})
        folder = tmp_path / "diffusion-pipe-epoch1"
        folder.mkdir(exist_ok=True)
        (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, '
                                                    '"target_modules": ["qkv", "out", "w1", "w2", "w3"]}')
        path = folder / "adapter_model.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})
        return path, "comfyui", ("comfy@x2",)  # ComfyUI ignores adapter_config.json (alpha 8 / r 4 = 2)
    if kind == "comfyui-extract":  # LoraSave (nodes_lora_extract.py): fp16, no alpha, .diff norms, .diff_b biases
        sd = fused_qkv(t, lambda b, r: f"diffusion_model.{b}.attention.qkv.lora_{r}.weight", block_diag=False)
        for p, (d, u) in t.items():
            if not p.endswith(("to_q", "to_k", "to_v")):
                sd.update({f"diffusion_model.{comfy_name(p)}.lora_up.weight": u,
                           f"diffusion_model.{comfy_name(p)}.lora_down.weight": d})
        gen = torch.Generator().manual_seed(11)
        params = dict(model.named_parameters())
        for name, stem in comfy_module_names(model).items():
            if params[name].ndim == 1 and name.endswith(".weight"):
                sd[f"diffusion_model.{stem}.diff"] = 0.05 * torch.randn(params[name].shape, generator=gen)
            elif name.endswith(".bias"):
                sd[f"diffusion_model.{stem}.diff_b"] = 0.05 * torch.randn(params[name].shape, generator=gen)
        sd["diffusion_model.norm_final.diff"] = torch.zeros(model.config.dim)  # ComfyUI's unused norm_final
        return write(tmp_path, kind, {k: v.half() for k, v in sd.items()}), "comfyui", ("comfy",)
    if kind == "diffusers":
        meta = {"lora_adapter_metadata": '{"transformer.r": 4, "transformer.lora_alpha": 8, '
                                         '"transformer.target_modules": ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3", '
                                         '"adaLN_modulation.0"]}'}
        sd = {f"transformer.{p}.lora_{ab}.weight": w for p, (d, u) in t.items() for ab, w in (("A", d), ("B", u))}
        return write(tmp_path, kind, sd, meta), "diffusers", ("diffusers",)
    if kind == "peft-default":  # diffusers mis-prefixes this form, so its reference is the same tensors unwrapped
        sd = {f"transformer.{p}.lora_{ab}.default.weight": w for p, (d, u) in t.items()
              for ab, w in (("A", d), ("B", u))}
        return write(tmp_path, kind, sd), "peft", ("diffusers-equivalent",)
    if kind == "diffsynth":
        sd = {f"{p}.lora_{ab}.default.weight": w for p, (d, u) in t.items() for ab, w in (("A", d), ("B", u))}
        return write(tmp_path, kind, sd), "diffsynth", ("diffusers",)
    if kind == "ai-toolkit":
        sd = {f"diffusion_model.{p}.lora_{ab}.weight": w for p, (d, u) in t.items() for ab, w in (("A", d), ("B", u))}
        return write(tmp_path, kind, sd), "ai-toolkit", ("diffusers", "comfy")
    if kind == "musubi":
        sd = {}
        for p, (d, u) in t.items():
            sd.update({f"lora_unet_{kohya(p)}.lora_down.weight": d, f"lora_unet_{kohya(p)}.lora_up.weight": u,
                       f"lora_unet_{kohya(p)}.alpha": torch.tensor(3.0)})
        return write(tmp_path, kind, sd), "musubi/kohya", ("diffusers",)
    if kind == "musubi-comfy":
        sd = fused_qkv(t, lambda b, r: f"lora_unet_{kohya(b)}_attention_qkv" + (".alpha" if r == "alpha" else
                       f".lora_{r}.weight"), alpha=2.0)
        for p, (d, u) in t.items():
            if not p.endswith(("to_q", "to_k", "to_v")):
                q = f"lora_unet_{kohya(comfy_name(p))}"
                sd.update({f"{q}.lora_down.weight": d, f"{q}.lora_up.weight": u, f"{q}.alpha": torch.tensor(2.0)})
        return write(tmp_path, kind, sd), "musubi-comfy", ("diffusers", "comfy")
    if kind == "comfyui-trainer":
        sd = fused_qkv(t, lambda b, r: f"diffusion_model.{b}.attention.qkv" + (".alpha" if r == "alpha" else
                       f".lora_{r}.weight"), alpha=1.0, block_diag=False)
        gen = torch.Generator().manual_seed(7)
        for p, (d, u) in t.items():
            if not p.endswith(("to_q", "to_k", "to_v")):
                q = f"diffusion_model.{comfy_name(p)}"
                sd.update({f"{q}.lora_down.weight": d, f"{q}.lora_up.weight": u, f"{q}.alpha": torch.tensor(1.0)})
        for name, param in model.named_parameters():  # norms as .diff, biases as .diff_b (t_embedder: see comfy_model)
            if name.startswith("t_embedder."):
                continue
            stem = comfy_name(name.rsplit(".", 1)[0]).replace("all_x_embedder.2-1", "x_embedder") \
                .replace("all_final_layer.2-1", "final_layer").replace("norm_q", "q_norm").replace("norm_k", "k_norm")
            if param.ndim == 1 and name.endswith(".weight"):
                sd[f"diffusion_model.{stem}.diff"] = 0.05 * torch.randn(param.shape, generator=gen)
            elif name.endswith(".bias"):
                sd[f"diffusion_model.{stem}.diff_b"] = 0.05 * torch.randn(param.shape, generator=gen)
        return write(tmp_path, kind, sd), "comfyui", ("comfy",)
    if kind == "dot-lora":
        sd = {}
        for p, (d, u) in t.items():
            sd.update({f"diffusion_model.{p}.lora.down.weight": d, f"diffusion_model.{p}.lora.up.weight": u,
                       f"diffusion_model.{p}.alpha": torch.tensor(8.0)})
        return write(tmp_path, kind, sd), "dot-lora", ("diffusers", "comfy")
    gen = torch.Generator().manual_seed(3)
    sd = {}
    for p, (d, u) in t.items():
        out_f, in_f = u.shape[0], d.shape[1]
        q = f"diffusion_model.{p}"
        if kind == "lokr":  # w1 [2, 2] full, w2 = w2_a @ w2_b (rank 4), alpha 2 -> factor 1/2
            sd.update({f"{q}.lokr_w1": torch.randn(2, 2, generator=gen),
                       f"{q}.lokr_w2_a": 0.1 * torch.randn(out_f // 2, 4, generator=gen),
                       f"{q}.lokr_w2_b": 0.1 * torch.randn(4, in_f // 2, generator=gen), f"{q}.alpha": torch.tensor(2.0)})
        else:  # loha rank 4, alpha 1 -> factor 1/4
            for w in ("w1", "w2"):
                sd[f"{q}.hada_{w}_a"] = 0.2 * torch.randn(out_f, 4, generator=gen)
                sd[f"{q}.hada_{w}_b"] = 0.2 * torch.randn(4, in_f, generator=gen)
            sd[f"{q}.alpha"] = torch.tensor(1.0)
    return write(tmp_path, kind, sd), f"lycoris-{kind}", ("comfy",)


KINDS = ("diffusers", "peft-default", "diffsynth", "ai-toolkit", "musubi", "musubi-comfy", "comfyui-trainer",
         "dot-lora", "lokr", "loha", "videox-fun", "videox-fun-peft", "onetrainer-original", "onetrainer-comfy",
         "onetrainer-legacy", "onetrainer-diffusers", "peft-wrapped", "peft-wrapped-pipeline", "diffusion-pipe",
         "comfyui-extract")


# ------------------------------------------------------------------------------------------------ references
def diffusers_merged(model, path, strength):
    """Our weights in diffusers' ZImageTransformer2DModel, the LoRA loaded and fused by diffusers/peft."""
    from diffusers import ZImageTransformer2DModel
    from diffusers.loaders.lora_pipeline import ZImageLoraLoaderMixin

    cfg = {k: v for k, v in model.config.to_diffusers().items() if not k.startswith("_")}
    ref = ZImageTransformer2DModel(**cfg)
    ref.load_state_dict(model.state_dict(), strict=True)
    sd, meta = ZImageLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    ref.load_lora_adapter(sd, prefix="transformer", adapter_name="x", metadata=meta)
    ref.fuse_lora(lora_scale=strength)
    ref.unload_lora()
    return ref.state_dict()


@functools.lru_cache(maxsize=1)
def comfy():
    """The test host's ComfyUI (comfy_host.find_comfyui: $COMFYUI_DIR or the pinned 0.3.75) imported in-process on
    the CPU (torchvision is a stub where none is installed; Z-Image never touches it). No host is a failure, not a
    skip: for several formats ComfyUI is the only reference."""
    comfy_dir = find_comfyui()
    stubs = stub_dir(comfy_dir)
    if stubs is not None:
        import transformers.utils.import_utils as iu

        iu.is_torchvision_available()  # cache "no torchvision" before the stub lands on sys.path
        if str(stubs) not in sys.path:
            sys.path.append(str(stubs))
        import torchvision

        for sub in ("transforms", "models"):  # imported at module level by cosmos/cascade code only
            mod = types.ModuleType(f"torchvision.{sub}")
            sys.modules.setdefault(mod.__name__, mod)
            setattr(torchvision, sub, sys.modules[mod.__name__])
    if str(comfy_dir) not in sys.path:
        sys.path.insert(0, str(comfy_dir))
    from comfy.cli_args import args

    args.cpu = True
    import comfy.lora
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    return comfy


def comfy_model(model):
    c = comfy()
    cfg = model.config
    unet = dict(image_model="lumina2", patch_size=cfg.patch_size, in_channels=cfg.in_channels, dim=cfg.dim,
                cap_feat_dim=cfg.cap_feat_dim, n_layers=cfg.n_layers, n_refiner_layers=cfg.n_refiner_layers,
                n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads, qk_norm=True, axes_dims=list(cfg.axes_dims),
                axes_lens=[1536, 512, 512], rope_theta=cfg.rope_theta, ffn_dim_multiplier=8 / 3,
                z_image_modulation=True, time_scale=cfg.t_scale, pad_tokens_multiple=32)
    model_config = c.supported_models.ZImage(unet)
    model_config.set_inference_dtype(torch.float32, None)
    cm = model_config.get_model({}, device="cpu")
    # ComfyUI sizes the timestep MLP min(dim, 1024) wide, so at tiny width only t_embedder differs in shape from the
    # released model's fixed 1024; no fixture patches it and the comparisons leave it out.
    sd = {k: v for k, v in comfyui_state_dict(model).items() if not k.startswith("t_embedder.")}
    missing, unexpected = cm.diffusion_model.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("t_embedder.") or k == "norm_final.weight" for k in missing)
    return cm


def comfy_merged(model, path, strength):
    """LoraLoaderModelOnly's steps: key map, load_lora, add_patches, patch_model; returns ComfyUI-named weights."""
    c = comfy()
    cm = comfy_model(model)
    lora_sd = load_file(str(path))
    patches = c.lora.load_lora(lora_sd, c.lora.model_lora_keys_unet(cm, {}), log_missing=False)
    patcher = c.model_patcher.ModelPatcher(cm, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    patcher.add_patches(patches, strength)
    patcher.patch_model()
    return {k.removeprefix("diffusion_model."): v for k, v in cm.state_dict().items()}, len(patches)


def videox_fun_merged(model, path, strength):
    """VideoX-Fun's `merge_lora` arithmetic (videox_fun/utils/lora_utils.py), restated: for each `lora_unet__` module,
    W += multiplier * (alpha / rank) * (up @ down) in fp32, rank = up.shape[1], no alpha -> 1."""
    sd = load_file(str(path))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    by_kohya_name = {kohya(n): n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}  # test's own
    for key in [k for k in sd if k.endswith(".lora_down.weight")]:
        stem = key[:-len(".lora_down.weight")]
        down, up = sd[key].float(), sd[f"{stem}.lora_up.weight"].float()
        alpha = sd[f"{stem}.alpha"].item() / up.shape[1] if f"{stem}.alpha" in sd else 1.0
        path_ = by_kohya_name[stem.removeprefix("lora_unet__")]
        weights[f"{path_}.weight"] += strength * alpha * torch.mm(up, down)
    return weights


def assert_same(ours: dict, ref: dict, label: str):
    ours = {k: v for k, v in ours.items() if not k.startswith("t_embedder.")}
    assert ours.keys() <= ref.keys(), f"{label}: keys missing in reference: {sorted(ours.keys() - ref.keys())[:3]}"
    bad = [k for k in ours if not torch.equal(ours[k], ref[k])]
    worst = max(((ours[k] - ref[k]).abs().max().item(), k) for k in bad) if bad else None
    assert not bad, f"{label}: {len(bad)} tensors differ, worst {worst}"


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("kind", KINDS)
def test_format_merges_like_the_references(kind, tmp_path):
    """Each layout is detected, every key maps, and the fp32 merge equals the references bit for bit (strength
    0.75 exercises the strength factor as well); runtime mode gives the merged output to fp32 noise."""
    model = tiny_model(seed=0)
    path, fmt, refs = make_fixture(kind, model, tmp_path)
    lora = load_lora(path)
    assert lora.format == fmt and not lora.unmatched and lora.source == str(path)
    strength = 0.75
    x, cap = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5)), [torch.ones(7, 48)]
    base_out = model(x, 0.6, cap)
    with apply_loras(model, [(lora, strength)], mode="merge") as handle:
        merged = {k: v.clone() for k, v in model.state_dict().items()}
        merged_out = model(x, 0.6, cap)
    assert handle.reports[0].matched == len(lora.modules) > 0
    with apply_loras(model, [(path, strength)], mode="runtime"):
        runtime_out = model(x, 0.6, cap)
    assert not torch.equal(merged_out, base_out)
    torch.testing.assert_close(runtime_out, merged_out, rtol=1e-5, atol=1e-5)

    if "diffusers" in refs:
        assert_same(merged, diffusers_merged(model, path, strength), f"{kind} vs diffusers+peft")
    if "diffusers-equivalent" in refs:  # the same tensors, spelled as diffusers' own files
        plain = {"diffusion_model." + WRAPPERS.sub("", k).replace(".default", ""): v  # re-keyed by the test itself
                 for k, v in load_file(str(path)).items()}
        assert_same(merged, diffusers_merged(model, write(tmp_path, "plain", plain), strength), f"{kind} vs diffusers")
    if "diffusers-single-underscore" in refs:  # diffusers' converter reads `lora_unet_`, not VideoX-Fun's `lora_unet__`
        single = {k.replace("lora_unet__", "lora_unet_"): v for k, v in load_file(str(path)).items()}
        assert_same(merged, diffusers_merged(model, write(tmp_path, "single", single), strength), f"{kind} vs diffusers")
    if "videox-fun-merge" in refs:
        assert_same(merged, videox_fun_merged(model, path, strength), f"{kind} vs VideoX-Fun's merge_lora")
    if "comfy" in refs or "comfy@x2" in refs:
        factor = 2.0 if "comfy@x2" in refs else 1.0
        ref, n_patches = comfy_merged(model, path, strength * factor)
        model_c = tiny_model(seed=0)
        model_c.load_state_dict(merged)
        assert n_patches > 0
        assert_same(comfyui_state_dict(model_c), ref, f"{kind} vs ComfyUI")


def test_fused_qkv_lora_splits_exactly_onto_separate_projections(tmp_path):
    """A fused-qkv LoRA (musubi's ComfyUI conversion) and the same LoRA as separate q/k/v keys produce the same
    q/k/v weights; the split modules share the fused `down` tensor (no copies) with up split into row blocks."""
    model = tiny_model(seed=0)
    fused = load_lora(make_fixture("musubi-comfy", model, tmp_path)[0])
    q, k = fused.modules["layers.0.attention.to_q"], fused.modules["layers.0.attention.to_k"]
    assert q.down is k.down and q.up.shape == (96, 3 * RANK) and q.scale == 0.5
    t = truth(model)
    sd = {}
    for p, (d, u) in t.items():
        sd.update({f"lora_unet_{kohya(p)}.lora_down.weight": d, f"lora_unet_{kohya(p)}.lora_up.weight": u,
                   f"lora_unet_{kohya(p)}.alpha": torch.tensor(2.0)})
    split = load_lora(write(tmp_path, "split", sd))
    for path in ("layers.0.attention.to_q", "layers.1.attention.to_v", "noise_refiner.0.attention.to_k"):
        torch.testing.assert_close(fused.modules[path].weight_delta(), split.modules[path].weight_delta(),
                                   rtol=0, atol=1e-7)


@pytest.mark.parametrize("source, exact", [("musubi", False), ("onetrainer-comfy", True)])
def test_separate_qkv_lora_applies_exactly_onto_comfy_fused_layout(tmp_path, source, exact):
    """The export format (separate to_q/to_k/to_v keys) loaded by ComfyUI onto its fused qkv weight gives the same
    qkv rows as our merge onto the split weights (ComfyUI patches row slices of qkv): bit for bit with a
    power-of-two alpha / rank (onetrainer-comfy: 8 / 4), to the last bit with musubi's 3 / 4."""
    model = tiny_model(seed=0)
    from zimage_core.lora import save_lora

    out = save_lora(load_lora(make_fixture(source, model, tmp_path)[0]), tmp_path / "export.safetensors")
    ref, _ = comfy_merged(model, out, 1.0)
    with apply_loras(model, [(out, 1.0)]):
        ours = {k: v.clone() for k, v in comfyui_state_dict(model).items() if not k.startswith("t_embedder.")}
    # musubi's alpha 3 / rank 4 = 0.75 is not a power of two: ComfyUI scales after the product, diffusers (and we)
    # before it, so bits may differ in the last place; everything else is exact.
    for key in ours:
        if exact:
            assert torch.equal(ours[key], ref[key]), key
        else:
            torch.testing.assert_close(ours[key], ref[key], rtol=0,
                                       atol=2e-7 * max(1.0, ours[key].abs().max().item()))


def test_comfy_key_map_refusals_are_documented_forms(tmp_path):
    """Sanity of the reference itself: ComfyUI 0.3.75 drops unprefixed DiffSynth keys (the #1 'LoRA does nothing'
    report) while this engine maps all of them."""
    model = tiny_model(seed=0)
    path = make_fixture("diffsynth", model, tmp_path)[0]
    _, n_patches = comfy_merged(model, path, 1.0)
    assert n_patches == 0
    assert len(load_lora(path).modules) == len(truth(model))


def test_redundant_fused_copy_is_skipped_like_diffusers(tmp_path):
    """Anime-Z style files carry split to.q/to.k/to.v keys and a redundant fused qkv copy: the copy is skipped (as
    diffusers does) and reported, not applied twice."""
    model = tiny_model(seed=0)
    t = truth(model, subs=("attention.to_q", "attention.to_k", "attention.to_v"))
    sd = {}
    for p, (d, u) in t.items():
        dotted = p.replace("to_q", "to.q").replace("to_k", "to.k").replace("to_v", "to.v")
        sd.update({f"diffusion_model.{dotted}.lora.down.weight": d, f"diffusion_model.{dotted}.lora.up.weight": u})
    sd.update(fused_qkv(t, lambda b, r: f"diffusion_model.{b}.attention.qkv.lora.{r}.weight"))
    path = write(tmp_path, "animez", sd)
    lora = load_lora(path)
    assert lora.format == "dot-lora" and len(lora.modules) == len(t) and not lora.unmatched
    assert len(lora.redundant) == 2 * 4 and all("qkv" in k for k in lora.redundant)
    with apply_loras(model, [(lora, 1.0)]) as h:
        merged = {k: v.clone() for k, v in model.state_dict().items()}
    assert h.reports[0].redundant
    assert_same(merged, diffusers_merged(tiny_model(seed=0), path, 1.0), "anime-z vs diffusers")


def test_dora_and_other_unsupported_adapters_are_refused(tmp_path):
    model = tiny_model(seed=0)
    d, u = truth(model)["layers.0.attention.to_q"]
    path = write(tmp_path, "dora", {"diffusion_model.layers.0.attention.to_q.lora_A.weight": d,
                                    "diffusion_model.layers.0.attention.to_q.lora_B.weight": u,
                                    "diffusion_model.layers.0.attention.to_q.dora_scale": torch.ones(96, 1)})
    with pytest.raises(LoraError, match=r"DoRA.*dora_scale.*ai-toolkit"):
        load_lora(path)


def test_convert_lora_cli_round_trips_every_format(tmp_path):
    """`python -m zimage_core convert-lora IN OUT` writes the export format, and the converted file applies with the
    same weights as the original (LoRA formats; LoKr/LoHa are refused with a message saying why)."""
    model = tiny_model(seed=0)
    for kind in ("diffsynth", "musubi-comfy", "comfyui-trainer", "lokr"):
        src, fmt, _ = make_fixture(kind, model, tmp_path)
        dst = tmp_path / f"{kind}-out.safetensors"
        run = subprocess.run([sys.executable, "-m", "zimage_core", "convert-lora", str(src), str(dst)],
                             cwd=ROOT, capture_output=True, text=True)
        if kind == "lokr":
            assert run.returncode == 2 and "lokr" in run.stderr and "approximation" in run.stderr
            continue
        assert run.returncode == 0, run.stderr
        converted = load_lora(dst)
        assert converted.format == "zimage-turbo-nodes" and converted.metadata["converted_from"] == fmt
        assert all(k.startswith("diffusion_model.") for k in load_file(str(dst)))
        with apply_loras(model, [(src, 1.0)]):
            a = {k: v.clone() for k, v in model.state_dict().items()}
        with apply_loras(model, [(dst, 1.0)]):
            b = {k: v.clone() for k, v in model.state_dict().items()}
        assert_same(a, b, f"{kind} converted")


def test_fun_lora_distill_layout_maps_onto_the_released_model():
    """Z-Image-Fun-Lora-Distill (VideoX-Fun, 8-Steps-2603): `lora_unet__` + kohya-flattened names, rank 128 with
    alpha 128, on to_q/to_k/to_v and feed_forward w1/w2/w3 of all 30 layers and 2 + 2 refiners. On the released
    architecture (meta tensors) all 204 modules / 612 keys map, with the released shapes."""
    from zimage_core import ZImageConfig, ZImageTransformer
    from zimage_core.lora.formats import normalise

    with torch.device("meta"):
        model = ZImageTransformer(ZImageConfig())
    sd = {}
    for path, mod in model.named_modules():
        if path.endswith(("attention.to_q", "attention.to_k", "attention.to_v", "feed_forward.w1", "feed_forward.w2",
                          "feed_forward.w3")):
            stem = f"lora_unet__{kohya(path)}"
            sd[f"{stem}.lora_down.weight"] = torch.empty(128, mod.in_features, device="meta")
            sd[f"{stem}.lora_up.weight"] = torch.empty(mod.out_features, 128, device="meta")
            sd[f"{stem}.alpha"] = torch.tensor(128.0)
    assert len(sd) == 612
    lora = normalise(sd, {}, source="Z-Image-Fun-Lora-Distill-8-Steps-2603.safetensors")
    assert lora.format == "videox-fun" and len(lora.modules) == 204 and not lora.unmatched
    assert {m.scale for m in lora.modules.values()} == {1.0}
    handle = apply_loras(model, [(lora, 1.0)], mode="runtime")  # shape checks against the real model, no maths
    assert handle.reports[0].matched == 204
    handle.remove()


REFUSED = {  # method -> (key suffix replacing one module's plain LoRA, what the message names)
    "dora_scale": (".dora_scale", "DoRA"),  # LyCORIS / ai-toolkit / OneTrainer DoRA
    "peft-dora": (".lora_magnitude_vector.weight", "DoRA"),  # diffusers / peft DoRA
    "peft-dora-adapter": (".lora_magnitude_vector.default.weight", "DoRA"),
    "magnitude": (".magnitude", "DoRA"),
    "onetrainer-oft": (".oft_R.weight", "OFT"),
    "lycoris-oft": (".oft_blocks", "OFT"),
    "peft-boft": (".boft_R.default", "BOFT"),
    "vera": (".vera_lambda_b.default", "VeRA"),
}


@pytest.mark.parametrize("method", sorted(REFUSED))
def test_adapters_that_cannot_be_applied_exactly_are_refused_by_name(method, tmp_path):
    """DoRA, OFT, BOFT, VeRA ... change weights in ways that are not a delta this engine adds: the whole file is
    refused, the message naming the method, the file and the key (nothing half-applied)."""
    model = tiny_model(seed=0)
    sd = ab(truth(model, subs=("attention.to_q",)), lambda p: f"diffusion_model.{p}")
    suffix, what = REFUSED[method]
    sd[f"diffusion_model.layers.0.attention.to_q{suffix}"] = torch.ones(96, 1)
    path = write(tmp_path, method, sd)
    with pytest.raises(LoraError, match=rf"{path}.*{what}.*{suffix.lstrip('.').split('.')[0]}"):
        load_lora(path)


def test_peft_configs_that_say_dora_or_oft_are_refused(tmp_path):
    """The method can also be stated only in the peft config (file metadata, or a peft folder's
    adapter_config.json); it is refused just the same."""
    model = tiny_model(seed=0)
    sd = ab(truth(model, subs=("attention.to_q",)), lambda p: f"transformer.{p}")
    dora = write(tmp_path, "dora-meta", sd, {"lora_adapter_metadata": '{"r": 4, "lora_alpha": 4, "use_dora": true}'})
    with pytest.raises(LoraError, match=r"dora-meta.*DoRA.*use_dora"):
        load_lora(dora)
    folder = tmp_path / "peft-oft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "OFT", "r": 4}')
    oft = write(folder, "adapter_model", sd)
    with pytest.raises(LoraError, match=r"adapter_model.*peft_type OFT"):
        load_lora(oft)


def test_text_encoder_part_is_reported_by_name_and_refused_when_strict(tmp_path):
    """A LoRA that also trains the text encoder (kohya `lora_te_`, diffusers `text_encoder.`, ComfyUI's extractor
    `text_encoders.`): the transformer part applies exactly as without them, the text-encoder keys are listed by
    name in the report, and strict mode refuses the file naming them."""
    model = tiny_model(seed=0)
    base_path = make_fixture("ai-toolkit", model, tmp_path)[0]
    sd = load_file(str(base_path))
    te = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 32),
          "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(32, 4),
          "text_encoder.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 32),
          "text_encoder.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(32, 4),
          "text_encoders.qwen3_4b.transformer.model.layers.0.mlp.up_proj.lora_up.weight": torch.randn(32, 4),
          "text_encoders.qwen3_4b.transformer.model.layers.0.mlp.up_proj.lora_down.weight": torch.randn(4, 32)}
    path = write(tmp_path, "with-te", {**sd, **te})
    lora = load_lora(path)
    assert lora.format == "ai-toolkit" and sorted(lora.text_encoder) == sorted(te) and not lora.unmatched
    with pytest.raises(LoraError, match=r"with-te.*text encoder.*6 key.*lora_te_text_model"):
        apply_loras(model, [(lora, 1.0)])
    with apply_loras(model, [(lora, 0.75)], skip_text_encoder=True) as handle:
        with_te = {k: v.clone() for k, v in model.state_dict().items()}
    report = handle.reports[0]
    assert sorted(report.text_encoder) == sorted(te) and "6 text-encoder keys NOT applied" in str(report)
    with apply_loras(model, [(base_path, 0.75)]):
        plain = {k: v.clone() for k, v in model.state_dict().items()}
    assert_same(with_te, plain, "transformer part with and without text-encoder keys")
    with apply_loras(model, [(lora, 0.75)], strict=False) as lenient:  # strict=False reports them too
        assert len(lenient.reports[0].text_encoder) == 6
