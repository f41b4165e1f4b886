"""Generated code for gRPC's reflection proto, vendored in proto/grpc_reflection/v1/ (tools/gen_proto.py)."""
