"""The sidecar end to end, configured from a file, with real peers on loopback: weighted splits,
h2load through it to nghttpd, the errors it answers itself (to gRPC and to plain HTTP/2
clients), deadlines, routing, request ids, drain and workers, the command line, and its
upstream pools (idle timeout, GOAWAY, an upstream's MAX_CONCURRENT_STREAMS).

Peers: grpcio servers in this process, ``nghttpd``/``h2load`` (Debian nghttp2),
``harness.H2CaptureServer`` (records what reaches an upstream), ``harness.H2Client`` (an
``h2``-library client, for plain HTTP/2 requests with any :authority) and, here, an
``h2``-library server the test scripts (``ScriptedH2Server``, on ``harness.H2ScriptedServer``:
delays, GOAWAY, a stream limit).

Every call carries a timeout and every load is bounded in count; the tests assert behaviour,
never speed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import h2.connection
import h2.errors
import h2.settings
import pytest

from tests.integration import harness
from tests.integration.conftest import SIDECAR_KEY
from tests.integration.harness import H2Client, H2Response, grpc_frame

#: Every call's deadline (and every socket's) unless a test is about deadlines.
TIMEOUT = 10.0
HOST = harness.HOST
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")

NGHTTP2_TOOLS = ("nghttpd", "h2load")
needs_nghttp2 = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in NGHTTP2_TOOLS),
    reason="nghttpd/h2load are missing (apt-get install nghttp2-server nghttp2-client)",
)


# -- config files ------------------------------------------------------------------


def listener(port: int, *virtual_hosts: dict, **extra) -> dict:
    return {"name": "main", "address": f"{HOST}:{port}", "virtual_hosts": list(virtual_hosts), **extra}


def vhost(name: str, domains: list[str], *routes: dict) -> dict:
    return {"name": name, "domains": domains, "routes": list(routes)}


def to(cluster: str, match: dict | None = None, *, subset: str = "", timeout: str | None = None, **action) -> dict:
    """A route forwarding to ``cluster`` (``match`` defaults to every path)."""
    target = {"cluster": cluster, "subset": subset} if subset else {"cluster": cluster}
    route = {"match": match if match is not None else {"prefix": "/"}, "route": {"clusters": [target], **action}}
    if timeout is not None:
        route["timeout"] = timeout
    return route


def direct(match: dict, **response) -> dict:
    return {"match": match, "direct_response": response}


def cluster(name: str, *addresses: str, **extra) -> dict:
    return {"name": name, "endpoints": [{"address": a} for a in addresses], **extra}


def write_config(directory: Path, listen_port: int, virtual_hosts: list[dict], clusters: list[dict]) -> Path:
    path = directory / f"sidecar-{listen_port}.json"
    config = {"version": "test", "listeners": [listener(listen_port, *virtual_hosts)], "clusters": clusters}
    path.write_text(json.dumps(config, indent=1))
    return path


@contextlib.contextmanager
def configured_sidecar(
    directory: Path,
    virtual_hosts: list[dict],
    clusters: list[dict],
    *,
    upstream: str | None = None,
    request: pytest.FixtureRequest | None = None,
    extra_args: tuple[str, ...] = (),
    stop_timeout: float = 5.0,
):
    """A sidecar running ``virtual_hosts`` and ``clusters`` from a config file on a free port;
    ``upstream`` only says whose connections ``upstream_connections()`` counts."""
    port = harness.free_port()
    path = write_config(directory, port, virtual_hosts, clusters)
    with harness.Sidecar(
        upstream=upstream, config_file=path, listen_port=port, extra_args=extra_args, stop_timeout=stop_timeout
    ) as sidecar:
        if request is not None:
            request.node.stash[SIDECAR_KEY] = sidecar
        yield sidecar


def connections_to(sidecar: harness.Sidecar, address: str) -> int:
    """Established connections from the sidecar to ``address``'s port."""
    port = int(address.rpartition(":")[2])
    return sum(1 for _, remote in sidecar.connections() if remote == port)


def grpc_channel(address: str, *options) -> grpc.Channel:
    return grpc.insecure_channel(address, options=[*harness.CLIENT_OPTIONS, *options])


# -- a plain HTTP/2 client (harness.H2Client) ---------------------------------------------


def h2_request(address: str, path: str, timeout: float = TIMEOUT, **kwargs) -> H2Response:
    """One request on a connection of its own."""
    with H2Client(address, timeout=timeout) as client:
        return client.request(path, timeout=timeout, **kwargs)


# -- an upstream the test scripts -------------------------------------------------------


