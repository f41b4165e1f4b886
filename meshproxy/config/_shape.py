"""The structural check of a config dict against the proto schema, before json_format.ParseDict sees it.

ParseDict does the conversion, but its errors are multi-line, name the
field in whichever spelling the file used, and sometimes name none at all.
This walk finds the same mistakes (unknown fields, wrong types, two members
of a oneof, bad enum names, durations, out-of-range integers) and reports
each as one ConfigError naming the field path, with a suggestion for a
misspelt field name. It accepts what proto JSON accepts (snake_case and
lowerCamelCase names, integers as strings), and one thing less: null for a
scalar field, which in YAML is usually a value forgotten after the colon.
"""

from __future__ import annotations

import difflib
from functools import cache

from google.protobuf import duration_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from meshproxy.config._error import ConfigError, at, index

__all__ = ["check_shape"]

_INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}
_DURATION = duration_pb2.Duration.DESCRIPTOR.full_name


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


@cache
def _fields(desc: Descriptor) -> dict[str, FieldDescriptor]:
    by_key = {}
    for fd in desc.fields:
        by_key[fd.name] = fd
        by_key[fd.json_name] = fd
    return by_key


def check_shape(value: object, desc: Descriptor, path: str = "") -> None:
    """Raise ConfigError for the first place where ``value`` cannot be message ``desc`` in proto JSON form."""
    if not isinstance(value, dict):
        raise ConfigError(path, f"expected a mapping of {desc.name} fields, got {_kind(value)}")
    fields = _fields(desc)
    given: dict[str, str] = {}
    oneofs: dict[str, str] = {}
    for key, item in value.items():
        fd = fields.get(key) if isinstance(key, str) else None
        if fd is None:
            names = [f.name for f in desc.fields]
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(names)})"
            raise ConfigError(at(path, str(key)), f"unknown field in {desc.name}{hint}")
        fpath = at(path, fd.name)
        if fd.name in given:
            raise ConfigError(fpath, f"given twice, as '{given[fd.name]}' and as '{key}'")
        given[fd.name] = key
        oneof = fd.containing_oneof
        if oneof is not None and item is not None:
            other = oneofs.get(oneof.name)
            if other is not None:
                raise ConfigError(fpath, f"'{other}' is set too; they are alternatives (oneof {oneof.name}), set one")
            oneofs[oneof.name] = fd.name
        _check_field(fd, item, fpath)


def _check_field(fd: FieldDescriptor, value: object, path: str) -> None:
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        if value is None:
            return
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {_kind(value)}")
        key_fd = fd.message_type.fields_by_name["key"]
        value_fd = fd.message_type.fields_by_name["value"]
        for k, v in value.items():
            if key_fd.cpp_type == FieldDescriptor.CPPTYPE_STRING and not isinstance(k, str):
                raise ConfigError(index(path, str(k)), f"map key must be a string, got {_kind(k)} (quote it in YAML)")
            _check_single(value_fd, v, index(path, str(k)))
    elif fd.is_repeated:
        if value is None:
            return
        if not isinstance(value, list):
            raise ConfigError(path, f"expected a list, got {_kind(value)}")
        for i, v in enumerate(value):
            _check_single(fd, v, index(path, i))
    else:
        _check_single(fd, value, path)


def _check_single(fd: FieldDescriptor, value: object, path: str) -> None:
    cpp = fd.cpp_type
    if cpp == FieldDescriptor.CPPTYPE_MESSAGE:
        if value is None:
            return
        msg = fd.message_type
        if msg.full_name == _DURATION:
            _check_duration(value, path)
        elif not msg.full_name.startswith("google.protobuf."):
            check_shape(value, msg, path)
        # Other well-known types have their own JSON forms; ParseDict checks them.
        return
    if value is None:
        raise ConfigError(path, "no value (null): give one, or leave the field out")
    if cpp == FieldDescriptor.CPPTYPE_STRING:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {_kind(value)} (quote it in YAML)")
    elif cpp == FieldDescriptor.CPPTYPE_BOOL:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {_kind(value)}")
    elif cpp == FieldDescriptor.CPPTYPE_ENUM:
        _check_enum(fd, value, path)
    elif cpp in _INT_RANGES:
        _check_int(cpp, value, path)
    elif cpp in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(path, f"expected a number, got {_kind(value)}")


def _check_duration(value: object, path: str) -> None:
    if not isinstance(value, str):
        raise ConfigError(path, f"expected a duration such as '1.5s', got {_kind(value)}")
    try:
        duration_pb2.Duration().FromJsonString(value)
    except ValueError:
        raise ConfigError(
            path, f"invalid duration {value!r}: expected seconds with an 's' suffix, such as '1.5s'"
        ) from None


def _check_enum(fd: FieldDescriptor, value: object, path: str) -> None:
    enum = fd.enum_type
    if isinstance(value, str) and value in enum.values_by_name:
        return
    if isinstance(value, int) and not isinstance(value, bool) and value in enum.values_by_number:
        return
    raise ConfigError(path, f"invalid {enum.name} {value!r}; expected one of {', '.join(enum.values_by_name)}")


def _check_int(cpp: int, value: object, path: str) -> None:
    n = value
    if isinstance(value, str):
        try:
            n = int(value)
        except ValueError:
            n = None
    if isinstance(n, bool) or not isinstance(n, int):
        raise ConfigError(path, f"expected an integer, got {_kind(value)}")
    lo, hi = _INT_RANGES[cpp]
    if not lo <= n <= hi:
        raise ConfigError(path, f"{n} is out of range ({lo}..{hi})")
