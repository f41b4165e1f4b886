"""deploy/'s CustomResourceDefinitions: the kinds the control plane watches, with structural schemas that
let through every field control/model.py reads, refuses or ignores, and reject what Istio's shapes do not have.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import yaml

from control import model
from control.model import API_VERSIONS, parse
from control.sources.files import read_file
from control.sources.kube import KINDS
from tests.deploy.conftest import REPO, instance_validator

MESH_KINDS = ("VirtualService", "DestinationRule", "ServiceEntry", "PeerAuthentication", "AuthorizationPolicy")


def crd_for(crds: list[dict], group: str, kind: str) -> dict:
    found = [
        c
        for c in crds
        if c["kind"] == "CustomResourceDefinition" and (c["spec"]["group"], c["spec"]["names"]["kind"]) == (group, kind)
    ]
    assert len(found) == 1, f"{kind}.{group}: {len(found)} CRDs"
    return found[0]


def openapi(crd: dict, version: str) -> dict:
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return v["schema"]["openAPIV3Schema"]


def test_the_generated_files_are_up_to_date(gen_crds):
    assert gen_crds.main(["--check"]) == 0, "run: python deploy/gen_crds.py"
    for which, path in gen_crds.OUTPUTS.items():
        assert path.read_text(encoding="utf-8") == gen_crds.render(which)


def test_crds_are_exactly_the_kinds_the_control_plane_watches(base, istio_crds):
    """Group, version, plural and kind of every custom kind control/sources/kube.py watches."""
    watched = {(k.group, k.plural, k.kind, k.versions) for k in KINDS if k.group.endswith(("istio.io", "meshproxy.io"))}
    served = set()
    for crd in [o for o in base if o["kind"] == "CustomResourceDefinition"] + istio_crds:
        spec = crd["spec"]
        assert crd["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}"
        assert spec["scope"] == "Namespaced"
        assert spec["names"]["singular"] == spec["names"]["kind"].lower()
        assert spec["names"]["listKind"] == spec["names"]["kind"] + "List"
        versions = [v["name"] for v in spec["versions"]]
        assert all(v["served"] for v in spec["versions"])
        assert [v["storage"] for v in spec["versions"]].count(True) == 1
        # kube.py tries its versions in order and watches the first one served: every one must be
        served.add((spec["group"], spec["names"]["plural"], spec["names"]["kind"], tuple(versions)))
    watched_by_kind = {(g, p, k): set(v) for g, p, k, v in watched}
    served_by_kind = {(g, p, k): set(v) for g, p, k, v in served}
    assert served_by_kind == watched_by_kind
    # and control/model.py accepts each kind under each of those apiVersions
    for group, _, kind in served_by_kind:
        for version in served_by_kind[group, _, kind]:
            assert f"{group}/{version}" in API_VERSIONS[kind]


def test_our_group_has_no_short_names_and_istios_has_istios(base, istio_crds):
    for crd in [o for o in base if o["kind"] == "CustomResourceDefinition"]:
        assert "shortNames" not in crd["spec"]["names"]  # they would clash with Istio's when both are installed
        assert crd["spec"]["names"]["categories"] == ["meshproxy"]
    storage = {
        c["spec"]["names"]["kind"]: [v["name"] for v in c["spec"]["versions"] if v["storage"]] for c in istio_crds
    }
    # Istio's own storage versions: installing Istio over these later needs no storage migration
    assert storage == {
        "VirtualService": ["v1alpha3"],
        "DestinationRule": ["v1alpha3"],
        "ServiceEntry": ["v1alpha3"],
        "PeerAuthentication": ["v1beta1"],
        "AuthorizationPolicy": ["v1beta1"],
    }


# -- structural schemas -----------------------------------------------------------------------------------

#: What may stand inside allOf/anyOf/oneOf/not of a structural schema: value validations, no types.
_JUNCTOR_KEYS = {
    "required", "not", "anyOf", "allOf", "oneOf", "enum", "pattern", "minimum", "maximum", "minLength",
    "maxLength", "minItems", "maxItems", "minProperties", "maxProperties", "multipleOf", "uniqueItems", "format",
}  # fmt: skip


def structural_problems(node: dict, path: str, preserved: list[str]) -> list[str]:
    """Kubernetes' structural-schema rules, as the API server checks them on a CRD's create."""
    problems = []
    if node.get("x-kubernetes-preserve-unknown-fields"):
        preserved.append(path)
    if "type" not in node and not node.get("x-kubernetes-int-or-string"):
        problems.append(f"{path}: no type")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: both properties and additionalProperties")
    if node.get("type") == "object" and not (
        "properties" in node or "additionalProperties" in node or node.get("x-kubernetes-preserve-unknown-fields")
    ):
        problems.append(f"{path}: an object with neither properties nor additionalProperties")

    def junctor(branch: dict, where: str) -> None:
        for key, value in branch.items():
            if key not in _JUNCTOR_KEYS:
                problems.append(f"{where}: {key!r} inside a logical junctor")
            elif key in ("anyOf", "allOf", "oneOf"):
                for i, b in enumerate(value):
                    junctor(b, f"{where}.{key}[{i}]")
            elif key == "not":
                junctor(value, f"{where}.not")
            elif key == "required":
                missing = set(value) - set(node.get("properties", {}))
                if missing:
                    problems.append(f"{where}: requires {sorted(missing)}, not among the properties")

    for key in ("anyOf", "allOf", "oneOf"):
        for i, branch in enumerate(node.get(key, ())):
            junctor(branch, f"{path}.{key}[{i}]")
    if "not" in node:
        junctor(node["not"], f"{path}.not")
    for name, sub in node.get("properties", {}).items():
        problems += structural_problems(sub, f"{path}.{name}" if path else name, preserved)
    if isinstance(node.get("additionalProperties"), dict):
        problems += structural_problems(node["additionalProperties"], f"{path}[*]", preserved)
    if "items" in node:
        problems += structural_problems(node["items"], f"{path}[]", preserved)
    for field in node.get("required", ()):
        if field not in node.get("properties", {}):
            problems.append(f"{path}: requires {field!r}, not among the properties")
    return problems


def all_crds(base: list[dict], istio_crds: list[dict]) -> list[tuple[dict, str]]:
    crds = [o for o in base if o["kind"] == "CustomResourceDefinition"] + istio_crds
    return [(c, v["name"]) for c in crds for v in c["spec"]["versions"]]


def test_schemas_are_structural(base, istio_crds):
    for crd, version in all_crds(base, istio_crds):
        preserved: list[str] = []
        problems = structural_problems(openapi(crd, version), "", preserved)
        assert not problems, f"{crd['metadata']['name']} {version}: {problems}"
        # only where Istio's CRDs preserve unknown fields
        assert preserved == ["status"], f"{crd['metadata']['name']} {version}: {preserved}"


def test_the_structural_check_catches_what_the_api_server_refuses(base):
    schema = copy.deepcopy(openapi(crd_for(base, "meshproxy.io", "VirtualService"), "v1alpha1"))
    http = schema["properties"]["spec"]["properties"]["http"]
    del http["items"]["type"]
    http["items"]["properties"]["match"]["items"]["properties"]["uri"]["oneOf"][1]["type"] = "object"
    problems = structural_problems(schema, "", [])
    assert problems == [
        "spec.http[]: no type",
        "spec.http[].match[].uri.oneOf[1]: 'type' inside a logical junctor",
    ]


def test_the_istio_groups_have_the_same_schemas(base, istio_crds):
    for kind in MESH_KINDS:
        ours = openapi(crd_for(base, "meshproxy.io", kind), "v1alpha1")
        crd = next(c for c in istio_crds if c["spec"]["names"]["kind"] == kind)
        for v in crd["spec"]["versions"]:
            assert v["schema"]["openAPIV3Schema"] == ours, (kind, v["name"])


def field_names_in_model() -> set[str]:
    """Every field name control/model.py reads, refuses or ignores in an Istio-shaped spec: the arguments of
    its ``.fields(known, refused=..., ignored=...)`` calls."""
    tree = ast.parse(Path(model.__file__).read_text(encoding="utf-8"))
    names: set[str] = set()

    def strings(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Name):
            return list(getattr(model, node.id))
        if isinstance(node, ast.Dict):
            return [k.value for k in node.keys if isinstance(k, ast.Constant)]
        return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]

    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "fields":
            for arg in (*call.args, *(kw.value for kw in call.keywords)):
                names.update(strings(arg))
    return names


def property_names(schema: dict) -> set[str]:
    out = set()
    for name, sub in schema.get("properties", {}).items():
        out.add(name)
        out |= property_names(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            out |= property_names(schema[key])
    return out


# Read by control/model.py from Kubernetes Services' ports (its _ports(kubernetes=True)), not from a CRD.
_KUBERNETES_SERVICE_FIELDS = {"appProtocol", "nodePort"}


def test_every_field_the_model_knows_is_in_the_schemas(base):
    """The API server prunes a field its schema does not name: a field control/model.py refuses (redirect,
    mirror, ...) must reach it, to be refused, rather than vanish and leave the route silently different."""
    names = field_names_in_model()
    assert {"retryBudget", "healthCheck", "grpc", "redirect", "minHealthPercent", "portLevelMtls"} <= names
    in_schemas = set()
    for kind in MESH_KINDS:
        in_schemas |= property_names(openapi(crd_for(base, "meshproxy.io", kind), "v1alpha1"))
    assert sorted(names - in_schemas - _KUBERNETES_SERVICE_FIELDS) == []


# -- instances against the schemas --------------------------------------------------------------------------


# Most of what control/model.py accepts, by path, in one object per kind; checked to parse without an error.
EVERY_FIELD = list(
    yaml.safe_load_all(
        """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: everything, namespace: default}
