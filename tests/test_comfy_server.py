"""The pack in ComfyUI's real HTTP server (main.py on 127.0.0.1, CPU): /object_info, POST /prompt, /history, /view,
and a bad graph answered with ComfyUI's validation error. Uses the model files of the in-process host's base dir."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from comfy_fixtures import NODE_IDS, comfy_host, comfy_models, t2i_prompt  # noqa: F401  (fixtures)
from comfy_host import PACK_NAME, ComfyServer, PromptRejected

pytestmark = [pytest.mark.comfy, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(comfy_host, comfy_models):
    with ComfyServer(comfy_host.base_dir) as srv:
        yield srv


def test_object_info_lists_the_nodes_from_the_pack(server):
    info = server.get_json("/object_info")
    for node_id in NODE_IDS:
        assert node_id in info, f"{node_id} missing from /object_info"
        assert info[node_id]["python_module"] == f"custom_nodes.{PACK_NAME}"
    assert info["ZImageTurboTrainLora"]["experimental"] is True
    assert "IMPORT FAILED" not in "\n".join(l for l in server.log().splitlines() if PACK_NAME in l)


def test_prompt_history_view_roundtrip(server, comfy_models):
    m = comfy_models
    prompt = t2i_prompt(m, loras=[(m.user_lora, 0.8)], distillpatch=m.distillpatch, prefix="zimage_http")
    entry = server.wait(server.submit(prompt))
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert "DistillPatch" in entry["outputs"]["2"]["text"][0]
    image = entry["outputs"]["8"]["images"][0]
    png = server.view(image)
    with Image.open(io.BytesIO(png)) as im:
        assert im.size == (64, 64)
        lo, hi = im.convert("L").getextrema()
        assert hi > lo


def test_bad_graph_gets_comfyui_validation_error(server, comfy_models):
    prompt = t2i_prompt(comfy_models, save=False)
    prompt["5"]["inputs"]["steps"] = 0  # below min
    prompt["1"]["inputs"]["model_name"] = "missing_model.safetensors"
    with pytest.raises(PromptRejected) as err:
        server.submit(prompt)
    assert err.value.status == 400
    body = err.value.body
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    messages = str(body["node_errors"])
    assert "missing_model.safetensors" in body["node_errors"]["1"]["errors"][0]["details"]
    assert "steps" in messages and "smaller than min" in messages


def test_execution_error_reaches_history_with_culprit(server, comfy_models):
    m = comfy_models
    entry = server.wait(server.submit(t2i_prompt(m, loras=[(m.foreign_lora, 1.0)], save=False)))
    assert entry["status"]["status_str"] == "error"
    errors = [data for event, data in entry["status"]["messages"] if event == "execution_error"]
    assert errors and m.foreign_lora in errors[0]["exception_message"]
    assert errors[0]["node_type"] == "ZImageTurboLoraStack"


def test_startup_log_is_clean_and_the_loader_counts_small_models(server, comfy_models):
    """ComfyUI's own requirements are installed (no ERROR banner, e.g. comfyui-workflow-templates missing), and the
    loader reports a tiny model's parameters readably (not "0.00 B")."""
    import re

    entry = server.wait(server.submit(t2i_prompt(comfy_models, prefix="zimage_log", save=False)))
    assert entry["status"]["status_str"] == "success", entry["status"]
    log = server.log()
    assert [line for line in log.splitlines() if "ERROR" in line] == []
    counts = re.findall(r"layout, ([\d.]+(?: [KMB])?) parameters", log)
    assert counts and all(c != "0.00 B" and not c.startswith("0") for c in counts), counts
