"""The host tests run against the ComfyUI that COMFYUI_DIR (or `tools/test.sh --comfy DIR`) names: a copy of the
pinned host in a temp folder, marked with its own version string, must be the tree that is imported, with the pack
loaded from it and the torchvision stand-in found although the copy has none beside it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from comfy_host import ROOT, comfy_version, find_comfyui

pytestmark = [pytest.mark.comfy, pytest.mark.slow]

PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from comfy_host import find_comfyui, in_process_host
host = in_process_host()
import comfy.model_management, comfyui_version, folder_paths, nodes
print("PROBE " + json.dumps({"found": str(find_comfyui()), "comfy": comfy.model_management.__file__,
                             "nodes": nodes.__file__,
                             "folder_paths": folder_paths.__file__, "version": comfyui_version.__version__,
                             "pack": host.pack.__file__, "node": "ZImageTurboSampler" in nodes.NODE_CLASS_MAPPINGS}))
"""


@pytest.fixture(scope="module")
def host_copy(tmp_path_factory):
    """A copy of the pinned host whose comfyui_version.py says 0.3.75+copy (no comfy-stubs next to it)."""
    pinned = find_comfyui() if not os.environ.get("COMFYUI_DIR") else None
    if pinned is None:
        pytest.skip("checks the default host selection; COMFYUI_DIR is set")
    copy = tmp_path_factory.mktemp("other") / "ComfyUI"
    shutil.copytree(pinned, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "comfyui_version.py").write_text('__version__ = "0.3.75+copy"\n')
    return copy


def _env(comfy_dir=None):
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_DIR"}
    if comfy_dir is not None:
        env["COMFYUI_DIR"] = str(comfy_dir)
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_comfyui_dir_is_the_tree_the_host_imports(host_copy):
    proc = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "tools")], env=_env(host_copy), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("PROBE "))[6:])
    assert probe["found"] == str(host_copy) and probe["version"] == "0.3.75+copy"
    for module in ("comfy", "nodes", "folder_paths"):
        assert Path(probe[module]).is_relative_to(host_copy), (module, probe[module])
    assert probe["node"] and "ComfyUI-ZImage-Turbo" in probe["pack"]
    assert not (host_copy.parent / "comfy-stubs").exists()  # the stand-in came from the venv, not from beside it


def test_default_is_the_pinned_host():
    found = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                            "from comfy_host import find_comfyui; print(find_comfyui())", str(ROOT / "tools")],
                           env=_env(), capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stderr
    assert comfy_version(Path(found.stdout.strip())) == "0.3.75"


def test_test_sh_comfy_option_selects_the_tree(host_copy):
    env = _env()
    env["PYTHON"] = sys.executable
    proc = subprocess.run([str(ROOT / "tools" / "test.sh"), "--comfy", str(host_copy), "--co",
                           "tests/test_fp16.py"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"ComfyUI host: {host_copy} (ComfyUI 0.3.75+copy), Python {sys.executable}" in proc.stdout


def test_a_wrong_comfyui_dir_is_refused_by_name(tmp_path):
    proc = subprocess.run([str(ROOT / "tools" / "test.sh"), "--comfy", str(tmp_path), "--co", "-q"],
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"COMFYUI_DIR={tmp_path} is not a ComfyUI checkout" in proc.stderr
