"""What the node library shows about the pack's nodes besides their schema: search aliases.

Newer ComfyUI's V3 `io.Schema` has a `search_aliases` field (extra words the node search matches); ComfyUI 0.3.75's
has none and refuses unknown fields, so the aliases are passed only where the running host's Schema declares them.
"""

from __future__ import annotations

import dataclasses

from comfy_api.latest import io

PACK_ALIASES = ("zimage", "z-image", "z image", "turbo", "zimage turbo")


def search_aliases(*aliases: str) -> dict:
    """`io.Schema(..., **search_aliases("lora trainer"))`: the pack's aliases plus the node's own, where the host's
    Schema supports them; nothing on a host without the field."""
    fields = {f.name for f in dataclasses.fields(io.Schema)} if dataclasses.is_dataclass(io.Schema) else set()
    if "search_aliases" not in fields:
        return {}
    return {"search_aliases": [*PACK_ALIASES, *aliases]}
