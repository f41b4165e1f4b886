"""The ``meshproxy`` command: ``meshproxy run`` starts a sidecar.

``--config FILE`` takes the YAML (or JSON) form of ``meshproxy.v1.SidecarConfig``;
``--listen ADDR --upstream ADDR`` is the one-cluster, route-everything
shortcut. SIGHUP reads ``--config`` again and swaps it in (listeners stay as
they were); a bad file is refused with its reason, the config in force stays.
``--concurrency N`` forks N workers sharing the listeners with SO_REUSEPORT.
SIGTERM drains: GOAWAY, in-flight streams finish up to ``--drain-timeout``, exit 0.
Bad flags or config: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Any, NoReturn

__all__ = ["main"]

log = logging.getLogger("meshproxy")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One clear line, not a usage dump.
        self.exit(2, f"{self.prog}: error: {message}\n")


def _address(value: str, *, listener: bool = False) -> str:
    from meshproxy.config import parse_address

    try:
        parse_address(value, listener=listener)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{value!r}: {e}") from None
    return value


def _bind_address(value: str) -> str:
    return _address(value, listener=True)


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be at least 1")
    return n


def _seconds(value: str) -> float:
    try:
        s = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if s < 0:
        raise argparse.ArgumentTypeError(f"{value!r} must not be negative")
    return s


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="meshproxy", description="meshproxy: the sidecar of a service mesh for Kubernetes")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run a sidecar", description="Run a meshproxy sidecar.")
    src = run.add_mutually_exclusive_group()
    src.add_argument("--config", metavar="FILE", help="sidecar config (YAML or JSON of meshproxy.v1.SidecarConfig)")
    src.add_argument("--listen", metavar="ADDR", type=_bind_address, help="listen address (with --upstream)")
    run.add_argument("--upstream", metavar="ADDR", type=_address, help="the one upstream, h2c (with --listen)")
    run.add_argument(
        "--admin",
        metavar="ADDR",
        type=_bind_address,
        default="127.0.0.1:15000",
        help="admin service address (default 127.0.0.1:15000)",
    )
    run.add_argument(
        "--metrics",
        metavar="ADDR",
        type=_bind_address,
        default="0.0.0.0:15090",
        help="Prometheus metrics address (default 0.0.0.0:15090)",
    )
    run.add_argument(
        "--concurrency",
        metavar="N",
        type=_positive,
        default=1,
        help="worker processes sharing the listeners (default 1)",
    )
    run.add_argument(
        "--drain-timeout",
        metavar="SECONDS",
        type=_seconds,
        default=10.0,
        help="how long in-flight streams may take to finish on SIGTERM (default 10)",
    )
    run.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return parser


def load_config(args: argparse.Namespace) -> Any:
    from meshproxy import config

    if args.config:
        if args.upstream:
            raise config.ConfigError("--upstream goes with --listen, not with --config")
        cfg = config.load_file(args.config)
    elif args.listen and args.upstream:
        cfg = config.simple(args.listen, args.upstream)
    else:
        raise config.ConfigError("give --config FILE, or --listen ADDR with --upstream ADDR")
    config.validate(cfg)
    return cfg


def _run_worker(cfg: Any, args: argparse.Namespace) -> int:
    import uvloop

    from meshproxy.worker import Worker

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    worker = Worker(cfg, loop, drain_timeout=args.drain_timeout)
    worker.admin_address = args.admin
    worker.metrics_address = args.metrics
    try:
        loop.run_until_complete(worker.start())
    except OSError as e:
        print(f"meshproxy: error: cannot listen: {e.strerror or e}", file=sys.stderr)
        return 1
    worker.install_signals()
    if args.config:
        loop.add_signal_handler(signal.SIGHUP, _reload, worker, args.config)
    log.info("listening on %s", ", ".join(f"{h}:{p}" for h, p in worker.bound_addresses()))
    loop.run_until_complete(worker.wait_stopped())
    loop.close()
    return 0


def _reload(worker: Any, path: str) -> None:
    """SIGHUP: read ``--config`` again; a bad file is refused with its reason and the config in force stays."""
    from meshproxy import config

    try:
        cfg = config.load_file(path)
        worker.apply(cfg)
    except config.ConfigError as e:
        log.error("config reload refused, keeping version %r: %s", worker.runtime.version, e)
        return
    log.warning("config version %r in force", cfg.version)


def _supervise(cfg: Any, args: argparse.Namespace) -> int:
    """Fork ``--concurrency`` workers; forward SIGTERM/SIGINT; exit 0 if they all did."""
    children = []
    for _ in range(args.concurrency):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 1
            try:
                code = _run_worker(cfg, args)
            finally:
                os._exit(code)
        children.append(pid)

    def forward(signum: int, _frame: Any) -> None:
        # SIGTERM and SIGINT drain every worker; SIGHUP makes each re-read the config.
        sig = signal.SIGHUP if signum == signal.SIGHUP else signal.SIGTERM
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    status = 0
    for pid in children:
        _, code = os.waitpid(pid, 0)  # retried across our signal handlers (PEP 475)
        if os.waitstatus_to_exitcode(code) != 0:
            status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from meshproxy.config import ConfigError

    try:
        cfg = load_config(args)
    except ConfigError as e:
        print(f"meshproxy: error: {e}", file=sys.stderr)
        return 2
    if args.concurrency == 1:
        return _run_worker(cfg, args)
    for ls in cfg.listeners:
        if ls.address.endswith(":0"):
            print(f"meshproxy: error: listener {ls.name}: port 0 cannot be shared by several workers", file=sys.stderr)
            return 2
    return _supervise(cfg, args)


if __name__ == "__main__":
    sys.exit(main())
