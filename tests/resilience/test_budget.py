"""The retry budget on both twins: the selector, exact counts at the window's edges, errors, and twin parity."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.resilience import budget_py
from tests.twins import IO_MODULES, probe

pytestmark = pytest.mark.resilience

MS = 1_000_000
SEC = 1_000_000_000
TOKENS = 1000  # per retry, as documented
INT64_MAX = 2**63 - 1


def spend(b, now_ns: int) -> int:
    """Withdraw at ``now_ns`` until refused; how many were allowed."""
    n = 0
    while b.withdraw(now_ns):
        n += 1
    return n


# --- the twins and the selector ----------------------------------------------


def test_both_twins_export_the_same_names(twin):
    assert sorted(twin.budget.__all__) == sorted(budget_py.__all__)
    for name in twin.budget.__all__:
        assert hasattr(twin.budget, name), f"{twin.budget.__name__} lacks {name}"
    assert (twin.budget.SLOTS, twin.budget.TOKENS_PER_RETRY) == (10, TOKENS)


def test_selector_honours_no_extensions():
    got = probe("meshproxy.resilience", ("budget",), no_extensions=True)
    assert (got["budget"], got["ext"]) == ("meshproxy.resilience.budget_py", False)


def test_selector_prefers_the_compiled_twin():
    if os.environ.get("MESHPROXY_NO_EXTENSIONS"):
        pytest.skip("MESHPROXY_NO_EXTENSIONS is set: compiled twin not under test")
    got = probe("meshproxy.resilience", ("budget",), no_extensions=False)
    assert (got["budget"], got["ext"]) == ("meshproxy._fast.budget", True)


@pytest.mark.parametrize("no_ext", ["", "1"])
def test_budget_is_sans_io(no_ext):
    loaded = set(probe("meshproxy.resilience", ("budget",), no_extensions=bool(no_ext))["modules"])
    assert not loaded & IO_MODULES


def test_budget_imports_no_clock():
    # The interpreter imports ``time`` itself, so check the sources: time
    # comes only from the callers' now_ns.
    import meshproxy._fast

    tree = ast.parse(Path(budget_py.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported == {"__future__", "math", "operator"}
    pyx = Path(meshproxy._fast.__file__).with_name("budget.pyx").read_text()
    imported = set(re.findall(r"^(?:from|c?import) ([\w.]+)", pyx, re.MULTILINE))
    assert imported == {"cython", "libc.stdint", "meshproxy.resilience.budget_py"}


def test_stub_declares_every_public_name():
    import meshproxy._fast

    stub = Path(meshproxy._fast.__file__).with_name("budget.pyi")
    tree = ast.parse(stub.read_text())
    declared = {n.name for n in tree.body if isinstance(n, ast.ClassDef | ast.FunctionDef)}
    declared |= {n.target.id for n in tree.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    exported = set(budget_py.__all__)
    assert exported <= declared, f"budget.pyi lacks {sorted(exported - declared)}"


# --- exact counts ------------------------------------------------------------


def test_defaults_are_linkerds(twin):
    b = twin.budget.RetryBudget()
    assert (b.ttl_ns, b.min_per_second, b.retry_ratio) == (10 * SEC, 10, 0.2)
    assert (b.deposits, b.withdrawals, b.denied) == (0, 0, 0)


def test_a_thousand_requests_allow_a_fifth_of_them_plus_the_reserve(twin):
    # 0.2 x 1000 requests + 10/s x 10 s = 200 + 100: 300 retries, the 301st refused.
    b = twin.budget.RetryBudget(now_ns=0)
    for k in range(1000):
        b.deposit(k * MS)
    assert b.balance(SEC - 1) == 300 * TOKENS
    assert spend(b, SEC - 1) == 300
    assert (b.deposits, b.withdrawals, b.denied) == (1000, 300, 1)
    assert b.balance(SEC - 1) == 0
    assert not b.withdraw(SEC)
    assert b.denied == 2


def test_without_requests_only_the_reserve(twin):
    b = twin.budget.RetryBudget(now_ns=5 * SEC)
    assert b.balance(5 * SEC) == 100 * TOKENS
    assert b.withdraw(5 * SEC) is True
    assert b.deposit(5 * SEC) is None
    b = twin.budget.RetryBudget(now_ns=5 * SEC)
    assert spend(b, 5 * SEC) == 100
    assert (b.withdrawals, b.denied) == (100, 1)


def test_no_reserve_and_no_requests_allows_nothing(twin):
    b = twin.budget.RetryBudget(ttl_ns=SEC, min_per_second=0, retry_ratio=1.0)
    assert b.withdraw(0) is False
    assert (b.withdrawals, b.denied, b.balance(0)) == (0, 1, 0)


def test_ratio_zero_spends_only_the_reserve(twin):
    b = twin.budget.RetryBudget(min_per_second=3, retry_ratio=0.0)
    for k in range(1000):
        b.deposit(k)
    assert b.balance(1000) == 30 * TOKENS
    assert spend(b, 1000) == 30
    assert b.deposits == 1000


@pytest.mark.parametrize(
    ("ratio", "requests", "retries"),
    [
        (2.5, 10, 25),  # above 1: several retries per request
        (1000.0, 1, 1000),  # the upper bound
        (0.3, 1000, 300),  # three decimals are exact (tower's 1/floor(1/r) gives 333)
        (0.7, 10, 7),  # tower's gives 10
        (0.001, 1000, 1),
        (0.001, 999, 0),  # 999 thousandths: not yet a whole retry
        (0.0004, 10_000, 0),  # rounds to 0 tokens per request: reserve only
        (1 / 3, 3, 0),  # 333 tokens per request: 999 < 1000
        (1 / 3, 4, 1),
    ],
)
def test_ratio_is_applied_to_three_decimals(twin, ratio, requests, retries):
    b = twin.budget.RetryBudget(min_per_second=0, retry_ratio=ratio)
    for _ in range(requests):
        b.deposit(0)
    assert b.balance(0) == requests * round(ratio * TOKENS)
    assert spend(b, 0) == retries


def test_reserve_counts_a_fractional_ttl(twin):
    # 10/s over 1.5 s: 15 retries (tower truncates the ttl to whole seconds: 10).
    b = twin.budget.RetryBudget(ttl_ns=1500 * MS, min_per_second=10, retry_ratio=0.0)
    assert spend(b, 0) == 15


def test_requests_stop_counting_when_ttl_passes_without_traffic(twin):
    b = twin.budget.RetryBudget(now_ns=0)
    for k in range(1000):
        b.deposit(k * MS)  # slot 0
    assert spend(b, 9500 * MS) == 300  # slot 9
    # At 10 s the requests are gone but the 300 retries they paid for still
    # count: the reserve (100) less 300 retries.
    assert b.balance(10 * SEC - 1) == 0
    assert b.balance(10 * SEC) == -200 * TOKENS
    assert not b.withdraw(10 * SEC)
    # At 19 s the retries are gone too: the whole reserve is back.
    assert b.balance(19 * SEC - 1) == -200 * TOKENS
    assert b.balance(19 * SEC) == 100 * TOKENS
    assert spend(b, 19 * SEC) == 100


def test_a_long_silence_empties_the_window(twin):
    b = twin.budget.RetryBudget(min_per_second=0, retry_ratio=1.0, now_ns=0)
    for _ in range(50):
        b.deposit(0)
    assert b.withdraw(SEC)
    assert b.balance(3600 * SEC) == 0
    assert not b.withdraw(3600 * SEC)
    b.deposit(3600 * SEC)
    assert b.withdraw(3600 * SEC)


def test_window_slides_one_slot_at_a_time(twin):
    # ttl 10 s: ten slots of 1 s from the origin (7 s). Ten requests in each
    # of slots 0..9; from 17 s on, each new slot forgets the oldest.
    origin = 7 * SEC
    b = twin.budget.RetryBudget(ttl_ns=10 * SEC, min_per_second=0, retry_ratio=1.0, now_ns=origin)
    for slot in range(10):
        for _ in range(10):
            b.deposit(origin + slot * SEC + 500 * MS)
    assert b.balance(origin + 10 * SEC - 1) == 100 * TOKENS
    for gone in range(1, 11):
        edge = origin + (9 + gone) * SEC
        assert b.balance(edge - 1) == (100 - 10 * (gone - 1)) * TOKENS, gone
        assert b.balance(edge) == (100 - 10 * gone) * TOKENS, gone


def test_a_request_counts_between_nine_and_ten_tenths_of_ttl(twin):
    b = twin.budget.RetryBudget(ttl_ns=SEC, min_per_second=0, retry_ratio=1.0)
    b.deposit(99 * MS)  # end of slot 0: counts 0.901 s
    b.deposit(100 * MS)  # start of slot 1: counts 1 s
    assert b.balance(999 * MS) == 2 * TOKENS
    assert b.balance(1000 * MS) == 1 * TOKENS
    assert b.balance(1099 * MS) == 1 * TOKENS
    assert b.balance(1100 * MS) == 0


def test_retries_age_out_and_give_the_reserve_back(twin):
    b = twin.budget.RetryBudget(ttl_ns=SEC, min_per_second=10, retry_ratio=0.0)
    assert spend(b, 0) == 10
    assert not b.withdraw(999 * MS)
    assert spend(b, SEC) == 10
    assert b.denied == 3


def test_slots_as_towers_own_test(twin):
    # tower's tps_slots, at 1 s ttl and ratio 0.5 (two requests per retry).
    b = twin.budget.RetryBudget(ttl_ns=SEC, min_per_second=0, retry_ratio=0.5)
    b.deposit(0)
    b.deposit(0)
    assert b.withdraw(901 * MS)
    t = 2902 * MS  # a blank slate
    assert b.balance(t) == 0
    b.deposit(t)
    b.deposit(t + 301 * MS)
    b.deposit(t + 1102 * MS)  # the first of the three is gone, the second still counts
    assert b.withdraw(t + 1102 * MS)
    assert not b.withdraw(t + 1102 * MS)


def test_time_going_backwards_counts_as_the_latest_slot(twin):
    b = twin.budget.RetryBudget(ttl_ns=SEC, min_per_second=0, retry_ratio=1.0, now_ns=5 * SEC)
    b.deposit(12 * SEC)
    b.deposit(3 * SEC)  # earlier than anything seen: lands in the 12 s slot
    b.deposit(-1)
    assert b.balance(0) == 3 * TOKENS
    assert b.withdraw(11 * SEC)
    assert b.balance(12 * SEC + 999 * MS) == 2 * TOKENS
    assert b.balance(13 * SEC) == 0  # all of it aged with the 12 s slot
    assert (b.deposits, b.withdrawals, b.denied) == (3, 1, 0)


def test_the_end_of_time_does_not_overflow(twin):
    b = twin.budget.RetryBudget(min_per_second=0, retry_ratio=1.0, now_ns=INT64_MAX - SEC)
    b.deposit(INT64_MAX - SEC)
    b.deposit(INT64_MAX)
    assert b.balance(INT64_MAX) == 2 * TOKENS
    assert b.withdraw(INT64_MAX) and b.withdraw(INT64_MAX)
    assert not b.withdraw(INT64_MAX)


def test_counters_and_settings_are_read_only(twin):
    b = twin.budget.RetryBudget()
    for name in ("deposits", "withdrawals", "denied", "ttl_ns", "min_per_second", "retry_ratio"):
        with pytest.raises(AttributeError):
            setattr(b, name, 1)


# --- argument checks ---------------------------------------------------------

BAD = [
    ({"ttl_ns": SEC - 1}, ValueError, "ttl_ns must be between 1 s and 60 s"),
    ({"ttl_ns": 60 * SEC + 1}, ValueError, "ttl_ns must be between 1 s and 60 s"),
    ({"ttl_ns": 1.5e9}, TypeError, ""),
    ({"min_per_second": -1}, ValueError, "min_per_second must be between 0 and 2147483647, got -1"),
    ({"min_per_second": 2**31}, ValueError, "min_per_second must be between 0 and 2147483647"),
    ({"retry_ratio": -0.1}, ValueError, "retry_ratio must be between 0 and 1000, got -0.1"),
    ({"retry_ratio": 1000.5}, ValueError, "retry_ratio must be between 0 and 1000"),
    ({"retry_ratio": float("nan")}, ValueError, "retry_ratio must be between 0 and 1000, got nan"),
    ({"now_ns": -1}, ValueError, "now_ns must be between 0 and"),
    ({"now_ns": 2**63}, ValueError, "now_ns must be between 0 and"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD)
def test_bad_arguments_are_refused_alike(twin, kwargs, error, message):
    with pytest.raises(error) as got:
        twin.budget.RetryBudget(**kwargs)
    assert message in str(got.value)
    with pytest.raises(error) as pure:
        budget_py.RetryBudget(**kwargs)
    assert str(got.value) == str(pure.value)


@pytest.mark.parametrize(
    "kwargs", [{"ttl_ns": SEC}, {"ttl_ns": 60 * SEC}, {"retry_ratio": 1000}, {"now_ns": INT64_MAX}]
)
def test_bounds_are_inclusive(twin, kwargs):
    twin.budget.RetryBudget(**kwargs)


# --- the twins count alike, and as a naive model says ----------------------
#
# The model keeps every request and retry with its slot and sums those of the
# last ten slots: the documented arithmetic, written the slow, obvious way.


class Model:
    def __init__(self, ttl_ns: int, min_per_second: int, ratio: float, origin: int) -> None:
        self.slot_ns = ttl_ns // 10
        self.origin = origin
        self.reserve = min_per_second * ttl_ns * TOKENS // SEC
        self.earn = round(ratio * TOKENS)
        self.events: list[tuple[int, int]] = []
        self.slot = 0

    def _at(self, now_ns: int) -> int:
        if now_ns > self.origin:
            self.slot = max(self.slot, (now_ns - self.origin) // self.slot_ns)
        return self.slot

    def balance(self, now_ns: int) -> int:
        slot = self._at(now_ns)
        return self.reserve + sum(t for s, t in self.events if s > slot - 10)

    def deposit(self, now_ns: int) -> None:
        self.events.append((self._at(now_ns), self.earn))

    def withdraw(self, now_ns: int) -> bool:
        if self.balance(now_ns) < TOKENS:
            return False
        self.events.append((self.slot, -TOKENS))
        return True


steps = st.lists(
    st.one_of(
        st.tuples(st.just("wait"), st.integers(0, 3 * SEC)),
        # Just before, at and just after a slot edge of the 1 s ttl.
        st.tuples(st.just("wait"), st.sampled_from([100 * MS - 1, 100 * MS, 100 * MS + 1, SEC])),
        st.tuples(st.just("back"), st.integers(1, 5 * SEC)),
        st.tuples(st.just("deposit"), st.integers(1, 40)),
        st.tuples(st.just("withdraw"), st.integers(1, 40)),
        st.tuples(st.just("balance"), st.just(0)),
    ),
    max_size=80,
)


def replay(b, ops: list[tuple[str, int]], origin: int) -> list:
    out: list = []
    now = origin
    for op, arg in ops:
        if op == "wait":
            now += arg
        elif op == "back":
            now -= arg
        elif op == "deposit":
            for _ in range(arg):
                b.deposit(now)
        elif op == "withdraw":
            out.append([b.withdraw(now) for _ in range(arg)])
        out.append(b.balance(now))
    if not isinstance(b, Model):
        out.append((b.deposits, b.withdrawals, b.denied))
    return out


@settings(max_examples=200, deadline=None)
@given(
    ttl_ns=st.one_of(st.sampled_from([SEC, 1500 * MS, 10 * SEC, 60 * SEC]), st.integers(SEC, 60 * SEC)),
    min_per_second=st.integers(0, 20),
    ratio=st.one_of(st.sampled_from([0.0, 0.001, 0.2, 1 / 3, 1.0, 2.5, 1000.0]), st.floats(0, 1000)),
    origin=st.integers(0, 10**12),
    ops=steps,
)
def test_twins_and_the_model_agree(twin, ttl_ns, min_per_second, ratio, origin, ops):
    pure = replay(budget_py.RetryBudget(ttl_ns, min_per_second, ratio, origin), ops, origin)
    assert replay(twin.budget.RetryBudget(ttl_ns, min_per_second, ratio, origin), ops, origin) == pure
    assert replay(Model(ttl_ns, min_per_second, ratio, origin), ops, origin) == pure[:-1]