spec:
  hosts: [reviews]
  gateways: [mesh]
  exportTo: ["."]
  http:
  - name: grpc-canary
    match:
    - name: canary
      grpc: {service: reviews.Reviews, method: Get}
      headers: {x-canary: {exact: "1"}, x-debug: {}}
      withoutHeaders: {x-skip: {prefix: "y"}}
      sourceLabels: {app: productpage}
      sourceNamespace: default
      port: 9080
    route:
    - {destination: {host: reviews, subset: v2, port: {number: 9080}}, weight: 100}
    timeout: 1.5s
    retries:
      attempts: 3
      perTryTimeout: 500ms
      retryOn: unavailable,5xx
      backoff: 25ms
      retryBudget: {retryRatio: 0.2, minRetriesPerSecond: 10, ttl: 10s}
    fault:
      delay: {fixedDelay: 100ms, percentage: {value: 5}}
      abort: {grpcStatus: UNAVAILABLE, percentage: {value: 1}}
  - match: [{uri: {prefix: /v1/}, method: {exact: GET}}]
    rewrite: {uri: /v2/, authority: reviews-v2}
    route: [{destination: {host: reviews, subset: v1}}]
  - directResponse: {status: 503, body: {string: down}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: everything, namespace: default}
spec:
  host: reviews
  exportTo: ["*"]
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
    connectionPool:
      tcp: {connectTimeout: 250ms, maxConnections: 100}
      http: {http1MaxPendingRequests: 10, http2MaxRequests: 1000, maxRetries: 3, idleTimeout: 60s,
             maxConcurrentStreams: 100}
    outlierDetection: {consecutive5xxErrors: 5, consecutiveGatewayErrors: 3, splitExternalLocalOriginErrors: true,
                       consecutiveLocalOriginFailures: 2, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 50}
    retryBudget: {retryRatio: 0.2, minRetriesPerSecond: 10, ttl: 10s}
    healthCheck: {interval: 5s, timeout: 1s, unhealthyThreshold: 3, healthyThreshold: 2,
                  grpcServiceName: reviews.Reviews}
  subsets:
  - {name: v1, labels: {version: v1}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: everything, namespace: default}
