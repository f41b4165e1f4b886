"""Endpoint balancers, pure-Python twin of ``meshproxy/_fast/balancer.pyx``.

Owns the choice of one endpoint among ``n`` for one request: round robin,
uniform random, least request and peak-EWMA (both power of two choices),
a consistent-hash ring, and smooth weighted round robin for subset splits.
Endpoints are the indices ``0..n-1`` fixed at construction; a config change
builds a new balancer. Sans-IO and clock-free: time is passed in as integer
nanoseconds (``now_ns``) and randomness comes from a seeded splitmix64
generator written identically in both twins, so for the same seed and the
same calls both twins make the same picks.

Every balancer skips endpoints marked down with ``set_available(i, False)``;
``pick`` returns ``-1`` when no endpoint is available. Bad arguments raise
``ValueError`` with a one-line reason.
"""

from __future__ import annotations

import math
import os
from bisect import bisect_left
from collections.abc import Sequence

__all__ = [
    "LeastRequest",
    "PeakEwma",
    "Random",
    "RingHash",
    "RoundRobin",
    "WeightedSplit",
    "hash_key",
]

_M64 = 0xFFFFFFFFFFFFFFFF
_GOLDEN = 0x9E3779B97F4A7C15
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
# Far above any sane mesh, far below what would make the C arrays dangerous.
_MAX_ENDPOINTS = 1 << 24
_MAX_RING_POINTS = 1 << 24


def _mix64(z: int) -> int:
    # splitmix64's finalizer: every input bit affects every output bit.
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def hash_key(key: bytes) -> int:
    """The 64-bit ring position of ``key``: FNV-1a, then splitmix64's finalizer.

    FNV-1a alone clusters short keys that differ in their last byte; the
    finalizer spreads them over the whole ring.
    """
    if not isinstance(key, bytes):
        raise TypeError(f"key must be bytes, not {type(key).__name__}")
    h = _FNV_OFFSET
    for b in key:
        h = ((h ^ b) * _FNV_PRIME) & _M64
    return _mix64(h)


def _point_hash(endpoint: int, replica: int) -> int:
    # Depends only on (endpoint, replica), never on n: adding an endpoint
    # leaves every existing point where it was.
    return _mix64((((endpoint << 32) | replica) + _GOLDEN) & _M64)


def _initial_seed(seed: int | None) -> int:
    if seed is None:
        return int.from_bytes(os.urandom(8), "little")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return seed & _M64


def _check_n(n: int) -> None:
    if not 1 <= n <= _MAX_ENDPOINTS:
        raise ValueError(f"n must be between 1 and {_MAX_ENDPOINTS}, got {n}")


class _Pool:
    """The endpoints, which are up, and the random generator.

    ``_avail`` holds the available indices densely so a random pick among
    them is one draw; ``_pos[i]`` is i's place in it. Removal swaps the last
    one into the hole, in the same order in both twins, so draws map to the
    same endpoints.
    """

    __slots__ = ("_avail", "_n", "_navail", "_pos", "_state")

    def __init__(self, n: int, seed: int | None) -> None:
        _check_n(n)
        self._n = n
        self._avail = list(range(n))
        self._pos = list(range(n))
        self._navail = n
        self._state = _initial_seed(seed)

    def __len__(self) -> int:
        return self._n

    @property
    def available(self) -> int:
        """How many endpoints are available."""
        return self._navail

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self._n:
            raise ValueError(f"endpoint {i} out of range for {self._n} endpoints")

    def is_available(self, i: int) -> bool:
        """Whether endpoint ``i`` may be picked."""
        self._check_index(i)
        return self._pos[i] < self._navail

    def set_available(self, i: int, available: bool) -> None:
        """Mark endpoint ``i`` up (picked again) or down (ejected, never picked)."""
        self._check_index(i)
        p = self._pos[i]
        if available:
            if p >= self._navail:
                self._swap(p, self._navail)
                self._navail += 1
        elif p < self._navail:
            self._navail -= 1
            self._swap(p, self._navail)

    def _swap(self, a: int, b: int) -> None:
        avail, pos = self._avail, self._pos
        ia, ib = avail[a], avail[b]
        avail[a], avail[b] = ib, ia
        pos[ib], pos[ia] = a, b

    def _next(self) -> int:
        # splitmix64: a 64-bit counter through a strong mixer.
        self._state = (self._state + _GOLDEN) & _M64
        return _mix64(self._state)

    def _below(self, m: int) -> int:
        # Lemire's multiply-shift on the high 32 bits: no division, and the
        # bias (m / 2**32) is far below anything a balancer could notice.
        return ((self._next() >> 32) * m) >> 32

    def _two(self) -> tuple[int, int]:
        # Two distinct available endpoints (the caller ensures >= 2).
        k = self._navail
        a = self._below(k)
        b = self._below(k - 1)
        if b >= a:
            b += 1
        return self._avail[a], self._avail[b]


