"""The HTTP/2 codec selector: compiled twins unless told otherwise.

``frames`` and ``hpack`` are the modules the rest of meshproxy uses. They
are ``meshproxy._fast.frames`` / ``meshproxy._fast.hpack`` when the Cython
extensions are built and ``MESHPROXY_NO_EXTENSIONS`` is unset or empty, and
the pure-Python twins ``frames_py`` / ``hpack_py`` otherwise. Both twins
export the same names and raise the same errors (:mod:`meshproxy.errors`).
"""

from __future__ import annotations

from types import ModuleType

from meshproxy import _twins
from meshproxy.codec import frames_py, hpack_py

__all__ = ["USING_EXTENSIONS", "compiled", "frames", "hpack", "pure"]


def pure() -> tuple[ModuleType, ModuleType]:
    """The pure-Python twins: ``(frames, hpack)``."""
    return frames_py, hpack_py


def compiled() -> tuple[ModuleType, ModuleType] | None:
    """The compiled twins, or None when the extensions are not built."""
    return _twins.compiled("frames", "hpack")


(frames, hpack), USING_EXTENSIONS = _twins.select(pure(), "frames", "hpack")
