"""The Turbo sampler node equals ComfyUI's own KSampler on ComfyUI's own Z-Image model (same weights, seed, shift):
euler and res_multistep on the simple scheduler, text-to-image, image-to-image and inpainting with the LATENT
noise masks of SetLatentNoiseMask, VAEEncodeForInpaint and InpaintModelConditioning (in-process host)."""

from __future__ import annotations

import pytest
import torch

from comfy_fixtures import comfy_host, comfy_models  # noqa: F401  (fixtures)
from comfy_reference import comfy_own, ksampler  # noqa: F401  (comfy_own: fixture)
from tiny_encoders import tiny_encoders  # noqa: F401  (fixture)

pytestmark = pytest.mark.comfy
TOLERANCE = 5e-4  # measured 3.0e-5 to 6.0e-5 (t2i, img2img, inpainting, CLIPTextEncode conditioning): ~10x


@pytest.fixture(scope="module")
def inpaint_image(comfy_host):  # noqa: F811
    """A 64x64 photo-like test image in the input folder (the latent is 8x8, 4x4 patches)."""
    from PIL import Image

    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    rgb = torch.stack([xx, yy, 0.5 + 0.5 * torch.sin(6 * xx * yy)], -1)
    Image.fromarray((rgb * 255).byte().numpy()).save(comfy_host.base_dir / "input" / "zimage_inpaint_test.png")
    return "zimage_inpaint_test.png"


def _graph(m, image: str, variant: str, sampler: str, steps: int, cfg: float, denoise: float, seed: int) -> dict:
    """API prompt: the pack's loader + demo conditioning, a start latent made by core nodes, the Turbo sampler.
    Returns the prompt and the (node, output) of the LATENT, positive and negative the sampler reads."""
    prompt = {
        "1": {"class_type": "ZImageTurboModelLoader",
              "inputs": {"model_name": m.transformer, "weight_dtype": "fp32", "offload": "none"}},
        "3": {"class_type": "ZImageTurboDemoConditioning", "inputs": {"text": "a red door", "width": 2560,
                                                                       "model": ["1", 0]}},
        "30": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["3", 0]}},
        "20": {"class_type": "VAELoader", "inputs": {"vae_name": m.vae}},
        "21": {"class_type": "LoadImage", "inputs": {"image": image}},
        # a binary rectangle, feathered: soft edges exercise the blend exactly
        "22": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}},
        "23": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 24}},
        "24": {"class_type": "MaskComposite", "inputs": {"destination": ["22", 0], "source": ["23", 0], "x": 16,
                                                          "y": 8, "operation": "add"}},
        "25": {"class_type": "FeatherMask", "inputs": {"mask": ["24", 0], "left": 8, "top": 8, "right": 8,
                                                        "bottom": 0}},
    }
    positive, negative, latent = ["3", 0], ["30", 0], ["4", 0]
    if variant == "t2i":
        prompt["4"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    elif variant == "img2img":
        prompt["4"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["21", 0], "vae": ["20", 0]}}
    elif variant == "SetLatentNoiseMask":
        prompt["26"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["21", 0], "vae": ["20", 0]}}
        prompt["4"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["26", 0], "mask": ["25", 0]}}
    elif variant == "VAEEncodeForInpaint":
        prompt["4"] = {"class_type": "VAEEncodeForInpaint", "inputs": {"pixels": ["21", 0], "vae": ["20", 0],
                                                                        "mask": ["24", 0], "grow_mask_by": 6}}
    elif variant == "InpaintModelConditioning":
        prompt["27"] = {"class_type": "InpaintModelConditioning",
                        "inputs": {"positive": ["3", 0], "negative": ["30", 0], "vae": ["20", 0],
                                   "pixels": ["21", 0], "mask": ["25", 0], "noise_mask": True}}
        positive, negative, latent = ["27", 0], ["27", 1], ["27", 2]
    prompt["5"] = {"class_type": "ZImageTurboSampler",
                   "inputs": {"model": ["1", 0], "positive": positive, "latent_image": latent, "preset": "custom",
                              "steps": steps, "cfg": cfg, "shift": 3.0, "seed": seed, "denoise": denoise,
                              "sampler": sampler, "negative": negative}}  # read only when cfg != 1
    prompt["8"] = {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}}
    return prompt, {"latent": latent, "positive": positive, "negative": negative}