class ScriptedH2Server(harness.H2ScriptedServer):
    """An h2c server (``harness.H2ScriptedServer``: the h2 library, a thread per connection) that
    answers every request with a gRPC-shaped response carrying ``identity`` (``x-served-by``, and
    as the one message), and can be told to:

    * ``delay``: answer each request that many seconds after it has fully arrived;
    * ``max_concurrent_streams``: advertise that SETTINGS_MAX_CONCURRENT_STREAMS and refuse
      (RST_STREAM REFUSED_STREAM, as nghttp2 does) a stream above it;
    * ``goaway_after``: once a connection has answered that many requests, send GOAWAY and
      close the connection once it has no stream left. ``goaway`` says how:
      ``"with-response"``: in the same write as the last response, last stream id the highest
      received (all of which it answers); ``"graceful"``: first a GOAWAY with 2^31-1 and a
      PING, and the real one when the PING comes back (RFC 9113 §6.8); ``"next-stream"``:
      when the next request arrives, with the last stream id below it, leaving that request
      unprocessed (which RFC 9113 §8.7 says a client may safely retry).

    It counts what it saw: connections, requests served, the most streams open at once on one
    connection (refused ones included), refusals, GOAWAYs, streams ignored after a GOAWAY.
    """

    name = "scripted-h2"

    def __init__(
        self,
        identity: str = "scripted",
        *,
        delay: float = 0.0,
        max_concurrent_streams: int | None = None,
        goaway_after: int = 0,
        goaway: str = "with-response",
    ) -> None:
        if goaway not in ("with-response", "graceful", "next-stream"):
            raise ValueError(f"goaway={goaway!r}")
        self.limit = max_concurrent_streams
        self.goaway_after = goaway_after
        self.goaway_mode = goaway
        self.max_open = 0
        self.refused = 0
        self.resets = 0
        self.paths: list[str] = []
        super().__init__(identity, delay=delay, host=HOST)

    def _initiate(self, conn: h2.connection.H2Connection) -> None:
        if self.limit is None:
            conn.initiate_connection()
            return
        codes = h2.settings.SettingCodes
        conn.local_settings = h2.settings.Settings(
            client=False, initial_values={codes.MAX_CONCURRENT_STREAMS: self.limit}
        )
        conn.initiate_connection()
        # The limit is advertised (the SETTINGS frame is already written); this class enforces
        # it (with REFUSED_STREAM), so that the h2 library does not end the whole connection over it.
        conn.local_settings = h2.settings.Settings(
            client=False, initial_values={codes.MAX_CONCURRENT_STREAMS: 2**31 - 1}
        )

    def _answered(self, session: harness.H2Session) -> None:
        if self.goaway_after and session.answered == self.goaway_after and not session.goaways:
            if self.goaway_mode == "graceful":
                self._queue_goaway(session, 2**31 - 1, final=False)
                session.conn.ping(b"drain-me")
            elif self.goaway_mode == "with-response":
                self._queue_goaway(session, session.highest)

    def _goaway_on_request(self, session: harness.H2Session) -> bool:
        return self.goaway_mode == "next-stream" and session.answered >= self.goaway_after > 0 and not session.goaways

    def _ping_ack(self, session: harness.H2Session) -> None:
        if session.goaways and session.final_last is None:
            self._queue_goaway(session, session.highest)

    def _request(self, session: harness.H2Session, sid: int, headers: dict[str, str]) -> bool:
        session.open_streams.add(sid)
        with self.lock:
            self.paths.append(headers.get(":path", ""))
            self.max_open = max(self.max_open, len(session.open_streams))
        return True

    def _stream_reset(self, session: harness.H2Session, sid: int, was_open: bool) -> None:
        with self.lock:
            self.resets += 1

    def _after_read(self, session: harness.H2Session) -> None:
        # Streams over the limit are refused once the whole read is counted, so that
        # max_open says how many the client had open at once.
        while self.limit is not None and len(session.open_streams) > self.limit:
            sid = max(session.open_streams)
            session.open_streams.discard(sid)
            session.due.pop(sid, None)
            session.conn.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            with self.lock:
                self.refused += 1


# -- grpcio servers ---------------------------------------------------------------------

LIFE = "meshtest.Life"


@pytest.fixture(scope="module")
def life_server():
    handlers = {
        "Tick": grpc.unary_stream_rpc_method_handler(harness.tick),
        "Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request),
    }
    with harness.grpc_server(handlers, LIFE, workers=32) as address:
        yield address


def tick_request(count: int, interval: float) -> bytes:
    return struct.pack(">Id", count, interval)


# -- nghttpd -----------------------------------------------------------------------------


@contextlib.contextmanager
def nghttpd(htdocs: Path):
    port = harness.free_port()
    process = harness.Process(["nghttpd", "--no-tls", "-d", str(htdocs), str(port)], name="nghttpd")
    try:
        harness.wait_listening(HOST, port, 10, alive=process.alive)
        yield f"{HOST}:{port}"
    finally:
        process.stop(signal.SIGTERM, 5)
        process.remove_log()


@pytest.fixture(scope="module")
def versioned_nghttpds(tmp_path_factory: pytest.TempPathFactory):
    """Two nghttpd servers, ``v1`` and ``v2``: ``/who`` answers the server's version and
    ``/index.html`` is 2 KiB."""
    if not all(shutil.which(tool) for tool in NGHTTP2_TOOLS):
        pytest.skip("nghttpd/h2load are missing (apt-get install nghttp2-server nghttp2-client)")
    addresses = {}
    with contextlib.ExitStack() as stack:
        for version in ("v1", "v2"):
            htdocs = tmp_path_factory.mktemp(f"htdocs-{version}")
            (htdocs / "who").write_text(version)
            (htdocs / "index.html").write_bytes(bytes(range(256)) * 8)
            addresses[version] = stack.enter_context(nghttpd(htdocs))
        yield addresses


# == 1. weighted split ===================================================================


