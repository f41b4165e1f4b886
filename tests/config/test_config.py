"""Loading, checking and writing SidecarConfig: every refusal is one ConfigError line naming the field."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy import config, resilience
from meshproxy.config import ConfigError
from meshproxy.config.v1 import config_pb2 as pb

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sidecar.yaml"


def base() -> dict:
    """A small valid config; each error case below breaks one thing in it."""
    return {
        "version": "1",
        "listeners": [
            {
                "name": "outbound",
                "address": "127.0.0.1:15001",
                "virtual_hosts": [
                    {
                        "name": "api",
                        "domains": ["api.example.com", "api:8080"],
                        "routes": [
                            {
                                "name": "split",
                                "match": {"prefix": "/"},
                                "route": {
                                    "clusters": [
                                        {"cluster": "api", "subset": "v1", "weight": 80},
                                        {"cluster": "api", "subset": "v2", "weight": 20},
                                    ]
                                },
                            }
                        ],
                    },
                    {
                        "name": "other",
                        "domains": ["*"],
                        "routes": [
                            {"match": {"prefix": "/"}, "route": {"clusters": [{"cluster": "api"}]}},
                            {"match": {"prefix": "/"}, "route": {"clusters": [{"cluster": "api"}]}},
                            {"match": {"path": "/x"}, "direct_response": {"status": 404}},
                        ],
                    },
                ],
            }
        ],
        "clusters": [
            {
                "name": "api",
                "endpoints": [
                    {"address": "10.0.0.1:8080", "labels": {"version": "v1"}},
                    {"address": "[::1]:8080", "labels": {"version": "v2"}},
                ],
                "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}],
            }
        ],
    }


def refused(data: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config.from_dict(data)
    err = info.value
    assert "\n" not in str(err), str(err)
    return err


def with_change(change) -> dict:
    d = copy.deepcopy(base())
    change(d)
    return d


def listener(d: dict) -> dict:
    return d["listeners"][0]


def split_route(d: dict) -> dict:
    return d["listeners"][0]["virtual_hosts"][0]["routes"][0]


def other_route(d: dict, i: int) -> dict:
    return d["listeners"][0]["virtual_hosts"][1]["routes"][i]


def cluster(d: dict) -> dict:
    return d["clusters"][0]


# --- what loads --------------------------------------------------------------


def test_base_is_valid():
    cfg = config.from_dict(base())
    assert cfg.listeners[0].virtual_hosts[0].routes[0].route.clusters[1].weight == 20


def test_example_file_loads_and_round_trips_through_yaml():
    cfg = config.load_file(EXAMPLE)
    assert [lis.name for lis in cfg.listeners] == ["outbound"]
    assert cfg.clusters[0].lb_policy == config.Cluster.RING_HASH
    assert cfg.listeners[0].http2.max_concurrent_streams == 1000
    text = config.to_yaml(cfg)
    again = config.from_yaml(text)
    assert again == cfg
    assert config.to_yaml(again) == text


def test_yaml_round_trip_keeps_every_kind_of_field():
    cfg = config.from_dict(
        with_change(
            lambda d: split_route(d).update(
                timeout="2.500s",
                match={
                    "regex": "/a.*",
                    "grpc": {"service": "pkg.Svc", "method": "Get"},
                    "headers": [{"name": "x-a", "present": False, "invert": True}],
                    "method": "POST",
                },
            )
        )
    )
    assert config.from_yaml(config.to_yaml(cfg)) == cfg
    assert "present: false" in config.to_yaml(cfg)


def test_snake_case_and_lower_camel_case_are_both_accepted():
    d = base()
    lis = listener(d)
    lis["virtualHosts"] = lis.pop("virtual_hosts")
    cluster(d).update(lbPolicy="LEAST_REQUEST", connectTimeout="1.5s", max_connections_per_endpoint=3)
    cfg = config.from_dict(d)
    assert len(cfg.listeners[0].virtual_hosts) == 2
    assert cfg.clusters[0].lb_policy == config.Cluster.LEAST_REQUEST
    assert config.connect_timeout_s(cfg.clusters[0]) == 1.5
    assert cfg.clusters[0].max_connections_per_endpoint == 3


def test_integers_and_enums_in_their_other_proto_json_forms():
    cfg = config.from_dict(with_change(lambda d: cluster(d).update(lb_policy=1, max_connections_per_endpoint="7")))
    assert cfg.clusters[0].lb_policy == config.Cluster.ROUND_ROBIN
    assert cfg.clusters[0].max_connections_per_endpoint == 7


def test_timeout_defaults():
    c = config.Cluster(name="c")
    assert config.connect_timeout_s(c) == config.DEFAULT_CONNECT_TIMEOUT_S == 1.0
    assert config.idle_timeout_s(c) == config.DEFAULT_IDLE_TIMEOUT_S == 300.0
    c.idle_timeout.FromMilliseconds(30_500)
    c.connect_timeout.FromMilliseconds(250)
    assert (config.idle_timeout_s(c), config.connect_timeout_s(c)) == (30.5, 0.25)


def test_check_false_skips_only_the_semantic_checks():
    d = with_change(lambda d: split_route(d)["route"]["clusters"][0].update(cluster="nope"))
    assert config.from_dict(d, check=False).listeners[0].name == "outbound"
    with pytest.raises(ConfigError):
        config.from_dict({"listenerz": []}, check=False)


# --- simple() ----------------------------------------------------------------


def test_simple_routes_everything_to_one_upstream():
    cfg = config.simple("127.0.0.1:15001", "localhost:50051")
    config.validate(cfg)
    (lis,) = cfg.listeners
    assert lis.address == "127.0.0.1:15001"
    ((vh,),) = [lis.virtual_hosts]
    assert list(vh.domains) == ["*"]
    (route,) = vh.routes
    assert route.match.prefix == "/"
    assert [(c.cluster, c.subset) for c in route.route.clusters] == [("upstream", "")]
    (up,) = cfg.clusters
    assert up.name == "upstream"
    assert [e.address for e in up.endpoints] == ["localhost:50051"]
    assert config.from_yaml(config.to_yaml(cfg)) == cfg


def test_simple_accepts_ipv6_and_port_0():
    cfg = config.simple("[::1]:0", "[::1]:8080")
    assert cfg.listeners[0].address == "[::1]:0"


@pytest.mark.parametrize(
    ("listen", "upstream", "path", "reason"),
    [
        ("localhost:15001", "a:1", "listen", "not an IP address"),
        ("127.0.0.1", "a:1", "listen", "no port"),
        ("127.0.0.1:15001", "a:0", "upstream", "port '0'"),
        ("127.0.0.1:15001", "a", "upstream", "no port"),
    ],
)
def test_simple_names_the_bad_argument(listen, upstream, path, reason):
    with pytest.raises(ConfigError) as info:
        config.simple(listen, upstream)
    assert info.value.path == path
    assert str(info.value).startswith(f"{path}: invalid address")
    assert reason in str(info.value)


# --- the error itself --------------------------------------------------------


def test_config_error_is_one_line_with_path_and_reason():
    err = ConfigError("listeners[0].address", "bad\nthing", source="x.yaml")
    assert isinstance(err, ValueError)
    assert str(err) == "x.yaml: listeners[0].address: bad thing"
    assert str(ConfigError("", "empty")) == "empty"
    alone = ConfigError("give --config FILE")
    assert (alone.path, alone.reason, str(alone)) == ("", "give --config FILE", "give --config FILE")
    again = pickle.loads(pickle.dumps(err))
    assert (again.path, again.reason, again.source) == (err.path, err.reason, err.source)


def test_the_regex_error_reads_as_documented():
    def change(d):
        d["listeners"][0]["virtual_hosts"][1]["routes"][2] = {
            "match": {"regex": "("},
            "direct_response": {"status": 404},
        }

    assert str(refused(with_change(change))) == (
        "listeners[0].virtual_hosts[1].routes[2].match.regex: invalid regex '(': missing ), unterminated subpattern"
    )


# --- shape errors: unknown fields, wrong types --------------------------------

SHAPE_ERRORS = [
    ("unknown-field", lambda d: listener(d)["virtual_hosts"][0].update(domainz=["x"]),
     "listeners[0].virtual_hosts[0].domainz", "did you mean 'domains'"),
    ("unknown-top", lambda d: d.update(listenrs=[]), "listenrs", "did you mean 'listeners'"),
    ("unknown-no-hint", lambda d: cluster(d).update(zzz=1), "clusters[0].zzz", "known: name, lb_policy"),
    ("given-twice", lambda d: listener(d).update(virtualHosts=[]), "listeners[0].virtual_hosts", "given twice"),
    ("list-not-string", lambda d: listener(d)["virtual_hosts"][0].update(domains="api"),
     "listeners[0].virtual_hosts[0].domains", "expected a list"),
    ("string-not-int", lambda d: listener(d)["virtual_hosts"][0].update(domains=["a", 5]),
     "listeners[0].virtual_hosts[0].domains[1]", "expected a string, got int 5"),
    ("label-not-string", lambda d: cluster(d)["endpoints"][0]["labels"].update(version=2),
     "clusters[0].endpoints[0].labels['version']", "quote it"),
    ("label-key-not-string", lambda d: cluster(d)["endpoints"][0]["labels"].update({True: "x"}),
     "clusters[0].endpoints[0].labels['True']", "map key must be a string"),
    ("selector-not-map", lambda d: cluster(d)["subsets"][0].update(labels=["version=v1"]),
     "clusters[0].subsets[0].labels", "expected a mapping"),
    ("message-not-map", lambda d: split_route(d).update(match="/"),
     "listeners[0].virtual_hosts[0].routes[0].match", "expected a mapping of RouteMatch fields"),
    ("enum", lambda d: cluster(d).update(lb_policy="FASTEST"), "clusters[0].lb_policy", "PEAK_EWMA, ROUND_ROBIN"),
    ("enum-number", lambda d: cluster(d).update(lb_policy=9), "clusters[0].lb_policy", "invalid LbPolicy 9"),
    ("duration-int", lambda d: cluster(d).update(connect_timeout=5), "clusters[0].connect_timeout", "such as '1.5s'"),
    ("duration-unit", lambda d: cluster(d).update(connect_timeout="5ms"), "clusters[0].connect_timeout", "'5ms'"),
    ("uint-negative", lambda d: cluster(d)["endpoints"][0].update(weight=-1),
     "clusters[0].endpoints[0].weight", "out of range"),
    ("uint-too-big", lambda d: listener(d).update(per_stream_buffer_limit_bytes=2**32),
     "listeners[0].per_stream_buffer_limit_bytes", "out of range"),
    ("int-bool", lambda d: cluster(d)["endpoints"][0].update(weight=True),
     "clusters[0].endpoints[0].weight", "expected an integer"),
    ("int-text", lambda d: cluster(d)["endpoints"][0].update(weight="heavy"),
     "clusters[0].endpoints[0].weight", "expected an integer"),
    ("bool", lambda d: split_route(d)["match"].update(headers=[{"name": "a", "invert": "yes"}]),
     "listeners[0].virtual_hosts[0].routes[0].match.headers[0].invert", "expected true or false"),
    ("oneof-action", lambda d: split_route(d).update(direct_response={"status": 200}),
     "listeners[0].virtual_hosts[0].routes[0].direct_response", "oneof action"),
    ("oneof-path", lambda d: split_route(d)["match"].update(path="/a"),
     "listeners[0].virtual_hosts[0].routes[0].match.path", "oneof path_specifier"),
    ("null-scalar", lambda d: split_route(d)["match"].update(prefix=None),
     "listeners[0].virtual_hosts[0].routes[0].match.prefix", "no value (null)"),
    ("top-not-map", lambda d: d.update(listeners=[["x"]]), "listeners[0]", "expected a mapping of Listener fields"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "path", "reason"), [c[1:] for c in SHAPE_ERRORS], ids=[c[0] for c in SHAPE_ERRORS])
def test_shape_errors_name_the_field(change, path, reason):
    err = refused(with_change(change))
    assert err.path == path, str(err)
    assert reason in err.reason, str(err)
    assert str(err).startswith(path + ": ")


def test_null_for_a_list_or_message_means_empty():
    cfg = config.from_dict(with_change(lambda d: cluster(d).update(connect_timeout=None, endpoints=None)))
    assert not cfg.clusters[0].HasField("connect_timeout")
    assert len(cfg.clusters[0].endpoints) == 0
    # ...but then the routes to its subsets dangle, so the split is refused.
    with pytest.raises(ConfigError, match="has no subset named 'v1'"):
        config.from_dict(with_change(lambda d: cluster(d).update(subsets=None)))


def test_top_level_must_be_a_mapping():
    assert "expected a mapping of SidecarConfig fields, got a list" in str(refused([1]))
    assert str(refused(None)) == "the configuration is empty"


# --- semantic errors ------------------------------------------------------------

V0 = "listeners[0].virtual_hosts[0]"
R0 = f"{V0}.routes[0]"

SEMANTIC_ERRORS = [
    # listeners
    ("listener-no-port", lambda d: listener(d).update(address="127.0.0.1"), "listeners[0].address", "no port"),
    ("listener-hostname", lambda d: listener(d).update(address="localhost:1"), "listeners[0].address", "not an IP"),
    ("listener-v6-brackets", lambda d: listener(d).update(address="::1:15001"), "listeners[0].address", "brackets"),
    ("listener-bad-v6", lambda d: listener(d).update(address="[::g]:1"), "listeners[0].address", "not an IPv6"),
    ("listener-port-range", lambda d: listener(d).update(address="0.0.0.0:65536"), "listeners[0].address", "65535"),
    ("listener-port-sign", lambda d: listener(d).update(address="0.0.0.0:+80"), "listeners[0].address", "'+80'"),
    ("listener-no-name", lambda d: listener(d).update(name=""), "listeners[0].name", "needs a name"),
    ("listener-dup-name", lambda d: d["listeners"].append(dict(listener(d), address="127.0.0.1:15002")),
     "listeners[1].name", "already used by listeners[0]"),
    ("listener-dup-address", lambda d: d["listeners"].append(dict(listener(d), name="again")),
     "listeners[1].address", "already the address of listeners[0]"),
    ("http2-frame", lambda d: listener(d).update(http2={"max_frame_size": 1000}),
     "listeners[0].http2.max_frame_size", "16384"),
    ("http2-conn-window", lambda d: listener(d).update(http2={"initial_connection_window_size": 1000}),
     "listeners[0].http2.initial_connection_window_size", "65535"),
    ("http2-stream-window", lambda d: listener(d).update(http2={"initial_stream_window_size": 2**31}),
     "listeners[0].http2.initial_stream_window_size", "2^31-1"),
    ("http2-streams-0", lambda d: listener(d).update(http2={"max_concurrent_streams": 0}),
     "listeners[0].http2.max_concurrent_streams", "refuse every stream"),
    # virtual hosts and domains
    ("vhost-dup-name", lambda d: listener(d)["virtual_hosts"][1].update(name="api"),
     "listeners[0].virtual_hosts[1].name", "already used"),
    ("vhost-no-domains", lambda d: listener(d)["virtual_hosts"][0].update(domains=[]), f"{V0}.domains", "no domains"),
    ("domain-dup", lambda d: listener(d)["virtual_hosts"][1]["domains"].append("API.example.com"),
     "listeners[0].virtual_hosts[1].domains[1]", f"already in {V0}.domains[0]"),
    ("domain-star-port", lambda d: listener(d)["virtual_hosts"][0]["domains"].append("*:80"),
     f"{V0}.domains[2]", "takes no port"),
    ("domain-inner-star", lambda d: listener(d)["virtual_hosts"][0]["domains"].append("a*b.com"),
     f"{V0}.domains[2]", "invalid domain"),
    ("domain-empty", lambda d: listener(d)["virtual_hosts"][0]["domains"].append(""), f"{V0}.domains[2]", "host name"),
    ("domain-port-0", lambda d: listener(d)["virtual_hosts"][0]["domains"].append("api:0"), f"{V0}.domains[2]", "port"),
    ("domain-space", lambda d: listener(d)["virtual_hosts"][0]["domains"].append("a b"), f"{V0}.domains[2]", "a b"),
    # routes
    ("route-no-action", lambda d: split_route(d).pop("route"), R0, "no action"),
    ("route-dup-name", lambda d: listener(d)["virtual_hosts"][0]["routes"].append(split_route(d)),
     f"{V0}.routes[1].name", "already used"),
    ("route-no-clusters", lambda d: split_route(d)["route"].update(clusters=[]), f"{R0}.route.clusters", "no cluster"),
    ("route-missing-cluster", lambda d: split_route(d)["route"]["clusters"][1].update(cluster="apx"),
     f"{R0}.route.clusters[1].cluster", "no cluster named 'apx' (known: api)"),
    ("route-missing-subset", lambda d: split_route(d)["route"]["clusters"][1].update(subset="v3"),
     f"{R0}.route.clusters[1].subset", "no subset named 'v3'"),
    ("weights-all-zero", lambda d: [c.update(weight=0) for c in split_route(d)["route"]["clusters"]],
     f"{R0}.route.clusters", "every weight is 0"),
    ("route-timeout-negative", lambda d: split_route(d).update(timeout="-1s"), f"{R0}.timeout", "0 or more"),
    ("prefix-rewrite-regex", lambda d: split_route(d).update(match={"regex": "/a.*"}) or
     split_route(d)["route"].update(prefix_rewrite="/b"), f"{R0}.route.prefix_rewrite", "needs a match on 'prefix'"),
    ("authority-rewrite", lambda d: split_route(d)["route"].update(authority_rewrite="a b"),
     f"{R0}.route.authority_rewrite", "not an authority"),
    ("route-hash-header", lambda d: split_route(d)["route"].update(hash_header="x user"),
     f"{R0}.route.hash_header", "not a header name"),
    ("direct-status-low", lambda d: other_route(d, 2)["direct_response"].update(status=99),
     "listeners[0].virtual_hosts[1].routes[2].direct_response.status", "200 to 599"),
    ("direct-status-high", lambda d: other_route(d, 2)["direct_response"].update(status=600),
     "listeners[0].virtual_hosts[1].routes[2].direct_response.status", "200 to 599"),
    ("direct-grpc-status", lambda d: other_route(d, 2)["direct_response"].update(grpc_status=17),
     "listeners[0].virtual_hosts[1].routes[2].direct_response.grpc_status", "0..16"),
    # matches
    ("path-regex", lambda d: split_route(d).update(match={"regex": "/a[b"}), f"{R0}.match.regex", "invalid regex"),
    ("path-slash", lambda d: split_route(d).update(match={"path": "api"}), f"{R0}.match.path", "start with '/'"),
    ("prefix-slash", lambda d: split_route(d).update(match={"prefix": "api"}), f"{R0}.match.prefix", "start with"),
    ("grpc-method-only", lambda d: split_route(d).update(match={"grpc": {"method": "Get"}}),
     f"{R0}.match.grpc.method", "needs its service"),
    ("grpc-service-slash", lambda d: split_route(d).update(match={"grpc": {"service": "/pkg.Svc"}}),
     f"{R0}.match.grpc.service", "not a gRPC service name"),
    ("header-name", lambda d: split_route(d).update(match={"headers": [{"name": "", "present": True}]}),
     f"{R0}.match.headers[0].name", "not a header name"),
    ("header-regex", lambda d: split_route(d).update(match={"headers": [{"name": "a", "regex": "*"}]}),
     f"{R0}.match.headers[0].regex", "invalid regex '*': nothing to repeat"),
    ("method", lambda d: split_route(d).update(match={"method": "GE T"}), f"{R0}.match.method", "not an HTTP method"),
    # clusters
    ("cluster-no-name", lambda d: cluster(d).update(name=""), "clusters[0].name", "needs a name"),
    ("cluster-dup-name", lambda d: d["clusters"].append({"name": "api"}), "clusters[1].name", "already used"),
    ("endpoint-no-port", lambda d: cluster(d)["endpoints"][0].update(address="10.0.0.1"),
     "clusters[0].endpoints[0].address", "no port"),
    ("endpoint-port-0", lambda d: cluster(d)["endpoints"][0].update(address="10.0.0.1:0"),
     "clusters[0].endpoints[0].address", "from 1 to 65535"),
    ("endpoint-port-big", lambda d: cluster(d)["endpoints"][1].update(address="a.b:65536"),
     "clusters[0].endpoints[1].address", "from 1 to 65535"),
    ("endpoint-host", lambda d: cluster(d)["endpoints"][1].update(address="bad host:80"),
     "clusters[0].endpoints[1].address", "neither an IP address nor a DNS name"),
    ("endpoint-label-dash", lambda d: cluster(d)["endpoints"][1].update(address="-a.b:80"),
     "clusters[0].endpoints[1].address", "DNS name"),
    ("subset-dup", lambda d: cluster(d)["subsets"][1].update(name="v1"), "clusters[0].subsets[1].name", "already used"),
    ("subset-empty-key", lambda d: cluster(d)["subsets"][1].update(labels={"": "x"}),
     "clusters[0].subsets[1].labels", "key is empty"),
    ("connect-timeout-0", lambda d: cluster(d).update(connect_timeout="0s"),
     "clusters[0].connect_timeout", "greater than 0"),
    ("idle-timeout-negative", lambda d: cluster(d).update(idle_timeout="-0.5s"), "clusters[0].idle_timeout", "-0.5s"),
    ("idle-timeout-0", lambda d: cluster(d).update(idle_timeout="0s"), "clusters[0].idle_timeout", "greater than 0"),
    ("cluster-hash-header", lambda d: cluster(d).update(hash_header="a:b"), "clusters[0].hash_header", "header name"),
    # listener idle timeouts: 0s is "none", a negative one is refused
    ("stream-idle-negative", lambda d: listener(d).update(stream_idle_timeout="-1s"),
     "listeners[0].stream_idle_timeout", "0 or more"),
    ("idle-negative", lambda d: listener(d).update(idle_timeout="-0.001s"), "listeners[0].idle_timeout", "0 or more"),
    # retry backoff
    ("retry-base-0", lambda d: split_route(d).update(retry_policy={"base_interval": "0s"}),
     f"{R0}.retry_policy.base_interval", "greater than 0"),
    ("retry-max-0", lambda d: split_route(d).update(retry_policy={"max_interval": "0s"}),
     f"{R0}.retry_policy.max_interval", "greater than 0"),
    ("retry-max-below-base", lambda d: split_route(d).update(retry_policy={"base_interval": "1s",
                                                                           "max_interval": "0.5s"}),
     f"{R0}.retry_policy.max_interval", "0.5s is below base_interval (1s)"),
    ("retry-per-try-0", lambda d: split_route(d).update(retry_policy={"per_try_timeout": "0s"}),
     f"{R0}.retry_policy.per_try_timeout", "greater than 0"),
    ("retry-on", lambda d: split_route(d).update(retry_policy={"retry_on": ["5xx", "sometimes"]}),
     f"{R0}.retry_policy.retry_on[1]", "unknown condition 'sometimes'"),
    # fault injection
    ("fault-empty", lambda d: split_route(d).update(fault={}), f"{R0}.fault", "neither delay nor abort"),
    ("fault-delay-no-time", lambda d: split_route(d).update(fault={"delay": {"percentage": 10}}),
     f"{R0}.fault.delay.fixed_delay", "is required"),
    ("fault-delay-0", lambda d: split_route(d).update(fault={"delay": {"fixed_delay": "0s"}}),
     f"{R0}.fault.delay.fixed_delay", "greater than 0"),
    ("fault-delay-negative", lambda d: split_route(d).update(fault={"delay": {"fixed_delay": "-1s"}}),
     f"{R0}.fault.delay.fixed_delay", "greater than 0"),
    ("fault-delay-pct-high", lambda d: split_route(d).update(fault={"delay": {"fixed_delay": "1s",
                                                                              "percentage": 100.5}}),
     f"{R0}.fault.delay.percentage", "from 0 to 100, got 100.5"),
    ("fault-delay-pct-low", lambda d: split_route(d).update(fault={"delay": {"fixed_delay": "1s",
                                                                             "percentage": -1}}),
     f"{R0}.fault.delay.percentage", "from 0 to 100, got -1"),
    ("fault-abort-no-error", lambda d: split_route(d).update(fault={"abort": {"percentage": 5}}),
     f"{R0}.fault.abort", "no error: set http_status or grpc_status"),
    ("fault-abort-pct", lambda d: split_route(d).update(fault={"abort": {"http_status": 503, "percentage": 101}}),
     f"{R0}.fault.abort.percentage", "from 0 to 100, got 101"),
    ("fault-abort-http-low", lambda d: split_route(d).update(fault={"abort": {"http_status": 199}}),
     f"{R0}.fault.abort.http_status", "from 200 to 599, got 199"),
    ("fault-abort-http-high", lambda d: split_route(d).update(fault={"abort": {"http_status": 600}}),
     f"{R0}.fault.abort.http_status", "from 200 to 599, got 600"),
    ("fault-abort-http-0", lambda d: split_route(d).update(fault={"abort": {"http_status": 0}}),
     f"{R0}.fault.abort.http_status", "from 200 to 599, got 0"),
    ("fault-abort-grpc-ok", lambda d: split_route(d).update(fault={"abort": {"grpc_status": 0}}),
     f"{R0}.fault.abort.grpc_status", "1..16; 0 is OK"),
    ("fault-abort-grpc-17", lambda d: split_route(d).update(fault={"abort": {"grpc_status": 17}}),
     f"{R0}.fault.abort.grpc_status", "got 17"),
    ("fault-on-direct-response", lambda d: other_route(d, 2).update(fault={"abort": {"http_status": 1000}}),
     "listeners[0].virtual_hosts[1].routes[2].fault.abort.http_status", "got 1000"),
    # active health checks
    ("health-interval-short", lambda d: cluster(d).update(health_check={"interval": "0.05s"}),
     "clusters[0].health_check.interval", "at least 0.1s"),
    ("health-interval-0", lambda d: cluster(d).update(health_check={"interval": "0s"}),
     "clusters[0].health_check.interval", "greater than 0"),
    ("health-timeout-over-interval", lambda d: cluster(d).update(health_check={"interval": "1s", "timeout": "2s"}),
     "clusters[0].health_check.timeout", "must not exceed interval"),
    ("health-timeout-over-default-interval", lambda d: cluster(d).update(health_check={"timeout": "11s"}),
     "clusters[0].health_check.timeout", "must not exceed interval"),
    ("health-threshold", lambda d: cluster(d).update(health_check={"healthy_threshold": 1001}),
     "clusters[0].health_check.healthy_threshold", "at most 1000"),
    # outlier detection: what OutlierDetector would refuse
    ("outlier-interval-0", lambda d: cluster(d).update(outlier_detection={"interval": "0s"}),
     "clusters[0].outlier_detection.interval", "greater than 0"),
    ("outlier-base-0", lambda d: cluster(d).update(outlier_detection={"base_ejection_time": "0s"}),
     "clusters[0].outlier_detection.base_ejection_time", "greater than 0"),
    ("outlier-max-negative", lambda d: cluster(d).update(outlier_detection={"max_ejection_time": "-5s"}),
     "clusters[0].outlier_detection.max_ejection_time", "greater than 0"),
    ("outlier-max-below-base", lambda d: cluster(d).update(
        outlier_detection={"base_ejection_time": "60s", "max_ejection_time": "59.999s"}),
     "clusters[0].outlier_detection.max_ejection_time", "59.999s is below base_ejection_time (60s)"),
    ("outlier-max-below-default-base", lambda d: cluster(d).update(outlier_detection={"max_ejection_time": "10s"}),
     "clusters[0].outlier_detection.max_ejection_time", "10s is below base_ejection_time (30s when unset)"),
    ("outlier-base-above-default-max", lambda d: cluster(d).update(
        outlier_detection={"base_ejection_time": "301s"}),
     "clusters[0].outlier_detection.base_ejection_time", "exceeds max_ejection_time (300s when unset)"),
    ("outlier-interval-huge", lambda d: cluster(d).update(outlier_detection={"interval": "4611686019s"}),
     "clusters[0].outlier_detection.interval", "at most 2^62 ns"),
    ("outlier-max-huge", lambda d: cluster(d).update(outlier_detection={"max_ejection_time": "315576000000s"}),
     "clusters[0].outlier_detection.max_ejection_time", "at most 2^62 ns"),
    ("outlier-percent", lambda d: cluster(d).update(outlier_detection={"max_ejection_percent": 101}),
     "clusters[0].outlier_detection.max_ejection_percent", "from 0 to 100, got 101"),
    # transparent listeners and the service addresses that map a redirected connection to a cluster
    ("opaque-port-0", lambda d: listener(d).update(transparent=True, opaque_ports=[3306, 0]),
     "listeners[0].opaque_ports[1]", "a port from 1 to 65535, got 0"),
    ("opaque-port-big", lambda d: listener(d).update(opaque_ports=[65536]),
     "listeners[0].opaque_ports[0]", "a port from 1 to 65535, got 65536"),
    ("detection-timeout-0", lambda d: listener(d).update(protocol_detection_timeout="0s"),
     "listeners[0].protocol_detection_timeout", "greater than 0"),
    ("detection-timeout-negative", lambda d: listener(d).update(protocol_detection_timeout="-0.1s"),
     "listeners[0].protocol_detection_timeout", "greater than 0"),
    ("service-address-hostname", lambda d: cluster(d).update(service_addresses=["reviews:9080"]),
     "clusters[0].service_addresses[0]", "'reviews' is not an IP address"),
    ("service-address-no-port", lambda d: cluster(d).update(service_addresses=["10.96.0.1:80", "10.96.0.2"]),
     "clusters[0].service_addresses[1]", "no port"),
    ("service-address-port-0", lambda d: cluster(d).update(service_addresses=["10.96.0.1:0"]),
     "clusters[0].service_addresses[0]", "from 1 to 65535"),
    ("service-address-port-big", lambda d: cluster(d).update(service_addresses=["10.96.0.1:65536"]),
     "clusters[0].service_addresses[0]", "from 1 to 65535"),
    ("service-address-v6-brackets", lambda d: cluster(d).update(service_addresses=["fd00::1:80"]),
     "clusters[0].service_addresses[0]", "brackets"),
    ("service-address-dup", lambda d: cluster(d).update(service_addresses=["[fd00::1]:80"]) or
     d["clusters"].append({"name": "b", "service_addresses": ["[FD00:0::1]:80"]}),
     "clusters[1].service_addresses[0]", "already a service address of clusters[0].service_addresses[0]"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "path", "reason"), [c[1:] for c in SEMANTIC_ERRORS], ids=[c[0] for c in SEMANTIC_ERRORS]
)
def test_semantic_errors_name_the_field(change, path, reason):
    err = refused(with_change(change))
    assert err.path == path, str(err)
    assert reason in err.reason, str(err)


def test_valid_edge_values_pass():
    def change(d):
        lis = listener(d)
        lis["address"] = "[::]:0"
        lis["http2"] = {
            "max_frame_size": 16777215,
            "initial_connection_window_size": 65535,
            "initial_stream_window_size": 2**31 - 1,
            "header_table_size": 0,
        }
        lis["virtual_hosts"][0]["domains"] += ["*.example.com", "*.example.com:8443", "[::1]", "[::1]:80", "*-x.io"]
        cluster(d)["endpoints"].append({"address": "svc_a.ns.svc.cluster.local:65535"})
        split_route(d)["timeout"] = "0s"
        split_route(d)["match"] = {"path": "/p", "headers": [{"name": ":authority", "prefix": "a"}], "method": "GET"}
        split_route(d)["route"]["prefix_rewrite"] = "/q"
        other_route(d, 2)["direct_response"].update(status=599, grpc_status=0)
        lis.update(transparent=True, opaque_ports=[1, 3306, 65535], protocol_detection_timeout="0.001s")
        cluster(d)["service_addresses"] = ["10.96.0.1:1", "10.96.0.1:65535", "[fd00::1]:9080"]

    cfg = config.from_dict(with_change(change))
    # header_table_size 0 is meaningful (no dynamic table), so it is kept as set.
    assert cfg.listeners[0].http2.HasField("header_table_size")


def test_resilience_fields_accept_their_edge_values():
    def change(d):
        listener(d).update(stream_idle_timeout="0s", idle_timeout="0s")
        split_route(d).update(
            retry_policy={"num_retries": 2, "base_interval": "0.025s", "max_interval": "0.025s"},
            fault={
                "delay": {"fixed_delay": "0.001s", "percentage": 0},
                "abort": {"grpc_status": 16, "percentage": 100},
            },
        )
        other_route(d, 0)["fault"] = {"abort": {"http_status": 200}}
        other_route(d, 1)["fault"] = {"abort": {"http_status": 599, "percentage": 0.0001}}
        other_route(d, 1)["retry_policy"] = {"max_interval": "0.001s"}  # below the default base: a cap, not an error
        other_route(d, 2)["fault"] = {"delay": {"fixed_delay": "3600s"}, "abort": {"grpc_status": 1}}
        cluster(d).update(
            circuit_breakers={
                "max_connections": 0,
                "max_pending_requests": 1,
                "max_requests": 2**32 - 1,
                "max_retries": 3,
            },
            outlier_detection={
                "consecutive_5xx": 0,
                "consecutive_gateway_errors": 2**32 - 1,
                "consecutive_local_origin_failures": 0,
                "split_external_local_origin_errors": True,
                "interval": "0.000000001s",
                "base_ejection_time": "4611686018.427387904s",  # 2^62 ns, OutlierDetector's limit
                "max_ejection_time": "4611686018.427387904s",
                "max_ejection_percent": 100,
            },
        )
        d["clusters"] += [
            {"name": "base-only", "outlier_detection": {"base_ejection_time": "300s", "max_ejection_percent": 0}},
            {"name": "max-only", "outlier_detection": {"max_ejection_time": "30s"}},
            {"name": "empty", "outlier_detection": {}, "circuit_breakers": {}},
        ]

    cfg = config.from_dict(with_change(change))
    lis, route = cfg.listeners[0], cfg.listeners[0].virtual_hosts[0].routes[0]
    # 0s is "no timeout", kept apart from unset (the 300s and 3600s defaults)
    assert lis.HasField("stream_idle_timeout") and lis.HasField("idle_timeout")
    assert route.fault.delay.HasField("percentage") and route.fault.delay.percentage == 0
    assert route.fault.abort.WhichOneof("error") == "grpc_status"
    od = cfg.clusters[0].outlier_detection
    assert od.HasField("consecutive_5xx") and od.consecutive_5xx == 0
    assert not cfg.clusters[3].outlier_detection.HasField("max_ejection_percent")
    assert config.from_yaml(config.to_yaml(cfg)) == cfg


def test_nan_percentages_are_refused():
    cfg = config.from_dict(
        with_change(
            lambda d: split_route(d).update(fault={"delay": {"fixed_delay": "1s"}, "abort": {"http_status": 503}})
        )
    )
    cfg.listeners[0].virtual_hosts[0].routes[0].fault.delay.percentage = float("nan")
    with pytest.raises(
        ConfigError, match=r"^listeners\[0\].*\.routes\[0\]\.fault\.delay\.percentage: must be from 0 to 100, got nan$"
    ):
        config.validate(cfg)
    cfg.listeners[0].virtual_hosts[0].routes[0].fault.delay.percentage = 50
    cfg.listeners[0].virtual_hosts[0].routes[0].fault.abort.percentage = float("nan")
    with pytest.raises(ConfigError, match=r"\.fault\.abort\.percentage: must be from 0 to 100, got nan$"):
        config.validate(cfg)


def _ns(d) -> int:
    return d.seconds * 1_000_000_000 + d.nanos


def outlier_detector(od: pb.OutlierDetection, n: int, outlier=resilience.outlier):
    """The OutlierDetector the sidecar builds from ``od``: unset fields at the proto's defaults."""
    kwargs = {
        "consecutive_gateway_errors": od.consecutive_gateway_errors,
        "split_external_local_origin_errors": od.split_external_local_origin_errors,
    }
    for field in ("consecutive_5xx", "consecutive_local_origin_failures", "max_ejection_percent"):
        if od.HasField(field):
            kwargs[field] = getattr(od, field)
    for field, arg in (
        ("interval", "interval_ns"),
        ("base_ejection_time", "base_ejection_time_ns"),
        ("max_ejection_time", "max_ejection_time_ns"),
    ):
        if od.HasField(field):
            kwargs[arg] = _ns(getattr(od, field))
    return outlier.OutlierDetector(n, **kwargs)


