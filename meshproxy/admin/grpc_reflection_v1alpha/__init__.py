"""Generated code for gRPC's reflection proto, vendored in proto/grpc_reflection/v1alpha/ (tools/gen_proto.py)."""
