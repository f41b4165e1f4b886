# make test: set everything up, then lint and run the whole suite (the codec,
# balancer, resilience, gRPC-proxy, telemetry, admin and mTLS suites a second time on
# the pure-Python twins).
# make bench: run perf/. make demo: the local mesh of examples/demo (control plane,
# two versions of a gRPC service, a client and its sidecar), with a live traffic
# split changed from 80/20 to 50/50 (DEMO_FOREVER=1: until Ctrl-C; DEMO_SECONDS=N:
# seconds per split). All three install the Debian packages the tests use, create
# .venv and build the Cython extensions on first use.

VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.meshproxy-installed
BUILD_INPUTS := pyproject.toml setup.py $(wildcard meshproxy/_fast/*.pyx meshproxy/_fast/*.pxd)

# Real peers: h2load/nghttpd/nghttpx, wrk, the gRPC interop protos, iptables
# (the interception tests program it in network namespaces), and valgrind
# (perf/bench_retry_instructions.py counts instructions with callgrind).
DEBIAN_PACKAGES := nghttp2-client nghttp2-server nghttp2-proxy wrk grpc-proto iptables valgrind

.PHONY: test lint bench demo install clean debs

install: $(STAMP) debs

debs:
	@if ! command -v h2load >/dev/null || ! command -v nghttpd >/dev/null || ! command -v nghttpx >/dev/null \
	    || ! command -v wrk >/dev/null || ! test -f /usr/share/grpc-proto/grpc/testing/test.proto \
	    || ! command -v iptables-restore >/dev/null || ! command -v callgrind_control >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBIAN_PACKAGES); \
	fi

$(STAMP): $(BUILD_INPUTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint debs
	$(PY) -m pytest -q --durations=15
	MESHPROXY_NO_EXTENSIONS=1 $(PY) -m pytest -q -m "codec or lb or resilience" tests/codec tests/lb tests/resilience
	MESHPROXY_NO_EXTENSIONS=1 $(PY) -m pytest -q tests/integration/test_interop.py tests/integration/test_grpc_proxy.py \
	    tests/integration/test_mesh.py tests/integration/test_resilience.py tests/integration/test_health_check.py \
	    tests/integration/test_metrics.py tests/integration/test_mtls.py tests/telemetry tests/admin

bench: $(STAMP) debs
	$(PY) perf/bench_codec.py
	$(PY) perf/bench_lb.py
	$(PY) perf/bench_resilience.py
	$(PY) perf/bench_proxy.py
	$(PY) perf/bench_retry.py
	$(PY) perf/bench_retry_instructions.py
	$(PY) perf/bench_telemetry.py
	$(PY) perf/bench_mtls.py
	$(PY) perf/bench_push.py

demo: $(STAMP) debs
	$(PY) examples/demo/run.py

clean:
	rm -rf build $(VENV) *.egg-info meshproxy/_fast/*.c meshproxy/_fast/*.so meshproxy/_fast/*.html
