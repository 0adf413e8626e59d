"""protoserve client: generated stubs of the v1 API and a small typed client (sync and async). Needs only grpcio and protobuf."""
