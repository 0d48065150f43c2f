"""A real ComfyUI (0.3.75, unpacked by tools/setup_env.sh) as the host of this node pack, for tests and the demo.

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

Model files for tests (deterministic; written into a models folder): `write_tiny_transformer`,
`write_random_flux_vae` (ComfyUI hard-codes the Flux VAE's channel widths, so it is full size: ~84 M random params,
generated once per machine into a cache folder), `write_lora`, `write_foreign_lora`, `write_dataset`.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
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
NODE_IDS = ("ZImageTurboModelLoader", "ZImageTurboLoraStack", "ZImageTurboSampler", "ZImageTurboTrainLora",
            "ZImageTurboControlNetLoader", "ZImageTurboApplyControlNet", "ZImageTurboToModel")
DEMO_NODE_IDS = ("ZImageTurboDemoConditioning",)
MODEL_FOLDERS = ("diffusion_models", "loras", "vae", "text_encoders", "checkpoints", "model_patches")


def find_comfyui() -> Path:
    """ComfyUI source tree: $COMFYUI_DIR, else <venv>/ComfyUI (tools/setup_env.sh), else <repo>/.venv/ComfyUI."""
    candidates = [os.environ.get("COMFYUI_DIR"), Path(sys.prefix) / "ComfyUI", ROOT / ".venv" / "ComfyUI"]
    for c in candidates:
        if c and (Path(c) / "main.py").is_file():
            return Path(c).resolve()
    raise RuntimeError("ComfyUI not found: run tools/setup_env.sh (or set COMFYUI_DIR to a ComfyUI 0.3.75 tree)")


def stub_dir(comfy_dir: Path) -> Path | None:
    """The torchvision stand-in of the CPU test host (only when no real torchvision is installed)."""
    path = comfy_dir.parent / "comfy-stubs"
    return path if path.is_dir() else None


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


# =============================================================================================== model files
def cache_dir() -> Path:
    path = Path(os.environ.get("ZIMAGE_TEST_CACHE", Path(tempfile.gettempdir()) / "zimage-test-cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_tiny_transformer(path: str | os.PathLike, seed: int = 0, layout: str = "diffusers", prefix: str = "",
                           dtype=None, **config_overrides) -> Path:
    """A random tiny Z-Image transformer (zimage_core.testing.tiny_model) as a .safetensors file."""
    import torch
    from zimage_core import save_transformer
    from zimage_core.testing import tiny_model

    return save_transformer(tiny_model(seed, **config_overrides), path, layout=layout, prefix=prefix,
                            dtype=dtype or torch.float32)


FLUX_VAE_DDCONFIG = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                     "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def flux_vae_state_dict(seed: int = 0) -> dict:
    """Random weights with the exact key names and shapes of the Flux VAE (ae.safetensors), which ComfyUI's
    comfy.sd.VAE recognises by `decoder.conv_in.weight` with 16 latent channels and no post_quant_conv. ComfyUI
    builds that VAE with fixed widths (ch 128, ch_mult 1-2-4-4), so a narrower random VAE cannot load: it is full
    size. Deterministic: weights N(0, 1/fan_in), norms 1/0, biases 0."""
    import torch
    from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder

    with torch.device("meta"):
        parts = {"encoder": Encoder(**FLUX_VAE_DDCONFIG), "decoder": Decoder(**FLUX_VAE_DDCONFIG)}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, module in parts.items():
        for name, tensor in sorted(module.state_dict().items()):
            if tensor.ndim >= 2:
                fan_in = tensor[0].numel()
                value = torch.randn(tensor.shape, generator=gen) / fan_in ** 0.5
            elif "norm" in name and name.endswith("weight"):
                value = torch.ones(tensor.shape)
            else:
                value = torch.zeros(tensor.shape)
            out[f"{prefix}.{name}"] = value.to(torch.bfloat16)
    return out


def write_random_flux_vae(path: str | os.PathLike, seed: int = 0) -> Path:
    """Copy (hard-link when possible) a cached random Flux-architecture VAE to `path`. Needs ComfyUI importable."""
    from safetensors.torch import save_file

    cached = cache_dir() / f"flux_vae_random_seed{seed}_v1.safetensors"
    if not cached.is_file():
        tmp = cached.with_name(cached.name + f".{os.getpid()}.tmp")
        save_file(flux_vae_state_dict(seed), str(tmp))
        os.replace(tmp, cached)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        try:
            os.link(cached, path)
        except OSError:
            shutil.copyfile(cached, path)
    return path


def lora_tensors(config, fmt: str = "peft", rank: int = 4, seed: int = 1, scale: float = 0.05,
                 targets=("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                          "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")) -> dict:
    """A random LoRA for a model of `config` in a producer's key layout:
    fmt "peft": `diffusion_model.layers.0.attention.to_q.lora_A.weight` (ai-toolkit / this pack's export);
    fmt "diffsynth": `layers.0.attention.to_q.lora_A.default.weight` (DiffSynth, the DistillPatch's layout)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    dim, ffn = config.dim, config.ffn_dim
    shapes = {"attention.to_q": (dim, dim), "attention.to_k": (dim, dim), "attention.to_v": (dim, dim),
              "attention.to_out.0": (dim, dim), "feed_forward.w1": (ffn, dim), "feed_forward.w2": (dim, ffn),
              "feed_forward.w3": (ffn, dim)}
    blocks = ([f"layers.{i}" for i in range(config.n_layers)]
              + [f"noise_refiner.{i}" for i in range(config.n_refiner_layers)]
              + [f"context_refiner.{i}" for i in range(config.n_refiner_layers)])
    out = {}
    for block in blocks:
        for target in targets:
            out_f, in_f = shapes[target]
            down = torch.randn(rank, in_f, generator=gen) * scale
            up = torch.randn(out_f, rank, generator=gen) * scale
            stem = f"{block}.{target}"
            if fmt == "peft":
                out[f"diffusion_model.{stem}.lora_A.weight"], out[f"diffusion_model.{stem}.lora_B.weight"] = down, up
            elif fmt == "diffsynth":
                out[f"{stem}.lora_A.default.weight"], out[f"{stem}.lora_B.default.weight"] = down, up
            else:
                raise ValueError(f"unknown LoRA layout {fmt!r}")
    return out


def write_lora(path: str | os.PathLike, config, fmt: str = "peft", **kwargs) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in lora_tensors(config, fmt, **kwargs).items()}, str(path))
    return path


