"""The sidecar injection itself, pure: a Pod or a workload's pod template in, the injected object out.

What a pod gets (the shapes Istio's injector gives, with our names and ports):

- ``meshproxy-init``, an init container that runs ``meshproxy iptables ...`` as root with exactly the
  NET_ADMIN and NET_RAW capabilities (every other one dropped), so the pod's TCP goes through the proxy;
  the port and CIDR annotations become its flags.
- ``meshproxy-proxy``, the sidecar, as uid/gid 1337 (the uid the iptables rules exempt), non-root, with a
  read-only root filesystem and no capabilities. By default it is a native sidecar (Kubernetes 1.29+): an
  init container with ``restartPolicy: Always`` placed right after meshproxy-init, so the kubelet starts the
  app only once its startupProbe passes, stops it only after the app, and a Job completes when its app does.
  The annotation ``sidecar.meshproxy.io/nativeSidecar: "false"`` makes it a classic container, first in the
  list, whose postStart hook waits for readiness (the kubelet starts the next container only once postStart
  returns: Istio's holdApplicationUntilProxyStarts) and whose preStop sleeps 5 s, so the app gets SIGTERM and
  drains while the proxy still serves (Linkerd's proxy-wait-before-exit). A classic-mode Job's app, its
  work done, lets the pod complete with ``curl -fsS -X POST http://127.0.0.1:15021/quitquitquit`` (the
  sidecar drains and exits 0; ``meshproxy.ready``).
- the downward-API environment (POD_NAME, POD_NAMESPACE, POD_IP, SERVICE_ACCOUNT, NODE_NAME), a projected
  service-account token for audience ``meshproxy`` (the identity the control plane signs certificates for),
  resources from annotations, and readiness on :15021.
- with ``rewrite_probes`` (the caller decides: the webhook does it when the pod's mTLS mode is STRICT, as
  the kubelet's plaintext probes would otherwise be refused), each app container's httpGet or grpc probe
  becomes an httpGet to the sidecar at ``:15021/app-health/<container>/<livez|readyz|startupz>``, Istio's
  probe rewrite; the original probes are handed to the sidecar as JSON in ``MESHPROXY_APP_PROBES``:
  ``{"/app-health/app/livez": {"httpGet": {"path": "/healthz", "port": 8080}, "timeoutSeconds": 1}, ...}``
  (or ``{"grpc": {"port": 9090, "service": "..."}}``), named ports resolved to numbers.

A pod that carries the status annotation (or already has a meshproxy-proxy container), is labelled
``meshproxy.io/inject: "false"``, or uses the host's network (iptables would rewrite the node's rules) is
left alone. Bad annotations raise InjectError, one line naming the annotation.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from meshproxy import __version__

__all__ = [
    "ANNOTATIONS",
    "DEFAULT_CONTROL_PLANE",
    "INIT_CONTAINER",
    "INJECT_LABEL",
    "PROBES_ENV",
    "PROMETHEUS_ANNOTATIONS",
    "PROXY_CONTAINER",
    "STATUS_ANNOTATION",
    "TLS_MODE_LABEL",
    "WORKLOAD_KINDS",
    "InjectError",
    "Settings",
    "default_image",
    "inject",
    "inject_pod",
    "json_patch",
    "skip_reason",
    "workload_name",
]

PROXY_CONTAINER = "meshproxy-proxy"
INIT_CONTAINER = "meshproxy-init"
TOKEN_VOLUME = "meshproxy-token"
TOKEN_MOUNT = "/var/run/secrets/meshproxy"
TOKEN_AUDIENCE = "meshproxy"
# 12 h: the kubelet refreshes a projected token at 80% of its life, well before it expires
TOKEN_SECONDS = 43200
PROXY_UID = 1337
OUTBOUND_PORT, INBOUND_PORT, ADMIN_PORT, READY_PORT, METRICS_PORT = 15001, 15006, 15000, 15021, 15090
# the proxy's own ports (15020 is Istio's merged-metrics port: kept free so operators' habits hold)
RESERVED_PORTS = frozenset({ADMIN_PORT, OUTBOUND_PORT, INBOUND_PORT, 15020, READY_PORT, METRICS_PORT})
DEFAULT_CONTROL_PLANE = "meshproxy-control.meshproxy-system.svc:15010"

INJECT_LABEL = "meshproxy.io/inject"
STATUS_ANNOTATION = "sidecar.meshproxy.io/status"
#: Set on injected pods unless they set them: where Prometheus scrapes the sidecar.
PROMETHEUS_ANNOTATIONS = {
    "prometheus.io/scrape": "true",
    "prometheus.io/port": "15090",
    "prometheus.io/path": "/metrics",
}
#: Set on injected pods: the endpoints clients' sidecars speak mTLS to (control.security).
TLS_MODE_LABEL = "security.istio.io/tlsMode"
NATIVE_ANNOTATION = "sidecar.meshproxy.io/nativeSidecar"
DEFAULT_CONTAINER_ANNOTATION = "kubectl.kubernetes.io/default-container"
PROBES_ENV = "MESHPROXY_APP_PROBES"

EXCLUDE_OUTBOUND_PORTS = "traffic.meshproxy.io/excludeOutboundPorts"
EXCLUDE_INBOUND_PORTS = "traffic.meshproxy.io/excludeInboundPorts"
INCLUDE_INBOUND_PORTS = "traffic.meshproxy.io/includeInboundPorts"
EXCLUDE_OUTBOUND_CIDRS = "traffic.meshproxy.io/excludeOutboundIPRanges"
INCLUDE_OUTBOUND_CIDRS = "traffic.meshproxy.io/includeOutboundIPRanges"
PROXY_CPU = "sidecar.meshproxy.io/proxyCPU"
PROXY_MEMORY = "sidecar.meshproxy.io/proxyMemory"
PROXY_CPU_LIMIT = "sidecar.meshproxy.io/proxyCPULimit"
PROXY_MEMORY_LIMIT = "sidecar.meshproxy.io/proxyMemoryLimit"

#: Every annotation the injector reads.
ANNOTATIONS = (
    EXCLUDE_OUTBOUND_PORTS,
    EXCLUDE_INBOUND_PORTS,
    INCLUDE_INBOUND_PORTS,
    EXCLUDE_OUTBOUND_CIDRS,
    INCLUDE_OUTBOUND_CIDRS,
    PROXY_CPU,
    PROXY_MEMORY,
    PROXY_CPU_LIMIT,
    PROXY_MEMORY_LIMIT,
    NATIVE_ANNOTATION,
)

# The proxy's defaults: Istio's requests (100m, 128Mi); a memory limit so a leak cannot take the node's
# memory, twice the request as a Python proxy's heap grows with connections; no CPU limit, as CFS
# throttling a proxy adds latency to every request of the pod (Istio's and Linkerd's advice alike).
DEFAULT_REQUESTS = {"cpu": "100m", "memory": "128Mi"}
DEFAULT_LIMITS = {"memory": "256Mi"}
# meshproxy-init runs iptables once and exits: enough for the interpreter and the iptables binaries.
INIT_RESOURCES = {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}}

#: (apiVersion, kind) -> the path of the pod template inside it; a Pod is its own template.
WORKLOAD_KINDS: dict[tuple[str, str], tuple[str, ...]] = {
    ("v1", "Pod"): (),
    ("apps/v1", "Deployment"): ("spec", "template"),
    ("apps/v1", "StatefulSet"): ("spec", "template"),
    ("apps/v1", "DaemonSet"): ("spec", "template"),
    ("apps/v1", "ReplicaSet"): ("spec", "template"),
    ("batch/v1", "Job"): ("spec", "template"),
    ("batch/v1", "CronJob"): ("spec", "jobTemplate", "spec", "template"),
}
_KINDS = {kind for _, kind in WORKLOAD_KINDS}

_PROBES = (("livenessProbe", "livez"), ("readinessProbe", "readyz"), ("startupProbe", "startupz"))
# a Job made by a CronJob is named <cronjob>-<scheduled time in minutes since the epoch>
_CRONJOB_JOB = re.compile(r"^(.+)-\d{8,10}$")
_QUANTITY = re.compile(
    r"^(?P<num>[+]?(?:\d+\.?\d*|\.\d+))(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?\d+)?$"
)
_SUFFIX = {
    "": 1,
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


class InjectError(ValueError):
    """The object cannot be injected as it stands; the message is one line naming the field or annotation."""


def default_image() -> str:
    return f"meshproxy/proxy:{__version__}"


@dataclass(frozen=True)
class Settings:
    """What the injector needs beyond the pod: the same for every pod of a webhook or a ``meshctl inject`` run."""

    image: str = ""  # default_image() when empty
    control_plane: str = DEFAULT_CONTROL_PLANE
    native: bool = True  # the mode of pods without the nativeSidecar annotation
    rewrite_probes: bool = False
    image_pull_policy: str = "IfNotPresent"

    @property
    def proxy_image(self) -> str:
        return self.image or default_image()


# ---- reading the input ---------------------------------------------------------------------------------


def _mapping(value: Any, path: str, *, required: bool = False) -> dict:
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        what = "missing" if value is None else f"a {type(value).__name__}"
        raise InjectError(f"{path}: expected a mapping, got {what}")
    return value


def _containers(spec: dict, field: str, path: str, *, required: bool = False) -> list[dict]:
    value = spec.get(field)
    if value is None and not required:
        return []
    if not isinstance(value, list) or (required and not value):
        raise InjectError(f"{path}.{field}: expected a non-empty list of containers")
    for i, c in enumerate(value):
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not c["name"]:
            raise InjectError(f"{path}.{field}[{i}]: expected a container with a name")
    return value


def _string_map(value: Any, path: str) -> dict[str, str]:
    value = _mapping(value, path)
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InjectError(f"{path}: {k!r}: keys and values must be strings")
    return value


def skip_reason(meta: dict, spec: dict) -> str | None:
    """Why a pod (or template) with this metadata and spec is not injected, or None if it should be."""
    annotations = meta.get("annotations") or {}
    labels = meta.get("labels") or {}
    if isinstance(annotations, dict) and STATUS_ANNOTATION in annotations:
        return "already injected"
    for field in ("containers", "initContainers"):
        containers = spec.get(field)
        for c in containers if isinstance(containers, list) else ():
            if isinstance(c, dict) and c.get("name") == PROXY_CONTAINER:
                return "already injected"
    if isinstance(labels, dict) and labels.get(INJECT_LABEL) == "false":
        return f"opted out ({INJECT_LABEL}: false)"
    if spec.get("hostNetwork") is True:
        return "uses the host network"
    return None


def _ports(annotations: dict[str, str], key: str, *, star: bool = False) -> str | None:
    value = annotations.get(key)
    if value is None:
        return None
    text = value.strip()
    if star and text in ("*", ""):
        return text  # Istio's meaning: "" captures no inbound port at all
    if not text:
        return None
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or not 1 <= int(part) <= 65535:
            raise InjectError(f"annotation {key}: {part!r} is not a port number (1-65535)")
        out.append(str(int(part)))
    return ",".join(out)


def _cidrs(annotations: dict[str, str], key: str, *, star: bool = False) -> str | None:
    value = annotations.get(key)
    if value is None:
        return None
    text = value.strip()
    if star and text in ("*", ""):
        return text  # "" captures no outbound destination at all
    if not text:
        return None
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            out.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError:
            raise InjectError(f"annotation {key}: {part!r} is not an IP address or CIDR") from None
    return ",".join(out)


def _quantity(text: str, where: str) -> Decimal:
    m = _QUANTITY.match(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise InjectError(f"{where}: {text!r} is not a Kubernetes quantity (such as 100m, 0.5, 128Mi)")
    suffix = m["suffix"] or ""
    try:
        number = Decimal(m["num"])
        if suffix[:1] in ("e", "E") and suffix not in _SUFFIX:
            return number * Decimal(10) ** int(suffix[1:])
        return number * _SUFFIX[suffix]
    except (InvalidOperation, ValueError):
        raise InjectError(f"{where}: {text!r} is not a Kubernetes quantity") from None


def _resources(annotations: dict[str, str]) -> dict[str, dict[str, str]]:
    requests, limits = dict(DEFAULT_REQUESTS), dict(DEFAULT_LIMITS)
    given: set[tuple[str, str]] = set()
    for key, table, resource in (
        (PROXY_CPU, requests, "cpu"),
        (PROXY_MEMORY, requests, "memory"),
        (PROXY_CPU_LIMIT, limits, "cpu"),
        (PROXY_MEMORY_LIMIT, limits, "memory"),
    ):
        if key in annotations:
            value = annotations[key].strip()
            if _quantity(value, f"annotation {key}") <= 0:
                raise InjectError(f"annotation {key}: {value!r} must be more than 0")
            table[resource] = value
            given.add((resource, "limit" if table is limits else "request"))
    for resource, req_key, lim_key in (
        ("cpu", PROXY_CPU, PROXY_CPU_LIMIT),
        ("memory", PROXY_MEMORY, PROXY_MEMORY_LIMIT),
    ):
        if resource not in requests or resource not in limits:
            continue
        request, limit = requests[resource], limits[resource]
        if _quantity(request, req_key) <= _quantity(limit, lim_key):
            continue
        # the API server rejects a request above its limit: the default gives way to what was annotated
        if (resource, "limit") not in given:
            limits[resource] = request
        elif (resource, "request") not in given:
            requests[resource] = limit
        else:
            raise InjectError(f"annotation {req_key}: {request} is more than {lim_key} {limit}")
    return {"requests": requests, "limits": limits}


def _native(annotations: dict[str, str], default: bool) -> bool:
    value = annotations.get(NATIVE_ANNOTATION)
    if value is None:
        return default
    if value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise InjectError(f'annotation {NATIVE_ANNOTATION}: {value!r} is not "true" or "false"')


# ---- naming ---------------------------------------------------------------------------------------------


def workload_name(meta: dict, fallback: str = "") -> str:
    """The workload a pod belongs to, as Istio names it: the Deployment of a ReplicaSet's pod (the
    pod-template-hash stripped), the CronJob of a Job's pod, else the controller, else the pod's name stem."""
    labels = meta.get("labels") if isinstance(meta.get("labels"), dict) else {}
    for ref in meta.get("ownerReferences") or ():
        if not isinstance(ref, dict) or not ref.get("controller") or not isinstance(ref.get("name"), str):
            continue
        name, kind = ref["name"], ref.get("kind")
        if kind == "ReplicaSet":
            template_hash = labels.get("pod-template-hash")
            if template_hash and name.endswith(f"-{template_hash}"):
                return name[: -len(template_hash) - 1]
        if kind == "Job" and (m := _CRONJOB_JOB.match(name)):
            return m[1]
        return name
    generate = meta.get("generateName")
    if isinstance(generate, str) and generate:
        stem = generate.rstrip("-")
        template_hash = labels.get("pod-template-hash")
        if template_hash and stem.endswith(f"-{template_hash}"):
            stem = stem[: -len(template_hash) - 1]
        return stem
    name = meta.get("name")
    return name if isinstance(name, str) and name else fallback


# ---- building the containers ----------------------------------------------------------------------------


def _or_all(value: str | None) -> str:
    return "*" if value is None else value


def _iptables_args(annotations: dict[str, str]) -> list[str]:
    args = [
        "meshproxy",
        "iptables",
        "--proxy-uid",
        str(PROXY_UID),
        "--proxy-gid",
        str(PROXY_UID),
        "--outbound-port",
        str(OUTBOUND_PORT),
        "--inbound-port",
        str(INBOUND_PORT),
        "--include-outbound-cidrs",
        _or_all(_cidrs(annotations, INCLUDE_OUTBOUND_CIDRS, star=True)),
    ]
    if excluded := _cidrs(annotations, EXCLUDE_OUTBOUND_CIDRS):
        args += ["--exclude-outbound-cidrs", excluded]
    if excluded := _ports(annotations, EXCLUDE_OUTBOUND_PORTS):
        args += ["--exclude-outbound-ports", excluded]
    args += ["--include-inbound-ports", _or_all(_ports(annotations, INCLUDE_INBOUND_PORTS, star=True))]
    if excluded := _ports(annotations, EXCLUDE_INBOUND_PORTS):
        args += ["--exclude-inbound-ports", excluded]
    return args


def _init_container(settings: Settings, annotations: dict[str, str]) -> dict:
    return {
        "name": INIT_CONTAINER,
        "image": settings.proxy_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": _iptables_args(annotations),
        "resources": copy.deepcopy(INIT_RESOURCES),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "privileged": False,
            # iptables takes its lock under /run
            "readOnlyRootFilesystem": False,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "runAsUser": 0,
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _field_env(name: str, path: str) -> dict:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}


def _ready_probe(period: int, failures: int) -> dict:
    return {
        "httpGet": {"path": "/ready", "port": READY_PORT, "scheme": "HTTP"},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def _proxy_container(
    settings: Settings, annotations: dict[str, str], *, native: bool, workload: str, labels: dict[str, str]
) -> dict:
    args = [
        "run",
        "--control-plane",
        settings.control_plane,
        "--node-id",
        "$(POD_NAME).$(POD_NAMESPACE)",
        "--namespace",
        "$(POD_NAMESPACE)",
        "--workload",
        workload,
    ]
    if labels:
        args += ["--labels", ",".join(f"{k}={v}" for k, v in sorted(labels.items()))]
    args += [
        "--listen",
        f"0.0.0.0:{OUTBOUND_PORT}",
        "--transparent",
        "--inbound-listen",
        f"0.0.0.0:{INBOUND_PORT}",
        "--ready",
        f"0.0.0.0:{READY_PORT}",
        "--metrics",
        f"0.0.0.0:{METRICS_PORT}",
        "--admin",
        f"127.0.0.1:{ADMIN_PORT}",
    ]
    container: dict[str, Any] = {
        "name": PROXY_CONTAINER,
        "image": settings.proxy_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["meshproxy"],
        "args": args,
        "env": [
            _field_env("POD_NAME", "metadata.name"),
            _field_env("POD_NAMESPACE", "metadata.namespace"),
            _field_env("POD_IP", "status.podIP"),
            _field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            _field_env("NODE_NAME", "spec.nodeName"),
        ],
        "ports": [
            {"name": "http-metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
            {"name": "http-ready", "containerPort": READY_PORT, "protocol": "TCP"},
        ],
        # Istio's: every 15 s, unready after 4 misses; the startup probe below covers the first seconds
        "readinessProbe": _ready_probe(15, 4),
        "resources": _resources(annotations),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": True,
            "runAsUser": PROXY_UID,
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": TOKEN_VOLUME, "mountPath": TOKEN_MOUNT, "readOnly": True}],
    }
    if native:
        container["restartPolicy"] = "Always"
        # the kubelet starts the next init container (and then the app) only once this passes: 1 s steps
        # for up to 10 minutes, as Istio's native sidecar
        container["startupProbe"] = _ready_probe(1, 600)
    else:
        container["lifecycle"] = {
            "postStart": {
                "exec": {
                    "command": [
                        "meshproxy",
                        "wait-ready",
                        "--url",
                        f"http://127.0.0.1:{READY_PORT}/ready",
                        "--timeout",
                        "120",
                    ]
                }
            },
            "preStop": {"exec": {"command": ["sleep", "5"]}},
        }
    return container


def _token_volume() -> dict:
    return {
        "name": TOKEN_VOLUME,
        "projected": {
            "sources": [
                {
                    "serviceAccountToken": {
                        "audience": TOKEN_AUDIENCE,
                        "expirationSeconds": TOKEN_SECONDS,
                        "path": "token",
                    }
                }
            ]
        },
    }


def _probe_port(port: Any, container: dict) -> int | None:
    if isinstance(port, int) and not isinstance(port, bool):
        return port
    if isinstance(port, str):
        if port.isdigit():
            return int(port)
        for p in _items(container.get("ports")):
            if isinstance(p, dict) and p.get("name") == port and isinstance(p.get("containerPort"), int):
                return p["containerPort"]
    return None


def _rewrite_probes(containers: list[dict]) -> dict[str, dict]:
    """Point the app containers' httpGet and grpc probes at the sidecar; return the originals by their new path.

    gRPC probes too, as Istio does: the kubelet's plaintext gRPC call would meet STRICT mTLS just as an HTTP
    GET would. tcpSocket probes are left alone: the sidecar's inbound listener accepts the connection, so
    they pass (telling nothing, as under Istio before it rewrote them) rather than fail.
    """
    originals: dict[str, dict] = {}
    for container in containers:
        for field, suffix in _PROBES:
            probe = container.get(field)
            if not isinstance(probe, dict):
                continue
            handler = next((h for h in ("httpGet", "grpc") if isinstance(probe.get(h), dict)), None)
            if handler is None:
                continue
            port = _probe_port(probe[handler].get("port"), container)
            if port is None:
                # the kubelet cannot resolve it either: left for it to report
                continue
            path = f"/app-health/{container['name']}/{suffix}"
            original = {handler: dict(probe[handler], port=port)}
            if "timeoutSeconds" in probe:
                original["timeoutSeconds"] = probe["timeoutSeconds"]
            originals[path] = original
            rewritten = {k: v for k, v in probe.items() if k != handler}
            rewritten["httpGet"] = {"path": path, "port": READY_PORT, "scheme": "HTTP"}
            container[field] = rewritten
    return originals


def _items(value: Any) -> list:
    """The list at a field, or nothing: a field of the wrong type is the API server's to reject."""
    return value if isinstance(value, list) else []


