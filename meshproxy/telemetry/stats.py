"""The stats selector: the compiled counters unless told otherwise.

``RequestStats`` and ``TcpStats`` come from ``meshproxy._fast.stats`` when
the Cython extensions are built and ``MESHPROXY_NO_EXTENSIONS`` is unset or
empty, and from the pure-Python twin ``stats_py`` otherwise, the same rule
as ``meshproxy.conn`` (whose streams ``RequestStats.record`` reads: both
selectors always pick the same kind of twin).
"""

from __future__ import annotations

from types import ModuleType

from meshproxy import _twins
from meshproxy.telemetry import stats_py

__all__ = [
    "DURATION_BOUNDS_MS",
    "SIZE_BOUNDS",
    "USING_EXTENSIONS",
    "RequestStats",
    "TcpStats",
    "compiled",
    "pure",
    "using_extensions",
]


def pure() -> ModuleType:
    """The pure-Python twin."""
    return stats_py


def compiled() -> ModuleType | None:
    """The compiled twin, or None when the extensions are not built."""
    mods = _twins.compiled("stats")
    return None if mods is None else mods[0]


(_stats,), USING_EXTENSIONS = _twins.select((stats_py,), "stats")
using_extensions = USING_EXTENSIONS

RequestStats = _stats.RequestStats
TcpStats = _stats.TcpStats
DURATION_BOUNDS_MS = _stats.DURATION_BOUNDS_MS
SIZE_BOUNDS = _stats.SIZE_BOUNDS
