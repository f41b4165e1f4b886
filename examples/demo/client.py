"""The demo's client: a steady trickle of Reviews calls, and the live split in plain words.

    python examples/demo/client.py --target 127.0.0.1:15001 [--authority reviews.local:9080]

Calls go to ``--target`` (the client's sidecar) with ``:authority`` set to ``--authority``,
which is what the sidecar routes by. Once a second it prints which versions answered the
calls of the last second, and how many calls failed (with their gRPC codes). run.py uses
``Trickle`` and ``print_lines`` the same way, in its own process, to time the split's change.
"""

from __future__ import annotations

import argparse
import collections
import math
import signal
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TextIO

import grpc

# Compiled from reviews.proto, found on sys.path (this script's folder), when the module loads.
reviews_pb2, reviews_pb2_grpc = grpc.protos_and_services("reviews.proto")

#: Calls per second: enough for a split to show within a second, little enough to read.
RATE = 50.0
#: Each call's deadline. It also bounds the calls in flight: at most RATE * DEADLINE.
DEADLINE = 1.0
#: How many calls' outcomes are kept: ten minutes' worth.
KEEP = int(RATE * 600)
BAR = 20


@dataclass(frozen=True)
class Call:
    started: float  # time.monotonic() when it was sent
    version: str | None  # the version that answered; None if the call failed
    error: str | None  # the gRPC status code's name if it failed


def channel_options(authority: str) -> list[tuple[str, str | int]]:
    # No HTTP CONNECT proxy from the environment and no transparent retries: every call
    # goes to the sidecar once, and every failure is counted.
    return [("grpc.default_authority", authority), ("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0)]


class Trickle:
    """Sends GetReview RATE times a second to ``target`` on one channel, from a thread of its own,
    and keeps the outcomes of the last KEEP calls."""

    def __init__(self, target: str, authority: str) -> None:
        self.authority = authority
        self._channel = grpc.insecure_channel(target, options=channel_options(authority))
        self._get = reviews_pb2_grpc.ReviewsStub(self._channel).GetReview
        self._calls: collections.deque[Call] = collections.deque(maxlen=KEEP)
        self._lock = threading.Condition()
        self._in_flight = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._send, name="trickle", daemon=True)
        self.started = 0.0

    def start(self) -> Trickle:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sending, give the calls in flight their deadline to finish, close the channel."""
        self._stopping.set()
        self._thread.join(DEADLINE + 1)
        with self._lock:
            self._lock.wait_for(lambda: self._in_flight == 0, DEADLINE + 1)
        self._channel.close()

    def calls(self, since: float, until: float) -> list[Call]:
        """The finished calls sent in [since, until) (time.monotonic())."""
        with self._lock:
            return [c for c in self._calls if since <= c.started < until]

    def _send(self) -> None:
        request = reviews_pb2.GetReviewRequest(product="the demo")
        interval = 1.0 / RATE
        next_at = time.monotonic()
        while not self._stopping.wait(max(0.0, next_at - time.monotonic())):
            sent = time.monotonic()
            with self._lock:
                self._in_flight += 1
            future = self._get.future(request, timeout=DEADLINE)
            future.add_done_callback(lambda f, sent=sent: self._done(sent, f))
            # A steady pace, not a catch-up burst after a stall (a paused process, a slow host).
            next_at = max(next_at + interval, sent)

    def _done(self, sent: float, future: grpc.Future) -> None:
        try:
            call = Call(sent, future.result().version, None)
        except grpc.RpcError as e:
            call = Call(sent, None, e.code().name)
        except grpc.FutureCancelledError:
            call = Call(sent, None, "CANCELLED")
        with self._lock:
            self._calls.append(call)
            self._in_flight -= 1
            self._lock.notify_all()


def shares(calls: Iterable[Call]) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """(answers by version, failures by gRPC code)."""
    versions: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    for c in calls:
        if c.version is not None:
            versions[c.version] += 1
        else:
            errors[c.error or "UNKNOWN"] += 1
    return versions, errors


def split_line(calls: Sequence[Call], versions: Sequence[str], elapsed: float, host: str) -> str:
    """One line of the live display, e.g.
    ``t=  3s  reviews.local   v1 ████████████████░░░░  80%   v2 ████░░░░░░░░░░░░░░░░  20%   (50 calls, 0 errors)``;
    versions not in ``versions`` that answered anyway are shown after them."""
    answered, errors = shares(calls)
    ok = sum(answered.values())
    parts = []
    for version in [*versions, *sorted(set(answered) - set(versions))]:
        share = answered[version] / ok if ok else 0.0
        filled = round(share * BAR)
        parts.append(f"{version} {'█' * filled}{'░' * (BAR - filled)} {share:4.0%}")
    failed = sum(errors.values())
    detail = ", ".join(f"{code} x{n}" for code, n in errors.most_common())
    tally = f"{len(calls)} calls, {failed} error{'s' if failed != 1 else ''}" + (f": {detail}" if detail else "")
    return f"t={elapsed:3.0f}s  {host}   " + "   ".join(parts) + f"   ({tally})"


def print_lines(
    trickle: Trickle, versions: Sequence[str], seconds: float | None, stop: threading.Event, out: TextIO
) -> bool:
    """Print one line a second about the calls of the second before, on the trickle's clock, for
    ``seconds`` (None: until ``stop``). Return False if ``stop`` cut it short."""
    host = trickle.authority.rpartition(":")[0] or trickle.authority
    tick = trickle.started + math.floor(time.monotonic() - trickle.started) + 1
    end = None if seconds is None else tick - 1 + seconds
    while end is None or tick <= end + 1e-6:
        # A few milliseconds after the second ends, so that its last calls have answered.
        if stop.wait(max(0.0, tick + 0.05 - time.monotonic())):
            return False
        print(split_line(trickle.calls(tick - 1, tick), versions, tick - trickle.started, host), file=out, flush=True)
        tick += 1
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="where calls go: the client's sidecar, host:port")
    parser.add_argument("--authority", default="reviews.local:9080", help="the :authority the sidecar routes by")
    parser.add_argument("--versions", default="v1,v2", help="the versions to show, in order")
    parser.add_argument("--seconds", type=float, help="stop after this long (default: at Ctrl-C)")
    args = parser.parse_args(argv)

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"{RATE:.0f} calls/s to {args.authority} via {args.target}; each line: the calls of the second before")
    trickle = Trickle(args.target, args.authority).start()
    try:
        print_lines(trickle, args.versions.split(","), args.seconds, stop, sys.stdout)
    finally:
        trickle.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
