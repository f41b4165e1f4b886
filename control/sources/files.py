"""The directory source: every YAML (or JSON) file in one directory, re-read when it changes.

Each file is one source in the store (``file:reviews.yaml``) holding its
documents (``---``-separated). The directory is watched with inotify: any
change schedules a re-read a few milliseconds later (editors and
ConfigMap updates touch several entries at once), and the store drops
re-reads that changed nothing. Files whose names start with a dot
(editor swap files, a ConfigMap mount's ``..data``) are skipped; only the
top level is read, which is how a mounted ConfigMap looks.

A file that cannot be read or parsed keeps its last good content in force
and its error is reported (``errors``, the log, ``meshctl analyze``); a
document without apiVersion/kind/metadata.name is skipped and reported,
and the file's other documents still apply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import yaml

from control.store import Store, key_of

__all__ = ["DirectorySource", "read_file", "read_text", "yaml_error"]

log = logging.getLogger("meshproxy.control.files")

SUFFIXES = (".yaml", ".yml", ".json")
#: How long after a change event the directory is re-read: long enough to see an editor's
#: write-and-rename as one change, short next to the 100 ms push debounce.
SETTLE_S = 0.02
# libyaml's safe loader when PyYAML has it: 6x faster than the pure-Python one (a 40-resource
# file: 16 ms instead of 100 ms), which is most of the time from a save to a push.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_file(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """(the objects, the problems) of one file. Raises OSError, UnicodeDecodeError or yaml.YAMLError
    when the file as a whole cannot be used."""
    return read_text(path.read_bytes().decode("utf-8"))


def read_text(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(the objects, the problems) of multi-document YAML; yaml.YAMLError if it does not parse."""
    objects, problems = [], []
    try:
        docs = list(yaml.load_all(text, Loader=_LOADER))
    except yaml.YAMLError:
        # Parse again with the pure-Python loader for its clearer message (or, should
        # the two ever disagree, its result).
        docs = list(yaml.safe_load_all(text))
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            docs = doc["items"]
        else:
            docs = [doc]
        for d in docs:
            try:
                key_of(d)
            except ValueError as e:
                problems.append(f"document {i + 1}: {e}")
                continue
            objects.append(d)
    return objects, problems


def yaml_error(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"YAML syntax error{where}: {getattr(e, 'problem', None) or e}"


class DirectorySource:
    """Feeds ``store`` from ``directory``; ``errors`` maps a file name to why it (or part of it) was not used."""

    def __init__(self, store: Store, directory: str | Path) -> None:
        self.store = store
        self.directory = Path(directory)
        self.errors: dict[str, list[str]] = {}
        self._task: asyncio.Task | None = None
        # name -> the bytes last parsed (or refused): an unchanged file is not parsed again, so one
        # edit in a big directory costs one file's parse.
        self._seen: dict[str, bytes] = {}

    def source_of(self, path: Path) -> str:
        return f"file:{path.name}"

    def load(self) -> None:
        """Read the directory once (raises OSError if it cannot be listed)."""
        seen = set()
        errors: dict[str, list[str]] = {}
        for path in sorted(self.directory.iterdir()):
            if path.name.startswith(".") or path.suffix not in SUFFIXES or not path.is_file():
                continue
            source = self.source_of(path)
            seen.add(source)
            try:
                data = path.read_bytes()
                if self._seen.get(path.name) == data:
                    if path.name in self.errors:
                        errors[path.name] = self.errors[path.name]
                    continue
                self._seen[path.name] = data
                objects, problems = read_text(data.decode("utf-8"))
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
                reason = yaml_error(e) if isinstance(e, yaml.YAMLError) else f"cannot read: {e}"
                errors[path.name] = [f"{reason} (its last good content stays in force)"]
                continue
            if problems:
                errors[path.name] = problems
            self.store.replace(source, objects)
        for source in self.store.sources():
            if source.startswith("file:") and source not in seen:
                self.store.replace(source, [])
        self._seen = {name: data for name, data in self._seen.items() if self.source_of(Path(name)) in seen}
        for name, problems in errors.items():
            if self.errors.get(name) != problems:
                for p in problems:
                    log.error("%s: %s", self.directory / name, p)
        self.errors = errors

    def _reload(self) -> None:
        try:
            self.load()
        except OSError as e:
            log.error("cannot read %s: %s (the config in force stays)", self.directory, e)

    def start(self) -> None:
        """Read the directory now (raising OSError if it cannot), then follow its changes in a task."""
        self.load()
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        try:
            from asyncinotify import Inotify, Mask
        except (ImportError, OSError):  # not Linux, or no inotify: poll instead
            await self._poll()
            return
        mask = (
            Mask.CREATE
            | Mask.CLOSE_WRITE
            | Mask.MODIFY
            | Mask.DELETE
            | Mask.MOVED_TO
            | Mask.MOVED_FROM
            | Mask.ATTRIB
            | Mask.DELETE_SELF
            | Mask.MOVE_SELF
        )
        with Inotify() as inotify:
            inotify.add_watch(self.directory, mask)
            # Changes between start()'s load and this watch raised no event: read once more.
            self._reload()
            pending: asyncio.TimerHandle | None = None
            loop = asyncio.get_running_loop()
            async for event in inotify:
                if event.mask & (Mask.DELETE_SELF | Mask.MOVE_SELF | Mask.IGNORED):
                    log.error("%s was removed or moved: polling for it", self.directory)
                    break
                if pending is None or pending.cancelled() or pending.when() <= loop.time():
                    pending = loop.call_later(SETTLE_S, self._reload)
        await self._poll()

    async def _poll(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            self._reload()
