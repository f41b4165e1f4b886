"""gRPC server reflection (``grpc.reflection.v1`` and ``v1alpha`` ServerReflectionInfo) for the admin server.

Owns what the reflection stream answers: the names of the services served,
and the proto files that define them, with their dependencies
(``file_by_filename``, ``file_containing_symbol``: a package-qualified
message, enum, enum value, field, service or method name), so that
grpcurl-style tools and grpcio-reflection's ``ProtoReflectionDescriptorDatabase``
can call the admin service without its .proto. Only the files of the served
services and what they import are shown, not everything the sidecar's
descriptor pool holds. A file already sent on a stream is not sent again
on it (grpc-go's rule); what is unknown is an ``error_response`` NOT_FOUND
on the stream, which stays open.
"""

from __future__ import annotations

from typing import Any

from meshproxy.admin.grpc_reflection_v1 import reflection_pb2 as v1
from meshproxy.admin.grpc_reflection_v1alpha import reflection_pb2 as v1alpha
from meshproxy.admin.grpcserver import Call, Service, Status

__all__ = ["Reflection", "reflection_services"]


def _closure(files: list[Any]) -> dict[str, Any]:
    """The files and everything they import, by name."""
    out: dict[str, Any] = {}
    todo = list(files)
    while todo:  # bounded: each file is taken once
        f = todo.pop()
        if f.name in out:
            continue
        out[f.name] = f
        todo.extend(f.dependencies)
    return out


def _symbols(files: dict[str, Any]) -> dict[str, Any]:
    """Every symbol a client may ask about -> the file that defines it."""
    index: dict[str, Any] = {}

    def message(m: Any, f: Any) -> None:
        index[m.full_name] = f
        for field in m.fields:
            index[field.full_name] = f
        for ext in m.extensions:
            index[ext.full_name] = f
        for e in m.enum_types:
            enum(e, f)
        for nested in m.nested_types:
            message(nested, f)

    def enum(e: Any, f: Any) -> None:
        index[e.full_name] = f
        scope = e.full_name.rpartition(".")[0]
        for v in e.values:
            # Enum values are siblings of their enum (C++ scoping), as protoc names them.
            index[f"{scope}.{v.name}" if scope else v.name] = f

    for f in files.values():
        for m in f.message_types_by_name.values():
            message(m, f)
        for e in f.enum_types_by_name.values():
            enum(e, f)
        for ext in f.extensions_by_name.values():
            index[ext.full_name] = f
        for s in f.services_by_name.values():
            index[s.full_name] = f
            for m in s.methods:
                index[m.full_name] = f
    return index


class Reflection:
    """The reflection service of a server whose services are ``services`` (their descriptors), for
    one version of the reflection proto (``pb``: the v1 or v1alpha module)."""

    def __init__(self, services: list[Any], pb: Any) -> None:
        self.pb = pb
        self.names = sorted(s.full_name for s in services)
        self.files = _closure([s.file for s in services])
        self.symbols = _symbols(self.files)
        self.extensions: dict[str, list[Any]] = {}
        for f in self.files.values():
            for ext in f.extensions_by_name.values():
                self.extensions.setdefault(ext.containing_type.full_name, []).append(ext)

            def nested(m: Any) -> None:
                for ext in m.extensions:
                    self.extensions.setdefault(ext.containing_type.full_name, []).append(ext)
                for n in m.nested_types:
                    nested(n)

            for m in f.message_types_by_name.values():
                nested(m)

    async def ServerReflectionInfo(self, call: Call) -> None:
        sent: set[str] = set()
        async for request in call:
            await call.send(self.answer(request, sent))

    def answer(self, request: Any, sent: set[str]) -> Any:
        """The response to one request; ``sent`` holds the files already sent on this stream."""
        pb = self.pb
        response = pb.ServerReflectionResponse(valid_host=request.host, original_request=request)
        kind = request.WhichOneof("message_request")
        if kind == "list_services":
            response.list_services_response.service.extend(pb.ServiceResponse(name=n) for n in self.names)
        elif kind == "file_by_filename":
            f = self.files.get(request.file_by_filename)
            if f is None:
                return self._not_found(response, f"file {request.file_by_filename!r} not found")
            self._files(response, f, sent)
        elif kind == "file_containing_symbol":
            f = self.symbols.get(request.file_containing_symbol)
            if f is None:
                return self._not_found(response, f"symbol {request.file_containing_symbol!r} not found")
            self._files(response, f, sent)
        elif kind == "file_containing_extension":
            ask = request.file_containing_extension
            ext = next(
                (e for e in self.extensions.get(ask.containing_type, ()) if e.number == ask.extension_number), None
            )
            if ext is None:
                return self._not_found(
                    response, f"no extension {ask.extension_number} of {ask.containing_type!r} is known"
                )
            self._files(response, ext.file, sent)
        elif kind == "all_extension_numbers_of_type":
            name = request.all_extension_numbers_of_type
            if self.symbols.get(name) is None:
                return self._not_found(response, f"type {name!r} not found")
            numbers = sorted(e.number for e in self.extensions.get(name, ()))
            response.all_extension_numbers_response.base_type_name = name
            response.all_extension_numbers_response.extension_number.extend(numbers)
        else:
            response.error_response.error_code = Status.INVALID_ARGUMENT
            response.error_response.error_message = "a request without a message_request"
        return response

    def _files(self, response: Any, f: Any, sent: set[str]) -> None:
        # The file first (clients take the first as the answer), then its imports not sent yet.
        out = [f]
        for name, dep in sorted(_closure([f]).items()):
            if name != f.name and name not in sent:
                out.append(dep)
        for d in out:
            sent.add(d.name)
        response.file_descriptor_response.file_descriptor_proto.extend(d.serialized_pb for d in out)

    def _not_found(self, response: Any, message: str) -> Any:
        response.error_response.error_code = Status.NOT_FOUND
        response.error_response.error_message = message
        return response


def reflection_services(services: list[Any]) -> list[Service]:
    """The v1 and v1alpha reflection services for a server of ``services`` (descriptors), themselves included."""
    descriptors = [*services, v1.DESCRIPTOR.services_by_name["ServerReflection"]]
    descriptors.append(v1alpha.DESCRIPTOR.services_by_name["ServerReflection"])
    return [
        Service(v1.DESCRIPTOR.services_by_name["ServerReflection"], Reflection(descriptors, v1)),
        Service(v1alpha.DESCRIPTOR.services_by_name["ServerReflection"], Reflection(descriptors, v1alpha)),
    ]
