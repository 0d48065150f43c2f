"""benchmarks/bench_quant.py's paths on small inputs: each format's round trip, the files' per-Linear rules as
applied to a model, and the forward-time path through files written by the formats' reference writers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_quant  # noqa: E402
from gguf_fixtures import tiny_256  # noqa: E402


def test_round_trips_rank_the_formats_by_their_bits():
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0)) / 32
    err = {k: float((bench_quant.roundtrip(k, w) - w).norm() / w.norm()) for k in bench_quant.ROUNDTRIPS}
    print(err)
    assert 0 < err["Q8_0"] < err["Q6_K"] < err["Q5_K"] < err["Q4_K"] < err["Q3_K"] < 0.2
    assert 0 < err["int8"] < err["Q6_K"] and err["Q5_K"] < err["nvfp4"] < err["Q3_K"]
    assert 0 < err["svdq_r32"] < err["Q3_K"]
    with pytest.raises(ValueError, match="Q4_K: in_features 100 is not a multiple of its block 256"):
        bench_quant.roundtrip("Q4_K", w[:, :100])
    assert bench_quant.roundtrip("Q4_K", w[:, :100], pad=True).shape == (64, 100)


@pytest.mark.parametrize("file, rounded", [("Q4_K_M", 2 * 8), ("nvfp4", 4 * 7 + 3), ("svdq-int4 r32", 4 * 7)])
def test_each_file_rounds_the_linears_it_quantizes(file, rounded):
    """GGUF (city96): the 2 main layers' 7 Linears + adaLN; nvfp4: those of every block (+1+1 refiners; the context refiner has no adaLN); svdq: the
    attention and SwiGLU Linears of every block, adaLN kept."""
    model = tiny_256(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert bench_quant.quantize_weights_(model, file) == rounded
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert len(changed) == rounded and all(k.endswith(".weight") for k in changed)
    assert ("noise_refiner.0.attention.to_q.weight" in changed) == (file != "Q4_K_M")
    assert ("layers.0.adaLN_modulation.0.weight" in changed) == (file != "svdq-int4 r32")


def test_timing_path_runs_through_every_file_family():
    out = bench_quant.timing(repeats=1, files=("Q4_K_M", "int8", "svdq-int4 r32"), config=tiny_256(0).config,
                             sides=(16,))
    assert set(out) == {"Q4_K_M", "int8", "svdq-int4 r32"} and all(r[64] > 0 for r in out.values())


def test_dequant_share_path_runs():
    out = bench_quant.dequant_share(repeats=1, files=("Q8_0", "nvfp4"), config=tiny_256(0).config, side=16)
    assert set(out) == {"Q8_0", "nvfp4"} and all(v > 0 for v in out.values())