def write_foreign_lora(path: str | os.PathLike, seed: int = 3) -> Path:
    """A LoRA for another model (SDXL UNet kohya keys), which must be refused by name."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    stem = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    tensors = {f"{stem}.lora_down.weight": torch.randn(4, 640, generator=gen),
               f"{stem}.lora_up.weight": torch.randn(640, 4, generator=gen), f"{stem}.alpha": torch.tensor(4.0)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


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


# =============================================================================================== test models + graphs
@dataclass
class ModelFiles:
    """Names (as the nodes list them) of the tiny model files written by `write_test_models`."""

    config: object  # the ZImageConfig of the tiny transformer
    transformer: str = "zimage_tiny.safetensors"  # diffusers layout, fp32: equals zimage_core.testing.tiny_model(0)
    transformer_comfy: str = "zimage_tiny_comfy.safetensors"  # the same weights, ComfyUI fused-qkv layout + prefix
    user_lora: str = "user_style.safetensors"  # ai-toolkit / peft layout
    user_lora2: str = "user_other.safetensors"
    distillpatch: str = "z_image_turbo_distill_patch_lora_bf16.safetensors"  # Comfy-Org's name; DiffSynth layout
    foreign_lora: str = "sdxl_style.safetensors"  # an SDXL LoRA
    foreign_model: str = "not_zimage.safetensors"  # an SDXL-UNet-like checkpoint in diffusion_models
    vae: str = "ae.safetensors"  # random Flux-architecture VAE
    dataset: str = "zimage_dataset"  # in ComfyUI's input folder: 2 images with .txt captions
    empty_dataset: str = "zimage_empty_dataset"
    image: str = "zimage_test_image.png"  # in ComfyUI's input folder, for LoadImage -> VAEEncode


_MODELS: ModelFiles | None = None


def write_test_models(host: InProcessHost) -> ModelFiles:
    """Write (once per process) the tiny model files into the host's models and input folders."""
    global _MODELS
    if _MODELS is None:
        import torch
        from safetensors.torch import save_file
        from zimage_core.testing import tiny_model

        m = ModelFiles(config=tiny_model(0).config)
        models = host.models_dir
        write_tiny_transformer(models / "diffusion_models" / m.transformer, seed=0)
        write_tiny_transformer(models / "diffusion_models" / m.transformer_comfy, seed=0, layout="comfyui",
                               prefix="model.diffusion_model.")
        write_lora(models / "loras" / m.user_lora, m.config, "peft", seed=1)
        write_lora(models / "loras" / m.user_lora2, m.config, "peft", seed=5, rank=2,
                   targets=("attention.to_q", "attention.to_v"))
        write_lora(models / "loras" / m.distillpatch, m.config, "diffsynth", seed=2)
        write_foreign_lora(models / "loras" / m.foreign_lora)
        save_file({"input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3), "time_embed.0.weight": torch.zeros(8, 8)},
                  str(models / "diffusion_models" / m.foreign_model))
        write_random_flux_vae(models / "vae" / m.vae)
        write_dataset(host.base_dir / "input" / m.dataset, n=2, size=32)
        shutil.copyfile(host.base_dir / "input" / m.dataset / "img0.png", host.base_dir / "input" / m.image)
        (host.base_dir / "input" / m.empty_dataset).mkdir(exist_ok=True)
        (host.base_dir / "input" / m.empty_dataset / "notes.md").write_text("no images here")
        _MODELS = m
    return _MODELS


def t2i_prompt(m: ModelFiles, loras=(), distillpatch: str | None = None, seed: int = 42, steps: int = 8,
               preset: str = "turbo", cfg: float = 1.0, size: int = 64, text: str = "a red fox in the snow",
               weight_dtype: str = "fp32", transformer: str | None = None, save: bool = True,
               prefix: str = "zimage_t2i") -> dict:
    """API prompt: loader -> LoRA stack -> Turbo sampler (demo conditioning) -> VAEDecode -> SaveImage.
    Without `save` the sampler's LATENT goes to PreviewAny (no VAE). loras: [(name, strength)] (up to 3)."""
    slots = list(loras) + [("None", 1.0)] * (3 - len(loras))
    prompt = {
        "1": {"class_type": "ZImageTurboModelLoader",
              "inputs": {"model_name": transformer or m.transformer, "weight_dtype": weight_dtype, "offload": "none"}},
        "2": {"class_type": "ZImageTurboLoraStack",
              "inputs": {"model": ["1", 0], "distillpatch": distillpatch or "None", "distillpatch_strength": 1.0,
                         **{k: v for i, (name, strength) in enumerate(slots[:3], 1)
                            for k, v in ((f"lora_{i}", name), (f"strength_{i}", strength))}}},
        "3": {"class_type": "ZImageTurboDemoConditioning", "inputs": {"text": text, "width": 2560, "model": ["1", 0]}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "ZImageTurboSampler",
              "inputs": {"model": ["2", 0], "positive": ["3", 0], "latent_image": ["4", 0], "preset": preset,
                         "steps": steps, "cfg": cfg, "shift": 3.0, "seed": seed, "denoise": 1.0}},
    }
    if save:
        prompt.update({
            "6": {"class_type": "VAELoader", "inputs": {"vae_name": m.vae}},
            "7": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["6", 0]}},
            "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
        })
    else:
        prompt["8"] = {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}}
    return prompt


