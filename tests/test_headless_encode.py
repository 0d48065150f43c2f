"""`python -m zimage_core encode`: the headless dataset encoder against diffusers on tiny random Qwen3 and
AutoencoderKL weights saved in both layouts (diffusers repository, ComfyUI's single files), its errors on bad input,
the resumable cache, and the command line end to end (encode -> train -> the LoRA loads)."""

from __future__ import annotations

import json

import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_host import find_comfyui
from tiny_encoders import SIZES, comfy_tokenizer_dir, ldm_vae_state_dict, tiny_encoders, tiny_vae, \
    write_images  # noqa: F401 (fixture)
from zimage_core import apply_loras, load_lora, save_transformer
from zimage_core.__main__ import main
from zimage_core.encoders import EncoderError, MAX_SEQUENCE_LENGTH, load_prompt_encoder, load_vae_encoder
from zimage_core.encoders.vae import FluxVaeEncoder
from zimage_core.testing import tiny_model
from zimage_core.training import DatasetCache, DatasetError, TrainConfig
from zimage_core.training.cli import EXAMPLES, load_config
from zimage_core.training.config import SECTIONS

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red fox in the snow", "", "Ein Fuchs im Schnee, 雪の中の狐 ✓\nzweite Zeile", "  spaces around  "]


def reference_pipeline(files, tokenizer_dir: Path):
    """diffusers' ZImagePipeline around the same tiny text encoder and VAE (no transformer needed to encode)."""
    from diffusers import ZImagePipeline
    from transformers import AutoTokenizer

    return ZImagePipeline(scheduler=None, vae=files.vae, text_encoder=files.qwen, transformer=None,
                          tokenizer=AutoTokenizer.from_pretrained(str(tokenizer_dir)))


@pytest.fixture(scope="module")
def prompt_encoders(tiny_encoders):
    f = tiny_encoders
    return {"diffusers layout": load_prompt_encoder(f.repo / "text_encoder", f.tokenizer),
            "single file": load_prompt_encoder(f.text_single, f.tokenizer),
            "single file, ComfyUI's tokenizer": load_prompt_encoder(f.text_single, comfy_tokenizer_dir(find_comfyui()))}


# ---------------------------------------------------------------------------------------------- against diffusers
def test_text_features_equal_diffusers_encode_prompt(tiny_encoders, prompt_encoders):
    pipe = reference_pipeline(tiny_encoders, tiny_encoders.tokenizer)
    worst = 0.0
    for prompt in PROMPTS:
        (reference,), _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        for name, encoder in prompt_encoders.items():
            ours = encoder(prompt)
            assert ours.shape == reference.shape, (name, prompt)
            torch.testing.assert_close(ours, reference.float(), atol=1e-4, rtol=1e-5, msg=f"{name}: {prompt!r}")
            worst = max(worst, float((ours - reference).abs().max().detach()))
    print(f"\ncaption features vs diffusers' encode_prompt: max |diff| {worst:.2g} "
          f"(features up to {float(reference.abs().max().detach()):.3g})")


def test_the_template_is_zimages_not_the_tokenizers(tiny_encoders, prompt_encoders):
    """ComfyUI's tokenizer folder has Qwen2.5's chat template, which adds a system prompt: rendered through it,
    diffusers' encoding changes; ours does not, because the template is Z-Image's, not the tokenizer's."""
    pipe = reference_pipeline(tiny_encoders, comfy_tokenizer_dir(find_comfyui()))
    (qwen25,), _ = pipe.encode_prompt(PROMPTS[0], device="cpu", do_classifier_free_guidance=False)
    ours = prompt_encoders["single file, ComfyUI's tokenizer"](PROMPTS[0])
    assert qwen25.shape[0] > ours.shape[0] + 5  # "You are a helpful assistant." in front


def test_long_prompts_are_truncated_at_512_tokens_like_diffusers(tiny_encoders, prompt_encoders):
    prompt = " ".join(f"fox{i}" for i in range(400))
    pipe = reference_pipeline(tiny_encoders, tiny_encoders.tokenizer)
    (reference,), _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    with pytest.warns(UserWarning, match="only the first 512 are encoded"):
        ours = prompt_encoders["single file"](prompt)
    assert ours.shape == reference.shape == (MAX_SEQUENCE_LENGTH, 48)
    torch.testing.assert_close(ours, reference.float(), atol=1e-4, rtol=1e-5)


