"""Drive the real ComfyUI frontend (served by a running ComfyUI) in headless Chromium over the DevTools protocol.

Used by the workflow tests and to make the README screenshots: load a UI-format workflow exactly as a user who
drags it into the browser would, list node types the server does not provide, compare every node's widget values
with the saved ones (a renamed or added input shifts them), convert with the frontend's own `app.graphToPrompt()`
and take a screenshot. Needs Debian's `chromium` (tools/setup_env.sh installs it when it can) and aiohttp.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

import aiohttp

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                  "--window-size=1600,1120"]
# The frontend's first-run UI would cover the graph: no template browser, no missing-models dialog, no minimap.
FRONTEND_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False,
                     "Comfy.Minimap.Visible": False}

_UNKNOWN_TYPES_JS = """(() => { const reg = window.LiteGraph.registered_node_types, out = [];
  const walk = g => { for (const n of g._nodes) { if (n.isSubgraphNode && n.isSubgraphNode()) walk(n.subgraph);
                                                  else if (!(n.type in reg)) out.push(n.type); } };
  walk(window.app.graph); return out; })()"""
# what the frontend would save for each node's widgets (its own serialisation skips display-only widgets such as
# LoadImage's image preview)
_WIDGETS_JS = """(() => { const out = {};
  for (const n of window.app.graph._nodes) out[n.id] = n.serialize().widgets_values || [];
  return out; })()"""


def chromium_path() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class FrontendResult:
    unknown_types: list[str]
    api_prompt: dict
    screenshot_png: bytes
    widget_mismatches: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    alerts: list[str] = field(default_factory=list)  # toasts / dialogs the frontend showed (e.g. schema errors)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _widget_mismatches(workflow: dict, loaded: dict) -> list[str]:
    problems = []
    for node in workflow.get("nodes", []):
        saved = node.get("widgets_values")
        if not isinstance(saved, list) or node.get("mode", 0) != 0:
            continue
        values = loaded.get(str(node["id"]), [])
        if len(values) != len(saved) or any(not _same(a, b) for a, b in zip(values, saved)):
            problems.append(f"node {node['id']} ({node['type']}): saved {saved}, frontend shows {values}")
    return problems


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= 1e-6 * max(1.0, abs(b))
    return a == b


async def _open(url: str, workflow: dict, settle: float) -> FrontendResult:
    chromium = chromium_path()
    if not chromium:
        raise RuntimeError("headless Chromium is not installed (Debian: apt-get install chromium)")
    port = _free_port()
    profile = tempfile.mkdtemp(prefix="zimage-chromium-")
    proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                             f"--remote-debugging-port={port}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pages = []
        for _ in range(150):
            try:
                listing = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2).read())
                pages = [t for t in listing if t["type"] == "page"]
            except OSError:
                pass
            if pages:
                break
            await asyncio.sleep(0.2)
        if not pages:
            raise RuntimeError("Chromium exposed no page to drive")
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            return await _drive(ws, url, workflow, settle)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


async def _drive(ws, url: str, workflow: dict, settle: float) -> FrontendResult:
    counter = 0
    console: list[str] = []

    async def cdp(method, **params):
        nonlocal counter
        counter += 1
        call = counter
        await ws.send_json({"id": call, "method": method, "params": params})
        while True:
            message = json.loads((await ws.receive()).data)
            if message.get("method") == "Runtime.exceptionThrown":
                console.append(message["params"]["exceptionDetails"].get("text", "exception"))
            elif message.get("method") == "Runtime.consoleAPICalled" and message["params"]["type"] == "error":
                console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in message["params"]["args"]))
            if message.get("id") == call:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def js(expression):
        result = await cdp("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript error: {result['exceptionDetails']}")
        return result["result"].get("value")

    await cdp("Page.enable")
    await cdp("Runtime.enable")
    await cdp("Emulation.setDeviceMetricsOverride", width=1600, height=1120, deviceScaleFactor=1, mobile=False)
    request = urllib.request.Request(url + "/settings", data=json.dumps(FRONTEND_SETTINGS).encode(), method="POST")
    urllib.request.urlopen(request, timeout=10).read()
    await cdp("Page.addScriptToEvaluateOnNewDocument", source="localStorage.setItem('vueNodesBannerDismissed', 'true');")
    await cdp("Page.navigate", url=url + "/")
    deadline = time.time() + 60
    while not await js("!!(window.app && window.app.graph && window.app.canvas && "
                       "typeof window.app.loadGraphData === 'function')"):
        if time.time() > deadline:
            raise RuntimeError(f"the ComfyUI frontend at {url} never became ready")
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)
    console.clear()  # only what loading the workflow causes counts
    await js(f"(async () => {{ await window.app.loadGraphData({json.dumps(workflow)}); return 1; }})()")
    await asyncio.sleep(settle)
    unknown = await js(_UNKNOWN_TYPES_JS)
    widgets = await js(_WIDGETS_JS)
    api = await js("(async () => (await window.app.graphToPrompt()).output)()")
    alerts = await js("Array.from(document.querySelectorAll('.p-toast-message, .p-dialog'))"
                      ".map(e => e.innerText.trim()).filter(t => t)")
    shot = await cdp("Page.captureScreenshot", format="png")
    return FrontendResult(unknown, api, base64.b64decode(shot["data"]), _widget_mismatches(workflow, widgets),
                          console, alerts)


def open_workflow(url: str, workflow: dict, settle: float = 1.5) -> FrontendResult:
    """Load `workflow` (UI format) into the frontend served at `url` (e.g. http://127.0.0.1:8188)."""
    return asyncio.run(_open(url.rstrip("/"), workflow, settle))
