"""The HTTP/2 connection selector: the compiled twin unless told otherwise.

``h2conn`` is the module the rest of meshproxy uses. It is
``meshproxy._fast.conn`` when the Cython extensions are built and
``MESHPROXY_NO_EXTENSIONS`` is unset or empty, and the pure-Python twin
``conn_py`` otherwise. Both twins export the same names (events, ``Outbox``,
``Stream``, ``H2Connection``, ``link``, ``monotonic_ns``), raise the same
errors and, for the same calls and bytes, return the same events and write
the same bytes. Streams and outboxes of one twin work only with that twin.
"""

from __future__ import annotations

from types import ModuleType

from meshproxy import _twins, conn_py

__all__ = ["USING_EXTENSIONS", "compiled", "h2conn", "pure"]


def pure() -> ModuleType:
    """The pure-Python twin."""
    return conn_py


def compiled() -> ModuleType | None:
    """The compiled twin, or None when the extensions are not built."""
    mods = _twins.compiled("conn")
    return None if mods is None else mods[0]


(h2conn,), USING_EXTENSIONS = _twins.select((conn_py,), "conn")
