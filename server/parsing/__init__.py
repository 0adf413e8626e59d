"""Parsers of model output: tool calls (hermes, llama3, mistral formats) and reasoning (<think>)."""
