"""Trainer data: dataset layouts, skipped files, buckets, the encoded cache and its encoder keying, batches."""

import warnings

import pytest
import torch
from PIL import Image

from zimage_core.training import (DatasetCache, DatasetError, TrainConfig, ConfigError, bucket_size, build_cache,
                                  scan_dataset)
from zimage_core.training.toy import make_toy_dataset, toy_encoders


def counting(encoders):
    calls = {"image": 0, "text": 0}

    def image(pil):
        calls["image"] += 1
        return encoders.encode_image(pil)

    def text(s):
        calls["text"] += 1
        return encoders.encode_text(s)

    return type(encoders)(image, text, encoders.encoder_id), calls


def test_both_layouts_give_the_same_items(tmp_path):
    sidecar = make_toy_dataset(tmp_path / "a", n=3, layout="sidecar")
    csv = make_toy_dataset(tmp_path / "b", n=3, layout="metadata")
    items_a, skipped_a = scan_dataset(sidecar)
    items_b, skipped_b = scan_dataset(csv)
    assert skipped_a == skipped_b == []
    assert [(i.image.name, i.caption) for i in items_a] == [(i.image.name, i.caption) for i in items_b]
    assert len(items_a) == 3 and items_a[0].caption == "a red square on dark noise"


def test_bad_files_are_skipped_and_listed_in_one_warning(tmp_path):
    folder = make_toy_dataset(tmp_path / "d", n=2)
    (folder / "broken.png").write_bytes(b"this is not a png")
    (folder / "broken.txt").write_text("caption of a broken image", encoding="utf-8")
    Image.new("RGB", (64, 64)).save(folder / "nocaption.png")
    Image.new("RGB", (64, 64)).save(folder / "latin1.png")
    (folder / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items, skipped = scan_dataset(folder)
    assert len(items) == 2
    assert len(caught) == 1
    message = str(caught[0].message)
    for name, reason in (("broken.png", "not a readable image"), ("nocaption.png", "no caption"),
                         ("latin1.txt", "not UTF-8")):
        assert name in message and reason in message
    assert len(skipped) == 3


def test_missing_or_empty_dataset_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no usable image"):
        scan_dataset(tmp_path / "empty")
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.jpg").write_bytes(b"\x00" * 10)
    (only_bad / "x.txt").write_text("hi", encoding="utf-8")
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match="no usable image"):
        scan_dataset(only_bad)


