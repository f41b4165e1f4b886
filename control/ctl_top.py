"""``meshctl top``: live requests per second, success rate and latency quantiles per route, from
the sidecars' admin GetStats (``meshproxy_route_*``), like ``linkerd viz stat``.

Each report is the difference between two polls of every sidecar: request counts and the
duration histogram's buckets are counters, so their deltas over the time between the polls give
the rate, the success rate and the distribution of the requests made in that window. Quantiles
are estimated from the bucket deltas exactly as Prometheus' ``histogram_quantile`` does: linear
interpolation inside the bucket the rank falls in, the highest finite bound when it falls in
+Inf. A counter that went down (the sidecar restarted) counts from zero, as ``rate()`` does.
Several sidecars are summed per route (listener, virtual host, route).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from control.ctl_output import Unary, dump, number, table

__all__ = ["RouteCounters", "histogram_quantile", "report", "route_counters", "run", "subtract"]

STATS_METHOD = "/meshproxy.admin.v1.Admin/GetStats"
PREFIX = "meshproxy_route_"
# prometheus_client names a counter family without its _total; a sample has it. Take either.
REQUESTS = ("meshproxy_route_requests_total", "meshproxy_route_requests")
DURATION = "meshproxy_route_request_duration_milliseconds"

Key = tuple[str, str, str]  # (listener, virtual host, route)


def histogram_quantile(q: float, bounds: Sequence[float], cumulative: Sequence[float], count: float) -> float:
    """The ``q``-quantile of a histogram (Prometheus' ``histogram_quantile``): ``bounds`` ascending
    upper bounds without +Inf, ``cumulative`` the count at or below each, ``count`` all of them (the
    +Inf bucket). NaN when there are no observations."""
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    if count <= 0 or not bounds:
        return math.nan
    rank = q * count
    # The first bucket reaching the rank; a non-empty one, so that q = 0 answers the lower edge of the
    # lowest observation's bucket (where Prometheus divides 0 by 0).
    b = next((i for i, c in enumerate(cumulative) if c >= rank and c > 0), len(bounds))
    if b == len(bounds):  # in the +Inf bucket: nothing better than its lower edge
        return float(bounds[-1])
    if b == 0 and bounds[0] <= 0:
        return float(bounds[0])
    start, end = (0.0, bounds[0]) if b == 0 else (bounds[b - 1], bounds[b])
    in_bucket = cumulative[b] - (cumulative[b - 1] if b else 0)
    below = cumulative[b - 1] if b else 0
    if in_bucket <= 0:
        return float(end)
    return start + (end - start) * (rank - below) / in_bucket


@dataclass
class RouteCounters:
    """One route's counters in one poll (or the difference between two)."""

    requests: float = 0.0
    successes: float = 0.0
    bounds: tuple[float, ...] = ()
    cumulative: tuple[float, ...] = ()
    count: float = 0.0  # observations in the duration histogram

    def minus(self, before: RouteCounters) -> RouteCounters:
        """What happened between ``before`` and this poll; everything since zero when a counter went down."""
        went_down = (
            self.requests < before.requests
            or self.successes < before.successes
            or self.count < before.count
            or self.bounds != before.bounds
            or any(a < b for a, b in zip(self.cumulative, before.cumulative, strict=False))
        )
        if went_down:
            return self
        return RouteCounters(
            requests=self.requests - before.requests,
            successes=self.successes - before.successes,
            bounds=self.bounds,
            cumulative=tuple(a - b for a, b in zip(self.cumulative, before.cumulative, strict=True)),
            count=self.count - before.count,
        )

    def plus(self, other: RouteCounters) -> RouteCounters:
        """Both summed (several sidecars); histograms with different bounds keep this one's."""
        same = self.bounds == other.bounds or not self.bounds or not other.bounds
        bounds = self.bounds or other.bounds
        if same and self.cumulative and other.cumulative:
            cumulative = tuple(a + b for a, b in zip(self.cumulative, other.cumulative, strict=True))
        else:
            cumulative = self.cumulative or other.cumulative
        return RouteCounters(
            requests=self.requests + other.requests,
            successes=self.successes + other.successes,
            bounds=bounds,
            cumulative=cumulative,
            count=self.count + (other.count if same else 0),
        )


def _key(labels) -> Key:
    return (labels.get("listener", ""), labels.get("virtual_host", ""), labels.get("route", ""))


def route_counters(stats) -> dict[Key, RouteCounters]:
    """The per-route counters in an admin ``StatsResponse``."""
    out: dict[Key, RouteCounters] = {}
    for family in stats.families:
        if family.name in REQUESTS:
            for m in family.metrics:
                r = out.setdefault(_key(m.labels), RouteCounters())
                r.requests += m.value
                if m.labels.get("success") == "true":
                    r.successes += m.value
        elif family.name == DURATION:
            for m in family.metrics:
                r = out.setdefault(_key(m.labels), RouteCounters())
                h = m.histogram
                r.bounds, r.cumulative, r.count = tuple(h.bounds), tuple(h.cumulative_counts), h.count
    return out


def subtract(after: dict[Key, RouteCounters], before: dict[Key, RouteCounters]) -> dict[Key, RouteCounters]:
    """Per route, ``after`` minus ``before`` (a route new in ``after`` counts from zero)."""
    return {k: v.minus(before[k]) if k in before else v for k, v in after.items()}


def report(windows: Iterable[tuple[dict[Key, RouteCounters], float]]) -> list[dict[str, Any]]:
    """Rows for the routes of ``windows`` (each sidecar's deltas and the seconds they span), summed
    per route; sorted by requests per second, busiest first, then by name."""
    totals: dict[Key, RouteCounters] = {}
    rps: dict[Key, float] = {}
    for deltas, seconds in windows:
        for k, d in deltas.items():
            totals[k] = totals[k].plus(d) if k in totals else d
            rps[k] = rps.get(k, 0.0) + (d.requests / seconds if seconds > 0 else 0.0)
    rows = []
    for (listener, vhost, route), d in totals.items():
        p50 = histogram_quantile(0.5, d.bounds, d.cumulative, d.count)
        p99 = histogram_quantile(0.99, d.bounds, d.cumulative, d.count)
        rows.append(
            {
                "listener": listener,
                "virtual_host": vhost,
                "route": route,
                "requests": int(d.requests),
                "rps": rps[(listener, vhost, route)],
                "success_rate": d.successes / d.requests if d.requests else None,
                "p50_ms": None if math.isnan(p50) else p50,
                "p99_ms": None if math.isnan(p99) else p99,
            }
        )
    rows.sort(key=lambda r: (-r["rps"], r["listener"], r["virtual_host"], r["route"]))
    return rows


def render_table(rows: list[dict[str, Any]]) -> str:
    headers = ("LISTENER", "VIRTUAL HOST", "ROUTE", "REQUESTS", "RPS", "SUCCESS", "P50 MS", "P99 MS")
    return table(
        headers,
        [
            (
                r["listener"],
                r["virtual_host"],
                r["route"],
                r["requests"],
                f"{r['rps']:.1f}",
                "" if r["success_rate"] is None else f"{100 * r['success_rate']:.2f}%",
                number(r["p50_ms"]),
                number(r["p99_ms"]),
            )
            for r in rows
        ],
    )


def _poll(clients: list[Unary]) -> list[tuple[dict[Key, RouteCounters], float]]:
    from meshproxy.admin.v1 import admin_pb2

    out = []
    for c in clients:
        stats = c(STATS_METHOD, admin_pb2.StatsRequest(prefixes=[PREFIX]), admin_pb2.StatsResponse)
        out.append((route_counters(stats), time.monotonic()))
    return out


def run(addresses: Sequence[str], interval: float, count: int, fmt: str, timeout: float, out=None) -> int:
    """Poll ``addresses`` every ``interval`` seconds and print a report per interval, ``count`` of them
    (0: until interrupted). -o json prints one JSON object per line, -o yaml one document each."""
    out = out or sys.stdout
    addresses = list(dict.fromkeys(addresses))  # a sidecar named twice is still counted once
    clear = fmt == "table" and out.isatty()
    clients = [Unary(a, "the sidecar", timeout) for a in addresses]
    try:
        before = _poll(clients)
        n = 0
        while count == 0 or n < count:
            time.sleep(interval)
            after = _poll(clients)
            windows = [(subtract(a, b), ta - tb) for (a, ta), (b, tb) in zip(after, before, strict=True)]
            rows = report(windows)
            seconds = max(w[1] for w in windows)
            now = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
            if fmt == "table":
                if clear:
                    out.write("\x1b[H\x1b[2J")
                elif n:
                    out.write("\n")
                out.write(f"{now}  {len(addresses)} sidecar(s), last {seconds:.1f}s\n")
                out.write(render_table(rows) if rows else "no routes with requests counted\n")
            elif fmt == "json":
                out.write(json.dumps({"time": now, "seconds": seconds, "sidecars": list(addresses), "routes": rows}))
                out.write("\n")
            else:
                out.write("---\n")
                dump({"time": now, "seconds": seconds, "sidecars": list(addresses), "routes": rows}, "yaml", out)
            out.flush()
            before = after
            n += 1
    except KeyboardInterrupt:
        return 0
    finally:
        for c in clients:
            c.close()
    return 0
