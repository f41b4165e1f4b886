"""injector.mutate: the injected pod for many shapes, each one strictly valid for the oldest and newest Kubernetes."""

from __future__ import annotations

import copy
import json
import re

import pytest

from injector.mutate import (
    INIT_CONTAINER,
    PROBES_ENV,
    PROXY_CONTAINER,
    STATUS_ANNOTATION,
    InjectError,
    Settings,
    inject,
    inject_pod,
    json_patch,
    workload_name,
)
from meshproxy import __version__
from tests.fakekube.server import json_patch as apply_patch
from tests.injector.validation import validate

NATIVE, CLASSIC = Settings(), Settings(native=False)


def app(name: str = "app", **extra) -> dict:
    return {"name": name, "image": "example/app:1", "ports": [{"name": "http", "containerPort": 8080}], **extra}


def pod(*containers: dict, labels=None, annotations=None, **spec) -> dict:
    meta: dict = {"name": "web-0", "namespace": "shop", "labels": labels or {"app": "web"}}
    if annotations is not None:
        meta["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"containers": list(containers) or [app()], **spec},
    }


def template_of(obj: dict) -> dict:
    if obj["kind"] == "Pod":
        return obj
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    return obj["spec"]["template"]


def named(containers: list[dict], name: str) -> dict:
    return next(c for c in containers if c["name"] == name)


def workloads() -> list[dict]:
    template = {"metadata": {"labels": {"app": "reviews", "version": "v1"}}, "spec": {"containers": [app("reviews")]}}
    selector = {"matchLabels": {"app": "reviews", "version": "v1"}}
    job_template = {"metadata": {}, "spec": {"containers": [app("batch")], "restartPolicy": "Never"}}
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "reviews-v1"},
         "spec": {"selector": selector, "template": copy.deepcopy(template)}},
        {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "reviews-db"},
         "spec": {"selector": selector, "serviceName": "db", "template": copy.deepcopy(template)}},
        {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "agent"},
         "spec": {"selector": selector, "template": copy.deepcopy(template)}},
        {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "reviews-v1-abc"},
         "spec": {"selector": selector, "template": copy.deepcopy(template)}},
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "migrate"},
         "spec": {"template": copy.deepcopy(job_template)}},
        {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "nightly"},
         "spec": {"schedule": "0 3 * * *", "jobTemplate": {"spec": {"template": copy.deepcopy(job_template)}}}},
    ]  # fmt: skip


# ---- the shape of an injected pod ------------------------------------------------------------------------


