# ruff: noqa
# fmt: off
import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SidecarConfig(_message.Message):
    __slots__ = ("version", "node", "listeners", "clusters", "security")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    LISTENERS_FIELD_NUMBER: _ClassVar[int]
    CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    SECURITY_FIELD_NUMBER: _ClassVar[int]
    version: str
    node: Node
    listeners: _containers.RepeatedCompositeFieldContainer[Listener]
    clusters: _containers.RepeatedCompositeFieldContainer[Cluster]
    security: Security
    def __init__(self, version: _Optional[str] = ..., node: _Optional[_Union[Node, _Mapping]] = ..., listeners: _Optional[_Iterable[_Union[Listener, _Mapping]]] = ..., clusters: _Optional[_Iterable[_Union[Cluster, _Mapping]]] = ..., security: _Optional[_Union[Security, _Mapping]] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("id", "namespace", "workload", "labels", "service_account")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    id: str
    namespace: str
    workload: str
    labels: _containers.ScalarMap[str, str]
    service_account: str
    def __init__(self, id: _Optional[str] = ..., namespace: _Optional[str] = ..., workload: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., service_account: _Optional[str] = ...) -> None: ...

class Listener(_message.Message):
    __slots__ = ("name", "address", "virtual_hosts", "http2", "per_stream_buffer_limit_bytes", "per_connection_buffer_limit_bytes", "stream_idle_timeout", "idle_timeout", "transparent", "opaque_ports", "protocol_detection_timeout")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    VIRTUAL_HOSTS_FIELD_NUMBER: _ClassVar[int]
    HTTP2_FIELD_NUMBER: _ClassVar[int]
    PER_STREAM_BUFFER_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    PER_CONNECTION_BUFFER_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    STREAM_IDLE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    TRANSPARENT_FIELD_NUMBER: _ClassVar[int]
    OPAQUE_PORTS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_DETECTION_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    virtual_hosts: _containers.RepeatedCompositeFieldContainer[VirtualHost]
    http2: Http2Settings
    per_stream_buffer_limit_bytes: int
    per_connection_buffer_limit_bytes: int
    stream_idle_timeout: _duration_pb2.Duration
    idle_timeout: _duration_pb2.Duration
    transparent: bool
    opaque_ports: _containers.RepeatedScalarFieldContainer[int]
    protocol_detection_timeout: _duration_pb2.Duration
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., virtual_hosts: _Optional[_Iterable[_Union[VirtualHost, _Mapping]]] = ..., http2: _Optional[_Union[Http2Settings, _Mapping]] = ..., per_stream_buffer_limit_bytes: _Optional[int] = ..., per_connection_buffer_limit_bytes: _Optional[int] = ..., stream_idle_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., idle_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., transparent: _Optional[bool] = ..., opaque_ports: _Optional[_Iterable[int]] = ..., protocol_detection_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Http2Settings(_message.Message):
    __slots__ = ("max_concurrent_streams", "initial_stream_window_size", "initial_connection_window_size", "max_frame_size", "max_header_list_size", "header_table_size")
    MAX_CONCURRENT_STREAMS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_STREAM_WINDOW_SIZE_FIELD_NUMBER: _ClassVar[int]
    INITIAL_CONNECTION_WINDOW_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAME_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_HEADER_LIST_SIZE_FIELD_NUMBER: _ClassVar[int]
    HEADER_TABLE_SIZE_FIELD_NUMBER: _ClassVar[int]
    max_concurrent_streams: int
    initial_stream_window_size: int
    initial_connection_window_size: int
    max_frame_size: int
    max_header_list_size: int
    header_table_size: int
    def __init__(self, max_concurrent_streams: _Optional[int] = ..., initial_stream_window_size: _Optional[int] = ..., initial_connection_window_size: _Optional[int] = ..., max_frame_size: _Optional[int] = ..., max_header_list_size: _Optional[int] = ..., header_table_size: _Optional[int] = ...) -> None: ...

class VirtualHost(_message.Message):
    __slots__ = ("name", "domains", "routes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DOMAINS_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    domains: _containers.RepeatedScalarFieldContainer[str]
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    def __init__(self, name: _Optional[str] = ..., domains: _Optional[_Iterable[str]] = ..., routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("name", "match", "route", "direct_response", "timeout", "retry_policy", "fault")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MATCH_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    DIRECT_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    RETRY_POLICY_FIELD_NUMBER: _ClassVar[int]
    FAULT_FIELD_NUMBER: _ClassVar[int]
    name: str
    match: RouteMatch
    route: RouteAction
    direct_response: DirectResponse
    timeout: _duration_pb2.Duration
    retry_policy: RetryPolicy
    fault: FaultInjection
    def __init__(self, name: _Optional[str] = ..., match: _Optional[_Union[RouteMatch, _Mapping]] = ..., route: _Optional[_Union[RouteAction, _Mapping]] = ..., direct_response: _Optional[_Union[DirectResponse, _Mapping]] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., retry_policy: _Optional[_Union[RetryPolicy, _Mapping]] = ..., fault: _Optional[_Union[FaultInjection, _Mapping]] = ...) -> None: ...

class FaultInjection(_message.Message):
    __slots__ = ("delay", "abort")
    class Delay(_message.Message):
        __slots__ = ("fixed_delay", "percentage")
        FIXED_DELAY_FIELD_NUMBER: _ClassVar[int]
        PERCENTAGE_FIELD_NUMBER: _ClassVar[int]
        fixed_delay: _duration_pb2.Duration
        percentage: float
        def __init__(self, fixed_delay: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., percentage: _Optional[float] = ...) -> None: ...
    class Abort(_message.Message):
        __slots__ = ("percentage", "http_status", "grpc_status")
        PERCENTAGE_FIELD_NUMBER: _ClassVar[int]
        HTTP_STATUS_FIELD_NUMBER: _ClassVar[int]
        GRPC_STATUS_FIELD_NUMBER: _ClassVar[int]
        percentage: float
        http_status: int
        grpc_status: int
        def __init__(self, percentage: _Optional[float] = ..., http_status: _Optional[int] = ..., grpc_status: _Optional[int] = ...) -> None: ...
    DELAY_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    delay: FaultInjection.Delay
    abort: FaultInjection.Abort
    def __init__(self, delay: _Optional[_Union[FaultInjection.Delay, _Mapping]] = ..., abort: _Optional[_Union[FaultInjection.Abort, _Mapping]] = ...) -> None: ...

class RetryPolicy(_message.Message):
    __slots__ = ("num_retries", "per_try_timeout", "retry_on", "budget", "base_interval", "max_interval")
    NUM_RETRIES_FIELD_NUMBER: _ClassVar[int]
    PER_TRY_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    RETRY_ON_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    BASE_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    MAX_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    num_retries: int
    per_try_timeout: _duration_pb2.Duration
    retry_on: _containers.RepeatedScalarFieldContainer[str]
    budget: RetryBudget
    base_interval: _duration_pb2.Duration
    max_interval: _duration_pb2.Duration
    def __init__(self, num_retries: _Optional[int] = ..., per_try_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., retry_on: _Optional[_Iterable[str]] = ..., budget: _Optional[_Union[RetryBudget, _Mapping]] = ..., base_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class RetryBudget(_message.Message):
    __slots__ = ("retry_ratio", "min_retries_per_second", "ttl")
    RETRY_RATIO_FIELD_NUMBER: _ClassVar[int]
    MIN_RETRIES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    retry_ratio: float
    min_retries_per_second: int
    ttl: _duration_pb2.Duration
    def __init__(self, retry_ratio: _Optional[float] = ..., min_retries_per_second: _Optional[int] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class RouteMatch(_message.Message):
    __slots__ = ("prefix", "path", "regex", "grpc", "headers", "method")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    REGEX_FIELD_NUMBER: _ClassVar[int]
    GRPC_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    path: str
    regex: str
    grpc: GrpcMatch
    headers: _containers.RepeatedCompositeFieldContainer[HeaderMatch]
    method: str
    def __init__(self, prefix: _Optional[str] = ..., path: _Optional[str] = ..., regex: _Optional[str] = ..., grpc: _Optional[_Union[GrpcMatch, _Mapping]] = ..., headers: _Optional[_Iterable[_Union[HeaderMatch, _Mapping]]] = ..., method: _Optional[str] = ...) -> None: ...

class GrpcMatch(_message.Message):
    __slots__ = ("service", "method")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    service: str
    method: str
    def __init__(self, service: _Optional[str] = ..., method: _Optional[str] = ...) -> None: ...

class HeaderMatch(_message.Message):
    __slots__ = ("name", "exact", "present", "regex", "prefix", "invert")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXACT_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    REGEX_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    INVERT_FIELD_NUMBER: _ClassVar[int]
    name: str
    exact: str
    present: bool
    regex: str
    prefix: str
    invert: bool
    def __init__(self, name: _Optional[str] = ..., exact: _Optional[str] = ..., present: _Optional[bool] = ..., regex: _Optional[str] = ..., prefix: _Optional[str] = ..., invert: _Optional[bool] = ...) -> None: ...

class RouteAction(_message.Message):
    __slots__ = ("clusters", "authority_rewrite", "prefix_rewrite", "hash_header")
    CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    AUTHORITY_REWRITE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_REWRITE_FIELD_NUMBER: _ClassVar[int]
    HASH_HEADER_FIELD_NUMBER: _ClassVar[int]
    clusters: _containers.RepeatedCompositeFieldContainer[WeightedCluster]
    authority_rewrite: str
    prefix_rewrite: str
    hash_header: str
    def __init__(self, clusters: _Optional[_Iterable[_Union[WeightedCluster, _Mapping]]] = ..., authority_rewrite: _Optional[str] = ..., prefix_rewrite: _Optional[str] = ..., hash_header: _Optional[str] = ...) -> None: ...

class WeightedCluster(_message.Message):
    __slots__ = ("cluster", "subset", "weight")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    SUBSET_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    subset: str
    weight: int
    def __init__(self, cluster: _Optional[str] = ..., subset: _Optional[str] = ..., weight: _Optional[int] = ...) -> None: ...

class DirectResponse(_message.Message):
    __slots__ = ("status", "body", "grpc_status", "grpc_message")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    GRPC_STATUS_FIELD_NUMBER: _ClassVar[int]
    GRPC_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    status: int
    body: str
    grpc_status: int
    grpc_message: str
    def __init__(self, status: _Optional[int] = ..., body: _Optional[str] = ..., grpc_status: _Optional[int] = ..., grpc_message: _Optional[str] = ...) -> None: ...

class Cluster(_message.Message):
    __slots__ = ("name", "lb_policy", "hash_header", "endpoints", "subsets", "connect_timeout", "max_concurrent_streams_per_connection", "idle_timeout", "max_connections_per_endpoint", "retry_budget", "circuit_breakers", "outlier_detection", "health_check", "service_addresses", "tls")
    class LbPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PEAK_EWMA: _ClassVar[Cluster.LbPolicy]
        ROUND_ROBIN: _ClassVar[Cluster.LbPolicy]
        RANDOM: _ClassVar[Cluster.LbPolicy]
        LEAST_REQUEST: _ClassVar[Cluster.LbPolicy]
        RING_HASH: _ClassVar[Cluster.LbPolicy]
    PEAK_EWMA: Cluster.LbPolicy
    ROUND_ROBIN: Cluster.LbPolicy
    RANDOM: Cluster.LbPolicy
    LEAST_REQUEST: Cluster.LbPolicy
    RING_HASH: Cluster.LbPolicy
    NAME_FIELD_NUMBER: _ClassVar[int]
    LB_POLICY_FIELD_NUMBER: _ClassVar[int]
    HASH_HEADER_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    SUBSETS_FIELD_NUMBER: _ClassVar[int]
    CONNECT_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_STREAMS_PER_CONNECTION_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    MAX_CONNECTIONS_PER_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    RETRY_BUDGET_FIELD_NUMBER: _ClassVar[int]
    CIRCUIT_BREAKERS_FIELD_NUMBER: _ClassVar[int]
    OUTLIER_DETECTION_FIELD_NUMBER: _ClassVar[int]
    HEALTH_CHECK_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    name: str
    lb_policy: Cluster.LbPolicy
    hash_header: str
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    subsets: _containers.RepeatedCompositeFieldContainer[Subset]
    connect_timeout: _duration_pb2.Duration
    max_concurrent_streams_per_connection: int
    idle_timeout: _duration_pb2.Duration
    max_connections_per_endpoint: int
    retry_budget: RetryBudget
    circuit_breakers: CircuitBreakers
    outlier_detection: OutlierDetection
    health_check: HealthCheck
    service_addresses: _containers.RepeatedScalarFieldContainer[str]
    tls: UpstreamTls
    def __init__(self, name: _Optional[str] = ..., lb_policy: _Optional[_Union[Cluster.LbPolicy, str]] = ..., hash_header: _Optional[str] = ..., endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., subsets: _Optional[_Iterable[_Union[Subset, _Mapping]]] = ..., connect_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_concurrent_streams_per_connection: _Optional[int] = ..., idle_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_connections_per_endpoint: _Optional[int] = ..., retry_budget: _Optional[_Union[RetryBudget, _Mapping]] = ..., circuit_breakers: _Optional[_Union[CircuitBreakers, _Mapping]] = ..., outlier_detection: _Optional[_Union[OutlierDetection, _Mapping]] = ..., health_check: _Optional[_Union[HealthCheck, _Mapping]] = ..., service_addresses: _Optional[_Iterable[str]] = ..., tls: _Optional[_Union[UpstreamTls, _Mapping]] = ...) -> None: ...

class HealthCheck(_message.Message):
    __slots__ = ("interval", "timeout", "unhealthy_threshold", "healthy_threshold", "grpc_service_name")
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    UNHEALTHY_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    GRPC_SERVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    interval: _duration_pb2.Duration
    timeout: _duration_pb2.Duration
    unhealthy_threshold: int
    healthy_threshold: int
    grpc_service_name: str
    def __init__(self, interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., unhealthy_threshold: _Optional[int] = ..., healthy_threshold: _Optional[int] = ..., grpc_service_name: _Optional[str] = ...) -> None: ...

class CircuitBreakers(_message.Message):
    __slots__ = ("max_connections", "max_pending_requests", "max_requests", "max_retries")
    MAX_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_PENDING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    max_connections: int
    max_pending_requests: int
    max_requests: int
    max_retries: int
    def __init__(self, max_connections: _Optional[int] = ..., max_pending_requests: _Optional[int] = ..., max_requests: _Optional[int] = ..., max_retries: _Optional[int] = ...) -> None: ...

class OutlierDetection(_message.Message):
    __slots__ = ("consecutive_5xx", "consecutive_gateway_errors", "consecutive_local_origin_failures", "split_external_local_origin_errors", "interval", "base_ejection_time", "max_ejection_time", "max_ejection_percent")
    CONSECUTIVE_5XX_FIELD_NUMBER: _ClassVar[int]
    CONSECUTIVE_GATEWAY_ERRORS_FIELD_NUMBER: _ClassVar[int]
    CONSECUTIVE_LOCAL_ORIGIN_FAILURES_FIELD_NUMBER: _ClassVar[int]
    SPLIT_EXTERNAL_LOCAL_ORIGIN_ERRORS_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    BASE_EJECTION_TIME_FIELD_NUMBER: _ClassVar[int]
    MAX_EJECTION_TIME_FIELD_NUMBER: _ClassVar[int]
    MAX_EJECTION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    consecutive_5xx: int
    consecutive_gateway_errors: int
    consecutive_local_origin_failures: int
    split_external_local_origin_errors: bool
    interval: _duration_pb2.Duration
    base_ejection_time: _duration_pb2.Duration
    max_ejection_time: _duration_pb2.Duration
    max_ejection_percent: int
    def __init__(self, consecutive_5xx: _Optional[int] = ..., consecutive_gateway_errors: _Optional[int] = ..., consecutive_local_origin_failures: _Optional[int] = ..., split_external_local_origin_errors: _Optional[bool] = ..., interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., base_ejection_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_ejection_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_ejection_percent: _Optional[int] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("address", "weight", "labels")
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
    address: str
    weight: int
    labels: _containers.ScalarMap[str, str]
    def __init__(self, address: _Optional[str] = ..., weight: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Subset(_message.Message):
    __slots__ = ("name", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Security(_message.Message):
    __slots__ = ("trust_domain", "trust_bundle", "peer_authentication", "authorization")
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    PEER_AUTHENTICATION_FIELD_NUMBER: _ClassVar[int]
    AUTHORIZATION_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    trust_bundle: _containers.RepeatedScalarFieldContainer[str]
    peer_authentication: PeerAuthentication
    authorization: Authorization
    def __init__(self, trust_domain: _Optional[str] = ..., trust_bundle: _Optional[_Iterable[str]] = ..., peer_authentication: _Optional[_Union[PeerAuthentication, _Mapping]] = ..., authorization: _Optional[_Union[Authorization, _Mapping]] = ...) -> None: ...

class PeerAuthentication(_message.Message):
    __slots__ = ("mode", "port_modes", "sources")
    class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNSET: _ClassVar[PeerAuthentication.Mode]
        DISABLE: _ClassVar[PeerAuthentication.Mode]
        PERMISSIVE: _ClassVar[PeerAuthentication.Mode]
        STRICT: _ClassVar[PeerAuthentication.Mode]
    UNSET: PeerAuthentication.Mode
    DISABLE: PeerAuthentication.Mode
    PERMISSIVE: PeerAuthentication.Mode
    STRICT: PeerAuthentication.Mode
    class PortModesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: PeerAuthentication.Mode
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[PeerAuthentication.Mode, str]] = ...) -> None: ...
    MODE_FIELD_NUMBER: _ClassVar[int]
    PORT_MODES_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    mode: PeerAuthentication.Mode
    port_modes: _containers.ScalarMap[int, PeerAuthentication.Mode]
    sources: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, mode: _Optional[_Union[PeerAuthentication.Mode, str]] = ..., port_modes: _Optional[_Mapping[int, PeerAuthentication.Mode]] = ..., sources: _Optional[_Iterable[str]] = ...) -> None: ...

class UpstreamTls(_message.Message):
    __slots__ = ("mode", "allowed_spiffe_ids", "plaintext_endpoints")
    class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DISABLE: _ClassVar[UpstreamTls.Mode]
        ISTIO_MUTUAL: _ClassVar[UpstreamTls.Mode]
    DISABLE: UpstreamTls.Mode
    ISTIO_MUTUAL: UpstreamTls.Mode
    MODE_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_SPIFFE_IDS_FIELD_NUMBER: _ClassVar[int]
    PLAINTEXT_ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    mode: UpstreamTls.Mode
    allowed_spiffe_ids: _containers.RepeatedScalarFieldContainer[str]
    plaintext_endpoints: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, mode: _Optional[_Union[UpstreamTls.Mode, str]] = ..., allowed_spiffe_ids: _Optional[_Iterable[str]] = ..., plaintext_endpoints: _Optional[_Iterable[str]] = ...) -> None: ...

class Authorization(_message.Message):
    __slots__ = ("policies",)
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    policies: _containers.RepeatedCompositeFieldContainer[AuthorizationPolicy]
    def __init__(self, policies: _Optional[_Iterable[_Union[AuthorizationPolicy, _Mapping]]] = ...) -> None: ...

class AuthorizationPolicy(_message.Message):
    __slots__ = ("name", "action", "rules")
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ALLOW: _ClassVar[AuthorizationPolicy.Action]
        DENY: _ClassVar[AuthorizationPolicy.Action]
        AUDIT: _ClassVar[AuthorizationPolicy.Action]
    ALLOW: AuthorizationPolicy.Action
    DENY: AuthorizationPolicy.Action
    AUDIT: AuthorizationPolicy.Action
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    name: str
    action: AuthorizationPolicy.Action
    rules: _containers.RepeatedCompositeFieldContainer[AuthorizationRule]
    def __init__(self, name: _Optional[str] = ..., action: _Optional[_Union[AuthorizationPolicy.Action, str]] = ..., rules: _Optional[_Iterable[_Union[AuthorizationRule, _Mapping]]] = ...) -> None: ...

class AuthorizationRule(_message.Message):
    __slots__ = ("to", "when")
    FROM_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    WHEN_FIELD_NUMBER: _ClassVar[int]
    to: _containers.RepeatedCompositeFieldContainer[AuthorizationOperation]
    when: _containers.RepeatedCompositeFieldContainer[AuthorizationCondition]
    def __init__(self, to: _Optional[_Iterable[_Union[AuthorizationOperation, _Mapping]]] = ..., when: _Optional[_Iterable[_Union[AuthorizationCondition, _Mapping]]] = ..., **kwargs) -> None: ...

class AuthorizationSource(_message.Message):
    __slots__ = ("principals", "not_principals", "namespaces", "not_namespaces")
    PRINCIPALS_FIELD_NUMBER: _ClassVar[int]
    NOT_PRINCIPALS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    NOT_NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    principals: _containers.RepeatedCompositeFieldContainer[StringMatch]
    not_principals: _containers.RepeatedCompositeFieldContainer[StringMatch]
    namespaces: _containers.RepeatedCompositeFieldContainer[StringMatch]
    not_namespaces: _containers.RepeatedCompositeFieldContainer[StringMatch]
    def __init__(self, principals: _Optional[_Iterable[_Union[StringMatch, _Mapping]]] = ..., not_principals: _Optional[_Iterable[_Union[StringMatch, _Mapping]]] = ..., namespaces: _Optional[_Iterable[_Union[StringMatch, _Mapping]]] = ..., not_namespaces: _Optional[_Iterable[_Union[StringMatch, _Mapping]]] = ...) -> None: ...

class AuthorizationOperation(_message.Message):
    __slots__ = ("hosts", "not_hosts", "methods", "not_methods", "paths", "not_paths", "ports", "not_ports")
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    NOT_HOSTS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    NOT_METHODS_FIELD_NUMBER: _ClassVar[int]
    PATHS_FIELD_NUMBER: _ClassVar[int]
    NOT_PATHS_FIELD_NUMBER: _ClassVar[int]
    PORTS_FIELD_NUMBER: _ClassVar[int]
    NOT_PORTS_FIELD_NUMBER: _ClassVar[int]
    hosts: _containers.RepeatedCompositeFieldContainer[StringMatch]
    not_hosts: _containers.RepeatedCompositeFieldContainer[StringMatch]
    methods: _containers.RepeatedCompositeFieldContainer[StringMatch]
    not_methods: _containers.RepeatedCompositeFieldContainer[StringMatch]
    paths: _containers.RepeatedCompositeFieldContainer[StringMatch]
    not_paths: _containers.RepeatedCompositeFieldContainer[StringMatch]
    ports: _containers.RepeatedScalarFieldContainer[int]
    not_ports: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, hosts: _Optional[_Iterable[_Union[StringMatch, _Mapping]]] = ..., not_hosts: _Optional[_Iterable[_Union[StringMatch, _Mapping]]] = ..., methods: _Optional[_Iterable[_Union[StringMatch, _Mapping]]] = ..., not_methods: _Optional[_Iterable[_Union[StringMatch, _Mapping]]] = ..., paths: _Optional[_Iterable[_Union[StringMatch, _Mapping]]] = ..., not_paths: _Optional[_Iterable[_Union[StringMatch, _Mapping]]] = ..., ports: _Optional[_Iterable[int]] = ..., not_ports: _Optional[_Iterable[int]] = ...) -> None: ...

class AuthorizationCondition(_message.Message):
    __slots__ = ("attribute", "header", "values", "not_values")
    class Attribute(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        REQUEST_HEADER: _ClassVar[AuthorizationCondition.Attribute]
        SOURCE_PRINCIPAL: _ClassVar[AuthorizationCondition.Attribute]
        SOURCE_NAMESPACE: _ClassVar[AuthorizationCondition.Attribute]
        DESTINATION_PORT: _ClassVar[AuthorizationCondition.Attribute]
    REQUEST_HEADER: AuthorizationCondition.Attribute
    SOURCE_PRINCIPAL: AuthorizationCondition.Attribute
    SOURCE_NAMESPACE: AuthorizationCondition.Attribute
    DESTINATION_PORT: AuthorizationCondition.Attribute
    ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    NOT_VALUES_FIELD_NUMBER: _ClassVar[int]
    attribute: AuthorizationCondition.Attribute
    header: str
    values: _containers.RepeatedCompositeFieldContainer[StringMatch]
    not_values: _containers.RepeatedCompositeFieldContainer[StringMatch]
    def __init__(self, attribute: _Optional[_Union[AuthorizationCondition.Attribute, str]] = ..., header: _Optional[str] = ..., values: _Optional[_Iterable[_Union[StringMatch, _Mapping]]] = ..., not_values: _Optional[_Iterable[_Union[StringMatch, _Mapping]]] = ...) -> None: ...

class StringMatch(_message.Message):
    __slots__ = ("exact", "prefix", "suffix", "presence")
    EXACT_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    SUFFIX_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_FIELD_NUMBER: _ClassVar[int]
    exact: str
    prefix: str
    suffix: str
    presence: bool
    def __init__(self, exact: _Optional[str] = ..., prefix: _Optional[str] = ..., suffix: _Optional[str] = ..., presence: _Optional[bool] = ...) -> None: ...
