"""The OpenAPI 3.1 document of the routes the translator serves (GET /openapi.json).

Hand-written and kept true to the handlers: tests check that its paths and methods are exactly
`app.ROUTES`, and throw bodies generated from these schemas at the routes. Schemas list the fields
the translator reads; other fields are accepted and ignored (additionalProperties stays open).
"""

from __future__ import annotations

from typing import Any

_NUMBER = {"type": "number"}
_INTEGER = {"type": "integer"}
_BOOLEAN = {"type": "boolean"}
_STRING = {"type": "string"}
_OBJECT = {"type": "object"}
_STOP = {"oneOf": [_STRING, {"type": "array", "items": _STRING, "maxItems": 16}]}

_SAMPLING_PROPERTIES: dict[str, Any] = {
    "model": _STRING,
    "temperature": _NUMBER,
    "top_p": _NUMBER,
    "top_k": _INTEGER,
    "min_p": _NUMBER,
    "repetition_penalty": _NUMBER,
    "presence_penalty": _NUMBER,
    "frequency_penalty": _NUMBER,
    "seed": _INTEGER,
    "n": _INTEGER,
    "stop": _STOP,
    "stop_token_ids": {"type": "array", "items": _INTEGER},
    "min_tokens": _INTEGER,
    "ignore_eos": _BOOLEAN,
    "logit_bias": {"type": "object", "additionalProperties": _NUMBER},
    "skip_special_tokens": _BOOLEAN,
    "priority": _INTEGER,
    "user": _STRING,
    "stream": _BOOLEAN,
    "stream_options": {"type": "object", "properties": {"include_usage": _BOOLEAN}},
}

_RESPONSE_FORMAT = {
    "type": "object",
    "required": ["type"],
    "properties": {
        "type": {"enum": ["text", "json_object", "json_schema"]},
        "json_schema": {
            "type": "object",
            "required": ["schema"],
            "properties": {"name": _STRING, "schema": _OBJECT, "strict": _BOOLEAN},
        },
    },
}

_CONTENT_PART = {
    "type": "object",
    "required": ["type"],
    "properties": {
        "type": {"enum": ["text", "image_url", "input_text", "input_image", "output_text", "refusal"]},
        "text": _STRING,
        "image_url": {
            "oneOf": [
                _STRING,
                {
                    "type": "object",
                    "required": ["url"],
                    "properties": {"url": _STRING, "detail": {"enum": ["auto", "low", "high"]}},
                },
            ]
        },
    },
}
_CONTENT = {"oneOf": [_STRING, {"type": "null"}, {"type": "array", "items": _CONTENT_PART}]}

_FUNCTION: dict[str, Any] = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": _STRING, "description": _STRING, "parameters": _OBJECT, "strict": _BOOLEAN},
}
_TOOL_CHOICE = {"oneOf": [{"enum": ["auto", "none", "required"]}, _OBJECT]}

CHAT_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        **_SAMPLING_PROPERTIES,
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role"],
                "properties": {
                    "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
                    "content": _CONTENT,
                    "name": _STRING,
                    "tool_call_id": _STRING,
                    "reasoning_content": _STRING,
                    "tool_calls": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["function"],
                            "properties": {
                                "id": _STRING,
                                "type": {"const": "function"},
                                "function": {
                                    "type": "object",
                                    "required": ["name"],
                                    "properties": {"name": _STRING, "arguments": _STRING},
                                },
                            },
                        },
                    },
                },
            },
        },
        "max_tokens": _INTEGER,
        "max_completion_tokens": _INTEGER,
        "logprobs": _BOOLEAN,
        "top_logprobs": _INTEGER,
        "response_format": _RESPONSE_FORMAT,
        "tools": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["function"],
                "properties": {"type": {"const": "function"}, "function": _FUNCTION},
            },
        },
        "tool_choice": _TOOL_CHOICE,
        "parallel_tool_calls": _BOOLEAN,
        "chat_template_kwargs": _OBJECT,
    },
}

COMPLETION_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        **_SAMPLING_PROPERTIES,
        "prompt": {
            "oneOf": [_STRING, {"type": "array", "items": _INTEGER}, {"type": "array", "items": _STRING, "maxItems": 1}]
        },
        "max_tokens": _INTEGER,
        "logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        "echo": {"const": False},
        "suffix": _STRING,
        "best_of": _INTEGER,
        "response_format": _RESPONSE_FORMAT,
    },
}

