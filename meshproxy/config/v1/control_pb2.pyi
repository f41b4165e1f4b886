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

class StreamRequest(_message.Message):
    __slots__ = ("node", "version_info", "response_nonce", "error_detail", "worker")
    NODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_INFO_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_NONCE_FIELD_NUMBER: _ClassVar[int]
    ERROR_DETAIL_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    node: _config_pb2.Node
    version_info: str
    response_nonce: str
    error_detail: ErrorDetail
    worker: int
    def __init__(self, node: _Optional[_Union[_config_pb2.Node, _Mapping]] = ..., version_info: _Optional[str] = ..., response_nonce: _Optional[str] = ..., error_detail: _Optional[_Union[ErrorDetail, _Mapping]] = ..., worker: _Optional[int] = ...) -> None: ...

class ErrorDetail(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("version_info", "nonce", "config")
    VERSION_INFO_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    version_info: str
    nonce: str
    config: _config_pb2.SidecarConfig
    def __init__(self, version_info: _Optional[str] = ..., nonce: _Optional[str] = ..., config: _Optional[_Union[_config_pb2.SidecarConfig, _Mapping]] = ...) -> None: ...

class SignCertificateRequest(_message.Message):
    __slots__ = ("csr", "token", "validity_seconds")
    CSR_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    VALIDITY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    csr: str
    token: str
    validity_seconds: int
    def __init__(self, csr: _Optional[str] = ..., token: _Optional[str] = ..., validity_seconds: _Optional[int] = ...) -> None: ...

class SignCertificateResponse(_message.Message):
    __slots__ = ("cert_chain", "trust_bundle")
    CERT_CHAIN_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    cert_chain: _containers.RepeatedScalarFieldContainer[str]
    trust_bundle: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, cert_chain: _Optional[_Iterable[str]] = ..., trust_bundle: _Optional[_Iterable[str]] = ...) -> None: ...

class ProxyStatusRequest(_message.Message):
    __slots__ = ("namespace", "node_id")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    node_id: str
    def __init__(self, namespace: _Optional[str] = ..., node_id: _Optional[str] = ...) -> None: ...

class ProxyStatus(_message.Message):
    __slots__ = ("node_id", "namespace", "workload", "labels", "worker", "peer", "connected_since", "target_version", "sent_version", "sent_nonce", "sent_at", "acked_version", "acked_at", "nacked_version", "nack_nonce", "nack_message", "nacks", "state")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[ProxyStatus.State]
        SYNCED: _ClassVar[ProxyStatus.State]
        STALE: _ClassVar[ProxyStatus.State]
        NACKED: _ClassVar[ProxyStatus.State]
    STATE_UNSPECIFIED: ProxyStatus.State
    SYNCED: ProxyStatus.State
    STALE: ProxyStatus.State
    NACKED: ProxyStatus.State
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_SINCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_VERSION_FIELD_NUMBER: _ClassVar[int]
    SENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SENT_NONCE_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    ACKED_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACKED_AT_FIELD_NUMBER: _ClassVar[int]
    NACKED_VERSION_FIELD_NUMBER: _ClassVar[int]
    NACK_NONCE_FIELD_NUMBER: _ClassVar[int]
    NACK_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NACKS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    namespace: str
    workload: str
    labels: _containers.ScalarMap[str, str]
    worker: int
    peer: str
    connected_since: _timestamp_pb2.Timestamp
    target_version: str
    sent_version: str
    sent_nonce: str
    sent_at: _timestamp_pb2.Timestamp
    acked_version: str
    acked_at: _timestamp_pb2.Timestamp
    nacked_version: str
    nack_nonce: str
    nack_message: str
    nacks: int
    state: ProxyStatus.State
    def __init__(self, node_id: _Optional[str] = ..., namespace: _Optional[str] = ..., workload: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., worker: _Optional[int] = ..., peer: _Optional[str] = ..., connected_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., target_version: _Optional[str] = ..., sent_version: _Optional[str] = ..., sent_nonce: _Optional[str] = ..., sent_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., acked_version: _Optional[str] = ..., acked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., nacked_version: _Optional[str] = ..., nack_nonce: _Optional[str] = ..., nack_message: _Optional[str] = ..., nacks: _Optional[int] = ..., state: _Optional[_Union[ProxyStatus.State, str]] = ...) -> None: ...

class ProxyStatusResponse(_message.Message):
    __slots__ = ("proxies", "revision")
    PROXIES_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    proxies: _containers.RepeatedCompositeFieldContainer[ProxyStatus]
    revision: int
    def __init__(self, proxies: _Optional[_Iterable[_Union[ProxyStatus, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...
