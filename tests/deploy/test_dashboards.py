"""deploy/dashboards/: the Grafana dashboards query only what the sidecars export, and ship in deploy/'s base.

Every PromQL expression (panel targets and template-variable queries) is parsed with ``promql-parser``
(the Prometheus grammar, in Rust) and walked: each metric must be a family in
``meshproxy.telemetry.metrics.METRIC_NAMES["meshproxy"]`` (a histogram's series by its ``_bucket``,
``_sum``, ``_count``); each label in a selector, ``by``/``without``/``on``/``ignoring``/``group_*`` or a
legend must be one that family carries (``LABELS`` below: the Istio label sets from
``meshproxy.telemetry.labels``, the others as the issue 8 contract defines them); each aggregation must
group by labels its input still has. The label table itself is checked against a live sidecar's
``/metrics``. A dashboard that plots a series nobody exports draws an empty panel and no error, which is
why this is checked here rather than noticed in Grafana.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import promql_parser
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshproxy.telemetry.labels import BASE_LABELS, REQUEST_LABELS, ROUTE_LABELS
from meshproxy.telemetry.metrics import METRIC_NAMES
from tests.deploy.conftest import DEPLOY, one
from tests.deploy.test_manifests import NAMESPACE, VERSIONS
from tests.integration.harness import Sidecar, free_port

DASHBOARDS = DEPLOY / "dashboards"
FILES = sorted(DASHBOARDS.glob("*.json"))
KINDS = ("mesh", "service", "workload")

#: The Istio labels the issue 8 contract promises (meshproxy.telemetry.labels may add Istio's others).
CONTRACT_PEER = (
    "reporter",
    "source_workload", "source_workload_namespace", "source_principal", "source_app", "source_version",
    "source_canonical_service",
    "destination_workload", "destination_workload_namespace", "destination_principal", "destination_app",
    "destination_version", "destination_service", "destination_service_name", "destination_service_namespace",
    "destination_canonical_service",
    "connection_security_policy",
)  # fmt: skip
#: Every request and TCP series carries the peer labels; a request's add its outcome.
PEER = BASE_LABELS
REQUEST = (*BASE_LABELS, *REQUEST_LABELS)
ROUTE = ROUTE_LABELS
#: Family (without the meshproxy_ prefix) -> its labels.
LABELS: dict[str, tuple[str, ...]] = {
    "requests_total": REQUEST,
    "request_duration_milliseconds": REQUEST,
    "request_bytes": REQUEST,
    "response_bytes": REQUEST,
    "request_messages_total": REQUEST,
    "response_messages_total": REQUEST,
    "tcp_sent_bytes_total": PEER,
    "tcp_received_bytes_total": PEER,
    "tcp_connections_opened_total": PEER,
    "tcp_connections_closed_total": PEER,
    "route_requests_total": (*ROUTE, "success"),
    "route_request_duration_milliseconds": ROUTE,
    "upstream_retries_total": ("cluster",),
    "upstream_retry_budget_denied_total": ("cluster",),
    "upstream_retry_overflow_total": ("cluster",),
    "upstream_overflow_total": ("cluster",),
    "outlier_ejections_total": ("cluster",),
    "outlier_ejected_endpoints": ("cluster",),
    "upstream_requests_active": ("cluster",),
    "upstream_requests_pending": ("cluster",),
    "upstream_connections_active": ("cluster",),
    "endpoints": ("cluster", "health"),
    "downstream_connections_active": ("listener",),
    "config_info": ("version",),
    "config_updates_total": ("result",),
    "config_last_update_timestamp_seconds": (),
    "build_info": ("version", "extensions"),
}
HISTOGRAMS = {"request_duration_milliseconds", "request_bytes", "response_bytes", "route_request_duration_milliseconds"}
PREFIX = "meshproxy_"

#: Grafana's interval variables stand where PromQL wants a duration; every other variable in a label value.
INTERVAL_VAR = re.compile(r"\$__\w+|\$\{__\w+\}")
VAR = re.compile(r"\$\{\w+(?::\w+)?\}|\$\w+|\[\[\w+\]\]")
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
LABEL_VALUES = re.compile(r"^label_values\((?:(?P<expr>.*),)?\s*(?P<label>\w+)\s*\)$", re.S)
QUERY_RESULT = re.compile(r"^query_result\((?P<expr>.*)\)$", re.S)


class Unknown(AssertionError):
    """An expression names a metric or a label the sidecars do not export."""


def series_labels(name: str) -> set[str]:
    """The labels the series ``name`` carries, or Unknown when no exported family has it."""
    exported = set(METRIC_NAMES["meshproxy"])
    family = name.removeprefix(PREFIX)
    if name in exported and family in LABELS:
        return set(LABELS[family])
    base, _, suffix = name.rpartition("_")
    if suffix in ("bucket", "sum", "count") and base in exported and base.removeprefix(PREFIX) in HISTOGRAMS:
        return set(LABELS[base.removeprefix(PREFIX)]) | ({"le"} if suffix == "bucket" else set())
    raise Unknown(f"metric {name!r} is not exported (meshproxy.telemetry.metrics.METRIC_NAMES)")


def need(labels: list[str] | set[str], have: set[str], where: str) -> None:
    missing = sorted(set(labels) - have)
    if missing:
        raise Unknown(f"label(s) {missing} not on the series of {where} (they carry {sorted(have)})")


def output_labels(node: Any) -> set[str]:
    """The labels ``node``'s result series can carry; raise Unknown on a metric or label that cannot be there."""
    kind = type(node).__name__
    if kind == "VectorSelector":
        if node.name is None:
            raise Unknown("a selector without a metric name")
        have = series_labels(node.name)
        matchers = list(node.matchers.matchers) + [m for group in node.matchers.or_matchers for m in group]
        need([m.name for m in matchers if m.name != "__name__"], have, node.name)
        return have
    if kind == "MatrixSelector":
        return output_labels(node.vector_selector)
    if kind in ("ParenExpr", "UnaryExpr", "SubqueryExpr"):
        return output_labels(node.expr)
    if kind in ("NumberLiteral", "StringLiteral"):
        return set()
    if kind == "Call":
        args = [output_labels(a) for a in node.args]
        vectors = [labels for a, labels in zip(node.args, args, strict=True) if type(a).__name__ != "StringLiteral"]
        name = node.func.name
        if name == "histogram_quantile":
            need(["le"], args[1], f"histogram_quantile({node.args[1]})")
            return args[1] - {"le"}
        if name == "label_replace":
            need([node.args[3].val] if node.args[3].val else [], args[0], "label_replace's source label")
            return args[0] | {node.args[1].val}
        if name in ("vector", "time", "scalar", "absent"):
            return set()
        return vectors[0] if vectors else set()
    if kind == "AggregateExpr":
        have = output_labels(node.expr)
        if node.param is not None:
            output_labels(node.param)
        extra = {node.param.val} if str(node.op) == "count_values" else set()
        if node.modifier is None:
            return extra
        labels = list(node.modifier.labels)
        need(labels, have, f"{node.op} {'by' if node.modifier.type == promql_parser.AggModifierType.By else 'without'}")
        if node.modifier.type == promql_parser.AggModifierType.By:
            return set(labels) | extra
        return (have - set(labels)) | extra
    if kind == "BinaryExpr":
        lhs, rhs = output_labels(node.lhs), output_labels(node.rhs)
        scalar = {"NumberLiteral"}
        mod = node.modifier
        if mod is not None and mod.matching is not None:
            need(mod.matching.labels, lhs, f"the left of {node.op} {mod.matching}")
            need(mod.matching.labels, rhs, f"the right of {node.op} {mod.matching}")
        if mod is not None and mod.card == promql_parser.VectorMatchCardinality.ManyToOne:
            need(mod.group_labels, rhs, "group_left")
            return lhs | set(mod.group_labels)
        if mod is not None and mod.card == promql_parser.VectorMatchCardinality.OneToMany:
            need(mod.group_labels, lhs, "group_right")
            return rhs | set(mod.group_labels)
        if str(node.op) == "or":
            return lhs | rhs
        return rhs if type(node.lhs).__name__ in scalar else lhs
    raise AssertionError(f"unhandled PromQL node {kind}: {node}")