def _check_ports(containers: list[dict], path: str) -> None:
    for i, c in enumerate(containers):
        for p in _items(c.get("ports")):
            port = p.get("containerPort") if isinstance(p, dict) else None
            if isinstance(port, int) and port in RESERVED_PORTS:
                raise InjectError(
                    f"{path}[{i}] ({c['name']}): port {port} is the sidecar's "
                    f"({', '.join(map(str, sorted(RESERVED_PORTS)))} are reserved)"
                )


def _inject_template(meta: dict, spec: dict, settings: Settings, workload: str, path: str) -> bool:
    """Inject in place; False (and nothing changed) when the pod is to be left alone."""
    if skip_reason(meta, spec) is not None:
        return False
    annotations = _string_map(meta.get("annotations"), f"{path}metadata.annotations")
    labels = _string_map(meta.get("labels"), f"{path}metadata.labels")
    containers = _containers(spec, "containers", f"{path}spec", required=True)
    inits = _containers(spec, "initContainers", f"{path}spec")
    volumes = spec.get("volumes") or []
    if not isinstance(volumes, list):
        raise InjectError(f"{path}spec.volumes: expected a list")
    if any(isinstance(v, dict) and v.get("name") == TOKEN_VOLUME for v in volumes):
        raise InjectError(f"{path}spec.volumes: the name {TOKEN_VOLUME} is the sidecar's")
    names = {c["name"] for c in containers + inits}
    if INIT_CONTAINER in names:
        raise InjectError(f"{path}spec: the container name {INIT_CONTAINER} is the injector's")
    _check_ports(containers, f"{path}spec.containers")
    _check_ports(inits, f"{path}spec.initContainers")

    native = _native(annotations, settings.native)
    init = _init_container(settings, annotations)
    proxy = _proxy_container(settings, annotations, native=native, workload=workload, labels=labels)
    containers = copy.deepcopy(containers)
    if settings.rewrite_probes and (originals := _rewrite_probes(containers)):
        proxy["env"].append({"name": PROBES_ENV, "value": json.dumps(originals, sort_keys=True, separators=(",", ":"))})

    if native:
        # the app's own init containers come after the proxy, so they too reach the network through it
        spec["initContainers"] = [init, proxy, *inits]
        spec["containers"] = containers
        status_init, status_containers = [INIT_CONTAINER, PROXY_CONTAINER], []
    else:
        # with a classic sidecar nothing would serve the redirected traffic of the app's init containers:
        # they run before the rules exist
        spec["initContainers"] = [*inits, init]
        spec["containers"] = [proxy, *containers]
        status_init, status_containers = [INIT_CONTAINER], [PROXY_CONTAINER]
    spec["volumes"] = [*volumes, _token_volume()]
    status = {
        "containers": status_containers,
        "initContainers": status_init,
        "native": native,
        "version": __version__,
        "volumes": [TOKEN_VOLUME],
    }
    annotations = dict(annotations)
    annotations[STATUS_ANNOTATION] = json.dumps(status, sort_keys=True, separators=(",", ":"))
    # kubectl logs/exec pick the app, not the proxy (Istio sets the same annotation)
    annotations.setdefault(DEFAULT_CONTAINER_ANNOTATION, containers[0]["name"])
    # Annotation-based Prometheus setups scrape the sidecar's /metrics (as Istio's injector
    # does); a pod that says otherwise keeps its own.
    for key, value in PROMETHEUS_ANNOTATIONS.items():
        annotations.setdefault(key, value)
    meta["annotations"] = annotations
    # How the control plane's auto mTLS knows this pod has a sidecar to speak mTLS to (Istio's label).
    meta["labels"] = {**labels, TLS_MODE_LABEL: "istio"}
    return True


