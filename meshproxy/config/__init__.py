"""The sidecar's configuration: the ``meshproxy.v1`` schema, loading it, checking it, writing it.

One schema (``proto/meshproxy/v1/config.proto``) for both carriers: the
control plane pushes ``SidecarConfig`` messages, and ``--config`` files are
their YAML (or JSON) form, read with json_format.ParseDict, so field names
may be snake_case or lowerCamelCase and durations are strings like "1.5s".

Every way a configuration can be refused ends in one ``ConfigError`` whose
``str()`` is one line naming the field (``listeners[0].address: ...``): the
file loaders check the shape of the data first (unknown fields, wrong
types), then ``validate`` checks what the types cannot say (references,
unique names, addresses, regexes). A loaded config is always a valid one.
"""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format

from meshproxy.config._checks import Domain, duration_s, field_ns, field_s, parse_address, parse_domain, validate
from meshproxy.config._error import ConfigError
from meshproxy.config._shape import check_shape
from meshproxy.config.v1.config_pb2 import (
    Cluster,
    DirectResponse,
    Endpoint,
    GrpcMatch,
    HeaderMatch,
    Http2Settings,
    Listener,
    Node,
    Route,
    RouteAction,
    RouteMatch,
    SidecarConfig,
    Subset,
    VirtualHost,
    WeightedCluster,
)

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT_S",
    "DEFAULT_IDLE_TIMEOUT_S",
    "Cluster",
    "ConfigError",
    "DirectResponse",
    "Domain",
    "Endpoint",
    "GrpcMatch",
    "HeaderMatch",
    "Http2Settings",
    "Listener",
    "Node",
    "Route",
    "RouteAction",
    "RouteMatch",
    "SidecarConfig",
    "Subset",
    "VirtualHost",
    "WeightedCluster",
    "connect_timeout_s",
    "from_dict",
    "from_yaml",
    "idle_timeout_s",
    "load_file",
    "parse_address",
    "parse_domain",
    "simple",
    "to_dict",
    "to_yaml",
    "validate",
    "field_ns",
    "field_s",
]

DEFAULT_CONNECT_TIMEOUT_S = 1.0
DEFAULT_IDLE_TIMEOUT_S = 300.0


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping.

    Plain PyYAML keeps the last one silently, so a second ``routes:`` in a
    virtual host would drop the first list without a word.
    """


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    seen = set()
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode):
            key = (key_node.tag, key_node.value)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key_node.value!r} is given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
    return loader.construct_mapping(node)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _parse_yaml(text: str) -> object:
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("", f"YAML syntax error{where}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError("", f"YAML syntax error: {exc}") from None


def from_dict(data: object, *, check: bool = True) -> SidecarConfig:
    """The SidecarConfig whose proto JSON form is ``data``, validated unless ``check`` is False."""
    if data is None:
        raise ConfigError("", "the configuration is empty")
    check_shape(data, SidecarConfig.DESCRIPTOR)
    cfg = SidecarConfig()
    try:
        json_format.ParseDict(data, cfg)
    except json_format.ParseError as exc:
        # check_shape accepts only what ParseDict does; this is a backstop.
        raise ConfigError("", str(exc)) from None
    if check:
        validate(cfg)
    return cfg


def from_yaml(text: str, *, check: bool = True) -> SidecarConfig:
    """The SidecarConfig written as YAML (or JSON, which is YAML) in ``text``."""
    return from_dict(_parse_yaml(text), check=check)


def load_file(path: str | PathLike[str], *, check: bool = True) -> SidecarConfig:
    """Read a SidecarConfig from a YAML file, or a JSON one if its name ends in ``.json``.

    Every error is a ConfigError whose ``source`` is ``path``.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
        if source.endswith(".json"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    "", f"JSON syntax error at line {exc.lineno}, column {exc.colno}: {exc.msg}"
                ) from None
        else:
            data = _parse_yaml(text)
        return from_dict(data, check=check)
    except OSError as exc:
        raise ConfigError("", f"cannot read the file: {exc.strerror or exc}", source) from None
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"not UTF-8 text (byte {exc.start})", source) from None
    except ConfigError as exc:
        raise ConfigError(exc.path, exc.reason, source) from None


def to_dict(cfg: SidecarConfig) -> dict:
    """``cfg`` in proto JSON form with snake_case names; fields at their default are left out, and
    map entries (labels, port modes) sorted by key so that equal configs give equal dumps."""
    d = json_format.MessageToDict(cfg, preserving_proto_field_name=True)
    _sort_maps(cfg, d)
    return d


def _sort_maps(msg: Any, d: dict) -> None:
    # Protobuf maps iterate in no set order (it can differ between two equal messages).
    for field, value in msg.ListFields():
        sub = d.get(field.name)
        if field.message_type is None or sub is None:
            continue
        if field.message_type.GetOptions().map_entry:
            d[field.name] = {k: sub[k] for k in sorted(sub)}
            if field.message_type.fields_by_name["value"].message_type is not None:
                for k, v in value.items():
                    if isinstance(sub.get(str(k)), dict):
                        _sort_maps(v, sub[str(k)])
        elif isinstance(sub, list):  # a repeated message field
            for m, item in zip(value, sub, strict=False):
                if isinstance(item, dict):
                    _sort_maps(m, item)
        elif isinstance(sub, dict):
            _sort_maps(value, sub)


def to_yaml(cfg: SidecarConfig) -> str:
    """``cfg`` as YAML that ``from_yaml`` reads back to an equal message (for config dumps)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def simple(listen: str, upstream: str) -> SidecarConfig:
    """The config of ``meshproxy run --listen LISTEN --upstream UPSTREAM``: every request on one
    listener goes to the one endpoint of cluster ``"upstream"``.

    A bad address is a ConfigError whose path is the argument's name (``listen`` or ``upstream``).
    """
    for name, value, listener in (("listen", listen, True), ("upstream", upstream, False)):
        try:
            parse_address(value, listener=listener)
        except ValueError as exc:
            raise ConfigError(name, f"invalid address {value!r}: {exc}") from None
    route = Route(
        name="default", match=RouteMatch(prefix="/"), route=RouteAction(clusters=[WeightedCluster(cluster="upstream")])
    )
    cfg = SidecarConfig(
        version="simple",
        listeners=[
            Listener(
                name="main", address=listen, virtual_hosts=[VirtualHost(name="default", domains=["*"], routes=[route])]
            )
        ],
        clusters=[Cluster(name="upstream", endpoints=[Endpoint(address=upstream)])],
    )
    validate(cfg)
    return cfg


def connect_timeout_s(cluster: Cluster) -> float:
    """The cluster's connect timeout in seconds: DEFAULT_CONNECT_TIMEOUT_S when unset."""
    return duration_s(cluster.connect_timeout) if cluster.HasField("connect_timeout") else DEFAULT_CONNECT_TIMEOUT_S


def idle_timeout_s(cluster: Cluster) -> float:
    """How long an upstream connection with no stream stays open, in seconds: DEFAULT_IDLE_TIMEOUT_S when unset."""
    return duration_s(cluster.idle_timeout) if cluster.HasField("idle_timeout") else DEFAULT_IDLE_TIMEOUT_S