def test_metadata_csv_needs_its_columns(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "metadata.csv").write_text("file,text\na.png,hello\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="'image' and 'prompt'"):
        scan_dataset(folder)


@pytest.mark.parametrize("size", [(1024, 1024), (1920, 1080), (1080, 1920), (333, 777), (4000, 300), (100, 60)])
def test_buckets_stay_under_max_pixels_with_sides_multiple_of_16(size):
    for max_pixels in (1024 * 1024, 512 * 512):
        w, h = bucket_size(*size, max_pixels=max_pixels)
        assert w % 16 == 0 and h % 16 == 0 and w >= 16 and h >= 16
        assert w * h <= max(max_pixels, 256)
        assert w <= size[0] or w == 16  # never upscaled
        if min(size) >= 256:  # aspect kept within one 16-px step
            assert abs(w / h - size[0] / size[1]) < 16 / min(w, h) * (size[0] / size[1] + 1)
    assert bucket_size(1920, 1080) == (1360, 768)
    assert bucket_size(1024, 1024) == (1024, 1024)


def test_every_caption_is_encoded_before_the_first_image(tmp_path):
    """So a text encoder and a VAE that take turns on the GPU swap once per build, not once per image."""
    folder = make_toy_dataset(tmp_path / "d", n=4)
    base, order = toy_encoders(seed=0), []
    enc = type(base)(lambda pil: order.append("image") or base.encode_image(pil),
                     lambda s: order.append("text") or base.encode_text(s), base.encoder_id)
    cache = build_cache(folder, tmp_path / "cache", enc, prompts=["validation prompt"])
    assert order == ["text"] * 6 + ["image"] * 4  # 4 captions, "" and the prompt, then the images
    assert [e.caption for e in cache.entries] == [i.caption for i in scan_dataset(folder)[0]]


def test_cache_is_reused_and_rebuilt_for_another_encoder(tmp_path):
    folder = make_toy_dataset(tmp_path / "d", n=3, sizes=((96, 96), (128, 64)))
    enc, calls = counting(toy_encoders(seed=0))
    cache = build_cache(folder, tmp_path / "cache", enc, prompts=["validation prompt"])
    assert calls == {"image": 3, "text": 5}  # 3 captions + "" + the validation prompt
    assert cache.latent(0).shape == (16, 12, 12) and cache.entries[1].bucket == (128, 64)
    assert cache.latent(1).shape == (16, 8, 16)
    first = cache.latent(0).clone()

    enc_again, calls_again = counting(toy_encoders(seed=0))
    again = build_cache(folder, tmp_path / "cache", enc_again, prompts=["validation prompt"])
    assert calls_again == {"image": 0, "text": 0}  # everything reused
    assert torch.equal(again.latent(0), first)

    other, calls_other = counting(toy_encoders(seed=1))  # another encoder identity
    rebuilt = build_cache(folder, tmp_path / "cache", other)
    assert calls_other["image"] == 3 and calls_other["text"] >= 3
    assert rebuilt.encoder_id != cache.encoder_id
    assert not torch.equal(rebuilt.latent(0), first)
    loaded = DatasetCache.load(tmp_path / "cache")
    assert loaded.encoder_id == other.encoder_id and len(loaded) == 3
    with pytest.raises(DatasetError, match="built with encoder"):
        DatasetCache.load(tmp_path / "cache", encoder_id=cache.encoder_id)


def test_cache_file_from_another_encoder_is_never_read(tmp_path):
    folder = make_toy_dataset(tmp_path / "d", n=1)
    enc = toy_encoders(seed=0)
    cache = build_cache(folder, tmp_path / "cache", enc)
    latent_file = tmp_path / "cache" / cache.entries[0].latent_file
    # overwrite the file with a tensor claiming another encoder: rebuilding must replace it
    from safetensors.torch import save_file
    save_file({"value": torch.zeros(16, 12, 12)}, str(latent_file), metadata={"encoder_id": "someone-else"})
    with pytest.raises(DatasetError, match="another encoder"):
        cache.latent(0)
    enc2, calls = counting(enc)
    rebuilt = build_cache(folder, tmp_path / "cache", enc2)
    assert calls["image"] == 1 and rebuilt.latent(0).abs().sum() > 0


def test_cache_records_prompts_and_the_empty_negative(tmp_path):
    folder = make_toy_dataset(tmp_path / "d", n=1)
    cache = build_cache(folder, tmp_path / "c", toy_encoders(), prompts=["hello there"])
    assert cache.has_prompt("") and cache.has_prompt("hello there")
    assert cache.prompt_features("hello there").shape == (3, 48)
    with pytest.raises(KeyError, match="not in the cache"):
        cache.prompt_features("unknown")


def test_batches_are_deterministic_bucketed_and_repeated(tmp_path):
    folder = make_toy_dataset(tmp_path / "d", n=5, sizes=((96, 96), (128, 64)))
    cache = build_cache(folder, tmp_path / "c", toy_encoders(), repeats=3)
    batches = cache.batches(epoch=0, batch_size=2, seed=0)
    assert batches == cache.batches(epoch=0, batch_size=2, seed=0)
    assert batches != cache.batches(epoch=1, batch_size=2, seed=0)
    for batch in batches:
        assert len(batch) == 2 and len({cache.entries[i].bucket for i in batch}) == 1
    counts = torch.bincount(torch.tensor([i for b in batches for i in b]), minlength=5)
    assert counts.sum() >= 15 and counts.min() >= 3  # every image `repeats` times (+ wrap-around fill)


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="rank"):
        TrainConfig(rank=0).validate_settings()
    with pytest.raises(ConfigError, match="rank"):
        TrainConfig(rank=-4).validate_settings()
    for name in ("../escape", "a/b", "a\\b", "..", ""):
        with pytest.raises(ConfigError, match="output_name"):
            TrainConfig(output_name=name).validate_settings()
    with pytest.raises(ConfigError, match="preset_lora"):
        TrainConfig(scheme="differential").validate_settings()
    with pytest.raises(ConfigError, match="init_lora"):
        TrainConfig(scheme="trajectory").validate_settings()
    with pytest.raises(ConfigError, match="unknown training setting"):
        TrainConfig.from_dict({"rnak": 4})


def test_config_from_toml_with_tables(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('scheme = "differential"\nbase_model = "tiny:0"\n[lora]\nrank = 8\npreset_lora = "p.safetensors"\n'
                    '[optim]\nlr = 3e-4\nsteps = 12\n[data]\ncache_dir = "cache"\n', encoding="utf-8")
    cfg = TrainConfig.from_toml(path)
    assert cfg.rank == 8 and cfg.lr == 3e-4 and cfg.steps == 12 and cfg.scheme == "differential"
    assert cfg.preset_lora == str(tmp_path / "p.safetensors") and cfg.cache_dir == str(tmp_path / "cache")
    assert cfg.lora_alpha == 8.0 and cfg.targets == ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")
    bad = tmp_path / "bad.toml"
    bad.write_text("rank = = 3", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        TrainConfig.from_toml(bad)
