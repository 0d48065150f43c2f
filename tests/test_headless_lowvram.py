"""`python -m zimage_core train --weight-storage fp8_e4m3fn --offload block`, driven through the CLI entry point on the
tiny model on CPU (fp32): block offload trains the LoRA bit-identical to the run without it, fp8 storage trains one
that differs only by the fp8 rounding of the base, both together equal fp8 alone (the tiny model and a checkpoint
file alike), a checkpoint with offload is loaded to the CPU before its blocks are offloaded, and bad values or a
build without float8 casts are refused by option name before training."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zimage_core import save_transformer
from zimage_core.__main__ import main
from zimage_core.quant.fp8 import Fp8Linear
from zimage_core.testing import tiny_model
from zimage_core.training import build_cache
from zimage_core.training.toy import make_toy_dataset, toy_encoders

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red square", "a green square on dark noise"]
# Measured on this tiny model, 3 steps, AdamW lr 3e-3, rank 4, fp32 compute, 2026-12-03 (torch CPU): fp8 storage moves
# the first step's loss (LoRA up = 0, so the base alone) by 0.18 %, and the trained weight deltas (up @ down, all
# modules) by 24 % (relative Frobenius norm): Adam's nearly sign-like first steps amplify the small gradient changes
# of the near-zero gradients. LoRAs trained on another base (tiny:1) differ by 141 % (= sqrt 2: uncorrelated).
FP8_LOSS_TOLERANCE = 0.01
FP8_DELTA_TOLERANCE = 0.4
LOSS_LINE = re.compile(r"^step (\d+)/\d+ loss ([0-9.]+)", re.MULTILINE)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lowvram")
    folder = make_toy_dataset(tmp / "data", n=2, sizes=((64, 64),), captions=CAPTIONS)
    build_cache(folder, tmp / "cache", toy_encoders())
    save_transformer(tiny_model(0), tmp / "base.safetensors")
    return tmp


def write_config(folder, name: str, base_model: str = "tiny:0", *extra: str):
    config = folder / f"{name}.toml"
    config.write_text("\n".join([
        'scheme = "sft"', f'base_model = "{base_model}"', 'cache_dir = "cache"', 'output_dir = "out"',
        f'output_name = "{name}"', "rank = 4", "lr = 3e-3", "steps = 3", "seed = 7", "checkpoint_every = 0",
        "log_every = 1", "validate = false", 'save_dtype = "fp32"', *extra]) + "\n", encoding="utf-8")
    return config


def train_cli(workspace, capsys, name: str, *options: str, base_model: str = "tiny:0", extra=()):
    """Train through the CLI; returns (saved LoRA tensors, stdout)."""
    config = write_config(workspace, name, base_model, *extra)
    code = main(["train", "--config", str(config), "--device", "cpu", "--dtype", "fp32", "--quiet", *options])
    out, err = capsys.readouterr()
    assert code == 0, err
    return load_file(str(workspace / "out" / f"{name}.safetensors")), out


@pytest.fixture(scope="module")
def runs(workspace):
    return {}


def trained(runs, workspace, capsys, name, *options, base_model="tiny:0", extra=()):
    """train_cli, once per name in this module (several tests compare against the same run)."""
    if name not in runs:
        runs[name] = train_cli(workspace, capsys, name, *options, base_model=base_model, extra=extra)
    return runs[name]


def assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_block_offload_trains_the_same_lora_bit_for_bit(workspace, runs, capsys):
    plain, plain_out = trained(runs, workspace, capsys, "plain")
    offloaded, out = trained(runs, workspace, capsys, "offload", "--offload", "block")
    assert "block offload on:" in out and "blocks in cpu RAM, streamed to cpu" in out
    assert "block offload on" not in plain_out and "weights stored in the compute dtype" in plain_out
    assert max(float(t.abs().max()) for k, t in plain.items() if k.endswith(".lora_B.weight")) > 0  # it trained
    assert_identical(offloaded, plain)


def test_checkpoint_inputs_on_host_train_the_same_lora_and_losses_bit_for_bit(workspace, runs, capsys):
    """--checkpoint-inputs-on-host (alone, and with block offload) runs each checkpointed block on a host copy of its
    input: the same losses and LoRA as the plain run, to the bit."""
    plain, plain_out = trained(runs, workspace, capsys, "plain")
    host, out = trained(runs, workspace, capsys, "host", "--checkpoint-inputs-on-host")
    both, both_out = trained(runs, workspace, capsys, "host_offload", "--checkpoint-inputs-on-host",
                             "--offload", "block")
    assert LOSS_LINE.findall(out) == LOSS_LINE.findall(plain_out) == LOSS_LINE.findall(both_out)
    assert len(LOSS_LINE.findall(out)) == 3
    assert_identical(host, plain)
    assert_identical(both, plain)


def weight_deltas(lora: dict) -> dict:
    """Each module's trained weight delta, up @ down (the LoRA's scale is the same in every run compared)."""
    return {k: lora[k.replace("lora_A", "lora_B")] @ lora[k] for k in lora if k.endswith(".lora_A.weight")}


def relative_distance(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all modules' weight deltas (Frobenius)."""
    da, db = weight_deltas(a), weight_deltas(b)
    assert da.keys() == db.keys() and len(da) > 0
    return (sum(float((da[k] - db[k]).pow(2).sum()) for k in db) / sum(float(db[k].pow(2).sum()) for k in db)) ** 0.5


