"""`protoserve agent`: a tool-using agent that runs MCP tools against a protoserve model.

The parts, one file each:
- `turns.py`: what one assistant turn is (text and whole tool calls) and how streamed tool-call
  pieces are put back together.
- `model_backends.py`: where a turn comes from: the gRPC `Chat` stream (`GrpcModelBackend`) or
  the OpenAI-compatible REST API of the translator (`OpenAIModelBackend`, in `openai_backend.py`).
- `mcp_toolbox.py`: connections to MCP servers (stdio and streamable HTTP), their tools under
  unique names, and calls to them; `mcp_results.py` turns a tool's result into text.
- `loop.py`: the tool loop (`AgentLoop`): send the conversation and the tools, run the calls the
  model makes (concurrently), feed the results back as `tool` messages, until the model answers.
- `cli.py`: the `protoserve agent` subcommand.

Importing this package imports neither `mcp` nor `aiohttp`; the modules that need them import them
when they are used, so `protoserve.client` stays usable with only grpcio and protobuf.
"""

from __future__ import annotations

from protoserve.client.agent.loop import AgentAnswer, AgentLoop, AgentReporter, Toolbox
from protoserve.client.agent.model_backends import GrpcModelBackend, ModelBackend, ModelCallFailed
from protoserve.client.agent.turns import AssistantTurn, ToolCallRequest, ToolOutcome

__all__ = [
    "AgentAnswer",
    "AgentLoop",
    "AgentReporter",
    "AssistantTurn",
    "GrpcModelBackend",
    "ModelBackend",
    "ModelCallFailed",
    "ToolCallRequest",
    "ToolOutcome",
    "Toolbox",
]
