"""ComfyUI's own Z-Image model, built in the test host for the tiny configs (import inside the host process only).

ComfyUI's model detection only recognises the released dim-3840 Z-Image, so the model is built here the way
`comfy.sd.load_diffusion_model_state_dict` builds a detected one: `supported_models.ZImage` with the unet_config
detection would give (at the file's sizes), `get_model`, `load_model_weights`, wrapped in a plain `ModelPatcher`.
Sampling with it runs ComfyUI's real KSampler path (`nodes.common_ksampler`)."""

from __future__ import annotations

import contextlib
import dataclasses
from unittest import mock

import pytest
import torch

# NextDiT's own final norm, which its Z-Image forward never uses: ComfyUI 0.3.75 creates it (so it is missing from a
# Z-Image file), ComfyUI 0.8 no longer does. Either layout is ComfyUI's Z-Image.
UNUSED_NEXTDIT_KEYS = {"norm_final.weight"}


def check_nextdit_load(missing, unexpected) -> None:
    """A load_state_dict result of NextDiT on a Z-Image file: nothing unexpected, nothing missing but unused keys."""
    assert set(missing) <= UNUSED_NEXTDIT_KEYS and not unexpected, (missing, unexpected)


@contextlib.contextmanager
def tiny_qwen3_as_zimage_encoder(config):
    """Within: ComfyUI's CLIPLoader / `comfy.sd.load_clip` read a tiny Qwen3 file (transformers `Qwen3Config`
    `config`) as Z-Image's text encoder, with ComfyUI's own Qwen3 code, tokenizer and chat template. ComfyUI
    hard-codes Qwen3-4B's sizes (shrunk here to the file's) and recognises the encoder by the released model's sizes
    (0.8 by its width 2560 alone), so the detection is told the answer for a file with Qwen3's keys instead of
    relying on how a given ComfyUI treats a tiny one."""
    import comfy.sd
    import comfy.text_encoders.llama as llama

    @dataclasses.dataclass
    class TinyQwen3Config(llama.Qwen3_4BConfig):
        vocab_size: int = config.vocab_size
        hidden_size: int = config.hidden_size
        intermediate_size: int = config.intermediate_size
        num_hidden_layers: int = config.num_hidden_layers
        num_attention_heads: int = config.num_attention_heads
        num_key_value_heads: int = config.num_key_value_heads
        head_dim = config.head_dim

    detect = comfy.sd.detect_te_model

    def detect_tiny_qwen3(sd):
        if "model.layers.0.self_attn.q_norm.weight" in sd:  # Qwen3 (q/k norms): the Z-Image encoder here
            return comfy.sd.TEModel.QWEN3_4B
        return detect(sd)

    with mock.patch.object(llama, "Qwen3_4BConfig", TinyQwen3Config), \
            mock.patch.object(comfy.sd, "detect_te_model", detect_tiny_qwen3):
        yield


def comfy_zimage_model(path, axes_dims, dtype: torch.dtype = torch.float32):
    """ComfyUI's Z-Image (model_base.Lumina2 with NextDiT, in a ModelPatcher) from a single file in ComfyUI's
    layout (with or without the `model.diffusion_model.` prefix)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.ops
    import comfy.supported_models
    import comfy.utils
    from comfy.ldm.modules.diffusionmodules.mmdit import TimestepEmbedder

    sd = comfy.utils.load_torch_file(str(path))
    sd = comfy.utils.state_dict_prefix_replace(sd, {"model.diffusion_model.": ""})
    dim, cap_feat_dim = sd["cap_embedder.1.weight"].shape
    head_dim = sd["layers.0.attention.q_norm.weight"].shape[0]

    def count(prefix):
        return len({k.split(".")[1] for k in sd if k.startswith(prefix)})

    # comfy.model_detection's Z-Image branch, at these sizes (plus the refiner depth it leaves at NextDiT's default)
    unet_config = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": dim,
                   "cap_feat_dim": cap_feat_dim, "n_layers": count("layers."),
                   "n_refiner_layers": count("noise_refiner."),
                   "qk_norm": True, "n_heads": dim // head_dim, "n_kv_heads": dim // head_dim,
                   "axes_dims": list(axes_dims), "axes_lens": [1536, 512, 512], "rope_theta": 256.0,
                   "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0,
                   "pad_tokens_multiple": 32}
    model_config = comfy.supported_models.ZImage(unet_config)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model(sd)
    # NextDiT sizes the t-embedder's hidden layer min(dim, 1024); the released model (dim 3840) has 1024, like ours
    model.diffusion_model.t_embedder = TimestepEmbedder(1024, output_size=min(dim, 256),
                                                        operations=comfy.ops.disable_weight_init, dtype=dtype)
    check_nextdit_load(*model.diffusion_model.load_state_dict(sd, strict=False))
    model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def ksampler(model, latent: dict, positive, negative, seed: int, steps: int, cfg: float, sampler: str,
             scheduler: str = "simple", denoise: float = 1.0) -> torch.Tensor:
    """What ComfyUI's KSampler node returns (its own function, `nodes.common_ksampler`), as the raw latent."""
    import nodes

    return nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent,
                                 denoise=denoise)[0]["samples"]


def apply_node(class_type: str, **inputs):
    """The first output of a core node's function called directly (V1 or V3 node), e.g. on a MODEL that no prompt
    can produce (ComfyUI's own tiny Z-Image)."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    if hasattr(cls, "FUNCTION"):
        return getattr(cls(), cls.FUNCTION)(**inputs)[0]
    return cls.execute(**inputs).args[0]


@pytest.fixture(scope="module")
def comfy_own(comfy_host, comfy_models):  # noqa: F811
    """ComfyUI's Z-Image model on the tiny weights (the ComfyUI-layout copy of the file the pack's loader reads)."""
    return comfy_zimage_model(comfy_host.models_dir / "diffusion_models" / comfy_models.transformer_comfy,
                              comfy_models.config.axes_dims)
