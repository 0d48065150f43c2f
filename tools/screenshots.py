"""Refresh the pictures of the shipped workflows: docs/screenshots/NAME.png (the README's node reference) and
workflows/NAME.jpg (the thumbnail ComfyUI's template browser shows), taken in the real frontend in headless Chromium.

    .venv/bin/python tools/screenshots.py [NAME ...]   # only these workflows (default: all)
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from PIL import Image  # noqa: E402

import workflows as wf  # noqa: E402
from comfy_host import ComfyServer, make_base_dir, write_inpaint_image  # noqa: E402
from frontend import open_workflow  # noqa: E402

PLACEHOLDERS = {"diffusion_models": [wf.MODEL_FILE, wf.BASE_MODEL_FILE], "text_encoders": [wf.TEXT_ENCODER_FILE], "vae": [wf.VAE_FILE],
                "loras": [wf.DISTILLPATCH_FILE, wf.SFT_LORA_FILE, wf.ADAPTER_FILE, *wf.STACK_LORA_FILES],
                "model_patches": [wf.CONTROLNET_FILE]}


def main(only=()):
    base = make_base_dir(tempfile.mkdtemp(prefix="zimage-shots-"))
    for folder, names in PLACEHOLDERS.items():  # the combos list the standard files, as on a user's machine
        for name in names:
            (base / "models" / folder / name).write_bytes(b"")
    (base / "input" / wf.DATASET).mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), "gray").save(base / "input" / wf.CONTROL_IMAGE)
    write_inpaint_image(base / "input" / wf.INPAINT_IMAGE)
    shots = ROOT / "docs" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    with ComfyServer(base) as server:
        for path in sorted((ROOT / "workflows").glob("*.json")):
            if only and path.stem not in only:
                continue
            result = open_workflow(server.url, json.loads(path.read_text()))
            problems = result.unknown_types + result.widget_mismatches + result.alerts
            if problems:
                raise SystemExit(f"{path.name}: {problems}")
            (shots / f"{path.stem}.png").write_bytes(result.screenshot_png)
            thumb = Image.open(io.BytesIO(result.screenshot_png)).convert("RGB")
            thumb.thumbnail((640, 400))
            thumb.save(path.with_suffix(".jpg"), quality=85)
            print("wrote", shots / f"{path.stem}.png", "and", path.with_suffix(".jpg"))


if __name__ == "__main__":
    main(sys.argv[1:])
