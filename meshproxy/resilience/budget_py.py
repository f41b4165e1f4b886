"""Linkerd's retry budget, pure-Python twin of ``meshproxy/_fast/budget.pyx``.

Owns one decision: may this retry go out? Retries are capped at
``retry_ratio`` times the original requests seen over a sliding ``ttl``,
plus a reserve of ``min_per_second x ttl`` so that a quiet client can still
retry. This is tower's ``TpsBudget``, the budget linkerd2-proxy uses, made
sans-IO and exact:

- Integer tokens. A retry costs ``TOKENS_PER_RETRY`` (1000) tokens; an
  original request earns ``round(retry_ratio * 1000)`` tokens (Python's
  ``round``, computed once by this module for both twins); the reserve
  is ``min_per_second * ttl_ns // 1_000_000`` tokens (``min_per_second x
  ttl`` retries, to the thousandth; tower truncates ttl to whole seconds). ``withdraw`` succeeds, and spends
  1000 tokens, when the balance is at least 1000. So after ``D`` requests
  and from a fresh window, exactly ``(reserve_tokens + D *
  deposit_tokens) // 1000`` retries are allowed. Tower weighs deposits and
  withdrawals the same way for ratios above 1 (1000 and ``1000 / r``) but
  for ``r <= 1`` costs a retry ``floor(1 / r)`` deposits, which turns 0.3
  into 1/3 and 0.7 into 1; one scale for every ratio keeps the configured
  ratio to three decimals (0.2, Linkerd's default, is exact in both).
  A ratio of 0 earns nothing: only the reserve is ever spent.
- A ring of ``SLOTS`` (10) slots of ``ttl_ns // 10``, as tower, aligned on
  the ``now_ns`` given at construction. Slot ``k`` holds the tokens deposited
  minus those withdrawn during it; the balance is the reserve plus the
  current slot and the nine before it. When slot ``k + 10`` starts, slot
  ``k`` is forgotten, so a request or retry counts for between 0.9 and 1.0
  ``ttl`` and never longer (tower keeps the oldest slot until the current
  one is committed, up to 1.1 ``ttl``). Withdrawals age out too, which is
  what gives the reserve back.
- No clock: callers pass ``now_ns``, an int64 count of nanoseconds from
  any monotonic clock (the compiled twin refuses wider ints with
  ``OverflowError``). A ``now_ns`` earlier than one already seen counts as
  the latest slot: time never runs backwards here, and nothing raises.

The balance can go below zero (requests age out before the retries they
paid for); ``withdraw`` then says no until enough ages out or arrives.
Bad arguments raise ``ValueError`` (``TypeError`` for non-integers where
integers are due) with a one-line reason, from the constructor only.
"""

from __future__ import annotations

import math
import operator

__all__ = ["SLOTS", "TOKENS_PER_RETRY", "RetryBudget"]

#: What one retry costs, in tokens; a request earns ``round(ratio * this)``.
TOKENS_PER_RETRY = 1000
#: Slots in the sliding window, as tower.
SLOTS = 10

_SECOND_NS = 1_000_000_000
_MIN_TTL_NS = 1 * _SECOND_NS
_MAX_TTL_NS = 60 * _SECOND_NS
# Tower's bound (min_per_sec < i32::MAX); with the 60 s ttl and 1000 tokens
# per retry the reserve stays below 2**48, far from int64 in the C twin.
_MAX_MIN_PER_SECOND = 2**31 - 1
_MAX_RATIO = 1000
_MAX_NOW_NS = 2**63 - 1


def _settings(
    ttl_ns: int, min_per_second: int, retry_ratio: float, now_ns: int
) -> tuple[int, int, float, int, int, int]:
    """Check the constructor's arguments, shared by both twins so they refuse and round alike.

    Returns ``(ttl_ns, min_per_second, retry_ratio, now_ns, deposit_tokens, reserve_tokens)``.
    """
    ttl_ns = operator.index(ttl_ns)
    min_per_second = operator.index(min_per_second)
    now_ns = operator.index(now_ns)
    retry_ratio = float(retry_ratio)
    if not _MIN_TTL_NS <= ttl_ns <= _MAX_TTL_NS:
        raise ValueError(f"ttl_ns must be between 1 s and 60 s ({_MIN_TTL_NS}..{_MAX_TTL_NS} ns), got {ttl_ns}")
    if not 0 <= min_per_second <= _MAX_MIN_PER_SECOND:
        raise ValueError(f"min_per_second must be between 0 and {_MAX_MIN_PER_SECOND}, got {min_per_second}")
    if math.isnan(retry_ratio) or not 0 <= retry_ratio <= _MAX_RATIO:
        raise ValueError(f"retry_ratio must be between 0 and {_MAX_RATIO}, got {retry_ratio}")
    if not 0 <= now_ns <= _MAX_NOW_NS:
        raise ValueError(f"now_ns must be between 0 and {_MAX_NOW_NS}, got {now_ns}")
    deposit_tokens = round(retry_ratio * TOKENS_PER_RETRY)
    reserve_tokens = min_per_second * ttl_ns * TOKENS_PER_RETRY // _SECOND_NS
    return ttl_ns, min_per_second, retry_ratio, now_ns, deposit_tokens, reserve_tokens