def test_native_sidecar_by_default():
    original = pod(app(), initContainers=[{"name": "migrate", "image": "example/migrate:1"}])
    new, patch = inject_pod(original, NATIVE)
    validate(new)
    spec = new["spec"]
    assert [c["name"] for c in spec["initContainers"]] == [INIT_CONTAINER, PROXY_CONTAINER, "migrate"]
    assert [c["name"] for c in spec["containers"]] == ["app"]
    proxy = spec["initContainers"][1]
    assert proxy["restartPolicy"] == "Always"
    assert proxy["startupProbe"]["httpGet"] == {"path": "/ready", "port": 15021, "scheme": "HTTP"}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 15021, "scheme": "HTTP"}
    assert "lifecycle" not in proxy  # kubelet stops native sidecars after the app: no preStop needed
    status = json.loads(new["metadata"]["annotations"][STATUS_ANNOTATION])
    assert status == {
        "containers": [],
        "initContainers": [INIT_CONTAINER, PROXY_CONTAINER],
        "native": True,
        "version": __version__,
        "volumes": ["meshproxy-token"],
    }
    assert new["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "app"
    assert apply_patch(original, patch) == new
    assert original == pod(app(), initContainers=[{"name": "migrate", "image": "example/migrate:1"}])


def test_classic_sidecar_by_annotation():
    original = pod(
        app(),
        annotations={"sidecar.meshproxy.io/nativeSidecar": "false"},
        initContainers=[{"name": "migrate", "image": "example/migrate:1"}],
    )
    new, patch = inject_pod(original, NATIVE)
    validate(new)
    spec = new["spec"]
    assert [c["name"] for c in spec["containers"]] == [PROXY_CONTAINER, "app"]
    # the app's init containers run before the rules exist, as nothing would serve their redirected traffic
    assert [c["name"] for c in spec["initContainers"]] == ["migrate", INIT_CONTAINER]
    proxy = spec["containers"][0]
    assert "restartPolicy" not in proxy and "startupProbe" not in proxy
    assert proxy["lifecycle"] == {
        "postStart": {
            "exec": {
                "command": ["meshproxy", "wait-ready", "--url", "http://127.0.0.1:15021/ready", "--timeout", "120"]
            }
        },
        "preStop": {"exec": {"command": ["sleep", "5"]}},
    }
    assert json.loads(new["metadata"]["annotations"][STATUS_ANNOTATION])["containers"] == [PROXY_CONTAINER]
    assert apply_patch(original, patch) == new


def test_settings_choose_the_mode_and_the_annotation_wins():
    new, _ = inject(pod(), CLASSIC)
    assert new["spec"]["containers"][0]["name"] == PROXY_CONTAINER
    new, _ = inject(pod(annotations={"sidecar.meshproxy.io/nativeSidecar": "true"}), CLASSIC)
    assert new["spec"]["initContainers"][1]["name"] == PROXY_CONTAINER
    with pytest.raises(InjectError, match=r"nativeSidecar: 'yes' is not \"true\" or \"false\""):
        inject(pod(annotations={"sidecar.meshproxy.io/nativeSidecar": "yes"}), NATIVE)


def test_init_container_has_exactly_net_admin_and_net_raw():
    new, _ = inject(pod(), NATIVE)
    init = new["spec"]["initContainers"][0]
    assert init["name"] == INIT_CONTAINER
    assert init["securityContext"]["capabilities"] == {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
    assert init["securityContext"]["runAsUser"] == 0 and init["securityContext"]["runAsNonRoot"] is False
    assert init["securityContext"]["privileged"] is False
    assert init["command"] == [
        "meshproxy", "iptables", "--proxy-uid", "1337", "--proxy-gid", "1337", "--outbound-port", "15001",
        "--inbound-port", "15006", "--include-outbound-cidrs", "*", "--include-inbound-ports", "*",
    ]  # fmt: skip


def test_proxy_container():
    new, _ = inject(pod(labels={"app": "web", "version": "v2"}), Settings(image="registry.local/proxy:dev"))
    proxy = named(new["spec"]["initContainers"], PROXY_CONTAINER)
    assert proxy["image"] == "registry.local/proxy:dev"
    assert proxy["command"] == ["meshproxy"]
    assert proxy["args"] == [
        "run", "--control-plane", "meshproxy-control.meshproxy-system.svc:15010",
        "--node-id", "$(POD_NAME).$(POD_NAMESPACE)", "--namespace", "$(POD_NAMESPACE)",
        "--workload", "web-0", "--labels", "app=web,version=v2",
        "--listen", "0.0.0.0:15001", "--transparent", "--inbound-listen", "0.0.0.0:15006",
        "--ready", "0.0.0.0:15021", "--metrics", "0.0.0.0:15090", "--admin", "127.0.0.1:15000",
    ]  # fmt: skip
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in proxy["env"]}
    assert env == {
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
        "POD_IP": "status.podIP",
        "SERVICE_ACCOUNT": "spec.serviceAccountName",
        "NODE_NAME": "spec.nodeName",
    }
    assert proxy["ports"] == [
        {"name": "http-metrics", "containerPort": 15090, "protocol": "TCP"},
        {"name": "http-ready", "containerPort": 15021, "protocol": "TCP"},
    ]
    sc = proxy["securityContext"]
    assert (sc["runAsUser"], sc["runAsGroup"], sc["runAsNonRoot"], sc["readOnlyRootFilesystem"]) == (
        1337,
        1337,
        True,
        True,
    )
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["allowPrivilegeEscalation"] is False
    assert proxy["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}}
    assert proxy["volumeMounts"] == [
        {"name": "meshproxy-token", "mountPath": "/var/run/secrets/meshproxy", "readOnly": True}
    ]
    assert new["spec"]["volumes"] == [
        {
            "name": "meshproxy-token",
            "projected": {
                "sources": [
                    {"serviceAccountToken": {"audience": "meshproxy", "expirationSeconds": 43200, "path": "token"}}
                ]
            },
        }
    ]


def test_existing_volumes_and_annotations_are_kept():
    original = pod(
        app(volumeMounts=[{"name": "data", "mountPath": "/data"}]),
        annotations={"team": "shop"},
        volumes=[{"name": "data", "emptyDir": {}}],
    )
    new, patch = inject_pod(original, NATIVE)
    validate(new)
    assert [v["name"] for v in new["spec"]["volumes"]] == ["data", "meshproxy-token"]
    assert new["metadata"]["annotations"]["team"] == "shop"
    # the label auto mTLS keys on (control.security): clients' sidecars speak mTLS to this pod
    assert new["metadata"]["labels"]["security.istio.io/tlsMode"] == "istio"
    # Prometheus scrapes the sidecar's /metrics
    assert {k: new["metadata"]["annotations"][k] for k in ("prometheus.io/port", "prometheus.io/path")} == {
        "prometheus.io/port": "15090",
        "prometheus.io/path": "/metrics",
    }
    # annotations and labels are added one by one, so another webhook's are not overwritten
    assert {op["path"] for op in patch} == {
        "/metadata/annotations/sidecar.meshproxy.io~1status",
        "/metadata/annotations/kubectl.kubernetes.io~1default-container",
        "/metadata/labels/security.istio.io~1tlsMode",
        "/metadata/annotations/prometheus.io~1scrape",
        "/metadata/annotations/prometheus.io~1port",
        "/metadata/annotations/prometheus.io~1path",
        "/spec/initContainers",
        "/spec/volumes",
    }
    assert apply_patch(original, patch) == new


# ---- annotations ------------------------------------------------------------------------------------------


def test_traffic_annotations_become_iptables_flags():
    annotations = {
        "traffic.meshproxy.io/excludeOutboundPorts": "5432, 6379",
        "traffic.meshproxy.io/excludeInboundPorts": "9090",
        "traffic.meshproxy.io/includeInboundPorts": "8080,8443",
        "traffic.meshproxy.io/excludeOutboundIPRanges": "169.254.169.254/32,10.0.0.1",
        "traffic.meshproxy.io/includeOutboundIPRanges": "10.0.0.0/8,fd00::/8",
    }
    new, _ = inject(pod(annotations=annotations), NATIVE)
    validate(new)
    assert new["spec"]["initContainers"][0]["command"][10:] == [
        "--include-outbound-cidrs", "10.0.0.0/8,fd00::/8",
        "--exclude-outbound-cidrs", "169.254.169.254/32,10.0.0.1/32",
        "--exclude-outbound-ports", "5432,6379",
        "--include-inbound-ports", "8080,8443",
        "--exclude-inbound-ports", "9090",
    ]  # fmt: skip


def test_resource_annotations():
    annotations = {
        "sidecar.meshproxy.io/proxyCPU": "250m",
        "sidecar.meshproxy.io/proxyMemory": "64Mi",
        "sidecar.meshproxy.io/proxyCPULimit": "1",
        "sidecar.meshproxy.io/proxyMemoryLimit": "1Gi",
    }
    new, _ = inject(pod(annotations=annotations), NATIVE)
    validate(new)
    assert named(new["spec"]["initContainers"], PROXY_CONTAINER)["resources"] == {
        "requests": {"cpu": "250m", "memory": "64Mi"},
        "limits": {"cpu": "1", "memory": "1Gi"},
    }


@pytest.mark.parametrize(
    ("annotations", "resources"),
    [
        # a request above the default limit lifts the limit, as the API server would refuse request > limit
        (
            {"sidecar.meshproxy.io/proxyMemory": "512Mi"},
            {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"memory": "512Mi"}},
        ),
        # a limit below the default request lowers the request
        (
            {"sidecar.meshproxy.io/proxyCPULimit": "50m"},
            {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"cpu": "50m", "memory": "256Mi"}},
        ),
        (
            {"sidecar.meshproxy.io/proxyMemoryLimit": "0.1Gi"},
            {"requests": {"cpu": "100m", "memory": "0.1Gi"}, "limits": {"memory": "0.1Gi"}},
        ),
    ],
)
def test_defaults_give_way_to_annotations(annotations, resources):
    new, _ = inject(pod(annotations=annotations), NATIVE)
    validate(new)
    assert named(new["spec"]["initContainers"], PROXY_CONTAINER)["resources"] == resources


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        ({"traffic.meshproxy.io/excludeOutboundPorts": "80,http"}, "excludeOutboundPorts: 'http' is not a port number"),
        ({"traffic.meshproxy.io/excludeInboundPorts": "70000"}, "excludeInboundPorts: '70000' is not a port number"),
        ({"traffic.meshproxy.io/excludeOutboundIPRanges": "10.0.0.0/33"}, "'10.0.0.0/33' is not an IP address or CIDR"),
        ({"traffic.meshproxy.io/includeOutboundIPRanges": "everything"}, "'everything' is not an IP address or CIDR"),
        ({"sidecar.meshproxy.io/proxyCPU": "lots"}, "proxyCPU: 'lots' is not a Kubernetes quantity"),
        ({"sidecar.meshproxy.io/proxyMemory": "0"}, "proxyMemory: '0' must be more than 0"),
        (
            {"sidecar.meshproxy.io/proxyMemory": "1Gi", "sidecar.meshproxy.io/proxyMemoryLimit": "512Mi"},
            "proxyMemory: 1Gi is more than sidecar.meshproxy.io/proxyMemoryLimit 512Mi",
        ),
    ],
)
def test_bad_annotations_are_one_line_errors(annotations, message):
    with pytest.raises(InjectError) as e:
        inject(pod(annotations=annotations), NATIVE)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith("Pod shop/web-0: annotation ")


