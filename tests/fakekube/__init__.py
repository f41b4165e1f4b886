"""An in-process fake Kubernetes API server for tests: list/watch with resourceVersion, selectors, 410 Gone."""

from tests.fakekube.server import ApiError, FakeKube, Request, ResourceType, kubeconfig, parse_label_selector

__all__ = ("ApiError", "FakeKube", "Request", "ResourceType", "kubeconfig", "parse_label_selector")
