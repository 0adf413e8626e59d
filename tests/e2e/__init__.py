"""End-to-end tests: a real server and translator in subprocesses, driven by official OpenAI-side clients."""