# ---- entry points ---------------------------------------------------------------------------------------


def _describe(obj: dict) -> str:
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    name = meta.get("name") or meta.get("generateName") or "<unnamed>"
    ns = meta.get("namespace")
    return f"{obj.get('kind')} {ns}/{name}" if ns else f"{obj.get('kind')} {name}"


def _inject_object(out: dict, template_path: tuple[str, ...], settings: Settings) -> bool:
    if not template_path and out.get("metadata") is None:
        out["metadata"] = {}  # a Pod is its own template: its metadata gets the annotations
    outer_meta = _mapping(out.get("metadata"), "metadata")
    node, path = out, ""
    for part in template_path:
        path += f"{part}."
        node = _mapping(node.get(part), path.rstrip("."), required=True)
    if template_path:
        meta = node.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise InjectError(f"{path}metadata: expected a mapping")
        workload = outer_meta.get("name") if isinstance(outer_meta.get("name"), str) else ""
    else:
        meta = outer_meta
        workload = workload_name(meta)
    spec = _mapping(node.get("spec"), f"{path}spec", required=True)
    return _inject_template(meta, spec, settings, workload or "unknown", path)


def inject(obj: dict, settings: Settings) -> tuple[dict, bool]:
    """(the injected copy of ``obj``, whether anything changed). ``obj`` is a Pod or a workload with a pod
    template; other kinds come back unchanged. Raises InjectError when it cannot be injected."""
    if not isinstance(obj, dict):
        raise InjectError(f"expected a Kubernetes object (a mapping), got a {type(obj).__name__}")
    key = (obj.get("apiVersion"), obj.get("kind"))
    if not all(isinstance(k, str) for k in key) or key not in WORKLOAD_KINDS:
        if isinstance(obj.get("kind"), str) and obj["kind"] in _KINDS:
            wanted = next(v for v, k in WORKLOAD_KINDS if k == obj.get("kind"))
            raise InjectError(f"{_describe(obj)}: apiVersion {obj.get('apiVersion')!r} is not served; use {wanted}")
        return obj, False
    out = copy.deepcopy(obj)
    try:
        changed = _inject_object(out, WORKLOAD_KINDS[key], settings)
    except InjectError as e:
        raise InjectError(f"{_describe(obj)}: {e}") from None
    return (out, True) if changed else (obj, False)


