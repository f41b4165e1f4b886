"""The Kubernetes versions every injected object must validate against, and the check itself."""

from __future__ import annotations

import kubernetes_validate
from kubernetes_validate import utils
from packaging.version import Version

#: The oldest version we support (native sidecars are on by default from 1.29) and the newest the validator
#: bundles schemas for.
OLDEST = "1.29.0"
NEWEST = utils.latest_version()
VERSIONS = (OLDEST, NEWEST)
assert Version(NEWEST) >= Version(OLDEST)


def validate(obj: dict) -> None:
    """Strict validation for both versions; raises kubernetes_validate.ValidationError with the version."""
    for version in VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)
