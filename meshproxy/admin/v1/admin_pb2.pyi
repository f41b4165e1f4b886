# ruff: noqa
# fmt: off
import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from meshproxy.config.v1 import config_pb2 as _config_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ConfigDumpRequest(_message.Message):
    __slots__ = ("types",)
    TYPES_FIELD_NUMBER: _ClassVar[int]
    types: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, types: _Optional[_Iterable[str]] = ...) -> None: ...

class ResourceStatus(_message.Message):
    __slots__ = ("type", "name", "version", "last_updated")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_UPDATED_FIELD_NUMBER: _ClassVar[int]
    type: str
    name: str
    version: str
    last_updated: _timestamp_pb2.Timestamp
    def __init__(self, type: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., last_updated: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RejectedConfig(_message.Message):
    __slots__ = ("version", "reason", "time")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    version: str
    reason: str
    time: _timestamp_pb2.Timestamp
    def __init__(self, version: _Optional[str] = ..., reason: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ConfigDump(_message.Message):
    __slots__ = ("version", "node", "config", "resources", "last_rejected", "accepted_total", "rejected_total", "last_updated", "source")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    LAST_REJECTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REJECTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LAST_UPDATED_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    version: str
    node: _config_pb2.Node
    config: _config_pb2.SidecarConfig
    resources: _containers.RepeatedCompositeFieldContainer[ResourceStatus]
    last_rejected: RejectedConfig
    accepted_total: int
    rejected_total: int
    last_updated: _timestamp_pb2.Timestamp
    source: str
    def __init__(self, version: _Optional[str] = ..., node: _Optional[_Union[_config_pb2.Node, _Mapping]] = ..., config: _Optional[_Union[_config_pb2.SidecarConfig, _Mapping]] = ..., resources: _Optional[_Iterable[_Union[ResourceStatus, _Mapping]]] = ..., last_rejected: _Optional[_Union[RejectedConfig, _Mapping]] = ..., accepted_total: _Optional[int] = ..., rejected_total: _Optional[int] = ..., last_updated: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., source: _Optional[str] = ...) -> None: ...

class ClustersRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class EndpointStatus(_message.Message):
    __slots__ = ("address", "weight", "labels", "subsets", "health", "ejected_until", "ejections", "active_requests", "ewma_ms", "connections", "worker")
    class Health(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        HEALTHY: _ClassVar[EndpointStatus.Health]
        UNHEALTHY: _ClassVar[EndpointStatus.Health]
        EJECTED: _ClassVar[EndpointStatus.Health]
    HEALTHY: EndpointStatus.Health
    UNHEALTHY: EndpointStatus.Health
    EJECTED: EndpointStatus.Health
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SUBSETS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    EJECTED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    EJECTIONS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    EWMA_MS_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    address: str
    weight: int
    labels: _containers.ScalarMap[str, str]
    subsets: _containers.RepeatedScalarFieldContainer[str]
    health: EndpointStatus.Health
    ejected_until: _timestamp_pb2.Timestamp
    ejections: int
    active_requests: int
    ewma_ms: float
    connections: int
    worker: int
    def __init__(self, address: _Optional[str] = ..., weight: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., subsets: _Optional[_Iterable[str]] = ..., health: _Optional[_Union[EndpointStatus.Health, str]] = ..., ejected_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ejections: _Optional[int] = ..., active_requests: _Optional[int] = ..., ewma_ms: _Optional[float] = ..., connections: _Optional[int] = ..., worker: _Optional[int] = ...) -> None: ...

class ClusterStatus(_message.Message):
    __slots__ = ("name", "lb_policy", "endpoints", "active_requests", "pending_requests", "active_retries", "active_connections", "retries_total", "retries_budget_denied_total", "retries_overflow_total", "overflow_total", "ejections_total", "circuit_breakers", "worker")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LB_POLICY_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PENDING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_RETRIES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    RETRIES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    RETRIES_BUDGET_DENIED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    RETRIES_OVERFLOW_TOTAL_FIELD_NUMBER: _ClassVar[int]
    OVERFLOW_TOTAL_FIELD_NUMBER: _ClassVar[int]
    EJECTIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CIRCUIT_BREAKERS_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    name: str
    lb_policy: str
    endpoints: _containers.RepeatedCompositeFieldContainer[EndpointStatus]
    active_requests: int
    pending_requests: int
    active_retries: int
    active_connections: int
    retries_total: int
    retries_budget_denied_total: int
    retries_overflow_total: int
    overflow_total: int
    ejections_total: int
    circuit_breakers: _config_pb2.CircuitBreakers
    worker: int
    def __init__(self, name: _Optional[str] = ..., lb_policy: _Optional[str] = ..., endpoints: _Optional[_Iterable[_Union[EndpointStatus, _Mapping]]] = ..., active_requests: _Optional[int] = ..., pending_requests: _Optional[int] = ..., active_retries: _Optional[int] = ..., active_connections: _Optional[int] = ..., retries_total: _Optional[int] = ..., retries_budget_denied_total: _Optional[int] = ..., retries_overflow_total: _Optional[int] = ..., overflow_total: _Optional[int] = ..., ejections_total: _Optional[int] = ..., circuit_breakers: _Optional[_Union[_config_pb2.CircuitBreakers, _Mapping]] = ..., worker: _Optional[int] = ...) -> None: ...

class ClustersResponse(_message.Message):
    __slots__ = ("clusters",)
    CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    clusters: _containers.RepeatedCompositeFieldContainer[ClusterStatus]
    def __init__(self, clusters: _Optional[_Iterable[_Union[ClusterStatus, _Mapping]]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("prefixes", "local_only")
    PREFIXES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    prefixes: _containers.RepeatedScalarFieldContainer[str]
    local_only: bool
    def __init__(self, prefixes: _Optional[_Iterable[str]] = ..., local_only: _Optional[bool] = ...) -> None: ...

class Histogram(_message.Message):
    __slots__ = ("count", "sum", "bounds", "cumulative_counts")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    BOUNDS_FIELD_NUMBER: _ClassVar[int]
    CUMULATIVE_COUNTS_FIELD_NUMBER: _ClassVar[int]
    count: int
    sum: float
    bounds: _containers.RepeatedScalarFieldContainer[float]
    cumulative_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, count: _Optional[int] = ..., sum: _Optional[float] = ..., bounds: _Optional[_Iterable[float]] = ..., cumulative_counts: _Optional[_Iterable[int]] = ...) -> None: ...

class Metric(_message.Message):
    __slots__ = ("labels", "value", "histogram")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.ScalarMap[str, str]
    value: float
    histogram: Histogram
    def __init__(self, labels: _Optional[_Mapping[str, str]] = ..., value: _Optional[float] = ..., histogram: _Optional[_Union[Histogram, _Mapping]] = ...) -> None: ...

class MetricFamily(_message.Message):
    __slots__ = ("name", "help", "type", "metrics")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        COUNTER: _ClassVar[MetricFamily.Type]
        GAUGE: _ClassVar[MetricFamily.Type]
        HISTOGRAM: _ClassVar[MetricFamily.Type]
    COUNTER: MetricFamily.Type
    GAUGE: MetricFamily.Type
    HISTOGRAM: MetricFamily.Type
    NAME_FIELD_NUMBER: _ClassVar[int]
    HELP_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    name: str
    help: str
    type: MetricFamily.Type
    metrics: _containers.RepeatedCompositeFieldContainer[Metric]
    def __init__(self, name: _Optional[str] = ..., help: _Optional[str] = ..., type: _Optional[_Union[MetricFamily.Type, str]] = ..., metrics: _Optional[_Iterable[_Union[Metric, _Mapping]]] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("families", "workers")
    FAMILIES_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    families: _containers.RepeatedCompositeFieldContainer[MetricFamily]
    workers: int
    def __init__(self, families: _Optional[_Iterable[_Union[MetricFamily, _Mapping]]] = ..., workers: _Optional[int] = ...) -> None: ...

class LogLevelRequest(_message.Message):
    __slots__ = ("logger", "level")
    LOGGER_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    logger: str
    level: str
    def __init__(self, logger: _Optional[str] = ..., level: _Optional[str] = ...) -> None: ...

class LogLevelResponse(_message.Message):
    __slots__ = ("levels",)
    class LevelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    levels: _containers.ScalarMap[str, str]
    def __init__(self, levels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("connections",)
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    connections: int
    def __init__(self, connections: _Optional[int] = ...) -> None: ...

class ShutdownRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShutdownResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("version", "node", "live", "ready", "draining", "config_version", "start_time", "workers", "extensions")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    CONFIG_VERSION_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    EXTENSIONS_FIELD_NUMBER: _ClassVar[int]
    version: str
    node: _config_pb2.Node
    live: bool
    ready: bool
    draining: bool
    config_version: str
    start_time: _timestamp_pb2.Timestamp
    workers: int
    extensions: bool
    def __init__(self, version: _Optional[str] = ..., node: _Optional[_Union[_config_pb2.Node, _Mapping]] = ..., live: _Optional[bool] = ..., ready: _Optional[bool] = ..., draining: _Optional[bool] = ..., config_version: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., workers: _Optional[int] = ..., extensions: _Optional[bool] = ...) -> None: ...
