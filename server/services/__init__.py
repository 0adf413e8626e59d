"""The gRPC servicers: generation (Generate, Chat, Tokenize), transcription and models.

Each servicer converts protobuf at the edge, asks the `ModelRegistry` for the model, and reports
every failure through `protoserve.server.errors`.
"""