def inject_pod(pod: dict, settings: Settings) -> tuple[dict, list[dict]]:
    """(the injected pod, the RFC 6902 patch from ``pod`` to it; [] when it is left alone)."""
    new, changed = inject(pod, settings)
    return new, (json_patch(pod, new) if changed else [])


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def json_patch(old: dict, new: dict) -> list[dict]:
    """The RFC 6902 operations that turn pod ``old`` into ``new``, for what injection changes: annotations
    and labels one key at a time (other webhooks may add theirs), the container lists and volumes whole."""
    ops: list[dict] = []
    old_meta, new_meta = old.get("metadata") or {}, new.get("metadata") or {}
    if "metadata" not in old and new_meta:
        ops.append({"op": "add", "path": "/metadata", "value": {}})
    for part in ("annotations", "labels"):
        old_map, new_map = old_meta.get(part), new_meta.get(part) or {}
        if not isinstance(old_map, dict):
            if new_map:
                ops.append({"op": "add", "path": f"/metadata/{part}", "value": new_map})
        else:
            for k, v in new_map.items():
                if old_map.get(k) != v:
                    ops.append({"op": "add", "path": f"/metadata/{part}/{_escape(k)}", "value": v})
    old_spec, new_spec = old.get("spec") or {}, new.get("spec") or {}
    for field in ("initContainers", "containers", "volumes"):
        if field in new_spec and old_spec.get(field) != new_spec[field]:
            ops.append({"op": "add", "path": f"/spec/{field}", "value": new_spec[field]})
    return ops
