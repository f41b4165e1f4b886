"""Resilience building blocks, sans-IO, each a compiled twin and a pure-Python twin (as ``meshproxy.lb``).

``budget`` is Linkerd's retry budget (retries stay under a ratio of
requests over a sliding window, plus a floor per second); ``outlier`` is
Envoy's outlier detection (consecutive failures eject an endpoint for a
time that grows with each ejection, within a max ejection percent). Neither
reads a clock: callers pass ``now_ns``. The selector picks the compiled
twin when it is built and ``MESHPROXY_NO_EXTENSIONS`` is unset, as
``meshproxy._twins`` says.
"""

from __future__ import annotations

from types import ModuleType

from meshproxy import _twins
from meshproxy.resilience import budget_py, outlier_py

__all__ = ["USING_EXTENSIONS", "budget", "compiled", "outlier", "pure"]


def pure() -> tuple[ModuleType, ModuleType]:
    """The pure-Python twins: (budget, outlier)."""
    return budget_py, outlier_py


def compiled() -> tuple[ModuleType, ...] | None:
    """The compiled twins (budget, outlier), or None when the extensions are not built."""
    return _twins.compiled("budget", "outlier")


(budget, outlier), USING_EXTENSIONS = _twins.select((budget_py, outlier_py), "budget", "outlier")