def test_empty_annotations_mean_none():
    annotations = {
        "traffic.meshproxy.io/excludeOutboundPorts": " ",
        "traffic.meshproxy.io/includeInboundPorts": "",
        "traffic.meshproxy.io/includeOutboundIPRanges": "",
    }
    new, _ = inject(pod(annotations=annotations), NATIVE)
    command = new["spec"]["initContainers"][0]["command"]
    assert "--exclude-outbound-ports" not in command
    # as Istio: an empty include list captures nothing in that direction
    assert command[command.index("--include-inbound-ports") + 1] == ""
    assert command[command.index("--include-outbound-cidrs") + 1] == ""


def _kubelet_expand(args: list[str]) -> list[str]:
    values = {"POD_NAME": "reviews-v1-5d8f7c9b6-x2x9z", "POD_NAMESPACE": "shop"}
    return [re.sub(r"\$\((\w+)\)", lambda m: values[m[1]], a) for a in args]


@pytest.mark.parametrize("settings", [NATIVE, CLASSIC], ids=["native", "classic"])
def test_the_commands_parse_with_meshproxys_own_parsers(settings):
    """The argv the injector writes against the parsers of ``meshproxy run``, ``wait-ready`` and ``iptables``."""
    import argparse

    from meshproxy import iptables
    from meshproxy.cli import build_parser

    annotations = {
        "traffic.meshproxy.io/excludeOutboundPorts": "5432",
        "traffic.meshproxy.io/excludeInboundPorts": "9090",
        "traffic.meshproxy.io/includeInboundPorts": "8080",
        "traffic.meshproxy.io/excludeOutboundIPRanges": "169.254.169.254/32",
        "traffic.meshproxy.io/includeOutboundIPRanges": "10.0.0.0/8",
    }
    new, _ = inject(pod(labels={"app": "reviews", "version": "v1"}, annotations=annotations), settings)
    containers = new["spec"].get("initContainers", []) + new["spec"]["containers"]
    proxy, init = named(containers, PROXY_CONTAINER), named(containers, INIT_CONTAINER)
    run = build_parser().parse_args(_kubelet_expand(proxy["args"]))
    assert (run.workload, run.namespace, run.transparent) == ("web-0", "shop", True)
    assert run.labels == {"app": "reviews", "version": "v1"}
    assert init["command"][:2] == ["meshproxy", "iptables"]
    parser = argparse.ArgumentParser()
    iptables.add_parser(parser.add_subparsers(dest="command"))
    rules = parser.parse_args(init["command"][1:])
    assert (rules.proxy_uid, rules.outbound_port, rules.inbound_port) == (1337, 15001, 15006)
    if not settings.native:
        hook = proxy["lifecycle"]["postStart"]["exec"]["command"]
        assert hook[0] == "meshproxy"
        build_parser().parse_args(hook[1:])