def test_latents_equal_autoencoderkl_encode_with_flux_shift_scale(tiny_encoders):
    from diffusers.image_processor import VaeImageProcessor

    f = tiny_encoders
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 80, 3), dtype=np.uint8))
    pixels = VaeImageProcessor(vae_scale_factor=8).preprocess(image)  # diffusers' own 0..255 -> -1..1
    with torch.no_grad():
        mean = f.vae.encode(pixels).latent_dist.mode()
    reference = ((mean - f.vae.config.shift_factor) * f.vae.config.scaling_factor)[0]
    worst = 0.0
    for source in (f.repo / "vae", f.vae_single):
        encoder = load_vae_encoder(source)
        ours = encoder(image)
        assert ours.shape == (16, 6, 10) and encoder.spatial_factor == 8
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5, msg=str(source))
        torch.testing.assert_close(encoder(image), ours, atol=0, rtol=0)  # the posterior's mean, never a sample
        worst = max(worst, float((ours - reference).abs().max()))
    print(f"\nlatents vs AutoencoderKL.encode + Flux shift/scale: max |diff| {worst:.2g} "
          f"(latents up to {float(reference.abs().max()):.3g})")


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_cli_encode_both_layouts_then_train_and_load_the_lora(tiny_encoders, tmp_path, capsys):
    f = tiny_encoders
    write_images(tmp_path / "dataset")
    save_transformer(tiny_model(0), tmp_path / "base.safetensors")
    config = tmp_path / "train.toml"
    config.write_text("\n".join([
        'scheme = "sft"', 'base_model = "base.safetensors"',
        "[lora]", "rank = 4",
        "[data]", 'dataset_dir = "dataset"', 'cache_dir = "cache"', "max_pixels = 4096",
        "[optim]", "steps = 3", "lr = 3e-3",
        "[preservation]", "preservation_weight = 1.0", 'preservation_trigger = "fox"',
        'preservation_classes = ["cat", "dog"]',
        "[output]", 'output_dir = "out"', 'output_name = "fox"', "checkpoint_every = 0", 'save_dtype = "fp32"',
        'validation_prompts = ["a red fox at night"]']) + "\n", encoding="utf-8")

    # the diffusers repository through --config (dataset, cache, sizes and validation prompts from the TOML) ...
    assert main(["encode", "--config", str(config), "--model", str(f.repo), "--quiet"]) == 0
    # ... and ComfyUI's single files with a tokenizer folder, into another cache
    assert main(["encode", "--dataset", str(tmp_path / "dataset"), "--cache", str(tmp_path / "cache_single"),
                 "--text-encoder", str(f.text_single), "--tokenizer", str(f.tokenizer), "--vae", str(f.vae_single),
                 "--max-pixels", "4096", "--prompt", "a red fox at night", "--quiet"]) == 0
    a, b = DatasetCache.load(tmp_path / "cache"), DatasetCache.load(tmp_path / "cache_single")
    # output preservation's class captions are encoded with the dataset: the headless trainer has no text encoder
    assert a.has_prompt(a.entries[0].caption.replace("fox", "dog")) and not b.has_prompt("picture 0: a red dog, 64x48")
    assert [(e.caption, e.bucket) for e in a.entries] == [(e.caption, e.bucket) for e in b.entries]
    assert {e.bucket for e in a.entries} == {(64, 48), (48, 64)}
    for i in range(len(a)):
        torch.testing.assert_close(a.latent(i), b.latent(i), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.caption(i), b.caption(i), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.prompt_features("a red fox at night"), b.prompt_features("a red fox at night"),
                               atol=1e-5, rtol=1e-5)

    capsys.readouterr()
    assert main(["train", "--config", str(config), "--quiet", "--device", "cpu"]) == 0
    # the headless trainer prints the turbo check with its meaning (zimage_core/training/turbo_check.py)
    printed = capsys.readouterr().out
    assert "turbo check (higher keeps the Turbo)" in printed and "trained " in printed and "(match " in printed
    assert "output preservation (weight 1.0): 'fox' -> cat, dog" in printed
    report = json.loads((tmp_path / "out" / "fox.report.json").read_text())
    assert set(report["turbo_check"]) == {"base", "trained"} and report["turbo_check_meaning"]
    lora_path = tmp_path / "out" / "fox.safetensors"
    lora = load_lora(lora_path)
    assert not lora.unmatched and lora.rank == 4
    model = tiny_model(0)
    latents, sigmas, caption = torch.randn(1, 16, 6, 8), torch.tensor([0.7]), [a.caption(0)]
    with torch.no_grad():
        before = model(latents, sigmas, caption)
        handle = apply_loras(model, [(str(lora_path), 1.0)])
        after = model(latents, sigmas, caption)
        handle.remove()
        restored = model(latents, sigmas, caption)
    assert float((after - before).abs().max()) > 1e-4  # the trained LoRA does something
    torch.testing.assert_close(restored, before, atol=0, rtol=0)


