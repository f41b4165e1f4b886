"""How meshproxy picks between a compiled twin and its pure-Python twin: one rule for every package.

The compiled twin ``meshproxy._fast.<name>`` is used when it is built and
``MESHPROXY_NO_EXTENSIONS`` is unset or empty; otherwise the pure-Python
twin. Only a twin that is not built is passed over: one that is built but
fails to import raises, rather than silently running the slow path.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = ["compiled", "extensions_disabled", "select"]


def extensions_disabled() -> bool:
    return bool(os.environ.get("MESHPROXY_NO_EXTENSIONS"))


def compiled(*names: str) -> tuple[ModuleType, ...] | None:
    """The compiled modules ``meshproxy._fast.<name>``, or None if any is not built."""
    mods = []
    for name in names:
        qualified = f"meshproxy._fast.{name}"
        try:
            mods.append(importlib.import_module(qualified))
        except ModuleNotFoundError as exc:
            if exc.name != qualified:
                raise
            return None
    return tuple(mods)


def select(pure: tuple[ModuleType, ...], *names: str) -> tuple[tuple[ModuleType, ...], bool]:
    """``(modules, using_extensions)``: the compiled ``names`` if allowed and built, else ``pure``."""
    if not extensions_disabled():
        mods = compiled(*names)
        if mods is not None:
            return mods, True
    return pure, False
