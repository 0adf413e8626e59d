"""The MCP server of the agent tests: a calculator (`add`, `multiply`) and `list_files` under a root folder.

Run over stdio as a subprocess: `python mcp_test_server.py ROOT [--name NAME] [--log FILE]`. Each
tool call appends one JSON line to the log file, so a test can see which tools really ran (and on
which server); the server's pid is logged at start. `build_server` is imported by the tests that
serve it over streamable HTTP in-process.

mcp 2.x renamed `FastMCP` to `MCPServer` (`mcp.server.mcpserver`); either is used, whichever exists.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

try:
    from mcp.server.mcpserver import MCPServer as ServerClass
    from mcp.server.mcpserver.exceptions import ToolError
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP as ServerClass
    from mcp.server.fastmcp.exceptions import ToolError


def build_server(root: Path, *, name: str = "calculator", log: Path | None = None) -> Any:
    """A server whose `list_files` sees only `root` and whose calls are logged to `log`."""
    server = ServerClass(name, log_level="WARNING")
    root = root.resolve()

    def record(tool: str, **arguments: Any) -> None:
        if log is not None:
            with log.open("a") as file:
                file.write(json.dumps({"server": name, "tool": tool, "arguments": arguments}) + "\n")

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        record("add", a=a, b=b)
        return a + b

    @server.tool()
    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        record("multiply", a=a, b=b)
        return a * b

    @server.tool()
    def list_files(directory: str) -> str:
        """List the file names in a directory (relative to the server's root), one per line."""
        record("list_files", directory=directory)
        folder = (root / directory).resolve()
        if folder != root and root not in folder.parents:
            raise ToolError(f"{directory!r} is outside the served folder")
        if not folder.is_dir():
            raise ToolError(f"{directory!r} is not a directory")
        return "\n".join(sorted(entry.name for entry in folder.iterdir()))

    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--name", default="calculator")
    parser.add_argument("--log", type=Path)
    args = parser.parse_args()
    if args.log is not None:
        with args.log.open("a") as file:
            file.write(json.dumps({"server": args.name, "pid": os.getpid()}) + "\n")
    build_server(args.root, name=args.name, log=args.log).run("stdio")


if __name__ == "__main__":
    main()
