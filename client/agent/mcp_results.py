"""An MCP tool's result as the text of a `tool` message.

Text content is joined with newlines; other content (images, audio, resources) is described in
one bracketed line, since the model reads text only. With no content, the structured result is
given as JSON. Results longer than `max_chars` are cut, saying how much was left out. Field names
are read in both spellings of the `mcp` package (`is_error` in 2.x, `isError` in 1.x).
"""

from __future__ import annotations

import json
from typing import Any

DEFAULT_MAX_TOOL_OUTPUT_CHARS = 20_000


def field_of(item: Any, snake_name: str, camel_name: str) -> Any:
    """A field of an mcp type, whichever spelling the installed version uses."""
    value = getattr(item, snake_name, None)
    return getattr(item, camel_name, None) if value is None else value


def _describe_content(item: Any) -> str:
    kind = getattr(item, "type", "")
    if kind == "text":
        return str(getattr(item, "text", ""))
    if kind in ("image", "audio"):
        mime_type = field_of(item, "mime_type", "mimeType") or "unknown type"
        size = len(getattr(item, "data", "") or "")
        return f"[{kind} content, {mime_type}, {size} base64 characters, not shown]"
    if kind == "resource_link":
        return f"[resource {getattr(item, 'uri', '')}]"
    if kind == "resource":
        resource = getattr(item, "resource", None)
        text = getattr(resource, "text", None)
        return str(text) if text is not None else f"[resource {getattr(resource, 'uri', '')}, binary, not shown]"
    return f"[{kind or 'unknown'} content, not shown]"


def truncate(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    return f"{text[:max_chars]}\n[... {len(text) - max_chars} more characters cut]"


def result_text(result: Any, max_chars: int = DEFAULT_MAX_TOOL_OUTPUT_CHARS) -> tuple[str, bool]:
    """(text, is_error) of a `CallToolResult`."""
    parts = [_describe_content(item) for item in getattr(result, "content", None) or ()]
    text = "\n".join(part for part in parts if part)
    if not text:
        structured = field_of(result, "structured_content", "structuredContent")
        text = json.dumps(structured, ensure_ascii=False) if structured is not None else "(the tool returned nothing)"
    return truncate(text, max_chars), bool(field_of(result, "is_error", "isError"))
