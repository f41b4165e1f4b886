"""``meshctl proxy-status``, ``proxy-config`` and ``stats``: what the control plane knows of its
sidecars (``meshproxy.v1.MeshControl/ProxyStatus``) and what one sidecar runs and counts (its
admin service, ``meshproxy.admin.v1.Admin``).

Each command fetches, turns the protos into plain data (``collect_*``: dicts and lists, 64-bit
integers as numbers, times as RFC 3339 strings), and prints that data as JSON or YAML, or a table
made from it (``render_*``). The data is the contract for scripts; the tables are for people.
"""

from __future__ import annotations

import time
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from control.ctl_output import Unary, age, number, one_line, table

__all__ = [
    "ADMIN",
    "CONFIG_TYPES",
    "collect_config",
    "collect_proxy_status",
    "collect_stats",
    "plain",
    "render_config",
    "render_proxy_status",
    "render_stats",
]

ADMIN = "/meshproxy.admin.v1.Admin/"
PROXY_STATUS = "/meshproxy.v1.MeshControl/ProxyStatus"
CONFIG_TYPES = ("listeners", "routes", "clusters", "endpoints")

_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


# -- protos to plain data ---------------------------------------------------------------------


def plain(msg, *, defaults: bool = True) -> dict[str, Any]:
    """``msg`` in proto JSON form with snake_case names, in the proto's field order, but 64-bit
    integers as numbers (proto JSON writes them as strings). ``defaults``: also fields at their
    default value (status messages, where 0 is a figure); configs leave them out, as their YAML
    form does."""
    d = json_format.MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=defaults)
    return _tidy(msg.DESCRIPTOR, d)


def _tidy(desc, d: dict) -> dict:
    out = {}
    for f in desc.fields:
        if f.name not in d:
            continue
        value, mt = d[f.name], f.message_type
        if f.type in _INT64:
            value = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif mt is None or mt.full_name.startswith("google.protobuf."):
            pass
        elif mt.GetOptions().map_entry:
            vf = mt.fields_by_name["value"]
            if vf.type in _INT64:
                value = {k: int(v) for k, v in value.items()}
            elif vf.message_type is not None and not vf.message_type.full_name.startswith("google.protobuf."):
                value = {k: _tidy(vf.message_type, v) for k, v in value.items()}
        elif isinstance(value, list):
            value = [_tidy(mt, v) for v in value]
        else:
            value = _tidy(mt, value)
        out[f.name] = value
    return out


def _time(ts) -> str | None:
    """A Timestamp field as RFC 3339, None when unset."""
    return ts.ToJsonString() if ts.seconds or ts.nanos else None


def _ago(when: str | None, now: float | None = None) -> str:
    if when is None:
        return ""
    from google.protobuf.timestamp_pb2 import Timestamp

    ts = Timestamp()
    ts.FromJsonString(when)
    return age((now if now is not None else time.time()) - ts.ToNanoseconds() / 1e9)


# -- proxy-status -------------------------------------------------------------------------------


def collect_proxy_status(address: str, timeout: float, namespace: str = "", node_id: str = "") -> dict[str, Any]:
    from meshproxy.config.v1 import control_pb2 as cpb

    with Unary(address, "the control plane", timeout) as call:
        resp = call(PROXY_STATUS, cpb.ProxyStatusRequest(namespace=namespace, node_id=node_id), cpb.ProxyStatusResponse)
    proxies = []
    for p in resp.proxies:
        row = plain(p)
        for name in ("connected_since", "sent_at", "acked_at"):
            row[name] = _time(getattr(p, name))
        proxies.append(row)
    return {"control_plane": address, "revision": resp.revision, "proxies": proxies}


def render_proxy_status(data: dict[str, Any], now: float | None = None) -> str:
    if not data["proxies"]:
        return f"no sidecars are connected to the control plane at {data['control_plane']}\n"
    headers = ("NAME", "NAMESPACE", "WORKLOAD", "WORKER", "CONNECTED", "STATUS", "ACKED", "SENT", "NACKS", "LAST NACK")
    rows = [
        (
            p["node_id"],
            p["namespace"],
            p["workload"],
            p["worker"],
            _ago(p["connected_since"], now),
            p["state"],
            p["acked_version"],
            p["sent_version"],
            p["nacks"],
            f"{p['nacked_version']}: {p['nack_message']}" if p["nacked_version"] else "",
        )
        for p in data["proxies"]
    ]
    return table(headers, rows)


# -- proxy-config -------------------------------------------------------------------------------


