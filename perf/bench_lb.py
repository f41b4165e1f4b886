"""Benchmark meshproxy's balancers: ns per pick for each one, compiled twin against the pure-Python twin in one run.

Each balancer has 16 endpoints in a realistic state (some requests in flight,
RTT samples recorded, one endpoint ejected) and is asked for picks in a tight
loop; the loop is the same for both twins, so the ratio is the twins' own.
Both twins are replayed on identical inputs and must make identical picks,
or the script fails (status 1). ``ns per pick`` includes the Python call:
it is what a Python caller pays, not what the compiled connection pays
through ``pick_c``.

"Ours" is the compiled twin (``meshproxy.lb.compiled()``). If it is not
built the script exits with status 2, unless ``--allow-pure`` is given, in
which case the pure-Python twin is measured in its place and labelled so.

Usage::

    .venv/bin/python perf/bench_lb.py            # table, ~5 s
    .venv/bin/python perf/bench_lb.py --json     # one JSON object on stdout
    .venv/bin/python perf/bench_lb.py --quick --allow-pure   # smoke run, < 1 s
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
N_ENDPOINTS = 16
SEED = 20240611
KINDS = ("RoundRobin", "Random", "LeastRequest", "PeakEwma", "RingHash", "WeightedSplit")
MS = 1_000_000


class BenchError(Exception):
    """A setup or verification failure: reported on one line, exit status 1 or 2."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def load_twins(allow_pure: bool) -> tuple[ModuleType, ModuleType, bool]:
    """Return ``(ours, pure, compiled)``; without the compiled twin, raise (status 2) unless ``allow_pure``."""
    try:
        lb = importlib.import_module("meshproxy.lb")
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT))
        lb = importlib.import_module("meshproxy.lb")
    mod = lb.compiled()
    if mod is not None:
        return mod, lb.pure(), True
    if not allow_pure:
        raise BenchError(
            "compiled balancer twin (meshproxy._fast.balancer) is not built: build it (`pip install -e .`) "
            "or pass --allow-pure to benchmark the pure-Python twin in its place",
            status=2,
        )
    return lb.pure(), lb.pure(), False


def make_loop(mod: ModuleType, kind: str, picks: int) -> Callable[[], int]:
    """A function making ``picks`` picks on a freshly set-up balancer; returns a checksum of the picks."""
    n = N_ENDPOINTS
    if kind == "RingHash":
        b = mod.RingHash(n)
    elif kind == "WeightedSplit":
        b = mod.WeightedSplit([80, 20, *([5] * (n - 2))])
    else:
        b = getattr(mod, kind)(n, seed=SEED)
    if kind in ("LeastRequest", "PeakEwma"):
        for i in range(n):
            for _ in range(i % 4):
                b.start(i)
    if kind == "PeakEwma":
        for i in range(n):
            b.start(i)
            b.finish(i, (5 + 3 * i) * MS, 10 * MS)
    b.set_available(3, False)
    keys = [b"session-%d" % k for k in range(1024)]

    if kind == "PeakEwma":

        def loop() -> int:
            pick, total = b.pick, 0
            for k in range(picks):
                total += pick(20 * MS + k)
            return total

    elif kind == "RingHash":

        def loop() -> int:
            pick, total = b.pick, 0
            for k in range(picks):
                total += pick(keys[k & 1023])
            return total

    else:

        def loop() -> int:
            pick, total = b.pick, 0
            for _ in range(picks):
                total += pick()
            return total

    return loop


def measure(mod: ModuleType, kind: str, picks: int, repeats: int) -> tuple[list[float], int]:
    """ns per pick for each repeat (each on a fresh balancer), and the picks' checksum."""
    times, checksum = [], 0
    for _ in range(repeats):
        loop = make_loop(mod, kind, picks)
        t0 = time.perf_counter_ns()
        checksum = loop()
        times.append((time.perf_counter_ns() - t0) / picks)
    return times, checksum


def run(args: argparse.Namespace) -> dict[str, Any]:
    ours, pure, compiled = load_twins(args.allow_pure)
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "twin": "compiled" if compiled else "pure",
        "endpoints": N_ENDPOINTS,
        "picks": args.picks,
        "repeats": args.repeats,
        "ns_per_pick": {},
        "ns_per_pick_median": {},
        "speedup": {},
    }
    for kind in KINDS:
        ours_t, ours_sum = measure(ours, kind, args.picks, args.repeats)
        # The pure twin is slower: fewer picks, same per-pick figure.
        pure_picks = max(1, args.picks // 10)
        pure_t, pure_sum = measure(pure, kind, pure_picks, args.repeats)
        _, check = measure(ours, kind, pure_picks, 1)
        if check != pure_sum:
            raise BenchError(f"{kind}: the twins picked differently ({check} != {pure_sum})")
        report["ns_per_pick"][kind] = {"ours": min(ours_t), "pure": min(pure_t)}
        report["ns_per_pick_median"][kind] = {"ours": statistics.median(ours_t), "pure": statistics.median(pure_t)}
        report["speedup"][kind] = min(pure_t) / min(ours_t)
        report.setdefault("checksums", {})[kind] = ours_sum
    return report


def format_table(report: dict[str, Any]) -> str:
    ours = "compiled" if report["twin"] == "compiled" else "pure (no compiled twin)"
    lines = [
        f"meshproxy balancers, {report['endpoints']} endpoints, Python {report['python']}, "
        f"best of {report['repeats']} (ours = {ours})",
        f"{'balancer':<15}{'ours ns/pick':>14}{'pure ns/pick':>14}{'speedup':>10}",
    ]
    for kind in KINDS:
        t = report["ns_per_pick"][kind]
        lines.append(f"{kind:<15}{t['ours']:>14.1f}{t['pure']:>14.1f}{report['speedup'][kind]:>9.1f}x")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; ``--quick`` lowers the defaults for a sub-second smoke run."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer picks and repeats")
    p.add_argument(
        "--allow-pure", action="store_true", help="if the compiled twin is not built, measure the pure twin as 'ours'"
    )
    p.add_argument("--picks", type=int, help="picks per timed repeat of ours (default 200000; quick 5000)")
    p.add_argument("--repeats", type=int, help="timed repeats per twin (default 7; quick 2)")
    args = p.parse_args(argv)
    for name, default, quick in (("picks", 200_000, 5_000), ("repeats", 7, 2)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
    if args.picks < 1 or args.repeats < 1:
        p.error("--picks and --repeats must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: print the table or the JSON object; return the exit status."""
    args = parse_args(argv)
    try:
        report = run(args)
    except BenchError as exc:
        print(f"bench_lb: {exc}", file=sys.stderr)
        return exc.status
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