_TIMES_NS = st.one_of(
    st.none(),
    st.integers(-3, 3),
    st.integers(-(10**13), 10**13),
    st.integers(2**62 - 3, 2**62 + 3),
    st.sampled_from([30 * 10**9, 300 * 10**9, 300 * 10**9 + 1, 30 * 10**9 - 1]),
)


@settings(max_examples=400, deadline=None)
@given(
    c5xx=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    gateway=st.integers(0, 2**32 - 1),
    local=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    split=st.booleans(),
    interval=_TIMES_NS,
    base=_TIMES_NS,
    most=_TIMES_NS,
    percent=st.one_of(st.none(), st.integers(0, 120), st.just(2**32 - 1)),
)
def test_validate_accepts_exactly_the_outlier_detection_the_sidecar_can_build(
    c5xx, gateway, local, split, interval, base, most, percent
):
    cfg = config.from_dict(base_config_with_outlier())
    od = cfg.clusters[0].outlier_detection
    od.consecutive_gateway_errors = gateway
    od.split_external_local_origin_errors = split
    for field, value in (("consecutive_5xx", c5xx), ("consecutive_local_origin_failures", local)):
        if value is not None:
            setattr(od, field, value)
    if percent is not None:
        od.max_ejection_percent = percent
    for field, ns in (("interval", interval), ("base_ejection_time", base), ("max_ejection_time", most)):
        if ns is not None:
            getattr(od, field).FromNanoseconds(ns)
    try:
        config.validate(cfg)
        accepted = True
    except ConfigError as exc:
        assert exc.path.startswith("clusters[0].outlier_detection."), str(exc)
        accepted = False
    twins = [resilience.pure()[1]] + ([resilience.compiled()[1]] if resilience.compiled() else [])
    for twin in twins:
        try:
            outlier_detector(od, 3, twin)
            built = True
        except ValueError:
            built = False
        assert built == accepted, (twin.__name__, od)