def test_fp8_storage_trains_a_lora_close_to_the_full_precision_one(workspace, runs, capsys):
    plain, plain_out = trained(runs, workspace, capsys, "plain")
    fp8, out = trained(runs, workspace, capsys, "fp8", "--weight-storage", "fp8_e4m3fn")
    assert "fp8_e4m3fn weight storage on for 28 block Linears" in out  # 4 blocks x 7 targets
    assert "weight storage on" not in plain_out
    first_plain, first_fp8 = (float(LOSS_LINE.findall(text)[0][1]) for text in (plain_out, out))
    loss_change = abs(first_fp8 - first_plain) / first_plain
    distance = relative_distance(fp8, plain)
    other, _ = trained(runs, workspace, capsys, "other", base_model="tiny:1")
    unrelated = relative_distance(other, plain)
    print(f"\nfp8 storage vs fp32 base: first loss {100 * loss_change:.2f} % apart, LoRA weight deltas "
          f"{100 * distance:.0f} % apart (LoRA trained on another base: {100 * unrelated:.0f} %)")
    assert 0 < loss_change < FP8_LOSS_TOLERANCE  # the fp8 base is in use, and it is nearly the same base
    assert 0 < distance < FP8_DELTA_TOLERANCE < unrelated / 2  # close, and the bound tells a different base apart


def test_fp8_and_offload_together_equal_fp8_alone_for_tiny_and_file(workspace, runs, capsys):
    fp8, _ = trained(runs, workspace, capsys, "fp8", "--weight-storage", "fp8_e4m3fn")
    both, out = trained(runs, workspace, capsys, "both", "--weight-storage", "fp8_e4m3fn", "--offload", "block")
    assert "fp8_e4m3fn weight storage on for" in out and "block offload on:" in out
    assert_identical(both, fp8)
    # the same from a checkpoint file (quantised as it is read, then offloaded): the same base, the same LoRA
    from_file, out = trained(runs, workspace, capsys, "file", "--weight-storage", "fp8_e4m3fn", "--offload", "block",
                             base_model=str(workspace / "base.safetensors"))
    assert "fp8_e4m3fn weight storage on for" in out and "block offload on:" in out
    assert_identical(from_file, fp8)


def test_a_checkpoint_with_offload_is_loaded_to_the_cpu_then_offloaded(workspace, monkeypatch):
    import zimage_core.checkpoint as checkpoint
    from zimage_core.training.cli import load_base_model

    calls = []
    real = checkpoint.load_transformer
    monkeypatch.setattr(checkpoint, "load_transformer",
                        lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    # "meta" stands in for the GPU: had the whole model been loaded there, its blocks would have no values
    model = load_base_model(str(workspace / "base.safetensors"), torch.float32, torch.device("meta"),
                            weight_storage="fp8_e4m3fn", offload="block")
    assert [c["device"] for c in calls] == ["cpu"] and calls[0]["weight_storage"] == "fp8_e4m3fn"
    assert {p.device.type for b in model.blocks() for p in b.parameters()} == {"cpu"}
    assert model.x_pad_token.device.type == "meta"
    assert any(isinstance(m, Fp8Linear) for m in model.modules())
    reference = tiny_model(0)
    assert torch.equal(model.blocks()[0].adaLN_modulation[0].weight, reference.blocks()[0].adaLN_modulation[0].weight)


def test_torchrun_processes_each_load_fp8_and_offload_and_equal_one_process(workspace, runs, capsys):
    """2 gloo processes (batch 1 each) with both options vs one process (batch 2) with both: the same LoRA up to
    the all-reduce's rounding. Only rank 0 logs; that rank 1 trained on the fp8 base too shows in the LoRA (a
    full-precision rank would mix in another gradient), while offload changes no number and shows only in the log."""
    options = ("--weight-storage", "fp8_e4m3fn", "--offload", "block")
    single, _ = trained(runs, workspace, capsys, "single2", *options, extra=("batch_size = 2",))
    config = write_config(workspace, "ddp2", "tiny:0", "batch_size = 2")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ZIMAGE_TEST_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "zimage_core", "train", "--config", str(config), "--quiet", "--device", "cpu",
                           "--dtype", "fp32", *options], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and "fp8_e4m3fn weight storage on" in proc.stdout
    assert "block offload on:" in proc.stdout
    double = load_file(str(workspace / "out" / "ddp2.safetensors"))
    assert double.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(double[key], single[key], atol=1e-5, rtol=1e-5, msg=key)
    # a rank with another base (no fp8) would not give the same LoRA: the all-reduce would mix two gradients
    plain2, _ = trained(runs, workspace, capsys, "plain2", extra=("batch_size = 2",))
    assert max(float((plain2[k] - single[k]).abs().max()) for k in single) > 1e-4


@pytest.mark.parametrize("option, value", [("--offload", "disk"), ("--weight-storage", "fp8_e5m2")])
def test_a_bad_value_is_refused_by_argparse_naming_the_option(workspace, capsys, option, value):
    config = write_config(workspace, "bad")
    with pytest.raises(SystemExit) as done:
        main(["train", "--config", str(config), "--device", "cpu", option, value])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: invalid choice: '{value}'" in err


def test_fp8_on_a_build_that_cannot_cast_it_fails_before_training_naming_the_option(workspace, capsys, monkeypatch):
    real_to = torch.Tensor.to

    def to_without_fp8(self, *args, **kwargs):  # what a torch build / backend without float8 kernels does
        if torch.float8_e4m3fn in args or kwargs.get("dtype") == torch.float8_e4m3fn:
            raise RuntimeError("\"copy_kernel\" not implemented for 'Float8_e4m3fn'")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to_without_fp8)
    config = write_config(workspace, "nofp8")
    code = main(["train", "--config", str(config), "--device", "cpu", "--quiet", "--weight-storage", "fp8_e4m3fn"])
    out, err = capsys.readouterr()
    assert code == 2
    assert "error: --weight-storage fp8_e4m3fn: this torch build" in err and "cannot cast" in err
    assert "training" not in out and not (workspace / "out" / "nofp8.safetensors").exists()
