"""protoserve translator: an aiohttp OpenAI-compatible REST layer over the gRPC API. Never imports torch."""