def base_config_with_outlier() -> dict:
    return with_change(lambda d: cluster(d).update(outlier_detection={}))


def test_validate_checks_messages_built_in_code():
    # The control plane hands over messages, not dicts: the same checks apply.
    cfg = config.from_dict(base())
    cfg.clusters[0].lb_policy = 9
    with pytest.raises(ConfigError, match=r"^clusters\[0\]\.lb_policy: unknown policy number 9$"):
        config.validate(cfg)
    cfg = config.from_dict(base())
    cfg.clusters[0].connect_timeout.seconds = 1
    cfg.clusters[0].connect_timeout.nanos = -5
    with pytest.raises(ConfigError, match=r"^clusters\[0\]\.connect_timeout: malformed duration"):
        config.validate(cfg)


def test_parse_address():
    assert config.parse_address("127.0.0.1:15001", listener=True) == ("127.0.0.1", 15001)
    assert config.parse_address("[::1]:0", listener=True) == ("::1", 0)
    assert config.parse_address("reviews.bookinfo:9080") == ("reviews.bookinfo", 9080)
    with pytest.raises(ValueError, match="port '0'"):
        config.parse_address("a:0")


def test_parse_domain():
    assert config.parse_domain("API.Example.com") == config.Domain("api.example.com", None)
    assert config.parse_domain("*.example.com:8443") == config.Domain("*.example.com", 8443)
    assert config.parse_domain("*.x").wildcard and not config.parse_domain("x").wildcard
    assert config.parse_domain("[::1]:80") == config.Domain("[::1]", 80)


