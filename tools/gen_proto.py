"""Regenerates meshproxy's protobuf Python code from proto/ with grpc_tools.protoc.

    .venv/bin/python tools/gen_proto.py           # rewrite the committed *_pb2.py / *_pb2.pyi
    .venv/bin/python tools/gen_proto.py --check   # exit 1 if they are stale

protoc names Python modules after the .proto path (``meshproxy/v1/x.proto``
-> ``meshproxy.v1.x_pb2``), but our generated modules live in the package
that owns them (``meshproxy.config.v1``). ``PROTOS`` maps one to the other;
the output is post-processed so that module names and imports between our
own protos follow that map, and so that ruff leaves generated code alone.
The result depends only on the .proto files and the grpcio-tools version,
which tests/config/test_generated.py checks.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto"

#: .proto path under proto/ -> the package directory its generated modules live in.
PROTOS = {
    "meshproxy/v1/config.proto": "meshproxy/config/v1",
    "meshproxy/v1/control.proto": "meshproxy/config/v1",
    "meshproxy/admin/v1/admin.proto": "meshproxy/admin/v1",
    # gRPC's own services, served by the admin server. Vendored under the file names grpcio's
    # health-checking and reflection packages use, with the same content: a process importing both
    # (tests, meshctl) then registers each file once in the default descriptor pool.
    "grpc_health/v1/health.proto": "meshproxy/admin/grpc_health_v1",
    "grpc_reflection/v1alpha/reflection.proto": "meshproxy/admin/grpc_reflection_v1alpha",
    "grpc_reflection/v1/reflection.proto": "meshproxy/admin/grpc_reflection_v1",
}

#: Protos that declare services: they also get a ``*_pb2_grpc.py`` (which imports grpcio;
#: the sidecar never imports it, only the control plane and tests do).
SERVICES = {"meshproxy/v1/control.proto", "meshproxy/admin/v1/admin.proto"}

HEADER = "# ruff: noqa\n# fmt: off\n"


def _module(proto: str) -> tuple[str, str]:
    """(the module name protoc gives ``proto``, the one we give it)."""
    stem = Path(proto).stem + "_pb2"
    protoc_mod = str(Path(proto).with_name(stem)).replace("/", ".")
    ours = PROTOS[proto].replace("/", ".") + "." + stem
    return protoc_mod, ours


def _rename(text: str) -> str:
    for proto in PROTOS:
        protoc_mod, ours = _module(proto)
        protoc_pkg, _, name = protoc_mod.rpartition(".")
        ours_pkg = ours.rpartition(".")[0]
        # The module name passed to the descriptor builder (classes' __module__) ...
        text = text.replace(f"'{protoc_mod}'", f"'{ours}'")
        # ... and imports of it from another of our protos' generated code.
        text = re.sub(
            rf"^from {re.escape(protoc_pkg)} import {name}\b", f"from {ours_pkg} import {name}", text, flags=re.M
        )
    return text


def generate(out_dir: Path) -> list[Path]:
    """Generate every proto into ``out_dir`` laid out as the repository is; return the files written, relative."""
    from grpc_tools import protoc

    wkt = Path(protoc.__file__).resolve().parent / "_proto"
    written = []
    with tempfile.TemporaryDirectory() as raw:
        args = ["protoc", f"-I{PROTO_DIR}", f"-I{wkt}", f"--python_out={raw}", f"--pyi_out={raw}"]
        args += [f"--grpc_python_out={raw}"]
        args += [str(PROTO_DIR / p) for p in PROTOS]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        for proto, package in PROTOS.items():
            stem = Path(proto).stem + "_pb2"
            outputs = [stem + ".py", stem + ".pyi"] + ([stem + "_grpc.py"] if proto in SERVICES else [])
            for name in outputs:
                src = Path(raw) / Path(proto).parent / name
                rel = Path(package) / name
                dest = out_dir / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(HEADER + _rename(src.read_text()))
                written.append(rel)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed code differs from a fresh build")
    args = parser.parse_args(argv)
    if not args.check:
        for rel in generate(ROOT):
            print(f"wrote {rel}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        stale = [
            rel
            for rel in generate(Path(tmp))
            if not (ROOT / rel).exists() or (ROOT / rel).read_bytes() != (Path(tmp) / rel).read_bytes()
        ]
    for rel in stale:
        print(f"stale: {rel} (run {os.path.relpath(__file__, ROOT)})", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
