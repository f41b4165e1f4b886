"""Type stubs for the compiled outlier detector (same API as meshproxy.resilience.outlier_py)."""

from collections.abc import Sequence

SUCCESS: int
ERROR_5XX: int
GATEWAY_ERROR: int
LOCAL_ORIGIN_FAILURE: int

class OutlierDetector:
    def __init__(
        self,
        n: int,
        *,
        consecutive_5xx: int = 5,
        consecutive_gateway_errors: int = 0,
        consecutive_local_origin_failures: int = 5,
        split_external_local_origin_errors: bool = False,
        base_ejection_time_ns: int = 30_000_000_000,
        max_ejection_time_ns: int = 300_000_000_000,
        max_ejection_percent: int = 10,
        always_eject_one_host: bool = False,
        interval_ns: int = 10_000_000_000,
    ) -> None: ...
    def __len__(self) -> int: ...
    def record(self, i: int, outcome: int, now_ns: int) -> bool: ...
    def sweep(self, now_ns: int) -> list[int]: ...
    def is_ejected(self, i: int) -> bool: ...
    def ejected(self) -> int: ...
    def times_ejected(self, i: int) -> int: ...
    @property
    def ejections_total(self) -> int: ...
    @property
    def ejections_overflow(self) -> int: ...
    def resize(self, mapping: Sequence[int]) -> None: ...
