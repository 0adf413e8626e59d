"""Generated protobuf and gRPC code of the protoserve v1 API (scripts/gen_proto.py)."""
