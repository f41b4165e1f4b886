"""The committed protobuf code is what tools/gen_proto.py makes from proto/ today: stale generated code fails here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from meshproxy.config.v1 import config_pb2

ROOT = Path(__file__).resolve().parents[2]


def _gen_proto():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "tools" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_code_equals_a_fresh_build(tmp_path):
    written = _gen_proto().generate(tmp_path)
    assert sorted(str(p) for p in written) == [
        "meshproxy/admin/grpc_health_v1/health_pb2.py",
        "meshproxy/admin/grpc_health_v1/health_pb2.pyi",
        "meshproxy/admin/grpc_reflection_v1/reflection_pb2.py",
        "meshproxy/admin/grpc_reflection_v1/reflection_pb2.pyi",
        "meshproxy/admin/grpc_reflection_v1alpha/reflection_pb2.py",
        "meshproxy/admin/grpc_reflection_v1alpha/reflection_pb2.pyi",
        "meshproxy/admin/v1/admin_pb2.py",
        "meshproxy/admin/v1/admin_pb2.pyi",
        "meshproxy/admin/v1/admin_pb2_grpc.py",
        "meshproxy/config/v1/config_pb2.py",
        "meshproxy/config/v1/config_pb2.pyi",
        "meshproxy/config/v1/control_pb2.py",
        "meshproxy/config/v1/control_pb2.pyi",
        "meshproxy/config/v1/control_pb2_grpc.py",
    ]
    for rel in written:
        fresh = (tmp_path / rel).read_text()
        assert (ROOT / rel).read_text() == fresh, f"{rel} is stale: run .venv/bin/python tools/gen_proto.py"


def test_check_mode_reports_a_stale_file(tmp_path, monkeypatch, capsys):
    gen = _gen_proto()
    fake_root = tmp_path / "repo"
    gen.generate(fake_root)
    monkeypatch.setattr(gen, "ROOT", fake_root)
    assert gen.main(["--check"]) == 0
    stale = fake_root / "meshproxy/config/v1/config_pb2.pyi"
    stale.write_text(stale.read_text() + "\n# edited by hand\n")
    assert gen.main(["--check"]) == 1
    assert "config_pb2.pyi" in capsys.readouterr().err


def test_generated_classes_live_in_their_package():
    # The module name is rewritten from protoc's meshproxy.v1.config_pb2 to where the file is.
    assert config_pb2.SidecarConfig.__module__ == "meshproxy.config.v1.config_pb2"
    assert config_pb2.DESCRIPTOR.package == "meshproxy.v1"
    assert config_pb2.DESCRIPTOR.name == "meshproxy/v1/config.proto"
