"""A real ComfyUI (the pinned 0.3.75 of tools/setup_env.sh, or $COMFYUI_DIR) as the host of this node pack, for
tests and the demo.

Two ways to run it, both loading the pack through ComfyUI's own custom-node loader from `BASE/custom_nodes/<pack>`
(a symlink to this repository), with models in `BASE/models/...`:

In-process (one per Python process: ComfyUI's node registry and `args` are module globals)::

    from comfy_host import in_process_host
    host = in_process_host()              # first call initialises ComfyUI (CPU), later calls return the same host
    host.models_dir / "loras"              # write model files here (see the writers below)
    result = host.run(prompt)              # validate + execute an API-format prompt with ComfyUI's PromptExecutor
    result.success, result.error, result.ui["9"], result.output("3", 0), result.events
    host.object_info("ZImageTurboSampler") # what /object_info would answer for one node

In pytest use the session fixture `comfy_host` (import it into the test module). Progress: the host installs a
recording progress hook (`host.progress`) like ComfyUI's server does, so `ProgressBar` updates, previews and the
per-step interrupt check behave as in the UI; `host.interrupt_at_step(n)` presses Cancel from inside step n.

HTTP server (`main.py` in a subprocess on 127.0.0.1 and a free port)::

    with ComfyServer(host.base_dir) as server:         # or ComfyServer(make_base_dir(tmp))
        prompt_id = server.submit(prompt)               # POST /prompt; raises PromptRejected(status, body) on 400
        entry = server.wait(prompt_id)                  # polls GET /history/<id>
        png = server.view(entry["outputs"]["9"]["images"][0])  # GET /view

`tools/comfy_server.sh` starts the same server by hand.

Input files a demo or test puts in ComfyUI's input folder: `write_dataset`, `write_inpaint_image`. The tiny model
files, the test prompts and the pytest fixtures are test helpers: `tests/comfy_fixtures.py`.

Which ComfyUI: `$COMFYUI_DIR` (any checkout, run with the packages of the Python that imports this module; see
`tools/test.sh --comfy DIR`), else the pinned 0.3.75 test host that tools/setup_env.sh unpacks into `.venv/ComfyUI`.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib.metadata
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "ComfyUI-ZImage-Turbo"
MODEL_FOLDERS = ("diffusion_models", "loras", "vae", "text_encoders", "checkpoints", "model_patches")


def find_comfyui() -> Path:
    """ComfyUI source tree: $COMFYUI_DIR (any checkout), else <venv>/ComfyUI (tools/setup_env.sh), else
    <repo>/.venv/ComfyUI. The path is kept as given (symlinks are not resolved), so what is imported is that tree."""
    chosen = os.environ.get("COMFYUI_DIR")
    if chosen:
        if not (Path(chosen) / "main.py").is_file():
            raise RuntimeError(f"COMFYUI_DIR={chosen} is not a ComfyUI checkout (no main.py there)")
        return Path(chosen).absolute()
    for c in (Path(sys.prefix) / "ComfyUI", ROOT / ".venv" / "ComfyUI"):
        if (c / "main.py").is_file():
            return c.absolute()
    raise RuntimeError("ComfyUI not found: run tools/setup_env.sh (the pinned 0.3.75 test host), or set COMFYUI_DIR "
                       "to your ComfyUI checkout")


def comfy_version(comfy_dir: Path) -> str:
    """The version a ComfyUI tree declares (comfyui_version.py), without importing it."""
    path = comfy_dir / "comfyui_version.py"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    match = re.search(r"__version__\s*=\s*[\"']([^\"']+)", text)
    return match.group(1) if match else "unknown"


def stub_dir(comfy_dir: Path) -> Path | None:
    """The torchvision stand-in of the CPU test host, for a Python without a real torchvision: next to the host
    tree (tools/setup_env.sh puts it in the venv beside ComfyUI/), else in this Python's venv or the repo's .venv.
    None when torchvision is installed (the real one is used) or no stand-in exists."""
    try:  # by its metadata: the stand-in, once on sys.path, is importable too but has none
        importlib.metadata.version("torchvision")
        return None
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in (comfy_dir.parent / "comfy-stubs", Path(sys.prefix) / "comfy-stubs", ROOT / ".venv" / "comfy-stubs"):
        if path.is_dir():
            return path
    return None


def make_base_dir(base: str | os.PathLike, pack_dir: str | os.PathLike = ROOT) -> Path:
    """A ComfyUI --base-directory with the pack symlinked into custom_nodes and empty model folders."""
    base = Path(base)
    for sub in ["custom_nodes", "input", "output", "temp", "user"] + [f"models/{m}" for m in MODEL_FOLDERS]:
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_NAME
    if not link.exists():
        link.symlink_to(Path(pack_dir).resolve(), target_is_directory=True)
    return base


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# =============================================================================================== in-process host
class _HeadlessServer:
    """What PromptExecutor, the progress hook and nodes use of ComfyUI's PromptServer."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass

    def send_progress_text(self, text, node_id, sid=None):
        self.messages.append(("progress_text", {"text": text, "node": node_id}))