def test_weighted_split_80_20(tmp_path: Path, request: pytest.FixtureRequest, versioned_nghttpds: dict):
    """10,000 requests over one connection to a route splitting 80/20 between subsets v1 and v2
    of one cluster (endpoints labelled version=v1/v2). The split is smooth weighted round
    robin, exact over every 100 picks, so the counts are exactly 8000/2000; the binomial
    6-sigma bound (what a random split would have to meet) is checked too, for the record."""
    total, batch = 10_000, 100
    split = {
        "match": {"prefix": "/"},
        "route": {
            "clusters": [
                {"cluster": "reviews", "subset": "v1", "weight": 80},
                {"cluster": "reviews", "subset": "v2", "weight": 20},
            ]
        },
    }
    reviews = {
        "name": "reviews",
        "lb_policy": "ROUND_ROBIN",
        "endpoints": [
            {"address": versioned_nghttpds["v1"], "labels": {"version": "v1"}},
            {"address": versioned_nghttpds["v2"], "labels": {"version": "v2"}},
        ],
        "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}],
    }
    counts: Counter[str] = Counter()
    statuses: Counter[int | None] = Counter()
    with configured_sidecar(tmp_path, [vhost("all", ["*"], split)], [reviews], request=request) as sidecar:
        with H2Client(sidecar.address) as client:
            for _ in range(total // batch):
                ids = [client.send("/who", authority="reviews") for _ in range(batch)]
                for response in client.wait(ids, timeout=30):
                    statuses[response.status] += 1
                    counts[bytes(response.body).decode()] += 1
    assert statuses == {200: total}
    p = 0.8
    sigma = math.sqrt(total * p * (1 - p))  # 40 for 10,000 picks
    assert abs(counts["v1"] - total * p) <= 6 * sigma, counts
    assert counts == {"v1": 8000, "v2": 2000}


# == 2. h2load through the sidecar to nghttpd ============================================


H2LOAD_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored"
)
H2LOAD_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")


@needs_nghttp2
@pytest.mark.parametrize("shape", ["get", "grpc-post"])
def test_h2load_through_sidecar(tmp_path: Path, request: pytest.FixtureRequest, versioned_nghttpds: dict, shape: str):
    """``h2load -n 5000 -c 8 -m 16``: every request succeeds with a 2xx, and once h2load is gone
    the sidecar holds no downstream connection."""
    n = 5000
    upstream = versioned_nghttpds["v1"]
    with configured_sidecar(
        tmp_path, [vhost("all", ["*"], to("web"))], [cluster("web", upstream)], upstream=upstream, request=request
    ) as sidecar:
        argv = ["h2load", "-n", str(n), "-c", "8", "-m", "16"]
        if shape == "grpc-post":
            body = tmp_path / "request.bin"
            body.write_bytes(grpc_frame(b"\x08\x96\x01" * 100))
            argv += ["-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers"]
        argv.append(f"http://{sidecar.address}/index.html")
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        requests_line = H2LOAD_REQUESTS.search(result.stdout)
        status_line = H2LOAD_STATUS.search(result.stdout)
        assert requests_line and status_line, result.stdout
        total, started, done, succeeded, failed, errored = map(int, requests_line.groups())
        assert (total, started, done, succeeded, failed, errored) == (n, n, n, n, 0, 0), result.stdout
        assert tuple(map(int, status_line.groups())) == (n, 0, 0, 0), result.stdout
        assert harness.poll_until(lambda: sidecar.downstream_connections() == 0, 5), sidecar.connections()


# == 3. errors the proxy makes ===========================================================


@pytest.fixture(scope="module")
def errors_sidecar(tmp_path_factory: pytest.TempPathFactory):
    """One sidecar, several ways to fail: ``/unavailable*`` goes to a closed port, ``/slow*``
    to an upstream that answers after 3 s under a 0.3 s route timeout, ``/direct*`` are
    answered by the sidecar itself, and nothing else has a route."""
    closed = f"{HOST}:{harness.free_port()}"
    with ScriptedH2Server("slow", delay=3.0) as slow:
        routes = [
            to("dead", {"prefix": "/unavailable"}),
            to("slow", {"prefix": "/slow"}, timeout="0.3s"),
            direct(
                {"prefix": "/direct-grpc"},
                status=403,
                body="forbidden here\n",
                grpc_status=7,
                grpc_message="no entry for you",
            ),
            direct({"prefix": "/direct-503"}, status=503, body="down for maintenance\n"),
            direct({"prefix": "/direct"}, status=418, body="short and stout\n"),
        ]
        clusters = [cluster("dead", closed, connect_timeout="1s"), cluster("slow", slow.address)]
        directory = tmp_path_factory.mktemp("errors")
        with configured_sidecar(directory, [vhost("all", ["*"], *routes)], clusters) as sidecar:
            yield sidecar


@pytest.fixture(scope="module")
def errors_channel(errors_sidecar: harness.Sidecar):
    with grpc_channel(errors_sidecar.address) as channel:
        yield channel


def grpc_error(channel: grpc.Channel, path: str, timeout: float = TIMEOUT) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        channel.unary_unary(path)(b"request", timeout=timeout)
    return raised.value


def test_grpc_no_route(errors_channel: grpc.Channel):
    error = grpc_error(errors_channel, "/nowhere.Service/Method")
    assert error.code() is grpc.StatusCode.UNIMPLEMENTED
    assert "no route" in error.details()


def test_grpc_upstream_connect_failure(errors_channel: grpc.Channel):
    error = grpc_error(errors_channel, "/unavailable.Service/Method")
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert "connect" in error.details()


def test_grpc_route_timeout(errors_channel: grpc.Channel):
    """The route's 0.3 s runs out long before the client's 10 s deadline: DEADLINE_EXCEEDED
    comes from the proxy (before the client's own deadline could have fired)."""
    start = time.monotonic()
    error = grpc_error(errors_channel, "/slow.Service/Method", timeout=10)
    elapsed = time.monotonic() - start
    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "timeout" in error.details()
    assert elapsed < 5, f"DEADLINE_EXCEEDED after {elapsed:.2f}s: the client's deadline, not the route's"


def test_grpc_direct_response_status(errors_channel: grpc.Channel):
    error = grpc_error(errors_channel, "/direct-grpc.Service/Method")
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "no entry for you"


