# ruff: noqa
# fmt: off
from meshproxy.config.v1 import config_pb2 as _config_pb2
from google.protobuf.internal import containers as _containers
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
