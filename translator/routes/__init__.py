"""aiohttp handlers, one file per OpenAI resource."""
