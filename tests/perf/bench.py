"""Runs a perf/ script the way a user would, for the benchmark smoke tests (which never assert on speed)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

PERF = Path(__file__).resolve().parents[2] / "perf"


def run_bench(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``perf/<script>`` with this interpreter, from the repository root."""
    return subprocess.run(
        [sys.executable, str(PERF / script), *args],
        cwd=PERF.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )


def quick_report(script: str) -> dict:
    """The JSON report of a ``--quick --json --allow-pure`` run, which must succeed."""
    proc = run_bench(script, "--quick", "--json", "--allow-pure")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def load_script(name: str) -> ModuleType:
    """``perf/<name>.py`` as a module, registered as ``name`` (dataclasses look their module up there); the
    script puts perf/ on sys.path to import its siblings, which is undone here."""
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location(name, PERF / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module
