"""Pure conversions between OpenAI JSON and protoserve protobuf messages (no I/O, no aiohttp)."""
