"""The raw resources the sources have seen, and one signal that they changed.

Sources (a directory of YAML, Kubernetes watches) write here from any
thread; the control plane reads a consistent ``snapshot()`` when it
recomputes configs. Objects are kept as the plain dicts the source gave,
keyed by (source, apiVersion group, kind, namespace, name); a write that
changes nothing does not signal, so an unchanged relist or a file touched
without edits causes no push.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["Key", "Store", "key_of"]

#: (apiVersion group, kind, namespace, name); the namespace is "" for cluster-scoped kinds.
Key = tuple[str, str, str, str]


def key_of(obj: dict[str, Any]) -> Key:
    """The identity of a Kubernetes-shaped object. Raises ValueError if it has none."""
    if not isinstance(obj, dict):
        raise ValueError("not a mapping")
    api_version = obj.get("apiVersion")
    kind = obj.get("kind")
    meta = obj.get("metadata")
    if not isinstance(api_version, str) or not api_version:
        raise ValueError("apiVersion is missing")
    if not isinstance(kind, str) or not kind:
        raise ValueError("kind is missing")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise ValueError("metadata.name is missing")
    group = api_version.rpartition("/")[0]
    namespace = meta.get("namespace") or ""
    if not isinstance(namespace, str):
        raise ValueError("metadata.namespace is not a string")
    return group, kind, namespace, meta["name"]


class Store:
    """Objects by source. ``on_change`` is called (from the writing thread) after each effective change."""

    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._by_source: dict[str, dict[Key, dict[str, Any]]] = {}
        self.on_change = on_change
        #: Bumped on every effective change.
        self.revision = 0

    def replace(self, source: str, objects: Iterable[dict[str, Any]]) -> None:
        """Everything ``source`` holds is now ``objects`` (a full list, or a directory re-read)."""
        new = {key_of(o): o for o in objects}
        with self._lock:
            if self._by_source.get(source, {}) == new:
                return
            if new:
                self._by_source[source] = new
            else:
                self._by_source.pop(source, None)
            self.revision += 1
        if self.on_change is not None:
            self.on_change()

    def upsert(self, source: str, obj: dict[str, Any]) -> None:
        key = key_of(obj)
        with self._lock:
            objs = self._by_source.setdefault(source, {})
            if objs.get(key) == obj:
                return
            objs[key] = obj
            self.revision += 1
        if self.on_change is not None:
            self.on_change()

    def delete(self, source: str, key: Key) -> None:
        with self._lock:
            objs = self._by_source.get(source)
            if not objs or objs.pop(key, None) is None:
                return
            if not objs:
                del self._by_source[source]
            self.revision += 1
        if self.on_change is not None:
            self.on_change()

    def snapshot(self) -> tuple[int, list[tuple[dict[str, Any], str]]]:
        """(revision, every (object, its source)) at one instant, in a stable order (by source, then key)."""
        with self._lock:
            objs = [(objs[k], s) for s, objs in sorted(self._by_source.items()) for k in sorted(objs)]
            return self.revision, objs

    def sources(self) -> list[str]:
        with self._lock:
            return sorted(self._by_source)
