# syntax=docker/dockerfile:1
# meshproxy/proxy:<version>: the sidecar (`meshproxy run`) and its init step (`meshproxy iptables`).
# Build from the repository root: docker build -f deploy/docker/proxy.Dockerfile -t meshproxy/proxy:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# The Cython extensions (meshproxy/_fast) need a compiler; the runtime image does not get one.
FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# meshproxy's wheel (extensions compiled) and its dependencies' wheels, so the runtime stage
# installs offline.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
# iptables for the meshproxy-init container (Debian's default backend, nftables; iptables-legacy
# comes in the same package).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels meshproxy
# The root filesystem is mounted read-only: no .pyc written at run time.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# uid/gid 1337: the one iptables exempts from redirection (the injector runs meshproxy-init as root).
USER 1337:1337
ENTRYPOINT ["meshproxy"]
