"""Per-block torch.compile of the Z-Image transformer that stays exact with everything else the pack does.

`enable_compile(model)` compiles each transformer block's *forward* (not the block module), so everything that runs
around a block call stays outside the compiled region:

* block offload's copy hooks (zimage_core.offload) are forward pre/post hooks of the block: they run eagerly before
  and after each compiled forward, so the weights the graph reads are the fetched copies;
* runtime LoRA branches (zimage_core.lora.apply: every LoRA on an fp8 base, and training) are a `lora_branches`
  tuple on each Linear read by a hook that `enable_compile` pins on every block Linear: dynamo traces the hook,
  guards the tuple (adding / removing a LoRA compiles one graph per block variant) and takes the LoRA tensors and
  their strength factors as graph inputs (a new strength compiles nothing);
* fp8 storage: the dequantize (cast + scale) is traced into the graph, where inductor fuses it.

All blocks share one code object (`TransformerBlock.forward`), so their variants (refiner vs modulated, batch size,
key mask, LoRA set) all land in its cache entries; the recompile limit is raised to `recompile_limit` and shapes are
dynamic from the start, so resolutions and caption lengths do not recompile. Should the limit still be reached,
the block call runs eagerly and that is logged once per model, never silently.

On CPU compile gains little (the GEMMs dominate; docs/speed-options.md); it pays on GPUs and with fp8 storage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .lora.apply import pin_branch_hooks

log = logging.getLogger("zimage_core")

COMPILE_MODES = ("none", "blocks")  # what a user can choose (loader node): nothing, or each block's forward
_ATTR = "_zimage_compile"


@dataclass
class CompileSettings:
    """backend: torch.compile backend ("inductor"; "eager" / "aot_eager" trace only, for tests). dynamic: symbolic
    shapes from the first call (sequence lengths change per stage, resolution and caption). recompile_limit: dynamo's
    per-code-object limit while compiled (default 8 is reached by the block variants alone). fullgraph: off, so an
    attention kernel that breaks the graph (sage wrappers are compiler.disable'd) splits it instead of failing in
    the middle of sampling; the plain blocks have no graph break (torch._dynamo.explain, tests/test_compile.py)."""

    backend: str | Callable = "inductor"
    dynamic: bool = True
    recompile_limit: int = 64
    fullgraph: bool = False
    mode: str | None = None


class _CompiledForward:
    """The callable put in place of one block's `forward`: the compiled forward, or the eager one (logged once per
    model) when dynamo refuses a new variant because the recompile limit is reached."""

    def __init__(self, block: nn.Module, compiled, state: "_CompileState"):
        self.eager = block.forward
        self.compiled = compiled
        self.state = state

    def __call__(self, *args, **kwargs):
        try:
            with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                return self.compiled(*args, **kwargs)
        except torch._dynamo.exc.FailOnRecompileLimitHit as err:
            if not self.state.warned:
                self.state.warned = True
                log.warning("compile: dynamo's recompile limit (%d) is reached for the transformer blocks; block "
                            "calls of new variants (batch size, mask, LoRA set) now run eagerly (correct, slower). "
                            "Raise CompileSettings.recompile_limit or disable compile. (%s)",
                            self.state.settings.recompile_limit, str(err).splitlines()[0][:200])
            self.state.eager_calls += 1
            return self.eager(*args, **kwargs)


@dataclass
class _CompileState:
    settings: CompileSettings
    blocks: list
    warned: bool = False
    eager_calls: int = 0


def check_compile_support(backend: str | Callable = "inductor", device: str | torch.device | None = None) -> None:
    """Raise ValueError naming the `compile` option when this torch cannot compile with `backend` (no dynamo, unknown
    backend) or, given the device the model will run on, when inductor lacks its code generator there (triton on
    CUDA, a C++ compiler on CPU): refused when the model is set up, never in the middle of sampling."""
    if not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported():
        raise ValueError(f"compile: torch.compile is not supported by this torch build ({torch.__version__}) / Python;"
                         f" use compile 'none'")
    if isinstance(backend, str) and backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ValueError(f"compile: unknown torch.compile backend {backend!r}; available: "
                         f"{sorted(torch._dynamo.list_backends(exclude_tags=()))}")
    if backend != "inductor" or device is None:
        return
    kind = torch.device(device).type
    if kind == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ValueError("compile: inductor needs triton on CUDA and it is not installed (pip install triton, "
                             "or triton-windows on Windows); use compile 'none'")
    elif kind == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as err:
            raise ValueError(f"compile: inductor needs a C++ compiler on CPU ({type(err).__name__}: {err}); use "
                             f"compile 'none'") from None


def enable_compile(model: nn.Module, settings: CompileSettings | None = None, device=None,
                   **overrides) -> nn.Module:
    """Compile every block's forward of `model` (a ZImageTransformer or anything with `.blocks()`); idempotent.
    device: where the model will run (checked: see check_compile_support). Keyword overrides set CompileSettings
    fields (e.g. backend="aot_eager")."""
    settings = settings or CompileSettings()
    if overrides:
        settings = CompileSettings(**{**settings.__dict__, **overrides})
    current = model.__dict__.get(_ATTR)
    if current is not None:
        if current.settings == settings:
            return model
        disable_compile(model)
    check_compile_support(settings.backend, device)
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, settings.recompile_limit)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * settings.recompile_limit)
    blocks = list(model.blocks())
    pin_branch_hooks(blocks)
    state = _CompileState(settings, blocks)
    for block in blocks:
        compiled = torch.compile(block.forward, backend=settings.backend, dynamic=settings.dynamic,
                                 fullgraph=settings.fullgraph, mode=settings.mode)
        block.forward = _CompiledForward(block, compiled, state)  # an instance attribute: hooks stay outside
    model.__dict__[_ATTR] = state
    return model


def disable_compile(model: nn.Module) -> nn.Module:
    """Back to the eager block forwards (the pinned LoRA hooks stay: they are exact with no branches)."""
    state = model.__dict__.pop(_ATTR, None)
    if state is not None:
        for block in state.blocks:
            block.__dict__.pop("forward", None)
    return model


def is_compiled(model: nn.Module) -> bool:
    return _ATTR in model.__dict__


def compile_state(model: nn.Module) -> _CompileState | None:
    return model.__dict__.get(_ATTR)
