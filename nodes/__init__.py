"""The pack's ComfyUI nodes (V3 schema). Thin adapters over zimage_core; registered only through
`comfy_entrypoint` (no V1 mapping dict: ComfyUI checks it first and would then ignore the V3 entry point).

Stable node ids (saved in workflows; never rename): ZImageTurboModelLoader, ZImageTurboLoraStack, ZImageTurboSampler,
ZImageTurboTrainLora, ZImageTurboControlNetLoader, ZImageTurboApplyControlNet, ZImageTurboToModel, and the
demo/test-only ZImageTurboDemoConditioning, ZImageTurboDemoTextEncoder and ZImageTurboDemoVAE (the toy world's encoders).
The wire type is documented in types.py.
"""

from __future__ import annotations

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .bridge import ZImageTurboToModel
from .controlnet import ZImageTurboApplyControlNet, ZImageTurboControlNetLoader
from .demo import ZImageTurboDemoConditioning, ZImageTurboDemoTextEncoder, ZImageTurboDemoVAE
from .loader import ZImageTurboModelLoader
from .lora_stack import ZImageTurboLoraStack
from .sampler import ZImageTurboSampler
from .train import ZImageTurboTrainLora

NODES: list[type[io.ComfyNode]] = [
    ZImageTurboModelLoader,
    ZImageTurboLoraStack,
    ZImageTurboSampler,
    ZImageTurboTrainLora,
    ZImageTurboControlNetLoader,
    ZImageTurboApplyControlNet,
    ZImageTurboToModel,
    ZImageTurboDemoConditioning,
    ZImageTurboDemoTextEncoder,
    ZImageTurboDemoVAE,
]


class ZImageTurboExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> ZImageTurboExtension:
    return ZImageTurboExtension()
