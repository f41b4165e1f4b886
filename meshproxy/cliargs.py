"""What meshproxy's command lines share: a parser whose errors are one line (exit 2), and the
argument types for addresses, counts and durations.

Used by ``meshproxy`` (meshproxy.cli), ``meshproxy-control`` (control.cli) and ``meshctl``.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

__all__ = ["Parser", "address", "bind_address", "positive", "seconds"]


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One clear line, not a usage dump.
        self.exit(2, f"{self.prog}: error: {message}\n")


def address(value: str, *, listener: bool = False) -> str:
    """``host:port`` to connect to (a DNS name or an IP); the text as given."""
    from meshproxy.config import parse_address

    try:
        parse_address(value, listener=listener)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{value!r}: {e}") from None
    return value


def bind_address(value: str) -> str:
    """``ip:port`` to listen on (port 0: the kernel picks)."""
    return address(value, listener=True)


def positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be at least 1")
    return n


def seconds(value: str) -> float:
    try:
        s = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not s >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"{value!r} must not be negative")
    return s
