"""What meshctl's commands share: the ``-o table|json|yaml`` rendering, the one-line error
(``CtlError``, exit 1) and the gRPC unary calls to a control plane or a sidecar's admin service.

Tables are plain text: a header of capitalized column names, columns padded to their
widest cell and separated by two spaces, ``-`` for an empty cell. JSON and YAML print the
same data (dicts and lists of plain values) so that a script gets everything the table
shows, and more.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

__all__ = [
    "FORMATS",
    "CtlError",
    "Unary",
    "age",
    "dump",
    "number",
    "one_line",
    "table",
]

FORMATS = ("table", "json", "yaml")


class CtlError(Exception):
    """A failure meshctl reports as one line on stderr, with exit status 1."""


def one_line(text: str) -> str:
    """``text`` with its line breaks and runs of spaces folded into single spaces."""
    return " ".join(str(text).split())


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A text table: ``headers`` then ``rows``; None and "" show as ``-``; ends with a newline."""
    cells = [[str(h) for h in headers]]
    cells += [["-" if v is None or v == "" else one_line(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines) + "\n"


def dump(data: Any, fmt: str, out: TextIO | None = None) -> None:
    """Print ``data`` as indented JSON or block YAML (``fmt`` "json" or "yaml")."""
    out = out or sys.stdout
    if fmt == "json":
        out.write(json.dumps(data, indent=2) + "\n")
    else:
        import yaml

        out.write(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))


def age(seconds: float | None) -> str:
    """A duration as kubectl shows ages: ``45s``, ``3m12s``, ``2h5m``, ``4d3h``; "" for None."""
    if seconds is None:
        return ""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def number(value: float | None, digits: int = 3) -> str:
    """A figure for a table: integral values without a fraction, others to ``digits`` significant
    places; "" for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.{digits}g}"


class Unary:
    """Unary gRPC calls on one channel to ``address`` (``what`` names the peer in errors: "the control
    plane", "the sidecar"), each with a deadline of ``timeout`` seconds. Failures raise CtlError
    with one line saying what went wrong; usable as a context manager (closes the channel)."""

    def __init__(self, address: str, what: str, timeout: float) -> None:
        import grpc

        self.address, self.what, self.timeout = address, what, timeout
        # No HTTP CONNECT proxy from the environment (the addresses are pods' and loopback's), and
        # a refused connection fails the call at once rather than being retried until the deadline.
        self.channel = grpc.insecure_channel(
            address, options=[("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0)]
        )
        self._calls: dict[str, Callable] = {}

    def __call__(self, method: str, request: Any, response_type: Any) -> Any:
        import grpc

        call = self._calls.get(method)
        if call is None:
            call = self._calls[method] = self.channel.unary_unary(
                method,
                request_serializer=type(request).SerializeToString,
                response_deserializer=response_type.FromString,
            )
        try:
            return call(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise CtlError(self._describe(method, e)) from None

    def _describe(self, method: str, e: Any) -> str:
        import grpc

        code, details = e.code(), one_line(e.details() or "")
        where = f"{self.what} at {self.address}"
        if code == grpc.StatusCode.UNAVAILABLE:
            return f"cannot reach {where}: {details}"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"{where} did not answer {method} within {self.timeout:g}s"
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return f"{where} does not serve {method} (is it the right address?)"
        return f"{where}: {method}: {code.name}: {details}"

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Unary:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
