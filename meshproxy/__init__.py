"""meshproxy: a service mesh for Kubernetes whose sidecar speaks HTTP/2 and gRPC natively.

This package is the sidecar (data plane). Its protocol core lives in
:mod:`meshproxy.codec` (frames and HPACK), compiled from ``meshproxy/_fast``
with pure-Python twins beside it.
"""

__version__ = "0.1.0"
