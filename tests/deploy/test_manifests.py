"""deploy/'s kustomize base: valid for every Kubernetes version we support, and what the contract says it is."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest
from packaging.version import Version

import meshproxy
from control.cli import WEBHOOK_LISTEN, build_parser
from control.sources.kube import KINDS
from tests.deploy.conftest import one

NAMESPACE = "meshproxy-system"
NAME = "meshproxy-control"
#: The oldest Kubernetes we support (native sidecars), and the newest kubernetes-validate knows.
OLDEST = "1.29.0"
NEWEST = str(max(Version(v) for v in kubernetes_validate.utils.all_versions()))
VERSIONS = sorted({OLDEST, NEWEST}, key=Version)


def test_the_newest_version_is_newer_than_the_oldest():
    assert Version(NEWEST) > Version(OLDEST)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_validates_strictly(base, istio_crds, examples, version):
    builtin = [o for o in base + istio_crds + examples if not o["apiVersion"].startswith("meshproxy.io/")]
    assert len(builtin) == len(base) + len(istio_crds) + 1  # the examples' one built-in is their Namespace
    for obj in builtin:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {path}: {e.message} (Kubernetes {version})")


@pytest.mark.parametrize("version", VERSIONS)
def test_the_validation_is_strict(base, version):
    # A misspelt field must fail: otherwise the test above proves nothing.
    deployment = copy.deepcopy(one(base, "Deployment", NAME))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, version, strict=True)


def test_the_base_holds_exactly_these_objects(base):
    found = sorted((o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in base)
    ours = {kind.plural for kind in KINDS if kind.group == "meshproxy.io"}
    expected = [
        ("ClusterRole", "", NAME),
        ("ClusterRoleBinding", "", NAME),
        *(("ConfigMap", NAMESPACE, f"meshproxy-dashboard-{view}") for view in ("mesh", "service", "workload")),
        *(("CustomResourceDefinition", "", f"{plural}.meshproxy.io") for plural in ours),
        ("Deployment", NAMESPACE, NAME),
        ("MutatingWebhookConfiguration", "", "meshproxy-sidecar-injector"),
        ("Namespace", "", NAMESPACE),
        ("PodDisruptionBudget", NAMESPACE, NAME),
        ("Role", NAMESPACE, NAME),
        ("RoleBinding", NAMESPACE, NAME),
        ("Service", NAMESPACE, NAME),
        ("ServiceAccount", NAMESPACE, NAME),
    ]
    assert found == sorted(expected)
    # The Istio-group CRDs are optional (deploy/istio-crds), never in the base.
    assert not [o for o in base if o["kind"] == "CustomResourceDefinition" and "istio.io" in o["spec"]["group"]]
    for obj in base:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "meshproxy"


def test_the_namespace_is_not_injected_and_enforces_restricted(base):
    labels = one(base, "Namespace", NAMESPACE)["metadata"]["labels"]
    assert "meshproxy.io/inject" not in labels  # the injector must never need itself to start
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


# -- the control plane Deployment -------------------------------------------------------------------------


@pytest.fixture
def deployment(base):
    return one(base, "Deployment", NAME)


@pytest.fixture
def pod(deployment):
    return deployment["spec"]["template"]["spec"]


@pytest.fixture
def container(pod):
    (c,) = pod["containers"]
    return c


def test_deployment_runs_two_replicas_of_the_versioned_image(deployment, pod, container):
    assert deployment["metadata"]["namespace"] == NAMESPACE
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert container["image"] == f"meshproxy/control:{meshproxy.__version__}"
    assert pod["serviceAccountName"] == NAME
    assert not pod.get("initContainers")


def test_deployment_args_are_meshproxy_controls(container):
    assert "command" not in container  # the image's ENTRYPOINT is meshproxy-control
    assert container["args"] == ["serve", "--kubernetes", "--webhook"]
    args = build_parser().parse_args(container["args"])
    assert args.kubernetes and args.webhook
    # Its defaults are the ports the Service and the probes use.
    assert args.listen == "0.0.0.0:15010"
    assert (args.webhook_listen or WEBHOOK_LISTEN) == "0.0.0.0:15017"
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}


def test_deployment_security_context_meets_restricted(pod, container):
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == 10001 and psc["runAsGroup"] == 10001
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert not sc.get("privileged")
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    # Pod Security "restricted" allows only these volume types; we use emptyDir alone.
    assert [next(k for k in v if k != "name") for v in pod["volumes"]] == ["emptyDir"]
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}


def test_deployment_probes_and_ports(container):
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc-xds": 15010, "https-webhook": 15017}
    # meshproxy-control has no HTTP health endpoint: the probes are TCP connects. It is alive while the config
    # port accepts; ready once the webhook's port does too (it opens after the config port, with its certificate).
    targets = {
        probe: container[probe]["tcpSocket"]["port"] for probe in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert {probe: ports.get(t, t) for probe, t in targets.items()} == {
        "startupProbe": 15010,
        "readinessProbe": 15017,
        "livenessProbe": 15010,
    }
    startup = container["startupProbe"]
    # the config port opens after the first full list of the cluster, which may take 60 s
    assert startup["periodSeconds"] * startup["failureThreshold"] > 60


def test_deployment_resources(container):
    resources = container["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"}
    assert "memory" in resources["limits"]


def test_deployment_spreads_its_replicas(deployment, pod):
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    keys = set()
    for c in pod["topologySpreadConstraints"]:
        assert c["maxSkew"] == 1
        assert c["labelSelector"]["matchLabels"].items() <= labels.items()
        keys.add(c["topologyKey"])
    assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()


def test_pod_disruption_budget(base, deployment):
    pdb = one(base, "PodDisruptionBudget", NAME)
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["metadata"]["namespace"] == NAMESPACE
    assert pdb["spec"]["minAvailable"] == 1 < deployment["spec"]["replicas"]
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]


def test_service_ports(base, deployment, container):
    svc = one(base, "Service", NAME)
    assert svc["metadata"]["namespace"] == NAMESPACE
    assert svc["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    ports = {p["name"]: (p["port"], p["targetPort"], p["protocol"]) for p in svc["spec"]["ports"]}
    assert ports == {"grpc-xds": (15010, 15010, "TCP"), "https-webhook": (443, 15017, "TCP")}
    container_ports = {p["containerPort"] for p in container["ports"]}
    assert {target for _, target, _ in ports.values()} <= container_ports


# -- the webhook configuration -----------------------------------------------------------------------------


def test_mutating_webhook_configuration(base):
    from injector import certs

    config = one(base, "MutatingWebhookConfiguration")
    assert config["metadata"]["name"] == certs.WEBHOOK_CONFIGURATION == "meshproxy-sidecar-injector"
    (hook,) = config["webhooks"]
    assert hook["name"] == "sidecar-injector.meshproxy.io"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["clientConfig"] == {
        "service": {"name": NAME, "namespace": NAMESPACE, "path": "/inject", "port": 443}
    }  # no caBundle: the leader writes it, and re-applying must not erase it
    (rule,) = hook["rules"]
    assert rule["operations"] == ["CREATE"]
    assert rule["apiGroups"] == [""] and rule["apiVersions"] == ["v1"] and rule["resources"] == ["pods"]
    assert hook["namespaceSelector"] == {"matchLabels": {"meshproxy.io/inject": "enabled"}}
    assert hook["objectSelector"] == {
        "matchExpressions": [{"key": "meshproxy.io/inject", "operator": "NotIn", "values": ["false"]}]
    }
    assert hook["failurePolicy"] == "Fail"
    assert hook["sideEffects"] == "None"
    assert hook["timeoutSeconds"] == 10
    assert hook["reinvocationPolicy"] == "Never"


def test_webhook_port_reaches_the_webhook_listener(base, container):
    hook = one(base, "MutatingWebhookConfiguration")["webhooks"][0]
    svc = one(base, "Service", NAME)
    (port,) = [p for p in svc["spec"]["ports"] if p["port"] == hook["clientConfig"]["service"]["port"]]
    assert port["targetPort"] == 15017
    assert {"name": "https-webhook", "containerPort": 15017, "protocol": "TCP"} in container["ports"]
