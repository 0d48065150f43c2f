"""Shared test setup: repo root and tools/ on sys.path, deterministic small-thread torch, tiny-model fixtures."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tools"):  # tools/: the ComfyUI host harness, workflow builder, frontend driver
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

torch.set_num_threads(int(os.environ.get("ZIMAGE_TEST_THREADS", "1")))

from zimage_core.testing import tiny_model  # noqa: E402


@pytest.fixture
def tiny():
    """A fresh random tiny Z-Image transformer in fp32 (seed 0)."""
    return tiny_model(seed=0)
