"""protoserve server: gRPC services, model loading and the engine. The only part that imports torch."""