def test_grpc_direct_response_status_from_http(errors_channel: grpc.Channel):
    """No grpc_status configured: a gRPC client derives it from the HTTP status (503 ->
    UNAVAILABLE)."""
    error = grpc_error(errors_channel, "/direct-503.Service/Method")
    assert error.code() is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("path", "status", "flag"),
    [("/nowhere", 404, "NR"), ("/unavailable", 503, "UF"), ("/slow", 504, "UT")],
)
def test_http_error_responses(errors_sidecar: harness.Sidecar, path: str, status: int, flag: str):
    response = h2_request(errors_sidecar.address, path)
    assert response.status == status, response
    assert response.headers.get("x-meshproxy-response-flags") == flag, response
    assert response.ended and response.body, response


@pytest.mark.parametrize(
    ("path", "status", "body"),
    [("/direct", 418, b"short and stout\n"), ("/direct-grpc", 403, b"forbidden here\n")],
)
def test_http_direct_response(errors_sidecar: harness.Sidecar, path: str, status: int, body: bytes):
    response = h2_request(errors_sidecar.address, path)
    assert (response.status, bytes(response.body), response.ended) == (status, body, True), response


# == 4-6. what reaches the upstream: deadlines, routing, request ids =====================


@pytest.fixture(scope="module")
def capture():
    with harness.H2CaptureServer() as server:
        yield server


def _named(name: str, match: dict | None = None, **extra) -> dict:
    """A route to the capture server that tells the upstream its name (as :authority)."""
    return to("capture", match, authority_rewrite=name, **extra)


@pytest.fixture(scope="module")
def capture_sidecar(tmp_path_factory: pytest.TempPathFactory, capture: harness.H2CaptureServer):
    """A sidecar in front of the capture server whose every route rewrites :authority to its own
    name, so the upstream tells which one matched."""
    paths = vhost(
        "paths",
        ["paths.test"],
        _named("r-exact", {"path": "/exact"}),
        _named("r-regex", {"regex": "/items/[0-9]+"}),
        _named("r-grpc-method", {"grpc": {"service": "pkg.Svc", "method": "Get"}}),
        _named("r-grpc-service", {"grpc": {"service": "pkg.Svc"}}),
        _named("r-header", {"prefix": "/", "headers": [{"name": "X-Canary", "exact": "1"}]}),
        _named("r-absent", {"prefix": "/h/", "headers": [{"name": "x-user", "present": False}]}),
        to("capture", {"prefix": "/old/"}, prefix_rewrite="/new/"),
        _named("r-post", {"prefix": "/m/", "method": "POST"}),
        _named("r-default"),
    )
    virtual_hosts = [
        vhost("exact", ["api.test"], _named("vh-exact")),
        vhost("port", ["api.test:8443"], _named("vh-port")),
        vhost("wild", ["*.wild.test"], _named("vh-wild")),
        paths,
        vhost(
            "any",
            ["*"],
            _named("r-short", {"prefix": "/short.Svc/"}, timeout="0.5s"),
            _named("r-long", {"prefix": "/long.Svc/"}, timeout="60s"),
            _named("vh-any"),
        ),
    ]
    directory = tmp_path_factory.mktemp("capture")
    with configured_sidecar(directory, virtual_hosts, [cluster("capture", capture.address)]) as sidecar:
        yield sidecar


@pytest.fixture
def seen(capture: harness.H2CaptureServer):
    """``seen()``: the header fields of the next request the capture server got; none are left
    over from an earlier test."""
    while not capture.requests.empty():
        capture.requests.get_nowait()
    return lambda: capture.requests.get(timeout=TIMEOUT)


# -- 4. grpc-timeout ---------------------------------------------------------------------
#
# The client here sends grpc-timeout itself, so that "what the client sent" is known exactly:
# grpcio's own value is its deadline rounded up (to keep the header short), and may exceed the
# deadline a little.


def grpc_call(address: str, path: str, grpc_timeout: str | None) -> H2Response:
    """A gRPC-shaped unary request (one empty message) with ``grpc_timeout`` as sent."""
    headers = [*GRPC_HEADERS, *([("grpc-timeout", grpc_timeout)] if grpc_timeout else [])]
    return h2_request(address, path, method="POST", headers=headers, body=grpc_frame(b""))


@pytest.mark.parametrize(("path", "route"), [("/plain.Svc/Call", "vh-any"), ("/long.Svc/Call", "r-long")])
@pytest.mark.parametrize("sent", ["5S", "2000m", "30000000u"])
def test_grpc_timeout_is_time_remaining(capture_sidecar: harness.Sidecar, seen, path: str, route: str, sent: str):
    """No route timeout, or a longer one (60 s): the upstream is told the time remaining,
    rewritten from what the client sent (less the moment the proxy took), never more."""
    response = grpc_call(capture_sidecar.address, path, sent)
    assert (response.status, response.trailers.get("grpc-status")) == (200, "0"), response
    headers = seen()
    assert headers[":authority"] == route
    assert 0 < harness.grpc_timeout_seconds(headers["grpc-timeout"]) < harness.grpc_timeout_seconds(sent)


def test_grpc_timeout_route_timeout_wins(capture_sidecar: harness.Sidecar, seen):
    """The route timeout (0.5 s) is shorter than the client's deadline (30 s): the upstream is
    told the route's, less the moment the proxy took."""
    response = grpc_call(capture_sidecar.address, "/short.Svc/Call", "30S")
    assert response.status == 200, response
    headers = seen()
    assert headers[":authority"] == "r-short"
    assert 0.25 <= harness.grpc_timeout_seconds(headers["grpc-timeout"]) <= 0.5


