"""The load-balancer selector: the compiled twin unless told otherwise.

``balancer`` is the module the rest of meshproxy uses. It is
``meshproxy._fast.balancer`` when the Cython extensions are built and
``MESHPROXY_NO_EXTENSIONS`` is unset or empty, and the pure-Python twin
``balancer_py`` otherwise. Both twins export the same names, raise the same
errors and, for the same seed and calls, make the same picks.
"""

from __future__ import annotations

from types import ModuleType

from meshproxy import _twins
from meshproxy.lb import balancer_py

__all__ = ["USING_EXTENSIONS", "balancer", "compiled", "pure"]


def pure() -> ModuleType:
    """The pure-Python twin."""
    return balancer_py


def compiled() -> ModuleType | None:
    """The compiled twin, or None when the extensions are not built."""
    mods = _twins.compiled("balancer")
    return None if mods is None else mods[0]


(balancer,), USING_EXTENSIONS = _twins.select((balancer_py,), "balancer")
