"""Benchmark meshproxy's resilience twins: ns per call on the request path, compiled against pure in one run.

Each case (``CASES``) sets up one object from a twin pair in a realistic
state and returns a loop of ``ops`` calls, timed alone; the loop is the same
for both twins, so the ratio is the twins' own. Both twins are replayed on
identical inputs and must return the same checksum, or the script fails
(status 1). ``ns per call`` includes the Python call: it is what a Python
caller pays, not what a compiled caller pays through the ``_c`` methods.

- ``budget.deposit``: ``RetryBudget.deposit`` once per request, 10 µs apart
  (a new slot every 100,000 requests), as on every request a sidecar sends.
- ``budget.withdraw``: ``RetryBudget.withdraw`` after as many requests as
  calls, at Linkerd's defaults: the first fifth (plus the reserve) allowed,
  the rest denied, both paths timed.
- ``outlier.record_success`` / ``outlier.record_error``: ``OutlierDetector.record`` for
  16 endpoints in turn, a success (every response) or a 5xx that does not eject (the
  thresholds are out of reach), as on every response a sidecar forwards.

"Ours" is the compiled twin (``meshproxy.resilience.compiled()``). If it is
not built the script exits with status 2, unless ``--allow-pure`` is given,
in which case the pure-Python twin is measured in its place and labelled so.

Usage::

    .venv/bin/python perf/bench_resilience.py            # table, ~3 s
    .venv/bin/python perf/bench_resilience.py --json     # one JSON object on stdout
    .venv/bin/python perf/bench_resilience.py --quick --allow-pure   # smoke run, < 1 s
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
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
US = 1_000


class BenchError(Exception):
    """A setup or verification failure: reported on one line, exit status 1 or 2."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Case:
    """One measured call: ``make(twins, ops)`` sets up and returns a loop of ``ops`` calls returning a checksum.

    ``twins`` has one attribute per module of the pair (``budget``, ``outlier``).
    """

    name: str
    make: Callable[[SimpleNamespace, int], Callable[[], int]]


def budget_deposit(twins: SimpleNamespace, ops: int) -> Callable[[], int]:
    b = twins.budget.RetryBudget()

    def loop() -> int:
        deposit = b.deposit
        for now_ns in range(0, ops * 10 * US, 10 * US):
            deposit(now_ns)
        return b.balance(ops * 10 * US) + b.deposits

    return loop


def budget_withdraw(twins: SimpleNamespace, ops: int) -> Callable[[], int]:
    b = twins.budget.RetryBudget()
    for _ in range(ops):
        b.deposit(0)

    def loop() -> int:
        withdraw, allowed = b.withdraw, 0
        for k in range(ops):
            allowed += withdraw(k)
        return allowed * 1_000_003 + b.denied

    return loop


def _outlier_record(outcome_name: str) -> Callable[[SimpleNamespace, int], Callable[[], int]]:
    def make(twins: SimpleNamespace, ops: int) -> Callable[[], int]:
        mod = twins.outlier
        # Thresholds no run reaches: the error path counts and never ejects, so every call
        # costs the same and the loop measures the per-response bookkeeping only.
        d = mod.OutlierDetector(16, consecutive_5xx=2**32 - 1, consecutive_gateway_errors=2**32 - 1)
        outcome = getattr(mod, outcome_name)
        indices = [i % 16 for i in range(ops)]

        def loop() -> int:
            record = d.record
            for i in indices:
                record(i, outcome, 1_000)
            if d.ejected() or d.ejections_total:
                raise BenchError("the benchmark ejected an endpoint: its error path is not the one measured")
            return len(d) * 1_000_003 + d.ejections_overflow

        return loop

    return make


CASES: tuple[Case, ...] = (
    Case("budget.deposit", budget_deposit),
    Case("budget.withdraw", budget_withdraw),
    Case("outlier.record_success", _outlier_record("SUCCESS")),
    Case("outlier.record_error", _outlier_record("ERROR_5XX")),
)


