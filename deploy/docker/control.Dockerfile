# syntax=docker/dockerfile:1
# meshproxy/control:<version>: the control plane and sidecar injector (`meshproxy-control serve`).
# Build from the repository root: docker build -f deploy/docker/control.Dockerfile -t meshproxy/control:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# A virtualenv copied whole into the runtime stage: the compiler stays behind.
RUN python -m venv /opt/meshproxy \
 && /opt/meshproxy/bin/pip install --no-cache-dir ".[control]"

FROM ${PYTHON_IMAGE} AS runtime
COPY --from=build /opt/meshproxy /opt/meshproxy
ENV PATH=/opt/meshproxy/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# Numeric, so that the kubelet can check runAsNonRoot; the Deployment runs it as 10001 too.
USER 10001:10001
EXPOSE 15010 15017
ENTRYPOINT ["meshproxy-control"]