CASES = [  # variant, sampler, steps, cfg, denoise
    ("t2i", "euler", 8, 1.0, 1.0),
    ("t2i", "res_multistep", 8, 1.0, 1.0),
    ("t2i", "res_multistep", 8, 2.0, 1.0),
    ("img2img", "res_multistep", 6, 1.0, 0.6),
    ("SetLatentNoiseMask", "euler", 8, 1.0, 1.0),
    ("SetLatentNoiseMask", "res_multistep", 6, 2.0, 0.6),
    ("VAEEncodeForInpaint", "res_multistep", 8, 1.0, 1.0),
    ("InpaintModelConditioning", "euler", 8, 1.0, 1.0),
]


@pytest.mark.parametrize("variant, sampler, steps, cfg, denoise", CASES)
def test_sampler_node_equals_ksampler_on_comfyui_zimage(comfy_host, comfy_models, comfy_own,  # noqa: F811
                                                        inpaint_image, variant, sampler, steps, cfg, denoise):
    seed = 17
    prompt, wires = _graph(comfy_models, inpaint_image, variant, sampler, steps, cfg, denoise, seed)
    result = comfy_host.run(prompt)
    assert result.success, result.error
    ours = result.output("5", 0)["samples"]
    latent, positive, negative = (result.output(*wires[k]) for k in ("latent", "positive", "negative"))
    theirs = ksampler(comfy_own, latent, positive, negative, seed, steps, cfg, sampler, "simple", denoise)
    diff = (ours - theirs).abs().max().item()
    print(f"{variant} {sampler} steps {steps} cfg {cfg} denoise {denoise}: max|node - KSampler| = {diff:.2e}")
    assert ours.shape == theirs.shape == (1, 16, 8, 8)
    assert theirs.std() > 0.1
    assert diff <= TOLERANCE
    mask = latent.get("noise_mask")
    if mask is not None and torch.count_nonzero(latent["samples"]):
        import comfy.sampler_helpers

        keep = comfy.sampler_helpers.prepare_mask(mask, ours.shape, "cpu") == 0
        assert keep.any() and (~keep).any()
        assert (ours - latent["samples"])[keep].abs().max() < 1e-4  # the unmasked area is the input's latent
        assert (ours - latent["samples"])[~keep].abs().mean() > 0.05  # the masked area is repainted


def test_sampler_without_the_sampler_input_is_euler(comfy_host, comfy_models, inpaint_image):  # noqa: F811
    """A workflow saved before the `sampler` input existed (API prompt without it) still runs, as euler."""
    prompt, _ = _graph(comfy_models, inpaint_image, "t2i", "euler", 8, 1.0, 1.0, seed=3)
    euler = comfy_host.run(prompt)
    del prompt["5"]["inputs"]["sampler"]
    old = comfy_host.run(prompt, fresh=True)
    assert old.success, old.error
    torch.testing.assert_close(old.output("5", 0)["samples"], euler.output("5", 0)["samples"], rtol=0, atol=0)


# ------------------------------------------------------------------------- ComfyUI's own text encoding path
TINY_QWEN3 = "qwen_3_4b_tiny.safetensors"


@pytest.fixture(scope="module")
def clip_file(comfy_host, tiny_encoders):  # noqa: F811
    """The tiny Qwen3 (48 wide, the tiny transformer's caption width) in the host's text_encoders folder."""
    import shutil

    shutil.copyfile(tiny_encoders.text_single, comfy_host.models_dir / "text_encoders" / TINY_QWEN3)
    return TINY_QWEN3


