"""The turbo check's figures (zimage_core/training/turbo_check.py) read the right way round: higher keeps the Turbo.
On the toy world it ranks every remedy above a plain SFT LoRA (tests/test_toyworld.py); here, on synthetic latents,
each part reacts to what it names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zimage_core.training.turbo_check import MEANING, aligned_error, format_check, match, sharpness, turbo_check


def _blobs(n: int = 6, seed: int = 0) -> torch.Tensor:
    """Latents with a sharp-edged square each, at random places (a stand-in for full-quality samples)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.randn(n, 16, 16, 16, generator=g)
    for i in range(n):
        r, c = torch.randint(2, 10, (2,), generator=g).tolist()
        x[i, :, r:r + 5, c:c + 5] += torch.randn(16, 1, 1, generator=g)
    return x


def test_identical_blurred_and_different_samples_score_in_that_order():
    reference = _blobs()
    blurred = F.avg_pool2d(reference, 3, 1, 1)
    different = _blobs(seed=1)
    check = turbo_check({"same": reference, "blurred": blurred, "different": different}, reference)
    assert check["same"] == {"score": pytest.approx(1.0), "match": pytest.approx(1.0), "sharpness": pytest.approx(1.0)}
    assert check["blurred"]["sharpness"] < 0.5 and 0 < check["blurred"]["match"] < 1
    assert check["different"]["match"] < 0 < check["blurred"]["score"] < 1
    assert check["same"]["score"] > check["blurred"]["score"] > check["different"]["score"]
    # over-sharpening also costs: min(s, 1/s)
    sharper = reference + (reference - blurred)
    assert sharpness(sharper, reference) > 1 and turbo_check({"x": sharper}, reference)["x"]["score"] < 1


def test_lists_of_per_sample_latents_pair_by_noise_and_shapes_must_match():
    reference = _blobs(3)
    as_list = [x[None] for x in reference]  # the trainer's validation samples: [1, C, h, w] each
    assert match(as_list, list(reference)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\(2, 16, 16, 16\).*\(3, 16, 16, 16\)"):
        match(reference[:2], reference)


def test_the_line_says_which_way_is_better():
    assert "higher keeps the Turbo" in MEANING
    text = format_check({"trained": {"score": 0.5, "match": 0.6, "sharpness": 0.83}})
    assert text == "trained 0.50 (match 0.60, sharpness 0.83)"


def test_match_forgives_a_shift_of_the_whole_picture_up_to_a_quarter_of_the_side():
    """Guidance moves where things sit; match aligns each candidate to its reference first (MAX_SHIFT)."""
    reference = _blobs()
    near = torch.roll(reference, (3, -4), dims=(2, 3))  # within a quarter of 16
    far = torch.roll(reference, (8, 8), dims=(2, 3))
    assert match(near, reference) == pytest.approx(1.0, abs=1e-6)
    assert match(far, reference) < 0.5
    assert match(near, reference, max_shift=0.0) < 0.5  # max_shift 0 is the plain pixel-wise figure


def test_aligned_error_is_the_best_circular_shift_by_brute_force():
    g = torch.Generator().manual_seed(3)
    c, r = torch.randn(4, 3, 12, 10, generator=g), torch.randn(4, 3, 12, 10, generator=g)
    brute = torch.stack([(torch.roll(c, (dy, dx), dims=(2, 3)) - r).pow(2).sum(dim=(1, 2, 3))
                         for dy in range(-3, 4) for dx in range(-2, 3)]).amin(dim=0)
    assert aligned_error(c, r, max_shift=0.25) == pytest.approx(brute, rel=1e-5)
