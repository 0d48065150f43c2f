"""ComfyUI-ZImage-Turbo: Z-Image-Turbo loader, LoRA stack with DistillPatch, Turbo sampler and LoRA trainer.

ComfyUI imports this file as the node pack; outside ComfyUI (tests, CLI, other tools) the package is plain Python
and `zimage_core` works on its own. Nodes register only through the V3 entry point `comfy_entrypoint`.
"""

try:
    import comfy_api.latest  # noqa: F401  (present only inside ComfyUI)
except ImportError:
    comfy_entrypoint = None
else:
    from .nodes import comfy_entrypoint  # noqa: F401