def load_twins(allow_pure: bool) -> tuple[SimpleNamespace, SimpleNamespace, bool]:
    """Return ``(ours, pure, compiled)``; without the compiled twins, raise (status 2) unless ``allow_pure``."""
    try:
        resilience = importlib.import_module("meshproxy.resilience")
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT))
        resilience = importlib.import_module("meshproxy.resilience")
    budget, outlier = resilience.pure()
    pure = SimpleNamespace(budget=budget, outlier=outlier)
    mods = resilience.compiled()
    if mods is not None:
        return SimpleNamespace(budget=mods[0], outlier=mods[1]), pure, True
    if not allow_pure:
        raise BenchError(
            "compiled resilience twins (meshproxy._fast.budget, .outlier) are not built: build them "
            "(`pip install -e .`) or pass --allow-pure to benchmark the pure-Python twins in their place",
            status=2,
        )
    return pure, pure, False


def measure(twins: SimpleNamespace, case: Case, ops: int, repeats: int) -> tuple[list[float], int]:
    """ns per call for each repeat (each on a fresh object), and the loop's checksum."""
    times, checksum = [], 0
    for _ in range(repeats):
        loop = case.make(twins, ops)
        t0 = time.perf_counter_ns()
        checksum = loop()
        times.append((time.perf_counter_ns() - t0) / ops)
    return times, checksum


def run(args: argparse.Namespace) -> dict[str, Any]:
    ours, pure, compiled = load_twins(args.allow_pure)
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "twin": "compiled" if compiled else "pure",
        "ops": args.ops,
        "repeats": args.repeats,
        "ns_per_call": {},
        "ns_per_call_median": {},
        "speedup": {},
        "checksums": {},
    }
    for case in CASES:
        ours_t, ours_sum = measure(ours, case, args.ops, args.repeats)
        # The pure twin is slower: fewer calls, same per-call figure.
        pure_ops = max(1, args.ops // 10)
        pure_t, pure_sum = measure(pure, case, pure_ops, args.repeats)
        _, check = measure(ours, case, pure_ops, 1)
        if check != pure_sum:
            raise BenchError(f"{case.name}: the twins disagree ({check} != {pure_sum})")
        report["ns_per_call"][case.name] = {"ours": min(ours_t), "pure": min(pure_t)}
        report["ns_per_call_median"][case.name] = {"ours": statistics.median(ours_t), "pure": statistics.median(pure_t)}
        report["speedup"][case.name] = min(pure_t) / min(ours_t)
        report["checksums"][case.name] = ours_sum
    return report


def format_table(report: dict[str, Any]) -> str:
    ours = "compiled" if report["twin"] == "compiled" else "pure (no compiled twin)"
    width = max(len(case.name) for case in CASES) + 2
    lines = [
        f"meshproxy resilience, Python {report['python']}, best of {report['repeats']} (ours = {ours})",
        f"{'call':<{width}}{'ours ns/call':>14}{'pure ns/call':>14}{'speedup':>10}",
    ]
    for case in CASES:
        t = report["ns_per_call"][case.name]
        speedup = report["speedup"][case.name]
        lines.append(f"{case.name:<{width}}{t['ours']:>14.1f}{t['pure']:>14.1f}{speedup:>9.1f}x")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; ``--quick`` lowers the defaults for a sub-second smoke run."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer calls and repeats")
    p.add_argument(
        "--allow-pure",
        action="store_true",
        help="if the compiled twins are not built, measure the pure twins as 'ours'",
    )
    p.add_argument("--ops", type=int, help="calls per timed repeat of ours (default 500000; quick 5000)")
    p.add_argument("--repeats", type=int, help="timed repeats per twin (default 7; quick 2)")
    args = p.parse_args(argv)
    for name, default, quick in (("ops", 500_000, 5_000), ("repeats", 7, 2)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
    if args.ops < 1 or args.repeats < 1:
        p.error("--ops and --repeats must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: print the table or the JSON object; return the exit status."""
    args = parse_args(argv)
    try:
        report = run(args)
    except BenchError as exc:
        print(f"bench_resilience: {exc}", file=sys.stderr)
        return exc.status
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
