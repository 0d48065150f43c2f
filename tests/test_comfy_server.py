"""The pack in ComfyUI's real HTTP server (main.py on 127.0.0.1, CPU): /object_info, POST /prompt, /history, /view,
a bad graph answered with ComfyUI's validation error, progress texts over the websocket. Uses the model files of the
in-process host's base dir."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import uuid

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


async def _run_over_websocket(server, prompt, timeout=300.0):
    """Submit `prompt` as a client of ComfyUI's websocket and collect the progress texts the server sends it
    (binary event 3: node id and text), until the prompt finishes."""
    import aiohttp

    client_id, texts, status = uuid.uuid4().hex, [], None
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws:
            prompt_id = await asyncio.to_thread(server.submit, prompt, client_id)
            async with asyncio.timeout(timeout):
                async for message in ws:
                    if message.type == aiohttp.WSMsgType.BINARY and struct.unpack(">I", message.data[:4])[0] == 3:
                        size = struct.unpack(">I", message.data[4:8])[0]
                        texts.append((message.data[8:8 + size].decode(), message.data[8 + size:].decode()))
                    elif message.type == aiohttp.WSMsgType.TEXT:
                        event = json.loads(message.data)
                        if event["type"] in ("execution_success", "execution_error") \
                                and event["data"].get("prompt_id") == prompt_id:
                            status = event["type"]
                            break
    return status, texts


def test_progress_text_reaches_the_websocket_client(server, comfy_models):
    """The LoRA stack's report travels as ComfyUI's progress text over the real server's websocket (the in-process
    host only records it)."""
    m = comfy_models
    prompt = t2i_prompt(m, loras=[(m.user_lora, 0.7)], distillpatch=m.distillpatch, save=False, seed=11)
    status, texts = asyncio.run(_run_over_websocket(server, prompt))
    assert status == "execution_success"
    stack = [text for node, text in texts if node == "2"]
    assert stack and m.user_lora in stack[-1] and "DistillPatch" in stack[-1], texts


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


def _template_folder_names(comfy_dir) -> list[str]:
    """The folder names ComfyUI's template browser looks for in a pack, in its order, read from the host's own
    source (app/custom_node_manager.py), so a host that changes the list changes what this test expects."""
    import ast
    from pathlib import Path

    tree = ast.parse((Path(comfy_dir) / "app" / "custom_node_manager.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.List)
                and any(getattr(t, "id", "") == "example_workflow_folder_names" for t in node.targets)):
            return [ast.literal_eval(element) for element in node.value.elts]
    raise AssertionError("example_workflow_folder_names not found in the host's app/custom_node_manager.py")


def test_the_template_browser_serves_the_workflows_folder(server, comfy_host):
    """The pack has exactly one of the folder names the host serves as templates, `workflows/` (the headless configs
    live in configs/, which is none of them), and the host serves its files under the pack's name."""
    from pathlib import Path

    names = _template_folder_names(comfy_host.comfy_dir)
    assert "workflows" in names and "configs" not in names
    pack = comfy_host.base_dir / "custom_nodes" / PACK_NAME
    assert [name for name in names if (pack / name).is_dir()] == ["workflows"]
    shipped = sorted(Path(pack / "workflows").glob("*.json"))
    assert shipped
    status, served = server._request(f"/api/workflow_templates/{PACK_NAME}/{shipped[0].name}")
    assert status == 200 and served == shipped[0].read_bytes()
