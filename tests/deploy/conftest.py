"""Shared by the deploy/ tests: kustomize's output, the CRD generator, and CR-instance validation.

``kubectl kustomize`` renders the manifests exactly as ``kubectl apply -k`` would send them; kubectl is part
of the machines' base image (and of CI's), so its absence fails these tests rather than skipping them.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k directory` would apply."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not on PATH: deploy/ is rendered with `kubectl kustomize`")
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {directory} failed: {out.stderr.strip()}"
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


def load_gen_crds() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_crds", DEPLOY / "gen_crds.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def instance_validator(openapi: dict) -> jsonschema.Draft4Validator:
    """A JSON-schema validator for custom resources as the API server treats a structural schema.

    OpenAPI's ``nullable`` becomes a null type; every object schema that names its properties (and does not
    preserve unknown fields) refuses other keys, because the API server would prune them: a field missing
    from the CRD must fail here, not vanish silently there. apiVersion, kind and metadata are implicit.
    """

    def convert(node: Any) -> Any:
        if isinstance(node, list):
            return [convert(x) for x in node]
        if not isinstance(node, dict):
            return node
        out = {k: convert(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
        if node.get("nullable") and "type" in node:
            out["type"] = [node["type"], "null"]
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out

    schema = convert(copy.deepcopy(openapi))
    schema["properties"] |= {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {}}
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


@pytest.fixture(scope="session")
def base() -> list[dict[str, Any]]:
    return kustomize(DEPLOY)


@pytest.fixture(scope="session")
def istio_crds() -> list[dict[str, Any]]:
    return kustomize(DEPLOY / "istio-crds")


@pytest.fixture(scope="session")
def examples() -> list[dict[str, Any]]:
    return kustomize(DEPLOY / "examples")


@pytest.fixture(scope="session")
def gen_crds() -> ModuleType:
    return load_gen_crds()