def test_grpc_timeout_route_timeout_without_client_deadline(capture_sidecar: harness.Sidecar, seen):
    """No client deadline, a 0.5 s route timeout: the upstream still learns its deadline."""
    response = grpc_call(capture_sidecar.address, "/short.Svc/Call", None)
    assert response.status == 200, response
    assert 0.25 <= harness.grpc_timeout_seconds(seen()["grpc-timeout"]) <= 0.5


def test_grpc_timeout_from_grpcio(capture_sidecar: harness.Sidecar, seen):
    """The same through grpcio: a deadline reaches the upstream, at most the client's (plus
    grpcio's own rounding up: 1%), and a route timeout below it wins."""
    with grpc_channel(capture_sidecar.address) as channel:
        assert channel.unary_unary("/plain.Svc/Call")(b"x", timeout=5.0) == b""
        plain = seen()
        assert channel.unary_unary("/short.Svc/Call")(b"x", timeout=30.0) == b""
        short = seen()
    assert 0 < harness.grpc_timeout_seconds(plain["grpc-timeout"]) <= 5.0 * 1.01
    assert 0.25 <= harness.grpc_timeout_seconds(short["grpc-timeout"]) <= 0.5


# -- 5. routing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authority", "route"),
    [
        ("api.test", "vh-exact"),
        ("API.Test", "vh-exact"),
        ("api.test:8080", "vh-exact"),  # a domain without a port matches any port
        ("api.test:8443", "vh-port"),  # ... but one with the port wins
        ("a.wild.test", "vh-wild"),
        ("b.a.wild.test:99", "vh-wild"),
        ("wild.test", "vh-any"),  # "*." needs at least one character before the suffix
        ("elsewhere", "vh-any"),
    ],
)
def test_route_by_authority(capture_sidecar: harness.Sidecar, seen, authority: str, route: str):
    response = h2_request(capture_sidecar.address, "/some/path", authority=authority)
    assert response.status == 200, response
    headers = seen()
    assert headers[":authority"] == route
    assert headers[":path"] == "/some/path"


GRPC_HEADERS = (("content-type", "application/grpc"), ("te", "trailers"))


@pytest.mark.parametrize(
    ("method", "path", "headers", "route"),
    [
        ("GET", "/exact", (), "r-exact"),
        ("GET", "/exact?q=1", (), "r-exact"),  # exact paths ignore the query
        ("GET", "/exact/more", (), "r-default"),
        ("GET", "/items/42", (), "r-regex"),
        ("GET", "/items/42/x", (), "r-default"),  # a regex matches the whole path
        ("POST", "/pkg.Svc/Get", GRPC_HEADERS, "r-grpc-method"),
        ("POST", "/pkg.Svc/List", GRPC_HEADERS, "r-grpc-service"),
        ("POST", "/pkg.Svc/Get", (("content-type", "application/json"),), "r-default"),  # not gRPC
        ("POST", "/pkg.Other/Get", GRPC_HEADERS, "r-default"),
        ("GET", "/anything", (("x-canary", "1"),), "r-header"),
        ("GET", "/anything", (("x-canary", "2"),), "r-default"),
        ("GET", "/h/x", (), "r-absent"),
        ("GET", "/h/x", (("x-user", "u"),), "r-default"),
        ("POST", "/m/x", (), "r-post"),
        ("GET", "/m/x", (), "r-default"),
    ],
)
def test_route_by_request(capture_sidecar: harness.Sidecar, seen, method: str, path: str, headers, route: str):
    body = grpc_frame(b"") if method == "POST" else b""
    address = capture_sidecar.address
    response = h2_request(address, path, method=method, authority="paths.test", headers=headers, body=body)
    assert response.status == 200, response
    got = seen()
    assert (got[":authority"], got[":method"], got[":path"]) == (route, method, path)


@pytest.mark.parametrize(
    ("path", "upstream_path"),
    [("/old/thing", "/new/thing"), ("/old/a/b?x=1&y=2", "/new/a/b?x=1&y=2"), ("/old/", "/new/")],
)
def test_prefix_rewrite(capture_sidecar: harness.Sidecar, seen, path: str, upstream_path: str):
    response = h2_request(capture_sidecar.address, path, authority="paths.test:80")
    assert response.status == 200, response
    got = seen()
    assert got[":path"] == upstream_path
    assert got[":authority"] == "paths.test:80"  # no authority_rewrite on this route: kept


def test_authority_rewrite_for_grpc(capture_sidecar: harness.Sidecar, seen):
    """grpcio sends the channel's authority; the route replaces it upstream."""
    with grpc_channel(capture_sidecar.address, ("grpc.default_authority", "paths.test")) as channel:
        assert channel.unary_unary("/pkg.Svc/Get")(b"x", timeout=TIMEOUT) == b""
    got = seen()
    assert got[":authority"] == "r-grpc-method"
    assert got[":path"] == "/pkg.Svc/Get"


# -- 6. request ids and hop-by-hop fields ---------------------------------------------------


def test_request_id_generated(capture_sidecar: harness.Sidecar, seen):
    ids = []
    with H2Client(capture_sidecar.address) as client:
        for _ in range(3):
            assert client.request("/rid").status == 200
            ids.append(seen()["x-request-id"])
    assert all(UUID4.fullmatch(i) for i in ids), ids
    assert len(set(ids)) == 3, ids


def test_request_id_kept(capture_sidecar: harness.Sidecar, seen):
    response = h2_request(capture_sidecar.address, "/rid", headers=(("x-request-id", "my-own-id-123"),))
    assert response.status == 200
    got = seen()
    assert got["x-request-id"] == "my-own-id-123"