class RoundRobin(_Pool):
    """Each available endpoint in turn, from a seeded starting point."""

    __slots__ = ("_next_i",)

    def __init__(self, n: int, seed: int | None = None) -> None:
        super().__init__(n, seed)
        # A random start, so sidecars that all restart at once do not all
        # send their first request to endpoint 0.
        self._next_i = self._below(n)

    def pick(self) -> int:
        """The next available endpoint after the previous pick, or -1 if none is."""
        if self._navail == 0:
            return -1
        n, pos, navail = self._n, self._pos, self._navail
        i = self._next_i
        while pos[i] >= navail:
            i = i + 1 if i + 1 < n else 0
        self._next_i = i + 1 if i + 1 < n else 0
        return i


class Random(_Pool):
    """A uniformly random available endpoint."""

    __slots__ = ()

    def __init__(self, n: int, seed: int | None = None) -> None:
        super().__init__(n, seed)

    def pick(self) -> int:
        """A random available endpoint, or -1 if none is."""
        if self._navail == 0:
            return -1
        return self._avail[self._below(self._navail)]


class LeastRequest(_Pool):
    """Power of two choices on outstanding requests.

    Two distinct available endpoints are drawn at random and the one with
    fewer requests in flight wins (the first drawn on a tie). The caller
    reports each request with ``start(i)`` once sent and ``finish(i)`` once
    done; ``pick`` itself counts nothing.
    """

    __slots__ = ("_outstanding",)

    def __init__(self, n: int, seed: int | None = None) -> None:
        super().__init__(n, seed)
        self._outstanding = [0] * n

    def pick(self) -> int:
        """The less loaded of two random available endpoints, or -1 if none is."""
        k = self._navail
        if k < 2:
            return self._avail[0] if k else -1
        a, b = self._two()
        out = self._outstanding
        return b if out[b] < out[a] else a

    def start(self, i: int) -> None:
        """A request was sent to endpoint ``i``."""
        self._check_index(i)
        self._outstanding[i] += 1

    def finish(self, i: int) -> None:
        """A request to endpoint ``i`` completed (in any way)."""
        self._check_index(i)
        if self._outstanding[i] == 0:
            raise ValueError(f"finish({i}) without a matching start({i})")
        self._outstanding[i] -= 1

    def outstanding(self, i: int) -> int:
        """Requests in flight to endpoint ``i``."""
        self._check_index(i)
        return self._outstanding[i]


