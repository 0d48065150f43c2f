"""Shared test setup: repo root and tools/ on sys.path, deterministic small-thread torch, tiny-model fixtures, and
the ComfyUI host fixtures (`comfy_host`, `comfy_models`) for every module."""

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

from comfy_fixtures import comfy_host, comfy_models  # noqa: E402,F401  (fixtures; ComfyUI loads on first use)
from zimage_core.testing import tiny_model  # noqa: E402


def pytest_report_header(config):
    """Which ComfyUI the host tests import ($COMFYUI_DIR or the pinned test host), and which Python runs them."""
    from comfy_host import comfy_version, find_comfyui
    try:
        comfy_dir = find_comfyui()
    except RuntimeError as e:
        return f"ComfyUI host: none ({e})"
    return f"ComfyUI host: {comfy_dir} (ComfyUI {comfy_version(comfy_dir)}), Python {sys.executable}"


@pytest.fixture
def tiny():
    """A fresh random tiny Z-Image transformer in fp32 (seed 0)."""
    return tiny_model(seed=0)


def pytest_collection_modifyitems(items):
    """Every test that runs inside the ComfyUI host carries the `comfy` marker, whether or not its module says so:
    `tools/test.sh --comfy DIR -m comfy` (a user's own ComfyUI) then selects all of them."""
    for item in items:
        if {"comfy_host", "comfy_models"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.comfy)
