"""The loaders' cache (V3 nodes keep no instance state): loaded models by key, held weakly except the most recent
one, so a re-run finds it while switching to another file frees the old one once nothing (ComfyUI's output cache,
a workflow branch) uses it any more."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class KeepLastCache(Generic[T]):
    def __init__(self):
        self._items: "weakref.WeakValueDictionary[Hashable, T]" = weakref.WeakValueDictionary()
        self._last: list[T] = []

    def get_or_load(self, key: Hashable, load: Callable[[], T]) -> T:
        item = self._items.get(key)
        if item is None:
            item = load()
            self._items[key] = item
        self._last[:] = [item]
        return item