def collect_config(address: str, what: str | None, timeout: float, cluster: str = "") -> dict[str, Any]:
    """The sidecar's config (``what`` None: the summary and the whole config; else one of CONFIG_TYPES)."""
    from meshproxy.admin.v1 import admin_pb2

    with Unary(address, "the sidecar", timeout) as call:
        if what == "endpoints":
            resp = call(ADMIN + "GetClusters", admin_pb2.ClustersRequest(name=cluster), admin_pb2.ClustersResponse)
            return {"clusters": [plain(c) for c in resp.clusters]}
        # Routes live in the listeners' virtual hosts: ask for everything, pick here.
        dump = call(ADMIN + "GetConfigDump", admin_pb2.ConfigDumpRequest(), admin_pb2.ConfigDump)
    resources = [
        {"type": r.type, "name": r.name, "version": r.version, "last_updated": _time(r.last_updated)}
        for r in dump.resources
    ]
    head: dict[str, Any] = {"version": dump.version}
    if what is None:
        rejected = None
        if dump.HasField("last_rejected"):
            rej = dump.last_rejected
            rejected = {"version": rej.version, "reason": rej.reason, "time": _time(rej.time)}
        return head | {
            "source": dump.source,
            "node": plain(dump.node),
            "last_updated": _time(dump.last_updated),
            "accepted_total": dump.accepted_total,
            "rejected_total": dump.rejected_total,
            "last_rejected": rejected,
            "resources": resources,
            "config": plain(dump.config, defaults=False),
        }
    versions = {(r["type"], r["name"]): r["version"] for r in resources}
    if what == "listeners":
        listeners = []
        for lst in dump.config.listeners:
            d = plain(lst, defaults=False)
            d.pop("virtual_hosts", None)  # proxy-config routes shows them
            d["virtual_hosts"] = [vh.name for vh in lst.virtual_hosts]
            d["routes"] = sum(len(vh.routes) for vh in lst.virtual_hosts)
            d["resource_version"] = versions.get(("listener", lst.name), "")
            listeners.append(d)
        return head | {"listeners": listeners}
    if what == "routes":
        tables = [
            {
                "listener": lst.name,
                "resource_version": versions.get(("route", lst.name), ""),
                "virtual_hosts": [plain(vh, defaults=False) for vh in lst.virtual_hosts],
            }
            for lst in dump.config.listeners
        ]
        return head | {"routes": tables}
    clusters = []
    for c in dump.config.clusters:
        if cluster and c.name != cluster:
            continue
        d = plain(c, defaults=False)
        d["resource_version"] = versions.get(("cluster", c.name), "")
        clusters.append(d)
    return head | {"clusters": clusters}


def _match(m: dict) -> str:
    parts = []
    for key in ("prefix", "path", "regex"):
        if key in m:
            parts.append(f"{key}={m[key]}")
    if "grpc" in m:
        g = m["grpc"]
        parts.append(f"grpc={g.get('service') or '*'}/{g.get('method') or '*'}")
    if m.get("method"):
        parts.append(f"method={m['method']}")
    for h in m.get("headers", []):
        op = next((k for k in ("exact", "prefix", "regex", "present") if k in h), "")
        sign = "!" if h.get("invert") else ""
        parts.append(f"{sign}{h['name']}" + (f" {op}={h[op]}" if op and op != "present" else ""))
    return " ".join(parts) or "*"


def _action(r: dict) -> str:
    if "direct_response" in r:
        d = r["direct_response"]
        grpc = f" grpc-status {d['grpc_status']}" if "grpc_status" in d else ""
        return f"direct {d.get('status', 0)}{grpc}"
    clusters = r.get("route", {}).get("clusters", [])
    if len(clusters) == 1 and not clusters[0].get("subset"):
        return clusters[0]["cluster"]
    total = sum(c.get("weight", 0) for c in clusters) or 1
    return ", ".join(
        f"{c['cluster']}" + (f"|{c['subset']}" if c.get("subset") else "") + f" {100 * c.get('weight', 0) / total:g}%"
        for c in clusters
    )


