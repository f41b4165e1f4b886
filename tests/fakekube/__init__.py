"""An in-process fake Kubernetes API server for tests: list/watch with resourceVersion, selectors, 410 Gone."""

from tests.fakekube.server import FakeKube, ResourceType, parse_label_selector

__all__ = ("FakeKube", "ResourceType", "parse_label_selector")