def test_grpc_request_id_and_te(capture_sidecar: harness.Sidecar, seen):
    """gRPC through the sidecar: te: trailers reaches the upstream, and so does a generated
    x-request-id; one the client set is kept."""
    with grpc_channel(capture_sidecar.address) as channel:
        call = channel.unary_unary("/plain.Svc/Call")
        assert call(b"x", timeout=TIMEOUT) == b""
        first = seen()
        assert call(b"x", metadata=[("x-request-id", "grpc-given")], timeout=TIMEOUT) == b""
        second = seen()
    assert first["te"] == "trailers"
    assert first["content-type"].startswith("application/grpc")
    assert UUID4.fullmatch(first["x-request-id"]), first
    assert second["x-request-id"] == "grpc-given"


@pytest.mark.parametrize("header", [("connection", "keep-alive"), ("te", "gzip"), ("transfer-encoding", "chunked")])
def test_connection_specific_field_refused(capture_sidecar: harness.Sidecar, seen, header: tuple[str, str]):
    """A request with a connection-specific field is malformed in HTTP/2 (RFC 9113 §8.2.2): the
    stream is reset with PROTOCOL_ERROR, nothing goes upstream, and the connection lives on."""
    with H2Client(capture_sidecar.address, raw_headers=True) as client:
        bad = client.request("/bad", headers=(header,))
        assert bad.reset == h2.errors.ErrorCodes.PROTOCOL_ERROR, bad
        good = client.request("/good")
        assert good.status == 200, good
    assert seen()[":path"] == "/good"


# == 7. lifecycle ============================================================================


def probe_new_connection(address: str) -> str:
    """What a new client gets: ``refused`` (no listener), ``goaway`` (accepted, then told to go
    away or closed before an answer), or ``served``."""
    try:
        client = H2Client(address, timeout=2)
    except OSError:
        return "refused"
    with client:
        try:
            response = client.request("/meshtest.Life/Echo", timeout=2)
        except (OSError, TimeoutError):
            return "goaway"
        if client.goaway is not None or response.reset is not None or response.status is None:
            return "goaway"
        return "served"


def test_sigterm_drains_in_flight_stream(request: pytest.FixtureRequest, life_server: str):
    """SIGTERM while a server stream (15 messages, 100 ms apart) is in flight: the stream
    completes OK, new connections are refused or told to go away, and the process exits 0."""
    with harness.Sidecar(upstream=life_server) as sidecar:
        request.node.stash[SIDECAR_KEY] = sidecar
        with grpc_channel(sidecar.address) as channel:
            call = channel.unary_stream(f"/{LIFE}/Tick")(tick_request(15, 0.1), timeout=TIMEOUT)
            messages = [next(call)]
            sidecar.process.popen.send_signal(signal.SIGTERM)
            outcomes = []
            assert harness.poll_until(
                lambda: outcomes.append(probe_new_connection(sidecar.address)) or outcomes[-1] != "served", 3
            ), outcomes
            messages.extend(call)
            assert call.code() is grpc.StatusCode.OK
        assert [struct.unpack(">I", m)[0] for m in messages] == list(range(15))
        assert sidecar.process.popen.wait(timeout=5) == 0, sidecar.output()


def test_drain_timeout_cuts_long_call(request: pytest.FixtureRequest, life_server: str):
    """``--drain-timeout 0.5`` and a call that would take 8 s: the process exits 0 at about the
    drain deadline, long before the call would have ended, and the call fails."""
    with harness.Sidecar(upstream=life_server, extra_args=["--drain-timeout", "0.5"]) as sidecar:
        request.node.stash[SIDECAR_KEY] = sidecar
        with grpc_channel(sidecar.address) as channel:
            call = channel.unary_stream(f"/{LIFE}/Tick")(tick_request(80, 0.1), timeout=30)
            next(call)
            start = time.monotonic()
            sidecar.process.popen.send_signal(signal.SIGTERM)
            assert sidecar.process.popen.wait(timeout=6) == 0, sidecar.output()
            elapsed = time.monotonic() - start
            with pytest.raises(grpc.RpcError) as raised:
                for _ in call:
                    pass
    assert raised.value.code() is not grpc.StatusCode.OK
    assert 0.4 <= elapsed < 6, f"exited {elapsed:.2f}s after SIGTERM"


def _children(pid: int) -> list[int]:
    return [p for p in harness.process_tree(pid) if p != pid and _ppid(p) == pid]


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def _listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a listening TCP socket on ``port``."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def test_concurrency_two_workers(request: pytest.FixtureRequest, life_server: str):
    """``--concurrency 2`` on a fixed port: two worker processes (children of the sidecar),
    both taking connections (SO_REUSEPORT spreads 16 connections over them: all 16 on one
    has odds of 2 in 65536), every request answered, and SIGTERM ends it all with exit 0."""
    connections = 16
    with harness.Sidecar(upstream=life_server, extra_args=["--concurrency", "2"]) as sidecar:
        request.node.stash[SIDECAR_KEY] = sidecar
        workers = _children(sidecar.pid)
        assert len(workers) == 2, harness.process_tree(sidecar.pid)
        # The sidecar counts as ready once one worker listens; wait for the other too.
        assert harness.poll_until(lambda: all(_listens(pid, sidecar.listen_port) for pid in workers), 10), workers
        with contextlib.ExitStack() as stack:
            # A subchannel pool per channel: one TCP connection each.
            options = ("grpc.use_local_subchannel_pool", 1)
            channels = [stack.enter_context(grpc_channel(sidecar.address, options)) for _ in range(connections)]
            for i, channel in enumerate(channels):
                assert channel.unary_unary(f"/{LIFE}/Echo")(b"%d" % i, timeout=TIMEOUT) == b"%d" % i
            per_worker = {
                pid: sum(1 for local, _ in harness.established_tcp([pid]) if local == sidecar.listen_port)
                for pid in workers
            }
        assert sum(per_worker.values()) == connections, per_worker
        assert all(per_worker.values()), per_worker
        assert sorted(_children(sidecar.pid)) == sorted(workers)
    assert sidecar.exit_code == 0