def test_interrupted_encode_leaves_no_manifest_and_resumes(tiny_encoders, tmp_path, monkeypatch, capsys):
    f = tiny_encoders
    dataset = write_images(tmp_path / "dataset")
    args = ["encode", "--dataset", str(dataset), "--cache", str(tmp_path / "cache"), "--model", str(f.repo),
            "--max-pixels", "4096", "--quiet"]
    calls = []
    original = FluxVaeEncoder.__call__

    def interrupted_at_third_image(self, image):
        calls.append(image.size)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, image)

    monkeypatch.setattr(FluxVaeEncoder, "__call__", interrupted_at_third_image)
    assert main(args) == 130
    assert "incomplete" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="not a training cache"):
        DatasetCache.load(tmp_path / "cache")

    calls.clear()
    monkeypatch.setattr(FluxVaeEncoder, "__call__", lambda self, image: calls.append(image.size) or
                        original(self, image))
    assert main(args) == 0
    assert len(calls) == 1  # only the image the interrupted run did not finish
    cache = DatasetCache.load(tmp_path / "cache")
    assert len(cache) == 3

    # a rebuild (new image) that stops half-way removes the old manifest first: never taken for complete
    write_images(tmp_path / "dataset", sizes=SIZES + [(32, 32)])
    calls.clear()
    monkeypatch.setattr(FluxVaeEncoder, "__call__", lambda self, image: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(args) == 130
    assert not (tmp_path / "cache" / "manifest.json").exists()


# ---------------------------------------------------------------------------------------------- bad input
def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(["encode", *map(str, args), "--quiet"])
    return code, capsys.readouterr().err


def test_unreadable_image_and_non_utf8_caption_are_errors_naming_the_file(tiny_encoders, tmp_path, capsys):
    dataset = write_images(tmp_path / "dataset")
    (dataset / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    (dataset / "broken.txt").write_text("a caption", encoding="utf-8")
    Image.new("RGB", (32, 32)).save(dataset / "latin1.png")
    (dataset / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    common = ["--dataset", dataset, "--model", tiny_encoders.repo, "--max-pixels", 4096]
    code, err = run_cli(capsys, *common, "--cache", tmp_path / "cache")
    assert code == 2
    assert "broken.png: not a readable image" in err and "latin1.txt: caption file is not UTF-8" in err
    assert not (tmp_path / "cache" / "manifest.json").exists()
    with pytest.warns(UserWarning, match="broken.png"):
        code, _ = run_cli(capsys, *common, "--cache", tmp_path / "cache", "--skip-bad-files")
    assert code == 0 and len(DatasetCache.load(tmp_path / "cache")) == 3


def test_metadata_csv_cannot_reach_outside_the_dataset(tmp_path):
    from zimage_core.training import scan_dataset

    dataset = write_images(tmp_path / "dataset", sizes=[(32, 32)])
    Image.new("RGB", (32, 32)).save(tmp_path / "secret.png")
    (dataset / "metadata.csv").write_text("image,prompt\nimg0.png,a fox\n../secret.png,escape\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"\.\./secret\.png: listed in metadata.csv but outside"):
        scan_dataset(dataset, strict=True)


def test_a_clip_text_encoder_is_refused_by_name(tmp_path, tiny_encoders):
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    clip = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, vocab_size=1000))
    clip.save_pretrained(tmp_path / "text_encoder")
    with pytest.raises(EncoderError, match=r"text_encoder/config\.json describes a 'clip_text_model'.*not Qwen3"):
        load_prompt_encoder(tmp_path / "text_encoder", tiny_encoders.tokenizer)
    save_file({f"text_model.{k}": v.contiguous() for k, v in clip.state_dict().items()},  # ComfyUI's clip_l keys
              str(tmp_path / "clip_l.safetensors"))
    with pytest.raises(EncoderError, match=r"clip_l\.safetensors is not a Qwen3 text encoder.*a CLIP text encoder"):
        load_prompt_encoder(tmp_path / "clip_l.safetensors", tiny_encoders.tokenizer)


def test_an_sd_vae_with_4_latent_channels_is_refused_by_name(tmp_path, tiny_encoders):
    from safetensors.torch import save_file

    sd_vae = tiny_vae(latent_channels=4)
    sd_vae.save_pretrained(tmp_path / "vae")
    with pytest.raises(EncoderError, match=r"vae/config\.json: the VAE has 4 latent channels.*16-channel Flux"):
        load_vae_encoder(tmp_path / "vae")
    save_file(ldm_vae_state_dict(sd_vae), str(tmp_path / "sdxl_vae.safetensors"))
    with pytest.raises(EncoderError, match=r"sdxl_vae\.safetensors: the VAE has 4 latent channels"):
        load_vae_encoder(tmp_path / "sdxl_vae.safetensors")
    with pytest.raises(EncoderError, match=r"qwen_3_4b\.safetensors is not a VAE.*a text encoder"):
        load_vae_encoder(tiny_encoders.text_single)


def test_missing_or_foreign_tokenizer_is_an_error_naming_it(tiny_encoders, tmp_path, capsys):
    f = tiny_encoders
    code, err = run_cli(capsys, "--dataset", tmp_path, "--cache", tmp_path / "c", "--text-encoder", f.text_single,
                        "--vae", f.vae_single)
    assert code == 2 and "qwen_3_4b.safetensors carries no tokenizer: pass --tokenizer" in err
    with pytest.raises(EncoderError, match=r"tokenizer folder .*nowhere does not exist"):
        load_prompt_encoder(f.text_single, tmp_path / "nowhere")
    clip_tokenizer = find_comfyui() / "comfy" / "sd1_tokenizer"
    with pytest.raises(EncoderError, match=r"sd1_tokenizer is not a Qwen tokenizer"):
        load_prompt_encoder(f.text_single, clip_tokenizer)


@pytest.mark.slow
def test_pickled_weights_and_missing_dependencies_are_explained(tiny_encoders, tmp_path):
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "qwen3"}', encoding="utf-8")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    with pytest.raises(EncoderError, match=r"no \.safetensors weights \(only pickled weights \['pytorch_model.bin'\]"):
        load_prompt_encoder(folder, tiny_encoders.tokenizer)

    code = ("import sys; sys.modules['transformers'] = None\n"
            "from zimage_core.__main__ import main\n"
            f"sys.exit(main(['encode', '--dataset', '.', '--cache', 'c', '--model', {str(tiny_encoders.repo)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr
    assert "needs the Python package 'transformers'" in proc.stderr and "pip install" in proc.stderr


# ---------------------------------------------------------------------------------------------- train --help
def test_train_help_names_schemes_sections_and_examples(capsys):
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for word in ("sft", "differential", "trajectory", "distillpatch", "torchrun", "encode", *EXAMPLES):
        assert word in text
    for table, (_, names) in SECTIONS.items():
        assert (f"[{table}]" if table else "(top level)") in text
        for name in names:
            assert name in text


def test_sections_cover_every_setting_once():
    import dataclasses

    listed = [name for _, names in SECTIONS.values() for name in names]
    assert sorted(listed) == sorted(f.name for f in dataclasses.fields(TrainConfig))


@pytest.mark.parametrize("example", EXAMPLES)
def test_shipped_examples_are_valid_commented_configs(example):
    path = ROOT / example
    config = load_config(str(path))  # TrainConfig.from_toml and the CLI's own checks
    assert config.cache_dir and config.dataset_dir
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# ") and "python -m zimage_core encode" in text and "torchrun" in text
    for table, values in tomllib.loads(text).items():
        if isinstance(values, dict):
            assert set(values) <= set(SECTIONS[table][1]), (example, table)
        else:
            assert table in SECTIONS[""][1], (example, table)
    expected = {"train_sft.toml": "sft", "train_differential.toml": "differential", "train_distill.toml": "trajectory"}
    assert config.scheme == expected[path.name]


def test_fp8_text_encoder_is_upcast_and_scaled_fp8_refused(tiny_encoders, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_encoders.text_single))
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in state.items()}
    save_file(fp8, str(tmp_path / "qwen_3_4b_fp8.safetensors"))
    encoder = load_prompt_encoder(tmp_path / "qwen_3_4b_fp8.safetensors", tiny_encoders.tokenizer)
    reference = load_prompt_encoder(tiny_encoders.text_single, tiny_encoders.tokenizer)
    ours, full = encoder(PROMPTS[0]), reference(PROMPTS[0])
    assert ours.shape == full.shape and 0 < float((ours - full).abs().max()) < 0.2 * float(full.abs().max())
    save_file({**fp8, "scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)},
              str(tmp_path / "qwen_3_4b_scaled.safetensors"))
    with pytest.raises(EncoderError, match=r"qwen_3_4b_scaled\.safetensors is a scaled-fp8 checkpoint"):
        load_prompt_encoder(tmp_path / "qwen_3_4b_scaled.safetensors", tiny_encoders.tokenizer)


def test_train_refuses_a_cache_encoded_for_another_model(tmp_path, capsys):
    from zimage_core.training import Encoders, build_cache

    write_images(tmp_path / "dataset", sizes=[(32, 32)])
    other = Encoders(lambda image: torch.zeros(16, image.height // 8, image.width // 8),
                     lambda text: torch.ones(3, 32), "a 32-wide text encoder")
    build_cache(tmp_path / "dataset", tmp_path / "cache", other)
    config = tmp_path / "run.toml"
    config.write_text('base_model = "tiny:0"\ncache_dir = "cache"\nsteps = 1\n', encoding="utf-8")
    assert main(["train", "--config", str(config), "--quiet", "--device", "cpu"]) == 2
    assert "holds 32 caption features but tiny:0 reads 48" in capsys.readouterr().err


def test_encode_flip_stores_the_mirrored_images_latents(tiny_encoders, tmp_path):
    from zimage_core.training.data import crop_resize

    dataset = write_images(tmp_path / "dataset", sizes=[(64, 48)])
    assert main(["encode", "--dataset", str(dataset), "--cache", str(tmp_path / "cache"), "--model",
                 str(tiny_encoders.repo), "--max-pixels", "4096", "--flip", "--quiet"]) == 0
    cache = DatasetCache.load(tmp_path / "cache")
    assert cache.has_flips
    with Image.open(dataset / "img0.png") as im:
        mirrored = crop_resize(im, 64, 48).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    expected = load_vae_encoder(tiny_encoders.repo / "vae")(mirrored)
    torch.testing.assert_close(cache.latent(0, flipped=True), expected, atol=1e-6, rtol=1e-6)
    assert float((cache.latent(0, flipped=True) - cache.latent(0)).abs().max()) > 1e-3


def test_text_encoder_and_vae_take_turns_on_the_gpu():
    """load_encoders keeps only the model that is about to run on the device (10.3 -> 7.7 GiB at 1024², measured
    by bench_memory.py --encoders); recorded `.to` calls, since this machine has no GPU to move them to."""
    from zimage_core.encoders import _Turns

    moves = []

    class Recorded(torch.nn.Linear):
        def __init__(self, name):
            super().__init__(1, 1)
            self.label = name

        def to(self, device):
            moves.append((self.label, str(device)))
            return self

    text, vae = Recorded("text"), Recorded("vae")
    turns = _Turns(torch.device("cuda"))
    for model in (text, text, vae, vae, text):
        turns.use(model)
    assert moves == [("text", "cuda"), ("text", "cpu"), ("vae", "cuda"), ("vae", "cpu"), ("text", "cuda")]
    moves.clear()
    on_cpu = _Turns(torch.device("cpu"))
    on_cpu.use(text), on_cpu.use(vae)
    assert moves == [("text", "cpu"), ("vae", "cpu")]  # nothing is sent away from the CPU