class RetryBudget:
    """Retries allowed: ``retry_ratio`` per request over the last ``ttl_ns``, plus ``min_per_second`` x ttl."""

    __slots__ = (
        "_denied",
        "_deposit_tokens",
        "_deposits",
        "_min_per_second",
        "_origin_ns",
        "_reserve_tokens",
        "_retry_ratio",
        "_ring",
        "_slot",
        "_slot_end_ns",
        "_slot_ns",
        "_sum",
        "_ttl_ns",
        "_withdrawals",
    )

    def __init__(
        self, ttl_ns: int = 10_000_000_000, min_per_second: int = 10, retry_ratio: float = 0.2, now_ns: int = 0
    ) -> None:
        (
            self._ttl_ns,
            self._min_per_second,
            self._retry_ratio,
            self._origin_ns,
            self._deposit_tokens,
            self._reserve_tokens,
        ) = _settings(ttl_ns, min_per_second, retry_ratio, now_ns)
        self._slot_ns = self._ttl_ns // SLOTS
        self._slot = 0  # slots since the origin; the ring index is this mod SLOTS
        self._slot_end_ns = self._origin_ns + self._slot_ns
        self._ring = [0] * SLOTS
        self._sum = 0  # of the ring, kept up to date so the balance is O(1)
        self._deposits = 0
        self._withdrawals = 0
        self._denied = 0

    def _advance(self, now_ns: int) -> None:
        # Only called once now_ns has reached the current slot's end, so
        # now_ns > origin and the new slot is strictly later.
        slot = (now_ns - self._origin_ns) // self._slot_ns
        ring = self._ring
        for k in range(self._slot + 1, self._slot + 1 + min(slot - self._slot, SLOTS)):
            self._sum -= ring[k % SLOTS]
            ring[k % SLOTS] = 0
        self._slot = slot
        self._slot_end_ns = self._origin_ns + (slot + 1) * self._slot_ns

    def deposit(self, now_ns: int) -> None:
        """An original request (not a retry) was sent at ``now_ns``: it earns ``retry_ratio`` retries for ttl."""
        if now_ns >= self._slot_end_ns:
            self._advance(now_ns)
        self._ring[self._slot % SLOTS] += self._deposit_tokens
        self._sum += self._deposit_tokens
        self._deposits += 1

    def withdraw(self, now_ns: int) -> bool:
        """May a retry go out at ``now_ns``? If so (True) it is counted against the budget; if not, as denied."""
        if now_ns >= self._slot_end_ns:
            self._advance(now_ns)
        if self._reserve_tokens + self._sum < TOKENS_PER_RETRY:
            self._denied += 1
            return False
        self._ring[self._slot % SLOTS] -= TOKENS_PER_RETRY
        self._sum -= TOKENS_PER_RETRY
        self._withdrawals += 1
        return True

    def balance(self, now_ns: int) -> int:
        """Tokens left at ``now_ns``, maybe negative: ``balance // TOKENS_PER_RETRY`` more retries are allowed."""
        if now_ns >= self._slot_end_ns:
            self._advance(now_ns)
        return self._reserve_tokens + self._sum

    @property
    def ttl_ns(self) -> int:
        """How long a request or retry counts, in ns."""
        return self._ttl_ns

    @property
    def min_per_second(self) -> int:
        """Retries per second of ttl always allowed (the reserve), even without requests."""
        return self._min_per_second

    @property
    def retry_ratio(self) -> float:
        """Retries each request earns (as configured; applied to three decimals)."""
        return self._retry_ratio

    @property
    def deposits(self) -> int:
        """Requests deposited, lifetime total."""
        return self._deposits

    @property
    def withdrawals(self) -> int:
        """Retries allowed, lifetime total."""
        return self._withdrawals

    @property
    def denied(self) -> int:
        """Retries refused, lifetime total."""
        return self._denied