def render_config(data: dict[str, Any], what: str | None, now: float | None = None) -> str:
    if what is None:
        node = data["node"]
        rej = data["last_rejected"]
        lines = [
            ("VERSION", data["version"] or "(none yet)"),
            ("SOURCE", data["source"]),
            ("NODE", f"{node.get('id', '')} ({node.get('namespace', '')}/{node.get('workload', '')})"),
            (
                "UPDATED",
                f"{data['last_updated']} ({_ago(data['last_updated'], now)} ago)" if data["last_updated"] else "",
            ),
            ("ACCEPTED", data["accepted_total"]),
            ("REJECTED", data["rejected_total"]),
        ]
        if rej:
            lines.append(("LAST REJECTED", f"{rej['version']} at {rej['time']}: {rej['reason']}"))
        width = max(len(k) for k, _ in lines)
        head = "".join(f"{k.ljust(width)}  {one_line(v) if v != '' else '-'}\n" for k, v in lines)
        res = [(r["type"], r["name"], r["version"], _ago(r["last_updated"], now)) for r in data["resources"]]
        return head + "\n" + table(("TYPE", "NAME", "VERSION", "UPDATED"), res)
    if what == "listeners":
        rows = [
            (
                lst.get("name"),
                lst.get("address"),
                ",".join(lst["virtual_hosts"]),
                lst["routes"],
                "yes" if lst.get("transparent") else "no",
                lst["resource_version"],
            )
            for lst in data["listeners"]
        ]
        return table(("NAME", "ADDRESS", "VIRTUAL HOSTS", "ROUTES", "TRANSPARENT", "VERSION"), rows)
    if what == "routes":
        rows = [
            (
                t["listener"],
                vh.get("name"),
                ",".join(vh.get("domains", [])),
                r.get("name"),
                _match(r.get("match", {})),
                _action(r),
            )
            for t in data["routes"]
            for vh in t["virtual_hosts"]
            for r in vh.get("routes", [])
        ]
        return table(("LISTENER", "VIRTUAL HOST", "DOMAINS", "ROUTE", "MATCH", "ACTION"), rows)
    if what == "clusters":
        rows = [
            (
                c.get("name"),
                c.get("lb_policy", "PEAK_EWMA"),
                len(c.get("endpoints", [])),
                ",".join(s["name"] for s in c.get("subsets", [])),
                c["resource_version"],
            )
            for c in data["clusters"]
        ]
        return table(("NAME", "LB", "ENDPOINTS", "SUBSETS", "VERSION"), rows)
    rows = [
        (
            c["name"],
            e["address"],
            e["weight"],
            e["health"],
            ",".join(s or '""' for s in e["subsets"]),
            e["active_requests"],
            number(e["ewma_ms"]),
            e["ejections"],
            e["worker"],
        )
        for c in data["clusters"]
        for e in c["endpoints"]
    ]
    headers = ("CLUSTER", "ENDPOINT", "WEIGHT", "HEALTH", "SUBSETS", "ACTIVE", "EWMA MS", "EJECTIONS", "WORKER")
    return table(headers, rows)


# -- stats ----------------------------------------------------------------------------------------


def collect_stats(address: str, prefixes: list[str], timeout: float) -> dict[str, Any]:
    from meshproxy.admin.v1 import admin_pb2

    with Unary(address, "the sidecar", timeout) as call:
        resp = call(ADMIN + "GetStats", admin_pb2.StatsRequest(prefixes=prefixes), admin_pb2.StatsResponse)
    families = []
    for f in resp.families:
        kind = admin_pb2.MetricFamily.Type.Name(f.type)
        metrics = []
        for m in f.metrics:
            labels = dict(sorted(m.labels.items()))
            if f.type == admin_pb2.MetricFamily.HISTOGRAM:
                h = m.histogram
                buckets = [{"le": b, "count": c} for b, c in zip(h.bounds, h.cumulative_counts, strict=False)]
                metrics.append({"labels": labels, "count": h.count, "sum": h.sum, "buckets": buckets})
            else:
                metrics.append({"labels": labels, "value": m.value})
        families.append({"name": f.name, "help": f.help, "type": kind, "metrics": metrics})
    return {"workers": resp.workers, "families": families}


def _series(name: str, labels: dict[str, str], extra: str = "") -> str:
    pairs = [f'{k}="{_escape(v)}"' for k, v in labels.items()] + ([extra] if extra else [])
    return f"{name}{{{','.join(pairs)}}}" if pairs else name


def _escape(value: str) -> str:
    """A label value as the exposition format writes it."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_stats(data: dict[str, Any]) -> str:
    """One row per sample, named as the Prometheus exposition names them (histograms as _bucket,
    _sum and _count)."""
    rows = []
    for f in data["families"]:
        for m in f["metrics"]:
            if f["type"] == "HISTOGRAM":
                for b in m["buckets"]:
                    rows.append(
                        (_series(f["name"] + "_bucket", m["labels"], f'le="{number(b["le"], 12)}"'), b["count"])
                    )
                rows.append((_series(f["name"] + "_bucket", m["labels"], 'le="+Inf"'), m["count"]))
                rows.append((_series(f["name"] + "_sum", m["labels"]), number(m["sum"], 12)))
                rows.append((_series(f["name"] + "_count", m["labels"]), m["count"]))
            else:
                rows.append((_series(f["name"], m["labels"]), number(m["value"], 12)))
    if not rows:
        return "no metrics\n"
    return table(("SERIES", "VALUE"), rows)