def _clip_graph(m, clip_name, texts=("a red door", "blurry, dark, low quality, deformed"), batch=2):
    """CLIPLoader -> CLIPTextEncode (positive, negative) -> the Turbo sampler at cfg 2 on a batch of latents."""
    prompt, _ = _graph(m, "unused.png", "t2i", "res_multistep", 8, 2.0, 1.0, seed=29)
    for node in ("3", "30", "20", "21", "22", "23", "24", "25"):
        prompt.pop(node)
    prompt["4"]["inputs"]["batch_size"] = batch
    prompt["40"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": clip_name, "type": "lumina2"}}
    prompt["41"] = {"class_type": "CLIPTextEncode", "inputs": {"text": texts[0], "clip": ["40", 0]}}
    prompt["42"] = {"class_type": "CLIPTextEncode", "inputs": {"text": texts[1], "clip": ["40", 0]}}
    prompt["5"]["inputs"].update(positive=["41", 0], negative=["42", 0])
    return prompt


@pytest.mark.parametrize("batch, cfg", [(1, 1.0), (2, 2.0)])
def test_sampler_on_cliptextencode_conditioning_equals_ksampler(comfy_host, comfy_models, comfy_own,  # noqa: F811
                                                                clip_file, batch, cfg):
    """ComfyUI's real CLIPLoader -> CLIPTextEncode conditioning (Qwen3 hidden states with their attention_mask;
    at cfg 2 with a negative prompt of another length, on a batch of 2) drives the sampler as it drives KSampler on
    ComfyUI's own Z-Image."""
    from comfy_reference import tiny_qwen3_as_zimage_encoder
    from tiny_encoders import qwen3_config

    with tiny_qwen3_as_zimage_encoder(qwen3_config()):
        prompt = _clip_graph(comfy_models, clip_file, batch=batch)
        prompt["5"]["inputs"]["cfg"] = cfg
        result = comfy_host.run(prompt, fresh=True)
    assert result.success, result.error
    positive, negative = result.output("41", 0), result.output("42", 0)
    assert "attention_mask" in positive[0][1] and positive[0][0].shape[1] != negative[0][0].shape[1]
    ours = result.output("5", 0)["samples"]
    theirs = ksampler(comfy_own, result.output("4", 0), positive, negative, 29, 8, cfg, "res_multistep")
    diff = (ours - theirs).abs().max().item()
    print(f"CLIPTextEncode conditioning, cfg {cfg}, batch {batch}: max|node - KSampler| = {diff:.2e}")
    assert ours.shape == theirs.shape == (batch, 16, 8, 8) and theirs.std() > 0.1
    assert diff <= TOLERANCE


def test_padded_conditioning_rows_keep_only_their_tokens(comfy_host, comfy_models, clip_file):  # noqa: F811
    """A batch of two CLIPTextEncode prompts padded to one length (random values in the padding, attention_mask 0
    there): the sampler reads each row as exactly its own prompt's encoding."""
    import nodes
    from comfy_reference import tiny_qwen3_as_zimage_encoder
    from tiny_encoders import qwen3_config

    sampler = comfy_host.pack_module("nodes.sampler")
    base = comfy_host.pack_module("nodes.loader").load_base(comfy_models.transformer, "fp32", "none")
    model = comfy_host.pack_module("nodes.types").ZImageModel(base)
    with tiny_qwen3_as_zimage_encoder(qwen3_config()):
        clip = nodes.CLIPLoader().load_clip(clip_file, "lumina2")[0]
        short, long = (nodes.CLIPTextEncode().encode(clip, t)[0][0][0][0] for t in ("a door", "a red door at night"))
    length = long.shape[0]
    padded = torch.stack([torch.cat([short, torch.randn(length - short.shape[0], short.shape[1])]), long])
    mask = torch.zeros(2, length)
    mask[0, :short.shape[0]], mask[1] = 1, 1
    rows = sampler.conditioning_features([[padded, {"attention_mask": mask}]], model, "positive")
    assert [r.shape[0] for r in rows] == [short.shape[0], length]
    assert torch.equal(rows[0], short) and torch.equal(rows[1], long)