class PeakEwma(_Pool):
    """linkerd2-proxy's balancer: power of two choices on peak-EWMA cost.

    Cost of an endpoint = RTT estimate x (requests in flight + 1). The RTT
    estimate is a moving average that is sensitive to peaks:

    * a sample above the estimate replaces it at once (a slow endpoint is
      avoided from its first slow answer, not after many);
    * a sample at or below it pulls the estimate towards it with weight
      ``1 - exp(-elapsed / decay_ns)``, elapsed being the time since the
      estimate last changed (recent history counts, old history fades);
    * the first sample replaces ``default_rtt_ns``, which stands for an
      endpoint never sampled.

    As in linkerd2-proxy (tower's ``PeakEwma``), an endpoint that has not
    answered for a while has its estimate decayed towards zero when it is
    compared, by ``exp(-idle / decay_ns)``: without that an endpoint that
    was slow once and then lost every comparison would never be tried again.
    That decay is computed from ``now_ns`` at each pick and not stored.
    """

    __slots__ = ("_decay_ns", "_default_rtt", "_estimate", "_outstanding", "_sampled", "_stamp")

    def __init__(
        self,
        n: int,
        decay_ns: int = 10_000_000_000,
        default_rtt_ns: int = 30_000_000,
        seed: int | None = None,
    ) -> None:
        super().__init__(n, seed)
        if decay_ns <= 0:
            raise ValueError(f"decay_ns must be > 0, got {decay_ns}")
        if default_rtt_ns < 0:
            raise ValueError(f"default_rtt_ns must be >= 0, got {default_rtt_ns}")
        self._decay_ns = float(decay_ns)
        self._default_rtt = float(default_rtt_ns)
        self._estimate = [float(default_rtt_ns)] * n
        self._stamp = [0] * n
        self._sampled = [False] * n
        self._outstanding = [0] * n

    def _rtt(self, i: int, now_ns: int) -> float:
        if not self._sampled[i]:
            return self._default_rtt
        idle = now_ns - self._stamp[i]
        if idle <= 0:
            return self._estimate[i]
        return self._estimate[i] * math.exp(-idle / self._decay_ns)

    def _cost(self, i: int, now_ns: int) -> float:
        return self._rtt(i, now_ns) * (self._outstanding[i] + 1)

    def pick(self, now_ns: int) -> int:
        """The cheaper of two random available endpoints, or -1 if none is."""
        k = self._navail
        if k < 2:
            return self._avail[0] if k else -1
        a, b = self._two()
        return b if self._cost(b, now_ns) < self._cost(a, now_ns) else a

    def start(self, i: int) -> None:
        """A request was sent to endpoint ``i``."""
        self._check_index(i)
        self._outstanding[i] += 1

    def finish(self, i: int, rtt_ns: int, now_ns: int) -> None:
        """A request to endpoint ``i`` completed after ``rtt_ns``, at ``now_ns``."""
        self._check_index(i)
        if rtt_ns < 0:
            raise ValueError(f"rtt_ns must be >= 0, got {rtt_ns}")
        if self._outstanding[i] == 0:
            raise ValueError(f"finish({i}) without a matching start({i})")
        self._outstanding[i] -= 1
        rtt = float(rtt_ns)
        est = self._estimate[i]
        if not self._sampled[i] or rtt > est:
            self._estimate[i] = rtt
            self._sampled[i] = True
        else:
            elapsed = now_ns - self._stamp[i]
            # A clock that went backwards counts as no time at all.
            w = math.exp(-elapsed / self._decay_ns) if elapsed > 0 else 1.0
            self._estimate[i] = est * w + rtt * (1.0 - w)
        self._stamp[i] = now_ns

    def outstanding(self, i: int) -> int:
        """Requests in flight to endpoint ``i``."""
        self._check_index(i)
        return self._outstanding[i]

    def rtt_estimate(self, i: int, now_ns: int) -> float:
        """Endpoint ``i``'s RTT estimate in ns as a pick at ``now_ns`` sees it."""
        self._check_index(i)
        return self._rtt(i, now_ns)

    def cost(self, i: int, now_ns: int) -> float:
        """Endpoint ``i``'s cost as a pick at ``now_ns`` sees it."""
        self._check_index(i)
        return self._cost(i, now_ns)


def _check_weights(weights: Sequence[int], what: str) -> list[int]:
    ws = list(weights)
    for i, w in enumerate(ws):
        if not isinstance(w, int) or isinstance(w, bool):
            raise ValueError(f"{what} weight {i} must be an int, got {w!r}")
        if w < 0:
            raise ValueError(f"{what} weight {i} is negative ({w})")
        if w > 0xFFFFFFFF:
            raise ValueError(f"{what} weight {i} exceeds 2**32-1 ({w})")
    return ws