@dataclass
class ProgressEvent:
    value: int
    total: int
    node_id: str | None
    preview: object  # ("JPEG", PIL.Image, max_size) or None


@dataclass
class RunResult:
    """Outcome of `InProcessHost.run`."""

    prompt_id: str
    valid: bool
    node_errors: dict
    validation_error: dict | None
    success: bool = False
    events: list = field(default_factory=list)  # [(event, data)] from the executor: execution_start ... success/error
    ui: dict = field(default_factory=dict)  # history "outputs": node id -> ui dict ({"images": [...], "text": [...]})
    executor: object = None

    @property
    def error(self) -> dict | None:
        """The execution_error / execution_interrupted data, if the run failed."""
        for event, data in self.events:
            if event in ("execution_error", "execution_interrupted"):
                return dict(data, event=event)
        return None

    def output(self, node_id: str, index: int = 0):
        """Raw output `index` of a node (first batch item), from the executor's output cache."""
        entry = self.executor.caches.outputs.get(node_id)
        if entry is None:
            raise KeyError(f"node {node_id} has no cached output")
        return entry.outputs[index][0]


class InProcessHost:
    def __init__(self, base_dir: Path, comfy_dir: Path):
        self.base_dir = base_dir
        self.comfy_dir = comfy_dir
        self.models_dir = base_dir / "models"
        self.progress: list[ProgressEvent] = []
        self._interrupt_at: tuple | None = None
        self._init_comfy()

    # ------------------------------------------------------------------ setup
    def _init_comfy(self):
        t0 = time.time()
        # transformers decides once whether torchvision exists; ask it before the stand-in is importable, so
        # transformers/peft keep working in this process (the stand-in has no metadata and raises on use).
        import transformers.utils.import_utils as tiu
        tiu.is_torchvision_available()
        if str(self.comfy_dir) not in sys.path:
            sys.path.insert(0, str(self.comfy_dir))  # before the repo root: ComfyUI's `nodes` vs our `nodes/`
        stubs = stub_dir(self.comfy_dir)
        if stubs is not None and str(stubs) not in sys.path:
            sys.path.append(str(stubs))

        from comfy.cli_args import LatentPreviewMethod, args
        args.cpu = True  # before comfy.model_management is imported
        args.base_directory = str(self.base_dir)  # before folder_paths is imported
        args.disable_api_nodes = True
        args.preview_method = LatentPreviewMethod.Latent2RGB  # so previews are produced, as with --preview-method
        import folder_paths  # noqa: F401
        import utils.extra_config  # noqa: F401  must precede `nodes` (nodes.py puts comfy/ first on sys.path)
        import comfy.model_management
        import comfy.utils
        import execution
        import nodes
        import server

        self.args = args
        self.folder_paths = sys.modules["folder_paths"]
        self.execution = execution
        self.nodes = nodes
        self.mm = comfy.model_management
        self.server = _HeadlessServer()
        server.PromptServer.instance = self.server
        failed = asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        self.failed_extras = failed or []
        comfy.utils.set_progress_bar_global_hook(self._progress_hook)
        # nodes.py inserted ComfyUI/comfy at sys.path[0]; keep it, but behind everything else, so that its modules
        # (utils.py, ops.py, lora.py, sample.py ...) cannot shadow other packages in this test process.
        comfy_pkg_dir = str(self.comfy_dir / "comfy")
        while comfy_pkg_dir in sys.path:
            sys.path.remove(comfy_pkg_dir)
        sys.path.append(comfy_pkg_dir)
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0})
        self.init_seconds = time.time() - t0

    def _progress_hook(self, value, total, preview_image, prompt_id=None, node_id=None):
        """Like main.py's hook (which first honours Cancel), plus recording; it presses Cancel itself when asked to
        by interrupt_at_step, so the node's own per-step interrupt check is what stops the run."""
        from comfy_execution.utils import get_executing_context
        self.mm.throw_exception_if_processing_interrupted()
        ctx = get_executing_context()
        if node_id is None and ctx is not None:
            node_id = ctx.node_id
        self.progress.append(ProgressEvent(value, total, node_id, preview_image))
        when = self._interrupt_at
        if when is not None and value >= when[0] and when[1] in (None, node_id) and when[2] in (None, total):
            self._interrupt_at = None
            self.mm.interrupt_current_processing(True)  # what POST /interrupt does

    # ------------------------------------------------------------------ API
    @property
    def pack(self):
        """The pack's module as ComfyUI imported it (its name is the pack path, dots as _x_)."""
        path = str(self.base_dir / "custom_nodes" / PACK_NAME).replace(".", "_x_")
        return sys.modules[path]

    def pack_module(self, dotted: str):
        """A submodule of the loaded pack, e.g. host.pack_module("nodes.loader")."""
        return sys.modules[f"{self.pack.__name__}.{dotted}"]

    def object_info(self, node_id: str) -> dict:
        """What /object_info answers for a V3 node; for a V1 node (ComfyUI's core nodes) the parts the workflow
        builder reads (inputs, their order, outputs), as the server derives them."""
        cls = self.nodes.NODE_CLASS_MAPPINGS[node_id]
        if hasattr(cls, "GET_NODE_INFO_V1"):
            return cls.GET_NODE_INFO_V1()
        inputs = cls.INPUT_TYPES()
        return {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()}, "output": cls.RETURN_TYPES,
                "output_name": getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES), "name": node_id}

    def validate(self, prompt: dict):
        return asyncio.run(self.execution.validate_prompt(str(uuid.uuid4()), prompt, None))

    def interrupt_at_step(self, step: int, node_id: str | None = None, total: int | None = None):
        """Press Cancel once a progress bar (of `node_id`, with `total` steps, if given) reaches `step`; the next
        interrupt check of the running node must then stop the run."""
        self._interrupt_at = (step, node_id, total)

    def run(self, prompt: dict, fresh: bool = False) -> RunResult:
        """Validate and execute `prompt` (API format). Returns a RunResult; a prompt that fails validation is not
        executed (`valid` False, `validation_error`, `node_errors`). fresh=True drops ComfyUI's output cache first."""
        prompt_id = str(uuid.uuid4())
        ok, error, outputs, node_errors = asyncio.run(self.execution.validate_prompt(prompt_id, prompt, None))
        result = RunResult(prompt_id, bool(ok) and not node_errors, node_errors, None if ok else error)
        if not result.valid:
            result.validation_error = error if not ok else {"type": "node_errors", "node_errors": node_errors}
            return result
        if fresh:
            self.executor.reset()
        self.progress.clear()
        self.server.messages.clear()
        self.executor.execute(prompt, prompt_id, extra_data={}, execute_outputs=outputs)
        self._interrupt_at = None
        result.success = self.executor.success
        result.events = list(self.executor.status_messages)
        result.ui = dict(self.executor.history_result.get("outputs", {}))
        result.executor = self.executor
        return result