# == 8. the command line ====================================================================


def _cli_args(tmp_path: Path, case: str) -> list[str]:
    address = f"{HOST}:{harness.free_port()}"
    if case == "concurrency-0":
        return ["--listen", address, "--upstream", address, "--concurrency", "0"]
    if case == "listen-nope":
        return ["--listen", "nope", "--upstream", address]
    if case == "unknown-flag":
        return ["--listen", address, "--upstream", address, "--frobnicate"]
    if case == "missing-config":
        return ["--config", str(tmp_path / "missing.yaml")]
    if case == "invalid-regex":
        routes = [to("web", {"regex": "/items/(["})]
    else:  # unknown-cluster
        routes = [to("nonexistent")]
    port = harness.free_port()
    return ["--config", str(write_config(tmp_path, port, [vhost("all", ["*"], *routes)], [cluster("web", address)]))]


@pytest.mark.parametrize(
    ("case", "named"),
    [
        ("concurrency-0", "--concurrency"),
        ("listen-nope", "'nope'"),
        ("unknown-flag", "--frobnicate"),
        ("missing-config", "missing.yaml"),
        ("invalid-regex", "regex"),
        ("unknown-cluster", "'nonexistent'"),
    ],
)
def test_cli_refuses_bad_input(tmp_path: Path, case: str, named: str):
    """Bad flags or config: exit code 2 and one line on stderr naming the problem, no traceback."""
    args = _cli_args(tmp_path, case)
    result = subprocess.run(
        [sys.executable, "-m", "meshproxy", "run", *args], capture_output=True, text=True, timeout=30
    )
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result
    assert len(lines) == 1 and lines[0].startswith("meshproxy"), result.stderr
    assert "Traceback" not in result.stderr
    assert named in lines[0], result.stderr


# == 9. upstream pools ======================================================================


def test_idle_upstream_connections_close(tmp_path: Path, request: pytest.FixtureRequest, capture):
    """``idle_timeout: 1s``: once requests are done, the upstream connections go within a few
    seconds."""
    with configured_sidecar(
        tmp_path,
        [vhost("all", ["*"], to("capture"))],
        [cluster("capture", capture.address, idle_timeout="1s")],
        request=request,
    ) as sidecar:
        with H2Client(sidecar.address) as client:
            ids = [client.send("/idle") for _ in range(20)]
            assert [r.status for r in client.wait(ids)] == [200] * 20
            assert connections_to(sidecar, capture.address) >= 1
            assert harness.poll_until(lambda: connections_to(sidecar, capture.address) == 0, 8, 0.1), (
                sidecar.connections()
            )


def test_upstream_goaway_sequential(tmp_path: Path, request: pytest.FixtureRequest):
    """An upstream that sends GOAWAY with its 5th response on each connection (last stream id:
    that request's) and closes once idle: every one of 30 requests in a row still succeeds, on
    the new connections the proxy opens."""
    with ScriptedH2Server("g", goaway_after=5) as upstream:
        with configured_sidecar(
            tmp_path, [vhost("all", ["*"], to("g"))], [cluster("g", upstream.address)], request=request
        ) as sidecar:
            with H2Client(sidecar.address) as client:
                responses = [client.request(f"/seq/{i}") for i in range(30)]
        assert [(r.status, r.headers.get("x-served-by"), r.trailers.get("grpc-status")) for r in responses] == [
            (200, "g", "0")
        ] * 30
        assert upstream.served == 30
        assert upstream.goaways >= 5
        assert upstream.connections >= 6


def test_upstream_goaway_refusing_next_request(tmp_path: Path, request: pytest.FixtureRequest):
    """An upstream that, after 5 requests on a connection, answers the 6th with GOAWAY whose last
    stream id is the 5th's (so the 6th was not processed) and closes once idle: the proxy sends
    the unprocessed request again on a new connection, and all 30 requests in a row succeed.
    (This is also what happens, by chance, when a GOAWAY after the last response reaches the
    proxy a moment after the client's next request.)"""
    with ScriptedH2Server("g", goaway_after=5, goaway="next-stream") as upstream:
        with configured_sidecar(
            tmp_path, [vhost("all", ["*"], to("g"))], [cluster("g", upstream.address)], request=request
        ) as sidecar:
            with H2Client(sidecar.address) as client:
                responses = [client.request(f"/seq/{i}") for i in range(30)]
        outcomes = Counter((r.status, r.headers.get("x-meshproxy-response-flags")) for r in responses)
        assert outcomes == {(200, None): 30}, f"{outcomes}; the upstream left {upstream.ignored} unprocessed"
        assert upstream.served == 30


def test_upstream_graceful_goaway_concurrent(tmp_path: Path, request: pytest.FixtureRequest):
    """The same with 8 requests at a time and the graceful two-step GOAWAY (2^31-1 and a PING,
    then the real last stream id): none of 80 requests fails."""
    with ScriptedH2Server("g", goaway_after=7, goaway="graceful") as upstream:
        with configured_sidecar(
            tmp_path, [vhost("all", ["*"], to("g"))], [cluster("g", upstream.address)], request=request
        ) as sidecar:
            statuses: Counter = Counter()
            with H2Client(sidecar.address) as client:
                for batch in range(10):
                    ids = [client.send(f"/c/{batch}/{i}") for i in range(8)]
                    for r in client.wait(ids):
                        statuses[(r.status, r.reset, r.trailers.get("grpc-status"))] += 1
        assert statuses == {(200, None, "0"): 80}
        assert upstream.goaways >= 2
        assert upstream.connections >= 2
        assert upstream.ignored == 0


