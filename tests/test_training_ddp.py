"""The headless trainer (`python -m zimage_core train --config FILE`) and data parallel training: under torchrun with
2 gloo processes on CPU, the LoRA after k steps equals the single-process run with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zimage_core.training import build_cache
from zimage_core.training.checkpoint import load_checkpoint
from zimage_core.training.toy import make_toy_dataset, toy_encoders

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red square", "a green square on dark noise with more words", "blue", "a yellow square on noise"]


def write_config(path: Path, cache: Path, out: Path, **extra):
    lines = ['scheme = "sft"', 'base_model = "tiny:0"', f'cache_dir = "{cache}"', f'output_dir = "{out}"',
             'output_name = "cli"', "rank = 4", "lr = 3e-3", "steps = 3", "batch_size = 2", "checkpoint_every = 0",
             "log_every = 1", 'save_dtype = "fp32"', 'validation_prompts = ["a red square"]']
    lines += [f"{k} = {v}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run(args, timeout=240):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ZIMAGE_TEST_THREADS": "1"}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    folder = make_toy_dataset(tmp / "data", n=4, sizes=((64, 64),), captions=CAPTIONS)
    build_cache(folder, tmp / "cache", toy_encoders(), prompts=["a red square"])
    return tmp / "cache"


def test_cli_single_process_writes_the_outputs(tmp_path, cache_dir):
    config = write_config(tmp_path / "run.toml", cache_dir, tmp_path / "out")
    proc = run([sys.executable, "-m", "zimage_core", "train", "--config", str(config), "--quiet"])
    assert "turbo check" in proc.stdout and "trained 3 steps" in proc.stdout
    for suffix in (".safetensors", ".loss.png", ".grid.png", ".ckpt.safetensors"):
        assert (tmp_path / "out" / f"cli{suffix}").is_file()


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, cache_dir):
    """The checkpoint of the reference run: one process, the whole global batch."""
    tmp = tmp_path_factory.mktemp("single")
    single = write_config(tmp / "single.toml", cache_dir, tmp / "single", validate="false")
    run([sys.executable, "-m", "zimage_core", "train", "--config", str(single), "--quiet", "--device", "cpu"])
    return load_checkpoint(tmp / "single" / "cli.ckpt.safetensors")


def test_torchrun_two_gloo_processes_equal_one_process(tmp_path, cache_dir, single_process):
    double = write_config(tmp_path / "double.toml", cache_dir, tmp_path / "double", validate="false")
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "zimage_core", "train", "--config", str(double), "--quiet", "--device", "cpu"])
    assert "2 process(es)" in proc.stdout
    a = single_process
    b = load_checkpoint(tmp_path / "double" / "cli.ckpt.safetensors")
    assert a["step"] == b["step"] == 3
    diff = max(float((a["lora"][k] - b["lora"][k]).abs().max()) for k in a["lora"])
    scale = max(float(v.abs().max()) for v in a["lora"].values())
    moved = max(float(a["lora"][k].abs().max()) for k in a["lora"] if k.endswith("|up"))
    print(f"\nDDP (2 gloo processes, batch 1 each) vs 1 process (batch 2), 3 steps: max |diff| {diff:.3g} "
          f"(largest LoRA value {scale:.3g}, largest up {moved:.3g}); losses {a['losses']} vs {b['losses']}")
    assert moved > 1e-3  # training did move the LoRA
    assert diff < 1e-5
    assert torch.allclose(torch.tensor(a["losses"]), torch.tensor(b["losses"]), rtol=1e-5)


@pytest.mark.slow
def test_two_nodes_through_torchrun_rendezvous_equal_one_process(tmp_path, cache_dir, single_process):
    """Multi-node as torchrun runs it: two launchers (node ranks 0 and 1, one process each) meet at a c10d
    rendezvous endpoint; here both "nodes" are this machine, on gloo."""
    from comfy_host import free_port

    multi = write_config(tmp_path / "multi.toml", cache_dir, tmp_path / "multi", validate="false")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ZIMAGE_TEST_THREADS": "1"}
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
                               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                               "--rdzv-id", "zimage-test", "-m", "zimage_core", "train", "--config", str(multi),
                               "--quiet", "--device", "cpu"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(o[-3000:] for o in outputs)
    assert "2 process(es)" in "".join(outputs)
    a = single_process
    b = load_checkpoint(tmp_path / "multi" / "cli.ckpt.safetensors")
    assert a["step"] == b["step"] == 3
    diff = max(float((a["lora"][k] - b["lora"][k]).abs().max()) for k in a["lora"])
    print(f"\n2 nodes (c10d rendezvous, gloo) vs 1 process, 3 steps: LoRA max |diff| {diff:.3g}")
    assert diff < 1e-5