# ---- probes -----------------------------------------------------------------------------------------------


def probed() -> dict:
    return app(
        livenessProbe={
            "httpGet": {"path": "/healthz", "port": "http", "httpHeaders": [{"name": "X-Probe", "value": "1"}]},
            "periodSeconds": 7,
        },
        readinessProbe={"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTPS"}, "timeoutSeconds": 2},
        startupProbe={"tcpSocket": {"port": 8080}},
    )


def test_probes_rewritten_through_the_sidecar():
    original = pod(probed(), app("worker", ports=[], livenessProbe={"exec": {"command": ["true"]}}))
    new, patch = inject_pod(original, Settings(rewrite_probes=True))
    validate(new)
    main = named(new["spec"]["containers"], "app")
    assert main["livenessProbe"] == {
        "httpGet": {"path": "/app-health/app/livez", "port": 15021, "scheme": "HTTP"},
        "periodSeconds": 7,
    }
    assert main["readinessProbe"] == {
        "httpGet": {"path": "/app-health/app/readyz", "port": 15021, "scheme": "HTTP"},
        "timeoutSeconds": 2,
    }
    assert main["startupProbe"] == {"tcpSocket": {"port": 8080}}  # only HTTP probes are rewritten
    assert named(new["spec"]["containers"], "worker")["livenessProbe"] == {"exec": {"command": ["true"]}}
    proxy = named(new["spec"]["initContainers"], PROXY_CONTAINER)
    probes = json.loads(next(e["value"] for e in proxy["env"] if e["name"] == PROBES_ENV))
    assert probes == {
        # named ports resolved: the sidecar cannot look them up
        "/app-health/app/livez": {
            "httpGet": {"path": "/healthz", "port": 8080, "httpHeaders": [{"name": "X-Probe", "value": "1"}]}
        },
        "/app-health/app/readyz": {"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTPS"}, "timeoutSeconds": 2},
    }
    assert apply_patch(original, patch) == new


