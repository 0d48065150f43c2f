"""The Turbo sampler node equals ComfyUI's own KSampler on ComfyUI's own Z-Image model (same weights, seed, shift):
euler and res_multistep on the simple scheduler, text-to-image, image-to-image and inpainting with the LATENT
noise masks of SetLatentNoiseMask, VAEEncodeForInpaint and InpaintModelConditioning (in-process host)."""

from __future__ import annotations

import pytest
import torch

from comfy_fixtures import comfy_host, comfy_models  # noqa: F401  (fixtures)
from comfy_reference import comfy_own, ksampler  # noqa: F401  (comfy_own: fixture)

pytestmark = pytest.mark.comfy
TOLERANCE = 1e-3


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
