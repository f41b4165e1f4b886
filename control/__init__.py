"""meshproxy's control plane: reads the mesh's resources, turns them into sidecar configs, pushes them.

    sources/ (a directory of YAML, or Kubernetes list+watch)
        -> store.Store (raw objects, by source)
        -> model.parse (typed, validated resources; the invalid ones set aside with their reasons)
        -> translate.Translator (one meshproxy.v1.SidecarConfig per sidecar scope)
        -> server.ControlServer (the meshproxy.v1.MeshControl gRPC service: debounced, versioned push; ACK/NACK)

``meshproxy-control serve`` (control.cli) wires them together.
"""