_HOST: InProcessHost | None = None


def in_process_host(base_dir: str | os.PathLike | None = None) -> InProcessHost:
    """The process-wide in-process host; created on first use in `base_dir` (default: a temp dir removed at exit)."""
    global _HOST
    if _HOST is None:
        if base_dir is None:
            base_dir = tempfile.mkdtemp(prefix="zimage-comfy-")
            atexit.register(shutil.rmtree, base_dir, True)
        _HOST = InProcessHost(make_base_dir(base_dir), find_comfyui())
    return _HOST


# =============================================================================================== HTTP server
class PromptRejected(Exception):
    def __init__(self, status: int, body: dict):
        super().__init__(f"HTTP {status}: {json.dumps(body)[:2000]}")
        self.status, self.body = status, body


class ComfyServer:
    """ComfyUI's main.py on 127.0.0.1:<free port> (CPU), serving `base_dir` (see make_base_dir)."""

    def __init__(self, base_dir: str | os.PathLike, port: int | None = None, extra_args: tuple = (),
                 comfy_dir: Path | None = None, python: str = sys.executable):
        self.base_dir = make_base_dir(base_dir)
        self.comfy_dir = comfy_dir or find_comfyui()
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = tuple(extra_args)
        self.python = python
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base_dir / f"server-{self.port}.log"

    def command(self) -> list[str]:
        return [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--base-directory", str(self.base_dir), "--database-url", "sqlite:///:memory:",
                "--disable-api-nodes", "--preview-method", "latent2rgb", *self.extra_args]

    def start(self, timeout: float = 90.0) -> "ComfyServer":
        env = dict(os.environ)
        stubs = stub_dir(self.comfy_dir)
        if stubs is not None:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(stubs)) if p)
        env.setdefault("OMP_NUM_THREADS", "1")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), cwd=self.comfy_dir, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get_json("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"ComfyUI server did not answer within {timeout}s:\n{self.log()[-4000:]}")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ HTTP
    def _request(self, path: str, body: dict | None = None, timeout: float = 30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()

    def get_json(self, path: str, timeout: float = 30):
        return json.loads(self._request(path, timeout=timeout)[1])

    def post_json(self, path: str, body: dict) -> tuple[int, dict]:
        try:
            status, raw = self._request(path, body)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")
        return status, json.loads(raw or b"{}")

    def submit(self, prompt: dict, client_id: str = "zimage-tests") -> str:
        status, body = self.post_json("/prompt", {"prompt": prompt, "client_id": client_id})
        if status != 200:
            raise PromptRejected(status, body)
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 120.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout}s:\n{self.log()[-3000:]}")

    def view(self, image: dict) -> bytes:
        query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                        "type": image.get("type", "output")})
        return self._request(f"/view?{query}")[1]


# =============================================================================================== input files
def write_dataset(folder: str | os.PathLike, n: int = 2, size: int = 32, seed: int = 0) -> Path:
    """n small images with same-name .txt captions."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a test picture number {i}")
    return folder


def write_inpaint_image(path: str | os.PathLike, size: int = 1024) -> Path:
    """An RGBA picture whose transparent centre square is the inpainting mask (LoadImage's MASK is 1 - alpha), as
    ComfyUI's MaskEditor saves a painted mask."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([0.3 + 0.5 * x, 0.4 + 0.4 * y, 0.6 + 0.3 * np.sin(8 * x * y)], -1)
    alpha = np.ones((size, size))
    alpha[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 0.0
    pixels = (np.concatenate([rgb, alpha[..., None]], -1).clip(0, 1) * 255).astype(np.uint8)
    Image.fromarray(pixels, "RGBA").save(path)
    return Path(path)