# --- files ----------------------------------------------------------------------


def test_load_file_reads_yaml_and_json(tmp_path):
    (tmp_path / "c.yaml").write_text(config.to_yaml(config.from_dict(base())))
    (tmp_path / "c.json").write_text(json.dumps(base()))
    assert (
        config.load_file(tmp_path / "c.yaml") == config.load_file(str(tmp_path / "c.json")) == config.from_dict(base())
    )


def load_refused(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config.load_file(path)
    err = info.value
    assert err.source == str(path)
    assert "\n" not in str(err)
    assert str(err).startswith(f"{path}: ")
    return err


def test_missing_file(tmp_path):
    err = load_refused(tmp_path / "nope.yaml")
    assert err.reason == "cannot read the file: No such file or directory"


def test_yaml_syntax_error_gives_the_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("version: '1'\nlisteners:\n  - name: a\n   address: x\n")
    err = load_refused(p)
    assert err.reason.startswith("YAML syntax error at line 4, column")


def test_yaml_duplicate_key_is_refused(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("listeners:\n  - name: a\n    address: 127.0.0.1:1\n    name: b\n")
    err = load_refused(p)
    assert err.reason == "YAML syntax error at line 4, column 5: key 'name' is given twice in one mapping"


def test_json_syntax_error(tmp_path):
    p = tmp_path / "c.json"
    p.write_text('{"version": "1",\n "listeners": [}')
    assert load_refused(p).reason.startswith("JSON syntax error at line 2")


def test_not_utf8(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"version: \xff\n")
    assert "not UTF-8" in load_refused(p).reason


def test_empty_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("# nothing yet\n")
    assert load_refused(p).reason == "the configuration is empty"


@pytest.mark.parametrize(
    ("text", "path", "reason"),
    [
        ("listeners:\n  - name: a\n    adress: 1.2.3.4:1\n", "listeners[0].adress", "did you mean 'address'"),
        ("clusters:\n  - name: c\n    endpoints:\n      - address: 10.0.0.1\n", "clusters[0].endpoints[0].address",
         "no port"),
        ("clusters:\n  - name: c\n    connect_timeout: 1\n", "clusters[0].connect_timeout", "such as '1.5s'"),
        ("clusters:\n  - name: c\n    subsets:\n      - name: s\n        labels: {version: 1.0}\n",
         "clusters[0].subsets[0].labels['version']", "expected a string, got float 1.0"),
    ],
)  # fmt: skip
def test_file_errors_carry_the_field_path(tmp_path, text, path, reason):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    err = load_refused(p)
    assert err.path == path
    assert reason in err.reason
    assert str(err) == f"{p}: {path}: {err.reason}"


def test_yaml_dumps_maps_sorted_by_key_whatever_their_insertion_order():
    # Protobuf maps iterate in no set order; two equal configs must still dump alike (config dumps are diffed).
    keys = [f"k{i:02d}" for i in range(40)]
    one, two = config.SidecarConfig(), config.SidecarConfig()
    for k in keys:
        one.node.labels[k] = "v"
    for k in reversed(keys):
        two.node.labels[k] = "v"
    one.clusters.add(name="c").endpoints.add(address="127.0.0.1:1", labels={"version": "v1", "app": "a"})
    two.clusters.add(name="c").endpoints.add(address="127.0.0.1:1", labels={"app": "a", "version": "v1"})
    assert one == two
    text = config.to_yaml(one)
    assert text == config.to_yaml(two)
    assert list(config.to_dict(one)["node"]["labels"]) == keys
    assert list(config.to_dict(two)["clusters"][0]["endpoints"][0]["labels"]) == ["app", "version"]
    assert config.from_yaml(text) == one