def test_grpc_probes_are_rewritten_too():
    container = app(
        "grpc",
        ports=[{"name": "grpc", "containerPort": 9090}],
        livenessProbe={"grpc": {"port": 9090, "service": "reviews"}, "failureThreshold": 5},
        startupProbe={"grpc": {"port": 9090}},
    )
    new, _ = inject(pod(container), Settings(rewrite_probes=True))
    validate(new)
    main = named(new["spec"]["containers"], "grpc")
    assert main["livenessProbe"] == {
        "httpGet": {"path": "/app-health/grpc/livez", "port": 15021, "scheme": "HTTP"},
        "failureThreshold": 5,
    }
    assert main["startupProbe"] == {"httpGet": {"path": "/app-health/grpc/startupz", "port": 15021, "scheme": "HTTP"}}
    proxy = named(new["spec"]["initContainers"], PROXY_CONTAINER)
    assert json.loads(next(e["value"] for e in proxy["env"] if e["name"] == PROBES_ENV)) == {
        "/app-health/grpc/livez": {"grpc": {"port": 9090, "service": "reviews"}},
        "/app-health/grpc/startupz": {"grpc": {"port": 9090}},
    }


def test_probes_untouched_without_rewrite():
    new, _ = inject(pod(probed()), NATIVE)
    assert named(new["spec"]["containers"], "app")["livenessProbe"] == probed()["livenessProbe"]
    proxy = named(new["spec"]["initContainers"], PROXY_CONTAINER)
    assert PROBES_ENV not in {e["name"] for e in proxy["env"]}