def train_prompt(m: ModelFiles, scheme: str = "sft", steps: int = 3, output_name: str = "trained_sft",
                 preset_lora: str = "None", sft_lora: str = "None", dataset: str | None = None,
                 distillpatch: str | None = None, lr: float = 1e-3, seed: int = 0, **options) -> dict:
    """API prompt: loader -> (stack) -> trainer (demo text encoder, real VAE) -> sampler -> VAEDecode -> SaveImage,
    plus PreviewImage of the loss curve and validation grid. `options` sets further trainer inputs."""
    prompt = t2i_prompt(m, distillpatch=distillpatch, prefix=f"after_{output_name}", steps=8, size=32)
    prompt["2"]["inputs"]["model"] = ["1", 0]
    prompt.update({
        "10": {"class_type": "ZImageTurboDemoTextEncoder", "inputs": {"width": 2560, "model": ["1", 0]}},
        "11": {"class_type": "ZImageTurboTrainLora",
               "inputs": {"model": ["2", 0], "clip": ["10", 0], "vae": ["6", 0], "dataset_folder": dataset or m.dataset,
                          "scheme": scheme, "preset_lora": preset_lora, "sft_lora": sft_lora, "steps": steps,
                          "learning_rate": lr, "rank": 4, "targets": "to_q,to_k,to_v,to_out.0,w1,w2,w3",
                          "max_pixels": 1024, "seed": seed, "validation_prompt": "a red fox",
                          "output_name": output_name, **options}},
        "12": {"class_type": "PreviewImage", "inputs": {"images": ["11", 2]}},
        "13": {"class_type": "PreviewImage", "inputs": {"images": ["11", 3]}},
    })
    prompt["5"]["inputs"]["model"] = ["11", 0]
    return prompt


# =============================================================================================== pytest fixture
try:
    import pytest
except ImportError:  # the demo uses this module without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def comfy_host() -> InProcessHost:
        """The in-process ComfyUI host (one per test process, whichever modules import this fixture)."""
        return in_process_host()

    @pytest.fixture(scope="session")
    def comfy_models(comfy_host) -> ModelFiles:
        """The tiny model files, written once into the host's folders."""
        return write_test_models(comfy_host)
