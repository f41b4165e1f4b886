"""Shared checks for the twin selectors (meshproxy.codec, meshproxy.lb): what a fresh interpreter picks and imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

#: Modules a sans-IO core must never pull in: it takes bytes (or numbers)
#: and returns them; only the transport layer touches sockets or a loop.
IO_MODULES = frozenset({"asyncio", "socket", "ssl", "selectors", "uvloop"})


def probe(package: str, attrs: tuple[str, ...], no_extensions: bool) -> dict:
    """Import ``package`` in a fresh interpreter; return the module names of ``attrs``,
    its ``USING_EXTENSIONS`` and every module loaded, as a dict."""
    code = (
        "import importlib, json, sys\n"
        f"pkg = importlib.import_module({package!r})\n"
        f"out = {{a: getattr(pkg, a).__name__ for a in {attrs!r}}}\n"
        "out['ext'] = pkg.USING_EXTENSIONS\n"
        "out['modules'] = sorted(sys.modules)\n"
        "print(json.dumps(out))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MESHPROXY_NO_EXTENSIONS"}
    if no_extensions:
        env["MESHPROXY_NO_EXTENSIONS"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)