def test_an_unresolvable_probe_port_is_left_for_the_kubelet():
    container = app(livenessProbe={"httpGet": {"path": "/", "port": "nope"}})
    new, _ = inject(pod(container), Settings(rewrite_probes=True))
    assert named(new["spec"]["containers"], "app")["livenessProbe"] == container["livenessProbe"]


# ---- left alone -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "original",
    [
        pod(labels={"app": "web", "meshproxy.io/inject": "false"}),
        pod(hostNetwork=True),
        pod(app(), app(PROXY_CONTAINER)),
        pod(annotations={STATUS_ANNOTATION: "{}"}),
    ],
    ids=["opted-out", "host-network", "has-a-proxy", "has-the-status"],
)
def test_left_alone(original):
    before = copy.deepcopy(original)
    new, patch = inject_pod(original, NATIVE)
    assert new is original and patch == [] and original == before


@pytest.mark.parametrize("settings", [NATIVE, CLASSIC, Settings(rewrite_probes=True)])
def test_idempotent(settings):
    once, _ = inject(pod(probed()), settings)
    twice, changed = inject(once, settings)
    assert not changed and twice == once
    # a Deployment injected offline makes pods the webhook then leaves alone
    deployment, _ = inject(workloads()[0], settings)
    assert inject_pod(template_of(deployment) | {"apiVersion": "v1", "kind": "Pod"}, settings)[1] == []


@pytest.mark.parametrize(
    ("original", "message"),
    [
        (pod(app(ports=[{"containerPort": 15021}])), "spec.containers[0] (app): port 15021 is the sidecar's"),
        (pod(app(), app(INIT_CONTAINER)), "the container name meshproxy-init is the injector's"),
        (pod(volumes=[{"name": "meshproxy-token", "emptyDir": {}}]), "the name meshproxy-token is the sidecar's"),
        (
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": []}},
            "spec.containers: expected a non-empty list",
        ),
        ({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}, "spec: expected a mapping, got missing"),
        (
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"image": "x"}]}},
            "spec.containers[0]: expected a container with a name",
        ),
        (
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": {}},
            "spec.template: expected a mapping",
        ),
        (
            {"apiVersion": "extensions/v1beta1", "kind": "Deployment", "metadata": {"name": "d"}},
            "apiVersion 'extensions/v1beta1' is not served; use apps/v1",
        ),
        (
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "p", "annotations": {"a": 1}},
                "spec": {"containers": [app()]},
            },
            "keys and values must be strings",
        ),
    ],
)
def test_invalid_objects(original, message):
    with pytest.raises(InjectError, match=re.escape(message)):
        inject(original, NATIVE)


def test_other_kinds_pass_through():
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}}
    assert inject(service, NATIVE) == (service, False)


# ---- workloads --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings", [NATIVE, CLASSIC, Settings(rewrite_probes=True)], ids=["native", "classic", "probes"]
)
@pytest.mark.parametrize("workload", workloads(), ids=lambda w: w["kind"])
def test_workloads(workload, settings):
    before = copy.deepcopy(workload)
    new, changed = inject(workload, settings)
    assert changed and workload == before
    validate(new)
    template = template_of(new)
    names = [c["name"] for c in template["spec"].get("initContainers", []) + template["spec"]["containers"]]
    assert names.count(PROXY_CONTAINER) == 1 and names.count(INIT_CONTAINER) == 1
    proxy = named(template["spec"].get("initContainers", []) + template["spec"]["containers"], PROXY_CONTAINER)
    args = proxy["args"]
    assert args[args.index("--workload") + 1] == workload["metadata"]["name"]
    assert STATUS_ANNOTATION in template["metadata"]["annotations"]
    # everything outside the pod template is as it was
    assert {k: v for k, v in new.items() if k != "spec"} == {k: v for k, v in workload.items() if k != "spec"}


