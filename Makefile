# make test: set everything up, then lint and run the whole suite (the codec
# and balancer suites a second time on the pure-Python twins). make bench: run perf/.
# Both create .venv and build the Cython extensions on first use.

VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.meshproxy-installed
BUILD_INPUTS := pyproject.toml setup.py $(wildcard meshproxy/_fast/*.pyx meshproxy/_fast/*.pxd)

.PHONY: test lint bench install clean

install: $(STAMP)

$(STAMP): $(BUILD_INPUTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q
	MESHPROXY_NO_EXTENSIONS=1 $(PY) -m pytest -q -m "codec or lb" tests/codec tests/lb

bench: $(STAMP)
	$(PY) perf/bench_codec.py
	$(PY) perf/bench_lb.py

clean:
	rm -rf build $(VENV) *.egg-info meshproxy/_fast/*.c meshproxy/_fast/*.so meshproxy/_fast/*.html