def grafana_to_promql(text: str) -> str:
    """Grafana's text as Prometheus receives it, with a stand-in for each template variable."""
    return VAR.sub("x", INTERVAL_VAR.sub("5m", text))


def check_expr(text: str) -> set[str]:
    """Parse ``text`` (Grafana PromQL) and check every name in it; return the labels its result carries."""
    try:
        ast = promql_parser.parse(grafana_to_promql(text))
    except Exception as exc:  # the parser raises ValueError or its own Rust-side error types
        raise AssertionError(f"not PromQL: {text!r}: {exc}") from None
    return output_labels(ast)


def check_variable_query(text: str) -> None:
    """A query variable: Grafana's label_values(...) and query_result(...) around PromQL."""
    if m := LABEL_VALUES.match(text.strip()):
        if m["expr"] is None:  # label_values(label): any series that has it
            if not any(m["label"] in labels for labels in LABELS.values()):
                raise Unknown(f"no exported family has label {m['label']!r}")
            return
        need([m["label"]], check_expr(m["expr"]), m["expr"])
    elif m := QUERY_RESULT.match(text.strip()):
        check_expr(m["expr"])
    else:
        check_expr(text)


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", ())  # a collapsed row keeps its panels inside it


def targets(dashboard: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for panel in panels(dashboard):
        for target in panel.get("targets", ()):
            yield panel["title"], target


def variable_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            yield var["name"], query["query"] if isinstance(query, dict) else query


# -- the files ------------------------------------------------------------------------------------------------


def test_there_is_one_dashboard_per_view():
    assert [p.name for p in FILES] == [f"meshproxy-{kind}.json" for kind in KINDS]
    dashboards = [load(p) for p in FILES]
    assert [d["uid"] for d in dashboards] == [f"meshproxy-{kind}" for kind in KINDS]
    assert len({d["title"] for d in dashboards}) == len(KINDS)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_dashboard_is_a_current_grafana_dashboard_on_a_datasource_variable(path):
    dashboard = load(path)
    assert dashboard["schemaVersion"] >= 36
    assert "id" not in dashboard  # an id would clash with the Grafana instance's own numbering
    variables = dashboard["templating"]["list"]
    assert variables[0]["type"] == "datasource" and variables[0]["query"] == "prometheus"
    source = {"type": "prometheus", "uid": "${" + variables[0]["name"] + "}"}
    names = [v["name"] for v in variables]
    assert len(set(names)) == len(names)
    ids = [p["id"] for p in panels(dashboard)]
    assert len(set(ids)) == len(ids)
    for panel in panels(dashboard):
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == source, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == source, panel["title"]
    for var in variables[1:]:
        if var["type"] == "query":
            assert var["datasource"] == source, var["name"]
    # Every $variable a query uses is defined here (or is Grafana's own).
    used = {
        name
        for _, t in targets(dashboard)
        for name in re.findall(r"\$\{?(\w+)", t["expr"])
        if not name.startswith("__")
    }
    used |= {name for _, q in variable_queries(dashboard) for name in re.findall(r"\$\{?(\w+)", q)}
    assert used <= set(names)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_every_query_uses_exported_metrics_and_labels(path):
    dashboard = load(path)
    checked = 0
    for title, target in targets(dashboard):
        try:
            labels = check_expr(target["expr"])
            need(LEGEND_LABEL.findall(target.get("legendFormat", "")), labels, f"the legend of {target['expr']}")
        except AssertionError as exc:
            pytest.fail(f"{path.name}: panel {title!r}: {exc}")
        checked += 1
    for name, query in variable_queries(dashboard):
        try:
            check_variable_query(query)
        except AssertionError as exc:
            pytest.fail(f"{path.name}: variable {name!r}: {exc}")
    assert checked >= 15


def test_the_dashboards_cover_the_main_families():
    used: set[str] = set()

    def visit(node: Any) -> None:
        if type(node).__name__ == "VectorSelector":
            base = re.sub(r"_(bucket|sum|count)$", "", node.name)
            used.add(base if base.removeprefix(PREFIX) in HISTOGRAMS else node.name)

    for path in FILES:
        for _, target in targets(load(path)):
            promql_parser.walk(promql_parser.parse(grafana_to_promql(target["expr"])), visit)
    main = ("requests_total", "request_duration_milliseconds", "tcp_sent_bytes_total", "route_requests_total",
            "upstream_retries_total", "outlier_ejections_total", "config_info")  # fmt: skip
    assert {PREFIX + family for family in main} <= used


def test_the_label_table_describes_exported_families():
    exported = set(METRIC_NAMES["meshproxy"])
    assert {PREFIX + family for family in LABELS} <= exported
    assert set(CONTRACT_PEER) <= set(BASE_LABELS)
    assert set(REQUEST_LABELS) == {"request_protocol", "response_code", "grpc_response_status", "response_flags"}
    # The istio switch renames the Istio-shaped families only; the dashboards use the meshproxy names.
    assert "istio_requests_total" in METRIC_NAMES["istio"]


def test_the_label_table_matches_a_live_sidecars_exposition():
    # The table above, checked against what a real sidecar serves: every series it exposes has exactly the
    # labels the table gives its family. A call to an upstream that is not there still records a request.
    dead = f"127.0.0.1:{free_port()}"
    with Sidecar(upstream=dead) as sidecar, grpc.insecure_channel(sidecar.address) as channel:
        call = channel.unary_unary("/pkg.Svc/Method", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as failed:
            call(b"", timeout=10)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        with urllib.request.urlopen(f"http://127.0.0.1:{sidecar.metrics_port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    seen: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            seen.setdefault(sample.name, set()).update(sample.labels)
    assert "meshproxy_requests_total" in seen and "meshproxy_request_duration_milliseconds_bucket" in seen
    for name, labels in seen.items():
        assert labels == series_labels(name), name


@pytest.mark.parametrize(
    "expr",
    [
        "sum(rate(meshproxy_request_total[5m]))",  # misspelt family
        "rate(istio_requests_total[5m])",  # the other naming
        'sum(rate(meshproxy_requests_total{destination_cluster="a"}[5m]))',  # unknown label
        "sum by (cluster) (rate(meshproxy_requests_total[5m]))",  # a label of another family
        "histogram_quantile(0.9, sum by (destination_service) (rate(meshproxy_request_bytes_bucket[5m])))",  # no le
        "sum by (route) (sum by (listener) (meshproxy_route_requests_total))",  # grouped away already
        "meshproxy_requests_total_bucket",  # not a histogram
        "sum(rate(meshproxy_requests_total[5m]) by",  # not PromQL
    ],
)
def test_the_check_refuses_what_is_not_exported(expr):
    with pytest.raises(AssertionError):
        check_expr(expr)


def test_the_check_accepts_grafana_variables_and_legends():
    labels = check_expr(
        'sum by (destination_service) (rate(meshproxy_requests_total{destination_service=~"$service", '
        'reporter="${reporter}"}[$__rate_interval]))'
    )
    assert labels == {"destination_service"}
    check_variable_query('label_values(meshproxy_requests_total{reporter="source"}, destination_service)')
    with pytest.raises(AssertionError):
        check_variable_query("label_values(meshproxy_build_info, destination_service)")


# -- in deploy/'s base ----------------------------------------------------------------------------------------


def test_the_base_ships_each_dashboard_in_a_configmap_for_grafanas_sidecar(base):
    for path in FILES:
        cm = one(base, "ConfigMap", f"meshproxy-dashboard-{path.stem.removeprefix('meshproxy-')}")
        assert cm["metadata"]["namespace"] == NAMESPACE
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["data"] == {path.name: path.read_text()}
        # A client-side `kubectl apply` copies the object into an annotation, and annotations hold 256 KiB.
        assert len(json.dumps(cm)) < 256 * 1024


@pytest.mark.parametrize("version", VERSIONS)
def test_the_configmaps_validate_strictly(base, version):
    for cm in (o for o in base if o["kind"] == "ConfigMap"):
        kubernetes_validate.validate(cm, version, strict=True)
