"""Generated code for the ``meshproxy.v1`` config protos in proto/meshproxy/v1/ (tools/gen_proto.py writes it)."""
