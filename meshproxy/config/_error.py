"""ConfigError: why a configuration was refused, in one line that names the field."""

from __future__ import annotations

__all__ = ["ConfigError", "at", "index"]


class ConfigError(ValueError):
    """A configuration the sidecar will not use.

    ``path`` is the field in proto field names (``listeners[0].virtual_hosts[1].routes[2].match.regex``),
    empty for the file as a whole; ``source`` is the file it came from, if any.
    ``str()`` is ``"[source: ][path: ]reason"`` on one line: it goes into logs,
    NACKs and CLI errors as it is. ``ConfigError(reason)`` is one about no
    field in particular (a command line that names no config, say).
    """

    def __init__(self, path: str, reason: str | None = None, source: str | None = None) -> None:
        if reason is None:
            path, reason = "", path
        # One line, whatever the reason came from (YAML and regex errors are multi-line).
        self.reason = " ".join(reason.split())
        self.path = path
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        return ": ".join(p for p in (self.source, self.path, self.reason) if p)

    def __reduce__(self):
        return (type(self), (self.path, self.reason, self.source))


def at(path: str, name: str) -> str:
    """The path of field ``name`` inside ``path``."""
    return f"{path}.{name}" if path else name


def index(path: str, i: int | str) -> str:
    """The path of item ``i`` (a list index, or a map key) of ``path``."""
    return f"{path}[{i}]" if isinstance(i, int) else f"{path}[{i!r}]"
