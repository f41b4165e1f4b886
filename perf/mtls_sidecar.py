"""`meshproxy run` with its workload identity read from files instead of asked of the control plane (for bench_mtls).

Usage: ``python perf/mtls_sidecar.py [--identity DIR] <meshproxy run options>``. ``DIR`` holds
``cert.pem`` (the chain, leaf first), ``key.pem``, ``bundle.pem`` (the trust bundle) and
``spiffe_id``: every worker gets them as ``meshproxy.identity`` would hand them over
(``tls.install`` then ``Security.update``) before it starts listening. Everything else is
``meshproxy run`` itself (``meshproxy.cli.main``): the same workers, telemetry, admin and
signals as the plaintext sidecar. Without ``--identity`` it is exactly ``meshproxy run``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def credentials(directory: Path):
    """The ``meshproxy.identity.Credentials`` in ``directory``."""
    from meshproxy.identity import Credentials

    read = lambda name: (directory / name).read_bytes()  # noqa: E731
    return Credentials(read("cert.pem"), read("key.pem"), read("bundle.pem"), read("spiffe_id").decode().strip(), 0, 0)


def give_identity(creds) -> None:
    """Make every Worker that ``meshproxy.cli`` creates hold ``creds`` from its construction on."""
    from meshproxy import tls
    from meshproxy import worker as worker_module

    base = worker_module.Worker

    class IdentifiedWorker(base):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            tls.install(self).update(creds)

    worker_module.Worker = IdentifiedWorker  # cli._run_worker imports it from the module when it runs


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    p.add_argument("--identity", type=Path, help="directory with cert.pem, key.pem, bundle.pem, spiffe_id")
    args, rest = p.parse_known_args(argv)
    if args.identity is not None:
        give_identity(credentials(args.identity))
    from meshproxy import cli

    return cli.main(["run", *rest])


if __name__ == "__main__":
    sys.exit(main())
