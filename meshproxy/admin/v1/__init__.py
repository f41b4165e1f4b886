"""Generated code for the admin service proto, proto/meshproxy/admin/v1/ (tools/gen_proto.py writes it)."""
