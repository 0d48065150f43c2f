"""Output preservation (zimage_core.training.preservation; ai-toolkit's Differential Output Preservation) on a tiny
random model: the class captions, the settings' errors, and that it holds the LoRA's output on the class captions to
the frozen model's (and that without it the same run drifts)."""

import pytest
import torch

from zimage_core.lora import apply_loras
from zimage_core.testing import tiny_model
from zimage_core.training import ConfigError, TrainConfig, build_cache, train
from zimage_core.training.preservation import Preservation
from zimage_core.training.toy import make_toy_dataset, toy_encoders

CAPTIONS = ["a red bar", "a green bar", "a Bar of red", "a red circle"]  # the last one has no trigger


def test_class_captions_replace_the_whole_trigger_word_only():
    p = Preservation("bar", ("circle", "square"))
    assert p.caption("a red bar, a barn and a BAR", 1) == "a red square, a barn and a square"
    assert not p.applies("a barn") and p.applies("Bar.")
    assert p.all_captions(CAPTIONS) == ["a red circle", "a red square", "a green circle", "a green square",
                                        "a circle of red", "a square of red"]


@pytest.mark.parametrize("settings, field", [
    (dict(preservation_weight=1.0, preservation_classes="circle"), "preservation_trigger"),
    (dict(preservation_weight=1.0, preservation_trigger="bar", preservation_classes=" , "), "preservation_classes"),
    (dict(preservation_weight=1.0, preservation_trigger="bar", preservation_classes="circle, BAR"), "the trigger"),
    (dict(preservation_weight=-1.0), "preservation_weight"),
    (dict(preservation_blank=True), "preservation_blank needs preservation_weight"),
])
def test_bad_settings_name_the_field(settings, field):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**settings).validate_settings()


def test_classes_from_a_comma_separated_string():
    config = TrainConfig(preservation_weight=1.0, preservation_trigger=" bar ",
                         preservation_classes="circle, square ,").validate_settings()
    assert (config.preservation_trigger, config.preservation_classes) == ("bar", ("circle", "square"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("preservation")
    folder = make_toy_dataset(tmp / "data", n=4, sizes=((32, 32),), captions=CAPTIONS)
    return build_cache(folder, tmp / "cache", toy_encoders(cap_dim=32), prompts=["a red circle", "a green circle"])


def run(tmp_path, cache, model, **settings):
    settings = dict(dict(rank=8, lr=5e-3, steps=12, batch_size=2), **settings)
    config = TrainConfig(output_dir=str(tmp_path / "out"), validate=False, checkpoint_every=0, log_every=0,
                         base_model="tiny:0", **settings)
    return train(model, config, cache, encode_text=toy_encoders(cap_dim=32).encode_text, log=None)


def drift(model, lora, captions) -> float:
    """RMS change the LoRA makes to the model's velocity for `captions` on fixed noisy latents."""
    encode = toy_encoders(cap_dim=32).encode_text
    x = torch.randn((len(captions), 16, 4, 4), generator=torch.Generator().manual_seed(5))
    sigma = torch.full((len(captions),), 0.6)
    caps = [encode(c) for c in captions]
    with torch.no_grad():
        before = model(x, sigma, caps)
        handle = apply_loras(model, [(lora, 1.0)], mode="runtime")
        after = model(x, sigma, caps)
        handle.remove()
    return float((after - before).pow(2).mean().sqrt() / before.pow(2).mean().sqrt())


def test_preservation_keeps_the_class_captions_and_costs_one_frozen_forward_per_sample(tmp_path, cache):
    model = tiny_model(0, cap_feat_dim=32)
    plain = run(tmp_path / "plain", cache, model)
    kept = run(tmp_path / "kept", cache, model, preservation_weight=4.0, preservation_trigger="bar",
               preservation_classes=("circle", "square"))
    classes = ["a red circle", "a green square", "a square of red"]
    plain_drift, kept_drift = drift(model, plain.lora, classes), drift(model, kept.lora, classes)
    assert kept_drift < 0.5 * plain_drift, (kept_drift, plain_drift)
    # both learned something: the trigger captions still move
    assert drift(model, kept.lora, ["a red bar"]) > 0.5 * drift(model, plain.lora, ["a red bar"])
    # 12 steps x 2 samples, of which the 3 trigger captions (of 4) are preserved
    assert plain.preservation_forwards == 0
    assert 0 < kept.preservation_forwards < 24 and kept.student_forwards == 24 + kept.preservation_forwards
    assert kept.lora_path is not None
    from safetensors import safe_open
    with safe_open(str(kept.lora_path), "pt") as f:
        assert f.metadata()["preservation_classes"] == "circle,square"


def test_preservation_in_trajectory_imitation(tmp_path, cache):
    model = tiny_model(0, cap_feat_dim=32)
    sft = run(tmp_path / "sft", cache, model)
    result = run(tmp_path / "ti", cache, model, scheme="trajectory", init_lora=str(sft.lora_path), steps=2,
                 teacher_steps=6, student_steps=2, preservation_weight=1.0, preservation_trigger="bar",
                 preservation_classes="circle")
    assert result.preservation_forwards > 0 and all(map(lambda v: v == v, result.losses))


def test_errors_name_the_trigger_or_the_missing_caption(tmp_path, cache):
    model = tiny_model(0, cap_feat_dim=32)
    with pytest.raises(ConfigError, match="'star' is in none of the 4 captions"):
        run(tmp_path / "a", cache, model, preservation_weight=1.0, preservation_trigger="star",
            preservation_classes="circle")
    config = TrainConfig(rank=4, steps=1, output_dir=str(tmp_path / "b"), validate=False, checkpoint_every=0,
                         preservation_weight=1.0, preservation_trigger="bar", preservation_classes="triangle")
    with pytest.raises(ConfigError, match="'a red triangle' is not in the cache"):
        train(model, config, cache, log=None)  # no text encoder, and the cache lacks the class caption


def test_headless_encode_adds_the_class_captions(tmp_path):
    """The headless trainer has no text encoder: `python -m zimage_core encode --config` puts them in the cache."""
    from zimage_core.training.preservation import preservation_prompts

    folder = make_toy_dataset(tmp_path / "data", n=2, sizes=((32, 32),), captions=CAPTIONS[:2])
    on = TrainConfig(preservation_weight=1.0, preservation_trigger="bar", preservation_classes="circle")
    assert preservation_prompts(on.validate_settings(), folder) == ["a red circle", "a green circle"]
    assert preservation_prompts(TrainConfig(), folder) == []


def test_blank_preservation_also_holds_the_empty_prompt(tmp_path, cache):
    """preservation_blank (ai-toolkit's Blank Prompt Preservation): the empty prompt, which classifier-free guidance
    subtracts, keeps its output too; one more frozen and one more trained sample-forward per preserved sample."""
    model = tiny_model(0, cap_feat_dim=32)
    settings = dict(preservation_weight=4.0, preservation_trigger="bar", preservation_classes=("circle", "square"))
    classes_only = run(tmp_path / "classes", cache, model, **settings)
    blank = run(tmp_path / "blank", cache, model, preservation_blank=True, **settings)
    assert drift(model, blank.lora, [""]) < 0.6 * drift(model, classes_only.lora, [""])
    assert blank.preservation_forwards == 2 * classes_only.preservation_forwards
    from safetensors import safe_open
    with safe_open(str(blank.lora_path), "pt") as f:
        assert f.metadata()["preservation_blank"] == "true"