def test_upstream_max_concurrent_streams(tmp_path: Path, request: pytest.FixtureRequest):
    """An upstream allowing 2 streams per connection, 20 requests at once that each take 0.3 s:
    all succeed, and no connection ever carried more than 2 streams at once."""
    with ScriptedH2Server("m", delay=0.3, max_concurrent_streams=2) as upstream:
        with configured_sidecar(
            tmp_path, [vhost("all", ["*"], to("m"))], [cluster("m", upstream.address)], request=request
        ) as sidecar:
            with H2Client(sidecar.address) as client:
                # In one write: the proxy gets all 20 at once.
                ids = [client.send(f"/mcs/{i}", flush=i == 19) for i in range(20)]
                responses = client.wait(ids, timeout=30)
        outcomes = Counter((r.status, r.reset, r.headers.get("x-meshproxy-response-flags")) for r in responses)
        seen_upstream = f"max streams open at once {upstream.max_open}, refused {upstream.refused}"
        assert outcomes == {(200, None, None): 20}, f"{outcomes}; the upstream saw: {seen_upstream}"
        assert upstream.max_open <= 2, seen_upstream
        assert upstream.refused == 0, seen_upstream


def test_cluster_max_concurrent_streams_per_connection(tmp_path: Path, request: pytest.FixtureRequest):
    """The pool's own limit (``max_concurrent_streams_per_connection: 2``) with 20 requests at
    once that each take 0.3 s, to an upstream that would take them all on one connection: all
    succeed, and no connection carries more than 2 streams at once."""
    with ScriptedH2Server("p", delay=0.3) as upstream:
        with configured_sidecar(
            tmp_path,
            [vhost("all", ["*"], to("p"))],
            [cluster("p", upstream.address, max_concurrent_streams_per_connection=2)],
            request=request,
        ) as sidecar:
            with H2Client(sidecar.address) as client:
                ids = [client.send(f"/pool/{i}", flush=i == 19) for i in range(20)]
                responses = client.wait(ids, timeout=30)
        outcomes = Counter((r.status, r.reset, r.headers.get("x-meshproxy-response-flags")) for r in responses)
        assert outcomes == {(200, None, None): 20}, outcomes
        assert upstream.served == 20
        assert upstream.max_open <= 2, upstream.max_open
        assert upstream.connections >= 2


# == 10. config reload =====================================================================


def _who(address: str) -> str:
    response = h2_request(address, "/who", authority="reviews")
    assert response.status == 200, response
    return bytes(response.body).decode()


def test_sighup_swaps_the_config_and_refuses_a_bad_one(
    tmp_path: Path, request: pytest.FixtureRequest, versioned_nghttpds: dict
):
    """SIGHUP re-reads --config: a valid file takes effect for new requests; an invalid one is
    refused (one log line with the reason) and the config in force keeps serving."""
    v1, v2 = versioned_nghttpds["v1"], versioned_nghttpds["v2"]
    with configured_sidecar(
        tmp_path, [vhost("all", ["*"], to("reviews"))], [cluster("reviews", v1)], request=request
    ) as sidecar:
        assert _who(sidecar.address) == "v1"
        port = sidecar.listen_port
        path = write_config(tmp_path, port, [vhost("all", ["*"], to("reviews"))], [cluster("reviews", v2)])
        os.kill(sidecar.pid, signal.SIGHUP)
        assert harness.poll_until(lambda: _who(sidecar.address) == "v2", timeout=10), "the new config in force"
        good = path.read_text()
        path.write_text(good.replace('"reviews"', '"nowhere"', 1))  # a route to an unknown cluster
        os.kill(sidecar.pid, signal.SIGHUP)
        assert harness.poll_until(lambda: "config reload refused" in sidecar.output(), timeout=10), sidecar.output()
        assert _who(sidecar.address) == "v2", "the last good config stays in force"


# == 11. ring hash on a header ============================================================


def test_ring_hash_keeps_a_user_on_one_endpoint(
    tmp_path: Path, request: pytest.FixtureRequest, versioned_nghttpds: dict
):
    """A RING_HASH cluster keyed on x-user: every request of one user lands on the same endpoint,
    and the users spread over both."""
    ring = {
        "name": "reviews",
        "lb_policy": "RING_HASH",
        "hash_header": "x-user",
        "endpoints": [{"address": versioned_nghttpds["v1"]}, {"address": versioned_nghttpds["v2"]}],
    }
    users = [f"user-{i}" for i in range(40)]
    seen: dict[str, set[str]] = {u: set() for u in users}
    with configured_sidecar(tmp_path, [vhost("all", ["*"], to("reviews"))], [ring], request=request) as sidecar:
        with H2Client(sidecar.address) as client:
            for _ in range(5):
                ids = {client.send("/who", authority="reviews", headers=[("x-user", u)]): u for u in users}
                for sid, response in zip(ids, client.wait(list(ids), timeout=30), strict=True):
                    assert response.status == 200, response
                    seen[ids[sid]].add(bytes(response.body).decode())
    assert all(len(where) == 1 for where in seen.values()), seen
    assert {next(iter(where)) for where in seen.values()} == {"v1", "v2"}