spec:
  hosts: [api.example.com]
  location: MESH_EXTERNAL
  resolution: DNS
  exportTo: ["."]
  ports: [{number: 443, name: grpc, protocol: GRPC, targetPort: 8443}]
  endpoints: [{address: api-1.example.com, ports: {grpc: 9443}, labels: {zone: a}, weight: 2}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: everything, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  mtls: {mode: PERMISSIVE}
  portLevelMtls: {"9080": {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: everything, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: DENY
  rules:
  - from:
    - source: {principals: [cluster.local/ns/shop/sa/buyer], notNamespaces: [shop], ipBlocks: [10.0.0.0/8],
               notRemoteIpBlocks: [192.0.2.1], requestPrincipals: ["*"]}
    to:
    - operation: {methods: [POST], paths: [/admin/*], notPorts: ["9090"], hosts: [reviews]}
    when:
    - {key: "request.headers[x-user]", values: [bob], notValues: [alice]}
"""
    )
)


@pytest.fixture(scope="module")
def samples(examples) -> list[tuple[dict, str]]:
    """Every mesh resource in the repository's examples, deploy/examples and the control plane's test data
    that the control plane accepts without an error (broken.yaml is meant to fail)."""
    files = [
        REPO / "examples" / "seed" / "seed.yaml",
        *sorted((REPO / "examples" / "demo" / "mesh").glob("*.yaml")),
        *sorted(p for p in (REPO / "tests" / "control" / "data").glob("*.yaml") if p.name != "broken.yaml"),
    ]
    out = [(obj, "deploy/examples") for obj in examples if obj["kind"] in MESH_KINDS]
    out += [(obj, "EVERY_FIELD") for obj in EVERY_FIELD]
    for path in files:
        objects, bad = read_file(path)
        assert not bad, (path, bad)
        out += [(obj, str(path.relative_to(REPO))) for obj in objects if obj.get("kind") in MESH_KINDS]
    for obj, origin in out:  # one at a time: the files define some of the same objects
        assert not parse([(obj, origin)]).errors(), (origin, obj["kind"], obj["metadata"]["name"])
    return out


def test_the_samples_cover_every_kind(samples):
    assert {obj["kind"] for obj, _ in samples} == set(MESH_KINDS)


def test_samples_validate_against_our_group(base, samples):
    validators = {k: instance_validator(openapi(crd_for(base, "meshproxy.io", k), "v1alpha1")) for k in MESH_KINDS}
    for obj, origin in samples:
        ours = copy.deepcopy(obj) | {"apiVersion": "meshproxy.io/v1alpha1"}
        errors = [
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validators[obj["kind"]].iter_errors(ours)
        ]
        assert not errors, f"{obj['kind']} {obj['metadata']['name']} ({origin}): {errors}"


def test_samples_validate_against_the_istio_groups(istio_crds, samples):
    for obj, origin in samples:
        group, _, version = obj["apiVersion"].rpartition("/")
        if group == "meshproxy.io":
            continue
        validator = instance_validator(openapi(crd_for(istio_crds, group, obj["kind"]), version))
        errors = [e.message for e in validator.iter_errors(obj)]
        assert not errors, f"{obj['kind']} {obj['metadata']['name']} ({origin}): {errors}"


VS = {
    "apiVersion": "meshproxy.io/v1alpha1",
    "kind": "VirtualService",
    "metadata": {"name": "reviews", "namespace": "default"},
    "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]},
}


def with_route(**fields) -> dict:
    vs = copy.deepcopy(VS)
    vs["spec"]["http"][0] |= fields
    return vs


@pytest.mark.parametrize(
    ("obj", "why"),
    [
        ({**VS, "spec": {**VS["spec"], "htp": []}}, "a misspelt field"),
        (with_route(timeout="10 seconds"), "not a duration"),
        (with_route(route=[{"destination": {"host": "reviews"}, "weight": "80"}]), "a string weight"),
        (with_route(match=[{"uri": {"exact": "/a", "prefix": "/"}}]), "two kinds of string match"),
        (with_route(route=[{"weight": 100}]), "a route without its destination"),
        (with_route(match=[{"port": 70000}]), "a port out of range"),
        (with_route(retries={"retryBudget": {"retryRatio": "a lot"}}), "a retry budget's ratio that is no number"),
    ],
)
def test_schemas_refuse_what_istio_refuses(base, obj, why):
    validator = instance_validator(openapi(crd_for(base, "meshproxy.io", "VirtualService"), "v1alpha1"))
    assert list(validator.iter_errors(obj)), why


def test_refused_fields_reach_the_control_plane(base):
    """Fields meshproxy does not implement pass the schema (so the API server keeps them) and are then refused
    by the control plane with an error naming them."""
    validator = instance_validator(openapi(crd_for(base, "meshproxy.io", "VirtualService"), "v1alpha1"))
    for field, value in (
        ("redirect", {"uri": "/v2", "redirectCode": 301}),
        ("mirror", {"host": "reviews", "subset": "v2"}),
        ("headers", {"request": {"set": {"x-canary": "1"}}}),
        ("delegate", {"name": "reviews-routes", "namespace": "shop"}),
    ):
        vs = with_route(**{field: value})
        assert not list(validator.iter_errors(vs)), field
        (problem,) = parse([(vs, "test")]).errors()
        assert problem.path == f"spec.http[0].{field}"