RESPONSES_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["input"],
    "properties": {
        **_SAMPLING_PROPERTIES,
        "input": {
            "oneOf": [
                _STRING,
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "type": {"enum": ["message", "function_call", "function_call_output", "reasoning"]},
                            "role": {"enum": ["system", "developer", "user", "assistant"]},
                            "content": _CONTENT,
                            "call_id": _STRING,
                            "name": _STRING,
                            "arguments": _STRING,
                            "output": _STRING,
                        },
                    },
                },
            ]
        },
        "instructions": _STRING,
        "max_output_tokens": _INTEGER,
        "tools": {
            "type": "array",
            "items": {**_FUNCTION, "properties": {**_FUNCTION["properties"], "type": {"const": "function"}}},
        },
        "tool_choice": _TOOL_CHOICE,
        "parallel_tool_calls": _BOOLEAN,
        "text": {"type": "object", "properties": {"format": _OBJECT}},
    },
}

TRANSCRIPTION_FORM: dict[str, Any] = {
    "type": "object",
    "required": ["file"],
    "properties": {
        "file": {"type": "string", "contentMediaType": "application/octet-stream"},
        "model": _STRING,
        "language": _STRING,
        "prompt": _STRING,
        "response_format": {"enum": ["json", "text", "verbose_json", "srt", "vtt"]},
        "temperature": _NUMBER,
        "stream": _BOOLEAN,
    },
}

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": _STRING,
                "type": _STRING,
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def _errors() -> dict[str, Any]:
    return {
        status: {
            "description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for status, description in (
            ("400", "bad request"),
            ("401", "missing or invalid API key"),
            ("404", "unknown model or route"),
            ("413", "body too large"),
            ("415", "wrong content type"),
            ("429", "overloaded; see Retry-After"),
            ("500", "server error"),
            ("503", "upstream unavailable"),
            ("504", "deadline exceeded"),
        )
    }


def _json_post(summary: str, schema: str, streams: bool) -> dict[str, Any]:
    content = {"application/json": {"schema": _OBJECT}}
    if streams:
        content["text/event-stream"] = {"schema": _STRING}
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
            },
            "responses": {
                "200": {"description": "the result, or SSE events when stream is true", "content": content},
                **_errors(),
            },
        }
    }


def _form_post(summary: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {"multipart/form-data": {"schema": {"$ref": "#/components/schemas/TranscriptionForm"}}},
            },
            "responses": {"200": {"description": "the transcript in the asked format, or SSE events"}, **_errors()},
        }
    }


def _get(summary: str, content_type: str = "application/json") -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "responses": {"200": {"description": summary, "content": {content_type: {}}}, **_errors()},
        }
    }


OPENAPI_DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "protoserve OpenAI-compatible translator", "version": "1"},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "ChatCompletionRequest": CHAT_REQUEST,
            "CompletionRequest": COMPLETION_REQUEST,
            "ResponsesRequest": RESPONSES_REQUEST,
            "TranscriptionForm": TRANSCRIPTION_FORM,
            "Error": _ERROR,
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/v1/chat/completions": _json_post("Chat completion", "ChatCompletionRequest", streams=True),
        "/v1/completions": _json_post("Text completion (legacy)", "CompletionRequest", streams=True),
        "/v1/responses": _json_post("Responses API", "ResponsesRequest", streams=True),
        "/v1/audio/transcriptions": _form_post("Transcribe audio"),
        "/v1/audio/translations": _form_post("Translate audio into English text"),
        "/v1/models": _get("List models"),
        "/v1/models/{model_id}": {
            **_get("Describe one model (the id may contain '/')"),
            "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": _STRING}],
        },
        "/health": {
            "get": {
                "summary": "200 while the upstream reports SERVING, else 503",
                "security": [],
                "responses": {"200": {"description": "serving"}, "503": {"description": "not serving"}},
            }
        },
        "/metrics": _get("Prometheus metrics", "text/plain"),
        "/openapi.json": _get("This document"),
    },
}