class RingHash(_Pool):
    """Consistent hashing of a bytes key onto a ring of points.

    The heaviest endpoint gets ``ring_size`` points, the others
    proportionally fewer (at least one if their weight is not 0). Points
    depend only on (endpoint, replica), so adding an endpoint (of weight at
    most the heaviest's) moves only the keys the new endpoint takes: about
    1/(n+1) of them, and none between existing endpoints. A key whose
    endpoint is unavailable goes to the next available endpoint clockwise.
    """

    __slots__ = ("_counts", "_hashes", "_owners")

    def __init__(self, n: int, weights: Sequence[int] | None = None, ring_size: int = 1024) -> None:
        super().__init__(n, 0)
        if weights is None:
            ws = [1] * n
        else:
            ws = _check_weights(weights, "ring")
            if len(ws) != n:
                raise ValueError(f"got {len(ws)} weights for {n} endpoints")
        if not 1 <= ring_size <= _MAX_RING_POINTS:
            raise ValueError(f"ring_size must be between 1 and {_MAX_RING_POINTS}, got {ring_size}")
        wmax = max(ws)
        if wmax == 0:
            raise ValueError("all ring weights are 0")
        counts = [0 if w == 0 else max(1, (ring_size * w + wmax // 2) // wmax) for w in ws]
        if sum(counts) > _MAX_RING_POINTS:
            raise ValueError(f"ring of {sum(counts)} points exceeds {_MAX_RING_POINTS}")
        points = sorted((_point_hash(i, r), i) for i in range(n) for r in range(counts[i]))
        self._hashes = [h for h, _ in points]
        self._owners = [i for _, i in points]
        self._counts = counts
        # An endpoint of weight 0 has no point: it is down for good, so that
        # the "none available" check stays one comparison.
        for i in range(n):
            if counts[i] == 0:
                _Pool.set_available(self, i, False)

    @property
    def points(self) -> int:
        """How many points the ring has."""
        return len(self._hashes)

    def set_available(self, i: int, available: bool) -> None:
        """Mark endpoint ``i`` up or down; an endpoint of weight 0 stays down."""
        self._check_index(i)
        if available and self._counts[i] == 0:
            return
        super().set_available(i, available)

    def pick(self, key: bytes) -> int:
        """The endpoint owning ``key``'s place on the ring, or -1 if none is available."""
        h = hash_key(key)
        if self._navail == 0:
            return -1
        hashes, owners, pos, navail = self._hashes, self._owners, self._pos, self._navail
        m = len(hashes)
        p = bisect_left(hashes, h)
        if p == m:
            p = 0
        while pos[owners[p]] >= navail:
            p = p + 1 if p + 1 < m else 0
        return owners[p]


class WeightedSplit(_Pool):
    """Smooth weighted round robin (nginx's), for splits such as 80/20.

    Each pick adds every available endpoint's weight to its running credit,
    picks the endpoint with the most credit (the lowest index on a tie) and
    takes the total weight off it. Over every ``sum(weights)`` picks each
    endpoint gets exactly its weight, interleaved as evenly as possible.
    Weight 0 is never picked.
    """

    __slots__ = ("_credit", "_weights")

    def __init__(self, weights: Sequence[int]) -> None:
        ws = _check_weights(weights, "split")
        if not ws:
            raise ValueError("a split needs at least one weight")
        if not any(ws):
            raise ValueError("all split weights are 0")
        super().__init__(len(ws), 0)
        self._weights = ws
        self._credit = [0] * len(ws)

    def pick(self) -> int:
        """The next endpoint of the split, or -1 if no weighted endpoint is available."""
        total = 0
        best = -1
        best_credit = 0
        credit, weights, pos, navail = self._credit, self._weights, self._pos, self._navail
        for i in range(self._n):
            w = weights[i]
            if w == 0 or pos[i] >= navail:
                continue
            c = credit[i] + w
            credit[i] = c
            total += w
            if best < 0 or c > best_credit:
                best, best_credit = i, c
        if best >= 0:
            credit[best] -= total
        return best