def test_job_pods_get_a_native_sidecar_so_the_job_completes():
    job = workloads()[4]
    new, _ = inject(job, NATIVE)
    spec = template_of(new)["spec"]
    assert spec["restartPolicy"] == "Never"
    assert [c["name"] for c in spec["containers"]] == ["batch"]
    assert named(spec["initContainers"], PROXY_CONTAINER)["restartPolicy"] == "Always"


# ---- naming -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("meta", "name"),
    [
        ({"generateName": "reviews-v1-5d8f7c9b6-", "labels": {"pod-template-hash": "5d8f7c9b6"}}, "reviews-v1"),
        (
            {
                "generateName": "reviews-v1-5d8f7c9b6-",
                "labels": {"pod-template-hash": "5d8f7c9b6"},
                "ownerReferences": [{"kind": "ReplicaSet", "name": "reviews-v1-5d8f7c9b6", "controller": True}],
            },
            "reviews-v1",
        ),
        ({"name": "web-0", "ownerReferences": [{"kind": "StatefulSet", "name": "web", "controller": True}]}, "web"),
        (
            {
                "generateName": "nightly-28901234-",
                "ownerReferences": [{"kind": "Job", "name": "nightly-28901234", "controller": True}],
            },
            "nightly",
        ),
        (
            {"generateName": "migrate-", "ownerReferences": [{"kind": "Job", "name": "migrate", "controller": True}]},
            "migrate",
        ),
        ({"generateName": "batch-"}, "batch"),
        ({"name": "standalone"}, "standalone"),
        ({}, ""),
    ],
)
def test_workload_name(meta, name):
    assert workload_name(meta) == name


def test_webhook_shaped_pod_names_its_deployment():
    original = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "reviews-v1-5d8f7c9b6-",
            "labels": {"app": "reviews", "pod-template-hash": "5d8f7c9b6"},
        },
        "spec": {"containers": [app()]},
    }
    new, patch = inject_pod(original, NATIVE)
    validate(new)
    args = named(new["spec"]["initContainers"], PROXY_CONTAINER)["args"]
    assert args[args.index("--workload") + 1] == "reviews-v1"
    assert apply_patch(original, patch) == new


def test_patch_of_a_pod_without_annotations_or_metadata():
    original = {"apiVersion": "v1", "kind": "Pod", "spec": {"containers": [app()]}}
    new, patch = inject_pod(original, NATIVE)
    validate(new)
    assert patch[0] == {"op": "add", "path": "/metadata", "value": {}}
    assert apply_patch(original, patch) == new
    assert json_patch(new, new) == []


# ---- robustness -------------------------------------------------------------------------------------------


JUNK = (None, 1, -1, 1.5, True, "s", "15021", [], [1], [{"name": 1}], [{"containerPort": "x"}], {}, {"a": 1})


def _paths(obj, prefix=()):
    yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield from _paths(v, (*prefix, k))


def test_any_malformed_field_is_an_inject_error_or_ignored():
    """Every field of a full Deployment replaced by every kind of junk: InjectError or a result, never a crash."""
    base = workloads()[0]
    spec = base["spec"]["template"]["spec"]
    spec["containers"][0] |= {
        "livenessProbe": {"httpGet": {"port": "http", "path": "/"}},
        "readinessProbe": {"grpc": {"port": 8080}},
    }
    spec["initContainers"] = [{"name": "setup", "image": "example/setup:1"}]
    spec["volumes"] = [{"name": "data", "emptyDir": {}}]
    base["spec"]["template"]["metadata"]["annotations"] = {"sidecar.meshproxy.io/proxyCPU": "1"}
    tried = 0
    for path in list(_paths(base))[1:]:
        for junk in JUNK:
            obj = copy.deepcopy(base)
            node = obj
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = copy.deepcopy(junk)
            for settings in (Settings(rewrite_probes=True), CLASSIC):
                tried += 1
                try:
                    inject(obj, settings)
                except InjectError as e:
                    assert "\n" not in str(e)
    assert tried > 1000
