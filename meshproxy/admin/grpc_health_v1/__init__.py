"""Generated code for gRPC's health proto, vendored in proto/grpc_health/v1/ (tools/gen_proto.py writes it)."""
